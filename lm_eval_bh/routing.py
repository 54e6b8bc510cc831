"""Pure routing maths: router logits -> p-values -> a variable number of experts per token.

Torch only (no transformers, no files), fully vectorised over tokens, no host synchronisation. Every
rule works on the experts sorted by p-value (ties broken by the larger logit) and picks a per-token
count k in [min_k, max_k]; the first k sorted experts are selected and the remaining max_k - k slots
are padding (index = num_experts, weight 0) that the dispatch never runs.

Each p-value method (`pvalue=`) is a `PValueMethod` and each selection rule (`selection=`) a
`SelectionRule`, registered in `PVALUES` / `SELECTIONS`: adding one means one spec and its tests.
The settings themselves (`RoutingConfig`) live in lm_eval_bh/config.py. A calibration `null` is
duck-typed: ``null.pvalue(x)`` (and ``null.per_expert``) for p-values, see lm_eval_bh/calibration.py.
The argument checks live in lm_eval_bh/checks.py, below this module and config.py. See docs/pvalues.md
and docs/rules.md for what each method and rule promises; a rule's `knob` is what `target_k` fits.

Non-finite router logits (NaN, +inf, -inf) are defined behaviour, see `route`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import torch

from .checks import check_alpha, check_temperature
from .errors import RoutingError

if TYPE_CHECKING:
    from .config import RoutingConfig

__all__ = [
    "NONFINITE_LOGIT",
    "PVALUES",
    "SELECTIONS",
    "PValueMethod",
    "Ranked",
    "Routed",
    "RoutingConfig",
    "RoutingError",
    "Knob",
    "Selection",
    "SelectionRule",
    "benjamini_hochberg",
    "is_monotone",
    "nonfinite_rows",
    "prepare_compile",
    "pvalues",
    "route",
    "select_count",
    "split_counts",
]


# A non-finite logit is replaced by this value before anything else: it sorts last, gets softmax
# weight exactly 0 whenever the row has a finite logit, p = 1 under every method, and no arithmetic
# on it overflows to inf or NaN (it stays far from float32's max, 3.4e38).
NONFINITE_LOGIT = -1.0e30


# --- p-value methods ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PValueMethod:
    """How a token's router logits become one p-value per expert.

    `fn(logits, temperature, null)` returns p-values of the same shape and order as `logits` (T, E).
    For a method that orders the experts like their logits (`monotone`, or a null that is not per
    expert) `logits` arrive sorted in descending order along the last dim, so order statistics
    (median, quartiles) cost nothing; otherwise they come in the experts' own order.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    label: str
    monotone: bool = True  # p decreases with the logit whatever the null (then top-k by logit = by p)
    needs_null: bool = False  # needs the layer's calibration (`null.pvalue`), hence `calibration=FILE`
    params: tuple[str, ...] = ()  # the RoutingConfig fields it reads


_SQRT1_2 = 1.0 / math.sqrt(2.0)
_IQR_TO_SIGMA = 1.0 / 1.3489795003921634  # IQR of a standard normal
_NU_C, _NU_D = (1.41, 0.93, 1.29, 1.61), (-1.09, 5.03, 2.96, 1.60)  # per n mod 4, see _zscore_nu


def _softmax_pvalues(sorted_logits: torch.Tensor, temperature: float, null=None) -> torch.Tensor:
    """p = 1 - softmax probability (the original design; with many experts BH rarely rejects).

    logits / temperature are clamped to float32's finite range: a tiny temperature then gives the
    largest logit p = 0 and the others p = 1 (its limit), never NaN.
    """
    big = torch.finfo(sorted_logits.dtype).max
    return 1.0 - torch.softmax((sorted_logits / temperature).clamp(-big, big), dim=-1)


def _quantiles_desc(sorted_logits: torch.Tensor, n: torch.Tensor, qs: tuple[float, ...]) -> list[torch.Tensor]:
    """The q-quantiles (linear interpolation, numpy's default) of the first n[t] entries of each row,
    rows sorted descending: per-row positions, read with `gather`."""
    last = (n - 1).clamp_min(0).unsqueeze(-1)
    out = []
    for q in qs:
        pos = (1.0 - q) * last  # position in descending order
        lo = pos.floor()
        frac = (pos - lo).squeeze(-1)
        a = sorted_logits.gather(-1, lo.long()).squeeze(-1)
        b = sorted_logits.gather(-1, torch.minimum(lo + 1, last).long()).squeeze(-1)
        out.append(a * (1.0 - frac) + b * frac)
    return out


def _zscore_nu(n: torch.Tensor) -> torch.Tensor:
    """Degrees of freedom of the t tail that the robust z of n i.i.d. normal values follows.

    nu = 0.37 n + c - d / n, with (c, d) per n mod 4: the median and quartiles of n values are single
    order statistics when n = 1 (mod 4) and interpolated otherwise, which changes the tail. Fitted to
    the Monte Carlo nu of every n from 7 to 64 (scripts/fit_zscore_null.py, within 0.15 of it up to
    n = 40); docs/pvalues.md shows the resulting tail rates. Plain arithmetic: no table on the device.
    """
    r = n.remainder(4)
    pick = lambda v: torch.where(r == 0, v[0], torch.where(r == 1, v[1], torch.where(r == 2, v[2], v[3])))  # noqa: E731
    return (0.37 * n + pick(_NU_C) - pick(_NU_D) / n.clamp_min(1.0)).clamp_min(1.0)


def _student_t_sf(z: torch.Tensor, nu: torch.Tensor) -> torch.Tensor:
    """P(T_nu >= z) by Hill's (1970, CACM Algorithm 396) normal approximation of Student's t: a
    Wallace-type deviate w = sqrt((nu - 1/2) ln(1 + z^2/nu)) with Hill's correction, then the normal
    tail. Relative error below 1e-5 for nu >= 10 and below 1 % for nu >= 4 (tested against scipy)."""
    a = nu - 0.5
    b = 48.0 * a * a
    w = torch.sqrt(a * torch.log1p(z * z / nu)).clamp_max(40.0)  # erfc underflows far below 40
    w2 = w * w
    w = w + w * (w2 + 3.0) / b - w * (((4.0 * w2 + 33.0) * w2 + 240.0) * w2 + 855.0) / (10.0 * b * (b + 0.8 * w2 * w2 + 100.0))
    return 0.5 * torch.erfc(torch.copysign(w, z) * _SQRT1_2)


def _zscore_pvalues(sorted_logits: torch.Tensor, temperature: float, null=None) -> torch.Tensor:
    """Per-token empirical null: z = (logit - median) / (IQR / 1.349), p = the t tail z follows.

    Median and interquartile range come from the sort the selection needs anyway, over the token's
    finite logits only (non-finite ones, cleaned to NONFINITE_LOGIT, sort last); both ignore the few
    large logits of the experts that stand out. Because they are estimated from only n values, z is
    heavier-tailed than N(0, 1): p is the upper tail of Student's t with `_zscore_nu(n)` degrees of
    freedom, calibrated so that P(p <= t) = t under i.i.d. normal logits (docs/pvalues.md). The
    statistic is location-scale invariant, so `temperature` has no effect here.
    """
    finite = sorted_logits > NONFINITE_LOGIT
    n = finite.sum(dim=-1, keepdim=True).to(sorted_logits.dtype)
    median, q75, q25 = _quantiles_desc(sorted_logits, n.squeeze(-1), (0.5, 0.75, 0.25))
    scale = ((q75 - q25) * _IQR_TO_SIGMA).clamp_min(torch.finfo(sorted_logits.dtype).tiny)
    z = (sorted_logits - median.unsqueeze(-1)) / scale.unsqueeze(-1)
    # a non-finite logit gets p = 1 exactly
    z = z.masked_fill(~finite, -math.inf)
    return _student_t_sf(z, _zscore_nu(n))


def _layer_null(null, what: str):
    if null is None:
        raise RoutingError(f"{what} needs the layer's calibration (null=...; see calibration.load_calibration)")
    return null


def _calibrated_pvalues(logits: torch.Tensor, temperature: float, null=None) -> torch.Tensor:
    """p = P(N(loc, scale^2) >= logit): the upper tail of the layer's fitted empirical null (Efron's
    central matching, see lm_eval_bh/calibration.py). `temperature` divides the logits and the null
    alike, so it cancels; a per-expert null needs the experts' own order."""
    return _layer_null(null, "pvalue=calibrated").pvalue(logits)


def _ecdf_pvalues(logits: torch.Tensor, temperature: float, null=None) -> torch.Tensor:
    """p = (1 + #{pooled sample >= logit}) / (n + 1) over the layer's pooled calibration logits, signal
    experts included: every expert's p is then about uniform, so BH at alpha bounds only the chance
    that a token gets any expert beyond min_k. `temperature` cancels, as for `calibrated`."""
    return _layer_null(null, "pvalue=ecdf").ecdf_pvalue(logits)


PVALUES: dict[str, PValueMethod] = {
    spec.name: spec
    for spec in (
        PValueMethod("zscore", _zscore_pvalues, "zscore"),
        PValueMethod("softmax", _softmax_pvalues, "softmax", params=("temperature",)),
        PValueMethod("calibrated", _calibrated_pvalues, "calibrated", monotone=False, needs_null=True,
                     params=("calibration",)),
        PValueMethod("ecdf", _ecdf_pvalues, "ecdf", monotone=False, needs_null=True, params=("calibration",)),
    )
}


def is_monotone(cfg: "RoutingConfig", null=None) -> bool:
    """Whether the p-values order the experts exactly like the logits (then top-k by logit = top-k by p).

    True for a monotone method; for a method with a null, when `null` is given and is not per expert
    (without the null it cannot be known: False, the safe answer).
    """
    return _orders_like_logits(PVALUES[cfg.pvalue], null)


def _orders_like_logits(spec: PValueMethod, null) -> bool:
    return spec.monotone or (null is not None and not getattr(null, "per_expert", False))


def _clean(logits: torch.Tensor) -> torch.Tensor:
    """float32 logits with every NaN/+inf/-inf replaced by NONFINITE_LOGIT (one fused kernel)."""
    return torch.nan_to_num(logits.float(), nan=NONFINITE_LOGIT, posinf=NONFINITE_LOGIT, neginf=NONFINITE_LOGIT)


def nonfinite_rows(logits: torch.Tensor) -> torch.Tensor:
    """Per-token flag: True where the token's router logits contain a NaN or an infinity."""
    return ~torch.isfinite(logits).all(dim=-1)


def _check_logits(logits, name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() < 2 or not logits.is_floating_point():
        what = f"shape {tuple(logits.shape)} {logits.dtype}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise RoutingError(f"{name} must be a floating-point tensor of shape (tokens, experts), got {what}")


def pvalues(logits: torch.Tensor, method: str = "zscore", temperature: float = 1.0, null=None) -> torch.Tensor:
    """P-values of every expert for each token, in the experts' own order (for analysis and tests)."""
    _check_logits(logits)
    if method not in PVALUES:
        raise RoutingError(f"method must be one of {', '.join(PVALUES)}; got {method!r}")
    temperature = check_temperature(temperature)
    spec, x = PVALUES[method], _clean(logits)
    if not _orders_like_logits(spec, null):
        return spec.fn(x, temperature, null)
    sorted_logits, order = x.sort(dim=-1, descending=True, stable=True)
    p_sorted = spec.fn(sorted_logits, temperature, null)
    return torch.empty_like(p_sorted).scatter_(-1, order, p_sorted)


# --- selection rules: experts in p-value order -> how many to keep -------------------------------


class Ranked(NamedTuple):
    """What a selection rule sees, per token, experts in selection order (p ascending, ties by larger
    logit): `p` the p-values, `logits` the (cleaned, float32) logits, `order` the experts' indices,
    `by_logit` whether that order is also descending logit order (true for monotone p-value methods),
    `null` the layer's calibration (or None)."""

    p: torch.Tensor
    logits: torch.Tensor
    order: torch.Tensor
    by_logit: bool
    null: Any = None


@dataclass(frozen=True)
class Knob:
    """A rule's budget knob: the RoutingConfig field that `target_k` bisects. Mean k is monotone in it
    (non-decreasing if `increasing`, else non-increasing) over [lo, hi]; the bisection runs on the
    `scale` ("logit" for a level in (0, 1), "log" for a positive factor, "linear") of the value."""

    param: str
    lo: float
    hi: float
    increasing: bool = True
    scale: str = "logit"


@dataclass(frozen=True)
class SelectionRule:
    """How many of a token's experts (in p-value order) to keep.

    `fn(ranked, cfg)` returns the rule's count per token (T,) long, before the [min_k, max_k] clamp.
    """

    name: str
    fn: Callable[[Ranked, "RoutingConfig"], torch.Tensor]
    label: str
    params: tuple[str, ...] = ()  # the RoutingConfig fields it reads besides min_k / max_k
    uses_pvalues: bool = True  # False: the count ignores the p-values (they only order the experts)
    needs_null: bool = False  # needs the layer's calibration (`calibration=FILE`)
    fixed: bool = False  # the count is always max_k (or the per-layer budget, `layer_k`)
    knob: Knob | None = None  # the parameter `target_k` fits (None: a fixed rule, budgeted by `layer_k`)
    reads_probs: bool = False  # reads the router's softmax probabilities (meaningless when they are uniform)


def _bh_factor(m: int, dtype: torch.dtype, device) -> torch.Tensor:
    """m / i for i = 1..m, correctly rounded to `dtype` (scipy's ``m / i``).

    Computed in float64 and rounded once: for m <= 8192 this equals a float32 true division at every
    rank (checked exhaustively in the tests), and it does not depend on how a backend divides in
    float32 (torch's ``m / tensor`` is m * (1/i), which differs in the last bit at many ranks).
    """
    rank = torch.arange(1, m + 1, device=device, dtype=torch.float64)
    return (torch.full_like(rank, m) / rank).to(dtype)  # tensor / tensor: a true division


def _bh_count_p(p_sorted: torch.Tensor, alpha: float) -> torch.Tensor:
    """Benjamini-Hochberg step-up: the largest i with p_(i) * (m / i) <= alpha (0 if none).

    The arithmetic of scipy.stats.false_discovery_control: q_i = p_(i) * (m / i) in the p-values'
    dtype, compared with alpha in that dtype; its running minimum from the top rejects exactly
    the ranks up to the largest i with q_i <= alpha, which is what is counted here.
    """
    m = p_sorted.shape[-1]
    passed = p_sorted * _bh_factor(m, p_sorted.dtype, p_sorted.device) <= alpha
    rank = torch.arange(1, m + 1, device=p_sorted.device, dtype=p_sorted.dtype)
    # the max is taken in the float dtype (exact for ranks up to 2^24): torch.compile's inductor fails on
    # an integer amax here (torch 2.11), and compiled routing is about 7x faster on a GPU
    return torch.where(passed, rank, 0.0).amax(dim=-1).long()


def benjamini_hochberg(pvalues: torch.Tensor, alpha: float) -> torch.Tensor:
    """Boolean rejection mask of the BH step-up procedure at level alpha over the last dimension.

    Computed in float64 if `pvalues` is float64, else float32; NaN p-values are never rejected.
    Identical to ``scipy.stats.false_discovery_control(p, axis=-1) <= alpha`` for p in the same dtype.
    """
    alpha = check_alpha(alpha)
    if not isinstance(pvalues, torch.Tensor) or pvalues.dim() < 1:
        raise RoutingError(f"pvalues must be a tensor with at least one dimension, got {pvalues!r}")
    p = pvalues if pvalues.dtype == torch.float64 else pvalues.float()
    p = p.nan_to_num(nan=1.0)
    p_sorted = p.sort(dim=-1).values
    k = _bh_count_p(p_sorted, alpha)
    cutoff = p_sorted.gather(-1, (k - 1).clamp_min(0).unsqueeze(-1))
    return (p <= cutoff) & (k > 0).unsqueeze(-1)


def _bh_count(r: Ranked, cfg: "RoutingConfig") -> torch.Tensor:
    return _bh_count_p(r.p, cfg.alpha)


_HC_FRACTION = 0.5  # HC+ searches the ranks i <= m / 2 (Donoho & Jin's alpha0)


def _hc_plus(p_sorted: torch.Tensor) -> torch.Tensor:
    """HC+ of each rank i <= m/2 (Donoho & Jin 2004), HC_i = sqrt(m) (i/m - p_(i)) / sqrt(p_(i) (1 - p_(i))),
    with p_(i) floored at 1/m; -inf where p_(i) = 1 (the formula's limit). Shape (T, max(1, m // 2)).

    HC+ keeps the smallest null p-values from blowing HC up. Donoho & Jin drop the ranks with
    p_(i) <= 1/m; scoring them at p = 1/m instead gives the same protection (a null rank gains at most
    (i - 1)/sqrt(1 - 1/m) from the floor, and i null p-values below 1/m are rare) while a run of strong
    signals, all below 1/m, still counts: with 8 signals at +5 sigma among 64 experts the test fires
    for 100 % of tokens, against 66 % when those ranks are dropped (docs/pvalues.md).
    """
    m = p_sorted.shape[-1]
    i_max = max(1, int(_HC_FRACTION * m))
    raw = p_sorted[..., :i_max]
    p = raw.clamp(1.0 / m, 1.0 - 1e-7)
    rank = torch.arange(1, i_max + 1, device=p.device, dtype=p.dtype)
    hc = math.sqrt(m) * (rank / m - p) * torch.rsqrt(p * (1.0 - p))
    return hc.masked_fill(raw >= 1.0, -math.inf)


@functools.lru_cache(maxsize=32)
def _hc_null_maxima(m: int) -> torch.Tensor:
    """max_i HC+_i of 100,000 draws of m i.i.d. uniform p-values (the global null), sorted; fixed seed."""
    g = torch.Generator().manual_seed(20040607)
    draws, chunk = 100_000, max(1, (1 << 22) // m)
    maxima = [
        _hc_plus(torch.rand(min(chunk, draws - start), m, generator=g).sort(dim=-1).values).amax(dim=-1)
        for start in range(0, draws, chunk)
    ]
    return torch.cat(maxima).sort().values


def prepare_compile() -> None:
    """Call before `torch.compile(route)`: keeps HC's cached host-side simulation out of compiled graphs.
    (Done here, not with a decorator at import: `torch.compiler.disable` imports torch._dynamo, about a
    second of start-up for every process that never compiles.)"""
    global _hc_critical
    if not getattr(_hc_critical, "_lm_eval_bh_disabled", False):
        _hc_critical = torch.compiler.disable(_hc_critical)
        _hc_critical._lm_eval_bh_disabled = True


def _hc_critical(m: int, alpha: float) -> float:
    """The (1 - alpha) quantile of max HC+ under the global null (simulated once per m, in-process;
    below alpha = 1e-3 fewer than 100 simulated maxima lie beyond it)."""
    maxima = _hc_null_maxima(m)
    n = maxima.numel()
    return float(maxima[min(n - 1, max(0, math.ceil((1.0 - alpha) * n) - 1))])


def _hc_count(r: Ranked, cfg: "RoutingConfig") -> torch.Tensor:
    """Higher criticism as a test: when max HC+ exceeds its simulated null critical value at level
    alpha, keep the experts up to the rank where HC+ peaks (the first such rank on ties); else 0
    (the clamp then gives min_k). See `_hc_plus`."""
    hc = _hc_plus(r.p)
    best, arg = hc.max(dim=-1)
    return torch.where(best > _hc_critical(r.p.shape[-1], float(cfg.alpha)), arg + 1, 0)


def _topp_count(r: Ranked, cfg: "RoutingConfig") -> torch.Tensor:
    """Top-p (Huang et al. 2024): the smallest number of experts, taken in descending router softmax
    probability (temperature 1, the probabilities the weights use), whose mass reaches top_p."""
    probs = torch.softmax(r.logits, dim=-1)
    if not r.by_logit:
        probs = probs.sort(dim=-1, descending=True).values
    below = torch.cumsum(probs, dim=-1) < cfg.top_p
    return (below.sum(dim=-1) + 1).clamp_max(probs.shape[-1])


def _router_probs(r: Ranked) -> torch.Tensor:
    """The router's softmax probabilities (temperature 1, the ones the weights use), descending."""
    probs = torch.softmax(r.logits, dim=-1)
    return probs if r.by_logit else probs.sort(dim=-1, descending=True).values


def _skip_count(r: Ranked, cfg: "RoutingConfig") -> torch.Tensor:
    """Dynamic expert skipping (Lu et al. 2024, "Not All Experts are Equal"): keep every expert whose
    routing weight (softmax probability) is at least beta times the token's top weight."""
    probs = _router_probs(r)
    return (probs >= cfg.beta * probs[..., :1]).sum(dim=-1)


def _entropy_count(r: Ranked, cfg: "RoutingConfig") -> torch.Tensor:
    """Entropy-based adaptive k (as in the adaptive-k-routing package): k = ceil(c exp(H)), H the Shannon
    entropy (nats) of the token's router probabilities and c = `entropy_scale`. exp(H) is the effective
    number of experts (1 for a one-hot router, m for a uniform one), so k = j exactly when H lies between
    the thresholds ln((j - 1) / c) and ln(j / c): a confident router gets few experts, an undecided one
    many; a larger c gives every token more."""
    probs = torch.softmax(r.logits.double(), dim=-1)  # float64, and a relative 1e-9 below each threshold:
    entropy = -(probs * torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))).sum(dim=-1)
    scaled = cfg.entropy_scale * torch.exp(entropy)  # an exact c exp(H) = j (a uniform row) must give j
    return torch.ceil(scaled * (1.0 - 1e-9)).clamp(1, probs.shape[-1]).long()


def _topk_count(r: Ranked, cfg: "RoutingConfig") -> torch.Tensor:
    m = r.p.shape[-1]
    k = cfg.max_k if cfg.max_k is not None else m
    return torch.full(r.p.shape[:-1], k, dtype=torch.long, device=r.p.device)


def _lfdr_count(r: Ranked, cfg: "RoutingConfig") -> torch.Tensor:
    """Local false discovery rate (Efron): lfdr = pi0 f0 / f of each expert's logit, from the layer's
    calibration (`null.lfdr`). Keeps experts, in routing order, while the mean lfdr of the kept ones
    stays <= alpha: that mean is the Bayes FDR of the kept set. With a shared null the routing order is
    increasing lfdr (both are monotone in the logit); the temperature cancels, as for `calibrated`."""
    null = _layer_null(r.null, "selection=lfdr")
    if getattr(null, "per_expert", False):  # each expert's own table: look up in the experts' order
        own = torch.empty_like(r.logits).scatter_(-1, r.order, r.logits)
        lfdr = null.lfdr(own).gather(-1, r.order)
    else:
        lfdr = null.lfdr(r.logits)
    rank = torch.arange(1, lfdr.shape[-1] + 1, device=lfdr.device, dtype=lfdr.dtype)
    kept = (torch.cumsum(lfdr, dim=-1) <= cfg.alpha * rank).long()
    return kept.cumprod(dim=-1).sum(dim=-1)


SELECTIONS: dict[str, SelectionRule] = {
    spec.name: spec
    for spec in (
        SelectionRule("bh", _bh_count, "bh", params=("alpha",), knob=Knob("alpha", 1e-8, 1 - 1e-6)),
        # below alpha = 1e-3 fewer than 100 simulated HC maxima lie beyond the critical value
        SelectionRule("hc", _hc_count, "hc", params=("alpha",), knob=Knob("alpha", 1e-3, 1 - 1e-3)),
        SelectionRule("topp", _topp_count, "topp", params=("top_p",), uses_pvalues=False,
                      knob=Knob("top_p", 1e-6, 1.0, scale="linear"), reads_probs=True),
        SelectionRule("topk", _topk_count, "topk", uses_pvalues=False, fixed=True),
        SelectionRule("lfdr", _lfdr_count, "lfdr", params=("alpha",), uses_pvalues=False, needs_null=True,
                      knob=Knob("alpha", 1e-8, 1 - 1e-6)),
        SelectionRule("skip", _skip_count, "skip", params=("beta",), uses_pvalues=False,
                      knob=Knob("beta", 1e-6, 1.0, increasing=False, scale="log"), reads_probs=True),
        SelectionRule("entropy", _entropy_count, "entropy", params=("entropy_scale",), uses_pvalues=False,
                      knob=Knob("entropy_scale", 1e-3, 1e3, scale="log"), reads_probs=True),
    )
}


# --- the router -------------------------------------------------------------------------------


class Routed(NamedTuple):
    """Selected experts per token: `index` (T, max_k) with padding = num_experts, `weight` (T, max_k)
    float32 with padding = 0, `k` (T,) the number of real slots, `nonfinite` (T,) bool, True where
    the token's router logits (or, in a degenerate case, its p-values) had a NaN or an infinity,
    `discoveries` (T,) long the selection rule's count before the [min_k, max_k] clamp, and `pvalues`
    (T, E) float32 the p-values the rule saw, in selection order (ascending; experts in `index` order)."""

    index: torch.Tensor
    weight: torch.Tensor
    k: torch.Tensor
    nonfinite: torch.Tensor | None = None
    discoveries: torch.Tensor | None = None
    pvalues: torch.Tensor | None = None


class Selection(NamedTuple):
    """`select_count`'s result: per token, `logits` and expert `order` in selection order, the clamped
    count `k`, the rule's unclamped count `discoveries`, the sorted `pvalues`, and `bad_p` (T,) bool,
    True where a p-value came out NaN (then treated as 1)."""

    logits: torch.Tensor
    order: torch.Tensor
    k: torch.Tensor
    discoveries: torch.Tensor
    pvalues: torch.Tensor
    bad_p: torch.Tensor


def _rank(x: torch.Tensor, cfg: "RoutingConfig", null, allowed: torch.Tensor | None = None) -> Ranked:
    """Experts in selection order, from cleaned float32 logits `x` (`allowed`: see `route`)."""
    if allowed is not None:
        return _restrict(_rank(x, cfg, null), allowed)
    spec = PVALUES[cfg.pvalue]
    if not is_monotone(cfg, null):
        # p is not monotone in the logit across experts (a per-expert null): order by p, ties by the
        # larger logit, with two stable sorts (logit descending, then p ascending).
        p = spec.fn(x, cfg.temperature, null)
        by_logit, order1 = x.sort(dim=-1, descending=True, stable=True)
        p_sorted, order2 = p.gather(-1, order1).sort(dim=-1, stable=True)
        return Ranked(p_sorted, by_logit.gather(-1, order2), order1.gather(-1, order2), False, null)
    sorted_logits, order = x.sort(dim=-1, descending=True, stable=True)
    return Ranked(spec.fn(sorted_logits, cfg.temperature, null), sorted_logits, order, True, null)


def _restrict(ranked: Ranked, allowed: torch.Tensor) -> Ranked:
    """Move the experts that `allowed` (T, E) excludes behind the others, each part keeping its order, and
    give them p = 1: the order stays the p-value order (no p-value exceeds 1)."""
    ok = allowed.gather(-1, ranked.order)
    move = (~ok).to(torch.uint8).sort(dim=-1, stable=True).indices
    p = torch.where(ok, ranked.p, 1.0).gather(-1, move)
    return ranked._replace(p=p, logits=ranked.logits.gather(-1, move), order=ranked.order.gather(-1, move),
                           by_logit=False)


def _dead_k(cfg: "RoutingConfig") -> int:
    """k for a token with no finite logit: min_k, or max_k when k is fixed (no padding may appear)."""
    return cfg.max_k if cfg.fixed_k else cfg.min_k


def _check_config(cfg, num_experts: int) -> None:
    if not all(hasattr(cfg, f) for f in ("pvalue", "selection", "min_k", "max_k", "renormalize")):
        raise RoutingError(f"cfg must be a RoutingConfig, got {type(cfg).__name__}")
    if cfg.max_k is None or cfg.renormalize is None:
        raise RoutingError("cfg must be resolved against the model first: cfg.resolve(num_experts, top_k, norm_topk_prob)")
    if cfg.max_k > num_experts:
        raise RoutingError(f"max_k must be between min_k and the number of experts ({num_experts}), got {cfg.max_k}")


def split_counts(mean: float, positions: torch.Tensor, layer: int = 0) -> torch.Tensor:
    """Per-token counts whose mean is `mean` (a fractional per-layer budget): floor(mean) + 1 for a token
    when u < frac(mean), else floor(mean), with u = frac(phi (position + 1) + rho layer), phi the golden
    ratio's fraction (a Weyl sequence of the lowest discrepancy). Deterministic per position, so the same
    text gets the same counts in any batch; over the positions 0..n-1 of one sequence the share of
    rounded-up tokens is frac(mean) to within a few tokens (a hash of the token would add random error:
    measured 2-5x larger over lm-eval-like sequences). `positions` (T,) integer tensor."""
    base = math.floor(mean)
    u = torch.frac((positions.double() + 1) * _PHI + layer * _RHO)
    return base + (u < mean - base).long()


_PHI, _RHO = (math.sqrt(5) - 1) / 2, math.sqrt(3) - 1


def select_count(logits: torch.Tensor, cfg: "RoutingConfig", null=None, allowed: torch.Tensor | None = None,
                 counts: torch.Tensor | None = None) -> Selection:
    """Order experts by p-value and count how many each token keeps (see `Selection`).

    Rows with no finite logit get k = `_dead_k(cfg)` (see `route`); `allowed`, `counts`: see `route`.
    """
    _check_logits(logits)
    _check_config(cfg, logits.shape[-1])
    if allowed is not None and (allowed.shape != logits.shape or allowed.dtype != torch.bool):
        raise RoutingError(f"allowed must be a bool tensor of the logits' shape {tuple(logits.shape)}")
    if counts is not None and (counts.shape != logits.shape[:-1] or counts.dtype != torch.long):
        raise RoutingError(f"counts must be a long tensor of shape {tuple(logits.shape[:-1])} (one per token)")
    ranked = _rank(_clean(logits), cfg, null, allowed)
    bad = torch.isnan(ranked.p)  # only a degenerate method/null could produce one: count it, treat as p = 1
    ranked = ranked._replace(p=ranked.p.masked_fill(bad, 1.0))
    discoveries = SELECTIONS[cfg.selection].fn(ranked, cfg) if counts is None else counts
    dead = ranked.logits[..., 0] == NONFINITE_LOGIT  # the best expert is non-finite: all are
    k = torch.where(dead, _dead_k(cfg), discoveries.clamp(cfg.min_k, cfg.max_k))
    return Selection(ranked.logits, ranked.order, k, discoveries, ranked.p, bad.any(dim=-1))


def route(logits: torch.Tensor, cfg: "RoutingConfig", null=None, allowed: torch.Tensor | None = None,
          counts: torch.Tensor | None = None) -> Routed:
    """Route each token (row of `logits`, shape (T, E)) to between min_k and max_k experts.

    `cfg` must be resolved (`cfg.resolve(...)`, so max_k is set); `null` is this layer's calibration
    (duck-typed: ``null.pvalue(x)``, ``null.per_expert``; an element of
    `calibration.load_calibration(...)`, on the logits' device) when the p-value method or the
    selection rule needs one, else ignored.

    Weights are the router's softmax probabilities of the selected experts (renormalised over the
    selected ones when `cfg.renormalize`), matching the stock router at min_k = max_k = top_k.

    Non-finite logits: every NaN, +inf and -inf is treated as "no evidence" (replaced by
    NONFINITE_LOGIT = -1e30 before ranking): such an expert gets p = 1 and softmax weight 0, and is
    selected only when min_k forces more experts than the token has finite logits. A token with no
    finite logit at all is routed to experts 0 .. k0-1 with uniform weights 1/k0, where k0 = min_k
    (k0 = max_k when k is fixed: min_k == max_k or selection=topk, so no padding slot appears).
    Weights are never NaN. `Routed.nonfinite` flags the affected tokens for counting.

    `allowed` (T, E) bool, optional: the experts each token may use (e.g. the expert groups a
    group-limited router keeps). The others get p = 1 and come after the allowed ones in the selection
    order, so they are taken only when min_k forces more experts than are allowed; the p-values of the
    allowed experts, and BH's m, are those of all E experts.

    `counts` (T,) long, optional: how many experts each token keeps, in place of the rule's count (a
    per-layer budget `layer_k`, see `split_counts`); still clamped to [min_k, max_k].
    """
    sel = select_count(logits, cfg, null, allowed, counts)  # checks the arguments
    num_experts, max_k = logits.shape[-1], cfg.max_k
    k = sel.k
    valid = torch.arange(max_k, device=logits.device) < k.unsqueeze(-1)
    top_probs = torch.softmax(sel.logits, dim=-1)[..., :max_k]
    weight = torch.where(valid, top_probs, 0.0)
    if cfg.renormalize:
        total = weight.sum(dim=-1, keepdim=True)
        # all selected probabilities can underflow to 0 only with a per-expert null: then uniform 1/k
        weight = torch.where(total > 0, weight / total.clamp_min(torch.finfo(weight.dtype).tiny), valid / k.unsqueeze(-1))
    dead = sel.logits[..., :1] == NONFINITE_LOGIT  # (T, 1): no finite logit in the row
    weight = torch.where(dead, valid.float() / _dead_k(cfg), weight)
    index = torch.where(valid, sel.order[..., :max_k], num_experts)
    return Routed(index, weight, k, nonfinite_rows(logits) | sel.bad_p, sel.discoveries, sel.pvalues)


def __getattr__(name: str):
    # RoutingConfig lives in lm_eval_bh/config.py, which imports this module's registries; it stays
    # importable from here (`from lm_eval_bh.routing import RoutingConfig`) without an import cycle.
    if name == "RoutingConfig":
        from .config import RoutingConfig

        return RoutingConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
