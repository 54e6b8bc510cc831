"""Budget targeting: fit a routing rule to a mean number of experts per token on calibration text.

Settings are compared at matched cost only if their cost is set, not read off afterwards. Three fits,
all on the built-in corpus (lm_eval_bh/corpus.py), run with the patched model itself (`BHRouting`, whose
exact statistics give the mean k):

- `target_k=K` with an adaptive rule: bisection on the rule's knob (`SelectionRule.knob`: alpha for
  bh/hc/lfdr, top_p, beta, entropy_scale), on which mean k is monotone, to within +-2 % of K.
- `allocation=sensitivity`: the budget K x layers is split over the layers by dynamic programming over
  each layer's measured sensitivity (the calibration loss with that layer alone at k experts, the others
  at the model's top_k), as in Alloc-MoE; topk then routes the profile (`layer_k`), an adaptive rule
  meets it layer by layer with a per-layer knob (`layer_knob`), so token-level adaptivity is tested on
  top of the best static allocation.
- `layer_k=...` with an adaptive rule: the per-layer knob that meets those per-layer means.

The pure parts (`bisect_knob`, `bisect_layers`, `allocate`) take callables and numbers, no model.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict
from typing import Callable

import numpy as np
import torch

from .config import RoutingConfig
from .corpus import CORPUS, builtin_texts, corpus_hash, token_batches, token_ids_hash
from .errors import BudgetUnmet, RoutingError
from .families import find_moe_layers
from .patch import BHRouting
from .routing import SELECTIONS, Knob

__all__ = ["CAL_TOKENS", "REL_TOL", "SENSITIVITY_TOKENS", "allocate", "bisect_knob", "bisect_layers",
           "calibration_batches", "check_fit_tokens", "fit_budget", "layer_sensitivity", "measure"]

CAL_TOKENS = 8192  # calibration tokens of a knob fit: seconds on the tiny model
SENSITIVITY_TOKENS = 2048  # tokens per sensitivity forward (layers x k of them)
REL_TOL = 0.02  # a fit meets K within +-2 %
MAX_STEPS = 40


# --- the pure parts ----------------------------------------------------------------------------------


_TO = {"logit": lambda v: math.log(v / (1.0 - v)), "log": math.log, "linear": lambda v: v}
_FROM = {"logit": lambda t: 1.0 / (1.0 + math.exp(-t)), "log": math.exp, "linear": lambda t: t}


def _ends(knob: Knob) -> tuple[float, float]:
    """(the knob's transformed value giving the fewest experts, the one giving the most)."""
    lo, hi = _TO[knob.scale](knob.lo), _TO[knob.scale](knob.hi)
    return (lo, hi) if knob.increasing else (hi, lo)


def _value(knob: Knob, t: float) -> float:
    return min(knob.hi, max(knob.lo, _FROM[knob.scale](t)))


def bisect_knob(mean_k: Callable[[float], float], knob: Knob, target: float, *, rel_tol: float = REL_TOL,
                what: str = "the rule") -> tuple[float, float]:
    """(knob value, its mean k) with |mean k - target| <= rel_tol x target, by bisection on the knob's
    scale; `mean_k(value)` must be monotone in the direction `knob.increasing` says.

    RoutingError (one line) when target lies outside the reachable range [mean_k at the knob's
    fewest-experts end, mean_k at its most-experts end], naming that range, or falls in a jump of mean k.
    """
    tol = rel_tol * target
    a, b = _ends(knob)
    ka, kb = mean_k(_value(knob, a)), mean_k(_value(knob, b))
    if not ka - tol <= target <= kb + tol:
        raise BudgetUnmet(
            f"target_k={target:g} is out of reach of {what}: it reaches mean k {ka:.3g} to {kb:.3g} on the calibration "
            f"text ({knob.param} from {_value(knob, a):g} to {_value(knob, b):g})")
    for t, k in ((a, ka), (b, kb)):
        if abs(k - target) <= tol:
            return _value(knob, t), k
    for step in range(MAX_STEPS):
        m = _next(a, b, ka, kb, target, step)
        km = mean_k(_value(knob, m))
        if abs(km - target) <= tol:
            return _value(knob, m), km
        if km < target:
            a, ka = m, km
        else:
            b, kb = m, km
    raise BudgetUnmet(f"target_k={target:g} falls in a jump of {what}'s mean k, from {ka:.3g} to {kb:.3g} at "
                       f"{knob.param}={_value(knob, a):.6g}: no value gives it within {rel_tol:.0%}")


def _next(a: float, b: float, ka: float, kb: float, target: float, step: int) -> float:
    """The next point inside the bracket [a, b]: on even steps where the mean k there is linear in the
    knob's scale (clipped to the bracket's middle 80 %), on odd steps its midpoint, so the bracket at
    least halves every two steps whatever the curve does (jumps included)."""
    if step % 2 == 0 and kb > ka:
        f = min(0.9, max(0.1, (target - ka) / (kb - ka)))
        return a + f * (b - a)
    return 0.5 * (a + b)


def bisect_layers(mean_ks: Callable[[list[float]], list[float]], knob: Knob, targets: list[float], *,
                  rel_tol: float = REL_TOL, what: str = "the rule") -> tuple[list[float], list[float]]:
    """Per-layer knob values meeting per-layer target means, each within rel_tol: all layers bisect at
    once, one evaluation per step (`mean_ks(values)` -> per-layer means; a layer's mean may also move
    a little with the layers before it, so a layer is done only when the latest evaluation meets it)."""
    n = len(targets)
    lo, hi = _ends(knob)
    ks_lo, ks_hi = mean_ks([_value(knob, lo)] * n), mean_ks([_value(knob, hi)] * n)
    for i, (target, ka, kb) in enumerate(zip(targets, ks_lo, ks_hi)):
        if not ka - rel_tol * target <= target <= kb + rel_tol * target:
            raise BudgetUnmet(f"layer {i}'s budget {target:.3g} is out of reach of {what}: that layer reaches mean k "
                               f"{ka:.3g} to {kb:.3g} on the calibration text ({knob.param} from {_value(knob, lo):g} "
                               f"to {_value(knob, hi):g})")
    a, b = [lo] * n, [hi] * n
    current = [0.5 * (lo + hi)] * n
    for _ in range(MAX_STEPS + 10):
        ks = mean_ks([_value(knob, t) for t in current])
        if all(abs(k - t) <= rel_tol * t for k, t in zip(ks, targets)):
            return [_value(knob, t) for t in current], ks
        for i, (k, target) in enumerate(zip(ks, targets)):
            if abs(k - target) <= rel_tol * target:
                continue
            if k < target:
                a[i] = current[i]
            else:
                b[i] = current[i]
            if abs(b[i] - a[i]) < 1e-9:  # the layers before moved its curve: search its whole range again
                a[i], b[i] = lo, hi
            current[i] = 0.5 * (a[i] + b[i])
    worst = max(range(n), key=lambda i: abs(ks[i] - targets[i]) / targets[i])
    raise BudgetUnmet(f"could not meet the per-layer budget with {what}: layer {worst} stays at mean k "
                       f"{ks[worst]:.3g} against {targets[worst]:.3g} (a jump of its mean k)")


def allocate(losses: list[list[float]], total: float, min_k: int) -> tuple[float, ...]:
    """Per-layer budgets summing to `total` that minimise the summed loss: `losses[l][j]` is the loss with
    layer l at k = min_k + j experts (the others as measured). Dynamic programming over the integer part
    (exact for losses that add up over layers); a fractional remainder goes to the layer whose next expert
    gains the most (it then routes floor/ceil by the token split of routing.split_counts)."""
    n, width = len(losses), len(losses[0])
    if not n * min_k <= total + 1e-9 <= n * (min_k + width - 1) + 2e-9:
        raise RoutingError(f"a budget of {total / n:g} experts per token per layer lies outside min_k..max_k "
                           f"({min_k}..{min_k + width - 1})")
    whole = int(math.floor(total + 1e-9))
    extra = whole - n * min_k  # experts above min_k to place
    best = [0.0] + [math.inf] * extra  # best[e]: least loss of the layers so far with e extra experts
    choice = []
    for row in losses:
        new, pick = [math.inf] * (extra + 1), [0] * (extra + 1)
        for e in range(extra + 1):
            for j in range(min(width - 1, e) + 1):
                if best[e - j] + row[j] < new[e]:
                    new[e], pick[e] = best[e - j] + row[j], j
        best = new
        choice.append(pick)
    ks, e = [0] * n, extra
    for layer in range(n - 1, -1, -1):
        ks[layer] = choice[layer][e]
        e -= ks[layer]
    out = [float(min_k + j) for j in ks]
    remainder = total - whole
    if remainder > 1e-9:
        open_ = [l for l in range(n) if ks[l] < width - 1]
        gain = lambda l: losses[l][ks[l]] - losses[l][ks[l] + 1]  # noqa: E731
        out[max(open_, key=gain)] += remainder
    return tuple(out)


# --- running the model -------------------------------------------------------------------------------


def check_fit_tokens(value) -> int:
    """`fit_tokens=`: the calibration tokens of a budget fit, an integer >= 256."""
    from .checks import as_int

    n = as_int("fit_tokens", value)
    if n < 256:
        raise RoutingError(f"fit_tokens must be an integer >= 256 (calibration tokens of a budget fit), got {value!r}")
    return n


def calibration_batches(tokenizer, tokens: int, max_length: int = 256, batch_size: int = 8):
    """(batches, info): the first `tokens` tokens of the built-in corpus as (input_ids, attention_mask)
    batches, and what they are (corpus, hash, tokens) for the results file."""
    texts = builtin_texts()
    batches, seen = [], 0
    for ids, mask in token_batches(tokenizer, texts, max_length, batch_size):
        left = tokens - seen
        if left <= 0:
            break
        per_row = mask.sum(dim=1)
        keep = int(((per_row.cumsum(0) - per_row) < left).sum())  # whole rows until the budget is spent
        batches.append((ids[:keep], mask[:keep]))
        seen += int(per_row[:keep].sum())
    return batches, {"corpus": CORPUS["name"], "corpus_hash": corpus_hash(texts), "tokens": seen}


@torch.inference_mode()
def measure(model, cfg: RoutingConfig, batches, *, loss: bool = False, kernel: str | None = None,
            fitted=None) -> dict:
    """Route `batches` through `model` under `cfg` (patched, then restored): `routing.summary()` of those
    tokens, plus "loss", the mean next-token negative log-likelihood of the real tokens, if asked.
    `fitted`: the calibration of ``calibration=auto`` or a text file (see BHRouting)."""
    device = model.get_input_embeddings().weight.device
    routing = BHRouting(cfg, kernel=kernel, fitted=fitted).patch(model)
    nll, count = 0.0, 0
    try:
        for ids, mask in batches:
            ids, mask = ids.to(device), mask.to(device)
            if not loss:
                model(input_ids=ids, attention_mask=mask, logits_to_keep=1)  # the LM head on one position
                continue
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            nll += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="sum"))
            count += int((target != -100).sum())
        out = routing.summary()
    finally:
        routing.unpatch()
    if loss:
        out["loss"] = nll / max(count, 1)
    return out


def layer_sensitivity(model, cfg: RoutingConfig, batches, num_layers: int, min_k: int, max_k: int,
                      reference: int) -> list[list[float]]:
    """losses[l][j]: the calibration loss with layer l at min_k + j experts (fixed top-k) and every other
    layer at `reference` experts (the model's top_k). Only `cfg`'s weighting (temperature, renormalize)
    matters: the table is shared by every rule and target of one process (`_SENSITIVITY`)."""
    from .calibration import layers_fingerprint

    base = {"selection": "topk", "min_k": min_k, "max_k": max_k, "temperature": cfg.temperature,
            "renormalize": cfg.renormalize}
    key = (layers_fingerprint(find_moe_layers(model)), tuple(sorted(base.items())), reference, token_ids_hash(batches))
    if key not in _SENSITIVITY:
        _SENSITIVITY[key] = _layer_losses(model, base, batches, num_layers, min_k, max_k, reference)
    return _SENSITIVITY[key]


def _layer_losses(model, base: dict, batches, num_layers: int, min_k: int, max_k: int, reference: int):
    losses = []
    for layer in range(num_layers):
        row = []
        for k in range(min_k, max_k + 1):
            profile = [reference] * num_layers
            profile[layer] = k
            row.append(measure(model, RoutingConfig(**{**base, "layer_k": tuple(profile)}), batches, loss=True)["loss"])
        losses.append(row)
    return losses


def _null_hash(cal) -> str:
    """sha256 of a calibration's arrays: the same null, the same key."""
    h = hashlib.sha256()
    for name, array in sorted(cal.arrays.items()):
        h.update(name.encode() + np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


_SENSITIVITY: dict = {}  # in-process cache: (router fingerprint, weighting, reference, tokens) -> losses
_FITTED: dict = {}  # in-process cache: (router fingerprint, config, tokens) -> (fitted config, info)


def fit_budget(model, tokenizer, cfg: RoutingConfig, *, tokens: int = CAL_TOKENS,
               sensitivity_tokens: int = SENSITIVITY_TOKENS, kernel: str | None = None,
               fitted=None, progress: bool = True) -> tuple[RoutingConfig, dict | None]:
    """(the config to route with, how it was fitted) for a config whose budget needs fitting
    (`cfg.needs_fit`); else (cfg, None). Fitted on the first `tokens` tokens of the built-in corpus, one
    progress-bar step per run over them. `fitted`: the null of ``calibration=auto`` or a text file, fitted
    before the budget (lm_eval_bh/autocal.py), which every run routes with."""
    if not cfg.needs_fit:
        return cfg, None
    from .calibration import layers_fingerprint

    layers = find_moe_layers(model)
    null = None if fitted is None else _null_hash(fitted)  # the fitted null (calibration=auto) routes every run
    key = (layers_fingerprint(layers), cfg, tokens, sensitivity_tokens, null)
    if key in _FITTED:
        return _FITTED[key]
    start = time.monotonic()
    first = layers[0]
    resolved = cfg.resolve(first.num_experts, first.top_k, first.renormalizes)
    rule, n = SELECTIONS[cfg.selection], len(layers)
    batches, info = calibration_batches(tokenizer, tokens)
    what = (f"selection={cfg.selection} (" + (f"pvalue={cfg.pvalue}, " if rule.uses_pvalues else "")
            + f"k={resolved.min_k}..{resolved.max_k})")
    plain = {**asdict(cfg), "target_k": None, "allocation": "uniform", "fitted_k": None}
    info = {"target_k": cfg.target_k, "allocation": cfg.allocation, **info}

    profile = cfg.layer_k
    if cfg.allocation == "sensitivity":
        sens, _ = calibration_batches(tokenizer, sensitivity_tokens)
        reference = min(max(first.top_k, resolved.min_k), resolved.max_k)
        losses = layer_sensitivity(model, cfg, sens, n, resolved.min_k, resolved.max_k, reference)
        profile = allocate(losses, cfg.target_k * n, resolved.min_k)
        info["layer_loss"] = losses
    from tqdm.auto import tqdm

    seen: dict = {}  # knob value(s) -> the summary of that run on the calibration text
    with tqdm(desc=f"fit {cfg.label()} on {info['tokens']} tokens", unit="run", disable=not progress) as bar:
        def run(**changes) -> dict:
            point = tuple(sorted(changes.items()))
            if point not in seen:
                seen[point] = measure(model, RoutingConfig(**{**plain, **changes}), batches, kernel=kernel,
                                      fitted=fitted)
                bar.update(1)
                bar.set_postfix(k=f"{seen[point]['mean_experts_per_token']:.3f}")
            return seen[point]

        if rule.fixed:  # topk: the allocation is the routing
            changes = {"layer_k": profile}
            info.update(knob=None, value=None, layer_k=list(profile))
        elif profile is not None:  # an adaptive rule meeting per-layer means with a per-layer knob
            values, _ = bisect_layers(lambda v: run(layer_k=profile, layer_knob=tuple(v))["per_layer_mean"],
                                      rule.knob, list(profile), what=what)
            changes = {"layer_k": profile, "layer_knob": tuple(values)}
            info.update(knob=rule.knob.param, value=None, layer_values=list(values), layer_k=list(profile))
        else:
            value, _ = bisect_knob(lambda v: run(**{rule.knob.param: v})["mean_experts_per_token"], rule.knob,
                                   cfg.target_k, what=what)
            changes = {rule.knob.param: value}
            info.update(knob=rule.knob.param, value=value)
        found = run(**changes)  # already measured, except for topk
    fitted = RoutingConfig(**{**asdict(cfg), **changes, "fitted_k": found["mean_experts_per_token"]})
    info.update(calibration_k=found["mean_experts_per_token"], calibration_per_layer=found["per_layer_mean"],
                runs=len(seen), seconds=round(time.monotonic() - start, 2))
    _FITTED[key] = (fitted, info)
    return fitted, info
