"""``real-router``: the ``real`` MoE with a genuine softmax router, fitted by layer-wise distillation.

``real`` (lm_eval_bh.real) stores its router logits at a scale of 1e-5, so its softmax is uniform and every
expert is multiplied by E: exact with all experts, but nothing that reads router probabilities
(``pvalue=softmax``, ``selection=topp``, entropy or skipping rules) can be studied on it.  ``real-router``
is the same checkpoint (attention, embeddings, the same 16 neuron groups as experts and the same shared expert,
all with the same gate and up projections, Qwen2-MoE with ``norm_topk_prob=False``) with two things changed per
layer, both fitted against the dense model's MLP output on real.py's calibration chunks:

1. the router logits: real's ridge router (its direction: which experts' outputs are large) at a fitted
   temperature ``tau``, the smallest that makes the softmax clearly non-uniform (median top-1 probability
   ``TARGET_TOP1`` >= 2/E on the calibration tokens);
2. the down projections (the 16 routed experts' and the shared expert's), refitted by ridge regression so that
   the stock combination, shared expert + sum over the top-k of p_e * expert_e(x), approximates the dense MLP's
   output, jointly for k in ``FIT_KS`` (the combination is linear in the down projections: one solve per layer),
   shrunk towards real's experts with one fitted output scale ``s_e`` each (``RIDGE``), on calibration chunks
   spread over the whole text.  The fit is sequential (GPTQ-style,
   ``refit_sequentially``): layer l is fitted on the inputs the routed model itself produces at each k, layers
   before it already converted, and its target also steers half (``CORRECTION``) of the accumulated gap
   back towards the dense model's residual stream.  The dense MLP is ``real``'s own all-experts sum, so the
   build needs only ``real``.

Why this family.  With ``norm_topk_prob=False`` an expert's weight p_e does not depend on k, so top-k is a
truncation of the all-experts sum and one set of experts serves every k; renormalising over the top k
(``norm_topk_prob=True``) changes every weight with k (about E/k), which no fixed expert fits (its
layer-wise errors are in the asset's ``layer_errors``).  The sigmoid-scored families (DeepSeek-V3, GLM-4-MoE)
size their shared expert as a multiple of one routed expert (80 neurons), which ``real``'s 256-neuron
shared expert is not, and DeepSeek-V3's attention is MLA: the two models would differ outside the experts.

Limit (measured, see docs/real-router.md): the dense MLP is the *unweighted* sum of the experts, so any
token-dependent, non-uniform weighting moves the all-experts output away from it; the refit trades the
three k's against each other, and the experts' gate and up projections stay real's.

The router parameters (30 temperatures, 30 x 16 scales) ship in ``assets/real_router.json``, written by
``scripts/fit_real_router.py``; building applies them to the cached ``real`` checkpoint and refits the down
projections on ``REFIT_TOKENS`` calibration tokens (float64 solves: deterministic on a machine).
``ensure_real_router()`` caches the result like ``real``; ``python -m lm_eval_bh.real_router`` prints its
folder.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from . import real
from .errors import UsageError

BUILD_VERSION = "router-v5"  # part of the cache key: bump when the construction changes
ROUTER_VERSION = "router-v2"  # the fit of the shipped router parameters (assets/real_router.json)
TARGET_TOP1 = 0.14            # median top-1 softmax probability per layer (>= 2/E = 0.125 with a margin)
FIT_KS = (4, 8, 16)           # the top-k values the scales and down projections are fitted for, equally weighted
REFIT_TOKENS = 18432          # calibration tokens of the down-projection refit (72 chunks spread over the text)
CORRECTION = 0.5              # share of the accumulated gap to the dense stream each layer's refit steers back
BATCH = 16                    # calibration chunks per forward of the refit
RIDGE = 3e-3                  # its penalty towards real's scaled experts, relative to the Gram matrix's mean diagonal
ASSET = Path(__file__).with_name("assets") / "real_router.json"


# ----------------------------------------------------------------------------- the fit (one layer)
def expert_activations(block, x: torch.Tensor) -> torch.Tensor:
    """(tokens, E, neurons): each routed expert's activations silu(g x) * (u x), the input of its down projection."""
    g, u = torch.einsum("nh,eih->nei", x, block.experts.gate_up_proj).chunk(2, dim=-1)
    return torch.nn.functional.silu(g) * u


@torch.no_grad()
def expert_outputs(block, x: torch.Tensor) -> torch.Tensor:
    """(tokens, E, hidden): each routed expert of ``real``'s block at weight 1 (real stores d_e * E)."""
    E = block.experts.gate_up_proj.shape[0]
    return torch.einsum("nei,ehi->neh", expert_activations(block, x), block.experts.down_proj) / E


def topk_mask(p: torch.Tensor, k: int) -> torch.Tensor:
    """1 on each token's k most probable experts (torch.topk, as the stock router), else 0."""
    return torch.zeros_like(p).scatter_(1, p.topk(k, dim=-1).indices, 1.0)


def relative_errors(gram: torch.Tensor, weights: torch.Tensor, probs: torch.Tensor, ks, norm: float,
                    renormalize: bool = False) -> dict:
    """{k: E||sum_{top-k} w_e o_e - sum_e o_e||^2 / E||dense MLP output||^2}, from per-token Gram matrices."""
    out = {}
    for k in ks:
        q = probs * topk_mask(probs, k)
        if renormalize:
            q = q / q.sum(-1, keepdim=True)
        c = q * weights - 1
        out[k] = float(torch.einsum("ne,nef,nf->n", c, gram, c).mean() / norm)
    return out


def temperature_for(base: torch.Tensor, target_top1: float) -> float:
    """The smallest tau with median max softmax(tau * base) >= target_top1 (bisection; monotone in tau)."""
    def top1(tau):
        return float((tau * base).softmax(-1).max(-1).values.median())

    lo, hi = 0.0, 1.0
    while top1(hi) < target_top1:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise RuntimeError("router logits too flat to reach the target top-1 probability")
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if top1(mid) < target_top1 else (lo, mid)
    return hi


def fit_scales(gram: torch.Tensor, probs: torch.Tensor, ks=FIT_KS, renormalize: bool = False) -> torch.Tensor:
    """Per-expert output scales s minimising sum_k E||sum_{top-k} q_e s_e o_e - sum_e o_e||^2 (normal equations,
    float64); q = p, or p renormalised over the top k."""
    E = probs.shape[1]
    lhs = torch.zeros(E, E, dtype=torch.float64)
    rhs = torch.zeros(E, dtype=torch.float64)
    for k in ks:
        q = probs * topk_mask(probs, k)
        if renormalize:
            q = q / q.sum(-1, keepdim=True)
        q, g = q.double(), gram.double()
        lhs += torch.einsum("ne,nef,nf->ef", q, g, q)
        rhs += torch.einsum("ne,nef->e", q, g)
    return torch.linalg.solve(lhs, rhs)


@torch.no_grad()
def fit_layer(block, x: torch.Tensor, target_top1: float = TARGET_TOP1) -> dict:
    """{tau, scales, errors} for one of ``real``'s MoE blocks, from its dense MLP inputs ``x`` (tokens, hidden)."""
    o = expert_outputs(block, x)
    gram = torch.einsum("neh,nfh->nef", o, o)
    shared = torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
    norm = float(((o.sum(1) + shared) ** 2).sum(-1).mean())
    base = x @ (block.gate.weight.double() / real.ROUTER_SCALE).float().T  # real's ridge logits, unit variance
    tau = temperature_for(base, target_top1)
    p = (tau * base).softmax(-1)
    scales = fit_scales(gram, p)
    E = p.shape[1]
    errors = {"real (uniform, x E)": relative_errors(gram, torch.full((E,), float(E)), (base * 1e-5).softmax(-1),
                                                     (1, 2, 4, 8, 16), norm),
              "softmax": relative_errors(gram, scales.float(), p, (1, 2, 4, 8, 16), norm),
              "softmax, norm_topk_prob": relative_errors(gram, fit_scales(gram, p, renormalize=True).float(), p,
                                                         (1, 2, 4, 8, 16), norm, renormalize=True)}
    return {"tau": tau, "scales": [float(s) for s in scales.float()], "errors": errors}


# ----------------------------------------------------------------------------- fit all layers, apply
def fit_routers(moe, dense, tokenizer, cal_tokens: int = real.CAL_TOKENS, progress: bool = True,
                target_top1: float = TARGET_TOP1) -> dict:
    """The fitted parameters of every layer of ``moe`` (a ``real`` checkpoint) against ``dense``."""
    from tqdm.auto import tqdm

    layers = moe.config.num_hidden_layers
    chunks = real.calibration_chunks(tokenizer, cal_tokens)
    xs = real.mlp_inputs(dense, chunks, layers, progress)
    fits = [fit_layer(moe.model.layers[i].mlp, xs[i], target_top1)
            for i in tqdm(range(layers), desc="fitting routers", disable=not progress)]
    return {"build": ROUTER_VERSION, "target_top1": target_top1, "fit_ks": list(FIT_KS),
            "calibration_tokens": int(chunks.numel()),
            "tau": [f["tau"] for f in fits], "scales": [f["scales"] for f in fits],
            "layer_errors": [f["errors"] for f in fits]}


def apply_router(block, tau: float, scales) -> None:
    """One of ``real``'s MoE blocks given the fitted router in place: logits x tau / ROUTER_SCALE, expert e's down
    projection x s_e / E (float32 products of fixed numbers: deterministic)."""
    with torch.no_grad():
        block.gate.weight.mul_(torch.tensor(tau / real.ROUTER_SCALE, dtype=torch.float32))
        block.experts.down_proj.mul_(torch.tensor(scales, dtype=torch.float32, device=block.experts.down_proj.device)
                                     .div(len(scales))[:, None, None])


def check_params(moe, params: dict) -> None:
    layers = moe.model.layers
    if len(params["tau"]) != len(layers) or any(len(s) != moe.config.num_experts for s in params["scales"]):
        raise UsageError(f"router parameters for {len(params['tau'])} layers do not fit this {len(layers)}-layer "
                         f"real model; refit them with scripts/fit_real_router.py")


@torch.no_grad()
def router_probs(block, x: torch.Tensor) -> torch.Tensor:
    """(tokens, E): the block's softmax router probabilities at ``x``."""
    logits = block.gate(x)
    return (logits[0] if isinstance(logits, tuple) else logits).float().softmax(-1)


@torch.no_grad()
def activations(block, x: torch.Tensor) -> torch.Tensor:
    """(tokens, E * neurons + S): the inputs of all the block's down projections, the routed experts' in order,
    then the shared expert's times its sigmoid gate: what the refit holds fixed."""
    s = block.shared_expert
    gated = torch.sigmoid(block.shared_expert_gate(x)) * torch.nn.functional.silu(s.gate_proj(x)) * s.up_proj(x)
    return torch.cat([expert_activations(block, x).flatten(1), gated], 1)


@torch.no_grad()
def down_weights(block) -> torch.Tensor:
    """(E * neurons + S, hidden): all the block's down projections, stacked in ``activations``' order."""
    E, H, I = block.experts.down_proj.shape
    routed = block.experts.down_proj.permute(0, 2, 1).reshape(E * I, H)
    return torch.cat([routed, block.shared_expert.down_proj.weight.T])


def design(p: torch.Tensor, acts: torch.Tensor, k: int, neurons: int) -> torch.Tensor:
    """(tokens, columns): ``activations`` with each routed expert's ``neurons`` columns times its weight at top-``k``
    (its probability in ``p`` if selected, else 0), the shared expert's as they are.  The MoE block's output at
    top-k is ``design(...) @ down_weights(block)`` (norm_topk_prob=False; the tests check it against the block's
    forward): linear in the down projections, so one least-squares problem fits them all."""
    E = p.shape[1]
    w = (p * topk_mask(p, k)).repeat_interleave(neurons, 1)
    return torch.cat([acts[:, :E * neurons] * w, acts[:, E * neurons:]], 1)


def gram_matrix(f: torch.Tensor, parts: int = 4) -> torch.Tensor:
    """F^T F in float64, with only the column blocks on and above the diagonal multiplied (the rest mirrored): a
    third less time than one product on CPU."""
    m = f.shape[1]
    step = -(-m // parts)
    gram = torch.empty(m, m, dtype=torch.float64, device=f.device)
    for i in range(0, m, step):
        block = (f[:, i:i + step].T @ f[:, i:]).double()
        gram[i:i + step, i:], gram[i:, i:i + step] = block, block.T
    return gram


@torch.no_grad()
def solve_down(block, gram: torch.Tensor, rhs: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """Set the first ``len(gram)`` rows of ``block``'s ``down_weights`` (the routed experts', and the shared
    expert's if the problem has its rows) to the ridge solution of the normal equations (``gram`` = sum F^T F,
    ``rhs`` = sum F^T y over ``design`` matrices F and targets y, float64), shrunk towards the current ones (d_0)
    with penalty lambda ||d - d_0||^2, lambda = ``ridge`` times the mean diagonal of the Gram matrix, so the penalty
    does not depend on the scale of the activations.  Returns the new ``down_weights``."""
    E, H, I = block.experts.down_proj.shape
    d = down_weights(block)
    lam = ridge * gram.diagonal().mean()
    d[:len(gram)] = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=torch.float64, device=gram.device),
                                       rhs + lam * d[:len(gram)].double()).float()
    block.experts.down_proj.copy_(d[:E * I].reshape(E, I, H).permute(0, 2, 1))
    block.shared_expert.down_proj.weight.copy_(d[E * I:].T)
    return d


# ----------------------------------------------------------------------------- the sequential refit
class _Captured(Exception):
    pass


@torch.no_grad()
def decoder_inputs(model, chunks: torch.Tensor, batch: int = BATCH) -> tuple[torch.Tensor, list[dict]]:
    """(the first decoder layer's hidden states for all ``chunks``, per batch of ``batch`` chunks the keyword
    arguments the model passes every decoder layer), captured from the model's own forward, so the attention
    mask and position embeddings follow its attention implementation."""
    hidden, kwargs = [], []

    def capture(module, args, kw):
        kw = dict(kw)
        hidden.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.append(kw)
        raise _Captured

    hook = model.model.layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for rows in chunks.split(batch):
            try:
                model.model(input_ids=rows, use_cache=False)
            except _Captured:
                pass
    finally:
        hook.remove()
    return torch.cat(hidden), kwargs


@torch.no_grad()
def attention_half(layer, h: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual stream after attention, MLP input) of a Qwen2-MoE decoder layer: its forward up to the MLP, as
    ``Qwen2MoeDecoderLayer.forward`` computes it (the tests check the whole layer against the model's own)."""
    attn, _ = layer.self_attn(hidden_states=layer.input_layernorm(h), **kwargs)
    residual = h + attn
    return residual, layer.post_attention_layernorm(residual)


@torch.no_grad()
def refit_sequentially(moe, params: dict, tokenizer, tokens: int = REFIT_TOKENS, ks=FIT_KS, ridge: float = RIDGE,
                       correction: float = CORRECTION, sequential: bool = True, shared: bool = True,
                       spread: bool = True, progress: bool = True) -> int:
    """``moe`` (a loaded ``real`` checkpoint) turned into ``real-router`` in place, layer by layer (GPTQ-style).

    Layer l's MLP inputs are those the *routed* model produces at top-k for each k in ``ks``, layers < l already
    converted (the error an evaluated model compounds is what the fit sees).  The target at those inputs is the
    dense MLP's output, which is ``real``'s own MLP with all experts before the conversion (``real`` is exact with
    all experts, so the dense model is not needed), plus ``correction`` times the gap between the dense model's
    residual stream and the routed one's with this layer's MLP dense (1: steer back onto the dense stream).
    Then the layer's router is applied (``apply_router``) and its routed down projections, and with ``shared`` the
    shared expert's, refitted for all ``ks`` jointly: one least-squares problem over the ``design`` matrices of
    all k (``solve_down``), whose products with the new weights propagate the routed streams.
    ``sequential=False`` fits every k on the dense model's inputs instead (router-v2).  The calibration chunks are
    spread over the whole text (``spread``) or its first ``tokens``.  Returns the number of tokens fitted on."""
    from tqdm.auto import tqdm

    check_params(moe, params)
    chunks = real.calibration_chunks(tokenizer, tokens, spread=spread).to(moe.device)
    hidden, kwargs = decoder_inputs(moe, chunks, BATCH)
    fit_on = {k: k if sequential else "dense" for k in ks}  # the stream each k's problem is posed on
    need_dense = correction > 0 or not sequential
    names = (("dense",) if need_dense else ()) + (tuple(ks) if sequential else ())
    streams = dict.fromkeys(names, hidden)  # (chunks, tokens, hidden) per stream: dense, and routed per k
    layers = moe.model.layers
    for i in tqdm(range(len(layers)), desc="refitting experts", disable=not progress):
        layer, block = layers[i], layers[i].mlp
        halves = {}  # per stream: (residual after attention, MLP input), each (tokens, hidden)
        for s, h in streams.items():
            parts = [attention_half(layer, hb, kw) for hb, kw in zip(h.split(BATCH), kwargs)]
            halves[s] = tuple(torch.cat(t).flatten(0, -2) for t in zip(*parts))
        acts = {s: activations(block, x) for s, (_, x) in halves.items()}  # gate, up: kept
        E, _, I = block.experts.down_proj.shape
        weights = down_weights(block)
        fit = len(weights) if shared else E * I  # the rows refitted: with ``shared``, all
        # real, still unconverted, with all experts at weight 1 (it stores d_e * E and p_e ~ 1/E): the dense MLP
        dense = torch.cat([weights[:E * I] / E, weights[E * I:]])
        dense_mlp = {s: a @ dense for s, a in acts.items()}
        if need_dense:
            dense_next = halves["dense"][0] + dense_mlp["dense"]
        apply_router(block, params["tau"][i], params["scales"][i])
        designs, gram, rhs, kept = {}, 0, 0, weights[fit:]  # rows apply_router leaves alone (the shared expert's)
        for k in ks:
            s = fit_on[k]
            y = dense_mlp[s]
            if correction and sequential:
                y = y + correction * (dense_next - halves[s][0] - y)
            f = designs[k] = design(router_probs(block, halves[s][1]), acts[s], k, I)
            y = y - f[:, fit:] @ kept  # the part not refitted (without ``shared``: the shared expert's output)
            gram, rhs = gram + gram_matrix(f[:, :fit]), rhs + (f[:, :fit].T @ y).double()
        d = solve_down(block, gram, rhs, ridge)
        if need_dense:
            streams["dense"] = dense_next.view_as(hidden)
        for k in ks if sequential else ():  # the routed model's MLP at k: its design times the new weights
            streams[k] = (halves[k][0] + designs[k] @ d).view_as(hidden)
    return int(chunks.numel())


@torch.no_grad()
def router_stats(moe, chunks: torch.Tensor) -> list[dict]:
    """Per layer, on ``chunks``: median top-1 softmax probability and mean entropy (nats) of the router."""
    probs: list[list[torch.Tensor]] = [[] for _ in moe.model.layers]
    hooks = [layer.mlp.gate.register_forward_hook(
        lambda m, a, out, i=i: probs[i].append(out[0].float().softmax(-1))) for i, layer in enumerate(moe.model.layers)]
    try:
        for row in chunks.split(4):
            moe.model(input_ids=row)  # the routers only: no lm head
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for p in (torch.cat(p) for p in probs):
        rows.append({"median_top1": float(p.max(-1).values.median()),
                     "mean_entropy": float(-(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(-1).mean())})
    return rows


# ----------------------------------------------------------------------------- build + cache
def load_params(path: Path = ASSET) -> dict:
    return json.loads(Path(path).read_text())


def build_real_router(out_dir, real_dir, params: dict, progress: bool = True,
                      refit_tokens: int = REFIT_TOKENS) -> Path:
    """Write ``real-router`` into ``out_dir``: the ``real`` checkpoint in ``real_dir`` converted by
    ``refit_sequentially`` (``params`` applied, down projections refitted).  Needs only ``real``: not the dense
    model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(real_dir)
    moe = AutoModelForCausalLM.from_pretrained(real_dir, dtype=torch.float32).eval()
    refit = {"ridge": RIDGE, "correction": CORRECTION, "sequential": True, "shared": True, "spread": True}
    fitted_tokens = refit_sequentially(moe, params, tok, refit_tokens, ks=FIT_KS, progress=progress, **refit)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    moe.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    record = json.loads((Path(real_dir) / "lm_eval_bh_real.json").read_text())
    record.update({"build": f"{record['build']}+{BUILD_VERSION}", "router": "softmax, fitted (real_router.py)",
                   "router_params_sha256": _params_hash(params), "target_top1": params["target_top1"],
                   "refit": {"tokens": fitted_tokens, **refit, "ks": list(FIT_KS)},
                   "router_build_seconds": round(time.time() - t0, 1)})
    (out / "lm_eval_bh_real.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out


def _params_hash(params: dict) -> str:
    return hashlib.sha256(json.dumps([params["tau"], params["scales"]]).encode()).hexdigest()


def default_real_router_dir(params: dict | None = None) -> Path:
    """``<cache>/real-router-<hash>``: the hash covers ``real``'s cache key, the router parameters and the refit's
    constants."""
    params = load_params() if params is None else params
    h = hashlib.sha256(json.dumps([BUILD_VERSION, real.default_real_dir().name, _params_hash(params),
                                   REFIT_TOKENS, RIDGE, CORRECTION, list(FIT_KS)]).encode())
    return real._cache_root() / f"real-router-{h.hexdigest()[:12]}"


def ensure_real_router(progress: bool = True) -> Path:
    """The cached ``real-router`` folder: ``real`` (built once, see lm_eval_bh.real) plus the shipped router."""
    params = load_params()
    if params["real_build"] != real.default_real_dir().name:
        raise UsageError(f"{ASSET.name} was fitted to {params['real_build']}, but this version builds "
                         f"{real.default_real_dir().name}; refit with scripts/fit_real_router.py")
    final = default_real_router_dir(params)
    if (final / "lm_eval_bh_real.json").is_file():
        return final
    real_dir = real.ensure_real(progress=progress)
    return real.build_once(final, lambda tmp: build_real_router(tmp, real_dir, params, progress=progress))


if __name__ == "__main__":  # `python -m lm_eval_bh.real_router` prints the model's folder, building it once
    print(ensure_real_router())
