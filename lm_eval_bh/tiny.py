"""A tiny, deterministic OLMoE-architecture causal LM for tests and demos (fully offline).

``build_tiny_olmoe(out_dir, seed)`` writes a ``save_pretrained`` checkpoint plus the small
byte-level BPE tokenizer shipped in ``lm_eval_bh/assets/tokenizer/`` (trained by
``scripts/train_tokenizer.py``), so that ``lm_eval --model hf --model_args pretrained=DIR``,
``AutoModelForCausalLM.from_pretrained(DIR)`` and ``AutoTokenizer.from_pretrained(DIR)`` work
without the hub.  ``ensure_tiny_olmoe(seed)`` builds it once into a cache folder and reuses it.

Router realism.  With plain random init the router logits of one token are i.i.d.-like
Gaussians across experts, so a Benjamini-Hochberg test on their robust z-scores selects
almost nothing; trained MoE routers instead put a few experts per token far above the rest.
We mimic that with a sparse-dictionary init: there is one unit "feature direction" per expert
(orthonormal when ``num_experts <= hidden_size``), every token embedding is isotropic
Gaussian noise plus 1-6 of those directions with strengths of 3-7.5 noise standard deviations,
and each layer's router row ``e`` is (a scaled copy of) the direction of a layer-specific
permutation of the experts.  The residual stream is dominated by the embedding at init, so
for every token a handful of experts get logits 3-7.5 robust-sigma above the median of the
others: a heavy right tail whose BH count grows with alpha (on task text, 16 experts: median
1 expert at alpha=0.01, 2 at 0.05, 3 at 0.3-0.5, at most 4-7; 64 experts: median 2 -> 5).
Expert and output weights are fan-in scaled so that the experts a token uses change its
predictions; all other weights are N(0, 0.02) as in OLMoE's own init. The model is untrained
(near-chance accuracy): it exists for plumbing and cost accounting.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

ASSETS_TOKENIZER = Path(__file__).resolve().parent / "assets" / "tokenizer"
# bump when the init scheme changes: it is part of the cache key
INIT_VERSION = "sparse-dict-v2"

_DEFAULTS = dict(
    hidden_size=64,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    num_experts=16,
    num_experts_per_tok=4,
    max_position_embeddings=1024,
    norm_topk_prob=False,
    tie_word_embeddings=False,
    initializer_range=0.02,
    rms_norm_eps=1e-5,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=1,
)

# sparse-dictionary init: how many expert directions a token carries (probabilities for 1..6)
# and the range of their strengths, in units of the per-direction noise standard deviation
_N_ACTIVE_PROBS = (0.25, 0.25, 0.20, 0.15, 0.10, 0.05)
_STRENGTH_RANGE = (3.0, 7.5)


_EXPERT_GAIN = 1.0


def _tokenizer_vocab_size() -> int:
    tok = json.loads((ASSETS_TOKENIZER / "tokenizer.json").read_text(encoding="utf-8"))
    ids = list(tok["model"]["vocab"].values()) + [t["id"] for t in tok.get("added_tokens", [])]
    return max(ids) + 1


def tiny_olmoe_config(**overrides):
    """The tiny ``OlmoeConfig`` (hidden 64, 2 layers, 4 heads, 16 experts, top-4, ...).

    ``vocab_size`` defaults to the shipped tokenizer's size; any field can be overridden.
    """
    from transformers import OlmoeConfig

    kw = dict(_DEFAULTS, vocab_size=_tokenizer_vocab_size())
    kw.update(overrides)
    cfg = OlmoeConfig(**kw)
    return cfg


def _param_generator(seed: int, name: str) -> torch.Generator:
    """Independent generator per parameter, so the init does not depend on module order."""
    h = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))


def _expert_directions(num_experts: int, hidden: int, gen: torch.Generator) -> torch.Tensor:
    """(num_experts, hidden) unit rows; orthonormal when num_experts <= hidden."""
    a = torch.randn(hidden, max(num_experts, 1), generator=gen, dtype=torch.float64)
    if num_experts <= hidden:
        q, r = torch.linalg.qr(a)
        q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # unique QR
        return q.T[:num_experts].contiguous()
    d = a.T
    return d / d.norm(dim=1, keepdim=True)


@torch.no_grad()
def init_tiny_olmoe_weights(model, seed: int = 0) -> None:
    """Deterministically (re)initialise every parameter of ``model`` in place (see module doc)."""
    cfg = model.config
    E, d = cfg.num_experts, cfg.hidden_size
    dirs = _expert_directions(E, d, _param_generator(seed, "__expert_directions__"))  # float64
    # Per-token noise has unit variance per coordinate; the RMSNorm before each router rescales
    # the residual to RMS 1, i.e. norm sqrt(d).  Router rows g * dir then give null logits of
    # standard deviation ~ g * sqrt(d) / ||emb||; pick g so that this is ~1.
    typical_norm = math.sqrt(d + 3 * (sum(_STRENGTH_RANGE) / 2) ** 2)
    router_gain = typical_norm / math.sqrt(d)

    for name, p in model.named_parameters():
        gen = _param_generator(seed, name)
        if name.endswith("embed_tokens.weight"):
            V = p.shape[0]
            emb = torch.randn(V, d, generator=gen, dtype=torch.float64)
            probs = torch.tensor(_N_ACTIVE_PROBS, dtype=torch.float64)
            n_active = torch.multinomial(probs, V, replacement=True, generator=gen) + 1
            lo, hi = _STRENGTH_RANGE
            for t in range(V):
                k = min(int(n_active[t]), E)
                experts = torch.randperm(E, generator=gen)[:k]
                strength = lo + (hi - lo) * torch.rand(k, generator=gen, dtype=torch.float64)
                emb[t] += strength @ dirs[experts]
            p.copy_(emb.to(p.dtype))
        elif name.endswith("mlp.gate.weight"):  # router (num_experts, hidden)
            perm = torch.randperm(E, generator=gen)
            p.copy_((router_gain * dirs[perm]).to(p.dtype))
        elif name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        elif name.endswith(("experts.gate_up_proj", "experts.down_proj", "lm_head.weight")):
            # Fan-in scaled (not the 0.02 default) so that the experts move the residual stream, the
            # output layer reads it, and the number of experts a token uses changes the model's answers.
            std = _EXPERT_GAIN / math.sqrt(p.shape[-1])
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(std).to(p.dtype))
        else:
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(cfg.initializer_range).to(p.dtype))


def make_tiny_olmoe(seed: int = 0, **overrides):
    """In-memory tiny ``OlmoeForCausalLM`` (float32, eval mode) with the deterministic init."""
    from transformers import OlmoeForCausalLM

    cfg = tiny_olmoe_config(**overrides)
    model = OlmoeForCausalLM(cfg)
    init_tiny_olmoe_weights(model, seed)
    return model.float().eval()


def build_tiny_olmoe(out_dir, seed: int = 0, **overrides) -> Path:
    """Build the tiny OLMoE model with ``seed`` and save model + tokenizer into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = make_tiny_olmoe(seed, **overrides)
    model.save_pretrained(str(out))
    for f in ASSETS_TOKENIZER.iterdir():
        if f.is_file():
            shutil.copyfile(f, out / f.name)
    # the tokenizer's length limit is the model's (else lm-eval warns of indexing errors that cannot happen)
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    tokenizer_config["model_max_length"] = model.config.max_position_embeddings
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out / "lm_eval_bh_tiny.json").write_text(
        json.dumps({"seed": seed, "init": INIT_VERSION, "overrides": overrides}, indent=2, sort_keys=True) + "\n"
    )
    return out


def _cache_key(seed: int, overrides: dict) -> str:
    h = hashlib.sha256()
    h.update(tiny_olmoe_config(**overrides).to_json_string(use_diff=False).encode())
    h.update(INIT_VERSION.encode())
    h.update(str(seed).encode())
    h.update(b"model_max_length=max_position_embeddings")  # what build_tiny_olmoe writes over the asset
    for f in sorted(ASSETS_TOKENIZER.iterdir()):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def _cache_root() -> Path:
    env = os.environ.get("LM_EVAL_BH_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "lm_eval_bh"


def default_tiny_model_dir(seed: int = 0, **overrides) -> Path:
    """Cache location ``$LM_EVAL_BH_CACHE`` (or ``~/.cache/lm_eval_bh``) ``/tiny-olmoe-<seed>-<hash>``.

    The hash covers the full config, the init scheme version and the tokenizer files.
    """
    return _cache_root() / f"tiny-olmoe-{seed}-{_cache_key(seed, overrides)}"


def ensure_tiny_olmoe(seed: int = 0, **overrides) -> Path:
    """Return the cached tiny model folder, building it once (in a temp folder, then renamed)."""
    final = default_tiny_model_dir(seed, **overrides)
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build_tiny_olmoe(tmp, seed, **overrides)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # not a lost race: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------- diagnostics
@torch.no_grad()
def router_logits_on_text(model, tokenizer, texts, max_length: int = 128) -> list[torch.Tensor]:
    """Router logits per layer, (n_tokens, num_experts), for ``texts`` (padding dropped)."""
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    out = model(**enc, output_router_logits=True)
    mask = enc["attention_mask"].reshape(-1).bool()
    res = []
    for rl in out.router_logits:
        rl = rl.reshape(-1, rl.shape[-1])
        res.append(rl[mask] if rl.shape[0] == mask.shape[0] else rl)
    return res


if __name__ == "__main__":  # `python -m lm_eval_bh.tiny` prints the embedded default's folder, building it once
    print(ensure_tiny_olmoe())
