"""Pure routing maths: router logits -> p-values -> a variable number of experts per token.

Torch only (no transformers), fully vectorised over tokens, no host synchronisation. Every rule works
on the experts sorted by p-value (ties broken by the larger logit) and picks a per-token count k in
[min_k, max_k]; the first k sorted experts are selected and the remaining max_k - k slots are padding
(index = num_experts, weight 0) that the dispatch never runs.

p-value methods (`pvalue=`): ``zscore`` (per-token robust z, normal tail), ``softmax`` (1 - softmax
probability) and ``calibrated`` (upper tail of an empirical null of the layer's logits, fitted by
``lm-eval-bh calibrate``; see lm_eval_bh/calibration.py). Selection rules (`selection=`): ``bh``
(Benjamini-Hochberg step-up), ``hc`` (higher criticism), ``topp`` (smallest set reaching a softmax
mass), ``topk`` (always max_k). See docs/pvalues.md.

Non-finite router logits (NaN, +inf, -inf) are defined behaviour, see `route`.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple

import torch

from .errors import RoutingError  # noqa: F401  (public here too)

__all__ = [
    "PVALUES",
    "SELECTIONS",
    "RoutingConfig",
    "RoutingError",
    "Routed",
    "benjamini_hochberg",
    "is_monotone",
    "nonfinite_rows",
    "pvalues",
    "route",
    "select_count",
]


# A non-finite logit is replaced by this value before anything else: it sorts last, gets softmax
# weight exactly 0 whenever the row has a finite logit, p = 1 under every method, and no arithmetic
# on it overflows to inf or NaN (it stays far from float32's max, 3.4e38).
NONFINITE_LOGIT = -1.0e30


# --- p-values --------------------------------------------------------------------------------
# Each function maps logits sorted in descending order along the last dim to their p-values (same
# order): fn(sorted_logits, temperature, null) with `null` the layer's calibration (None unless the
# method needs one). Methods are decreasing in the logit unless the null is per expert (see
# `is_monotone`), so sorting logits descending sorts p-values ascending with ties broken by the
# larger logit, as the selection rules require.

_SQRT1_2 = 1.0 / math.sqrt(2.0)
_IQR_TO_SIGMA = 1.0 / 1.3489795003921634  # IQR of a standard normal


def _softmax_pvalues(sorted_logits: torch.Tensor, temperature: float, null=None) -> torch.Tensor:
    """p = 1 - softmax probability (the original design; with many experts BH rarely rejects)."""
    return 1.0 - torch.softmax(sorted_logits / temperature, dim=-1)


def _quantile_sorted_desc(sorted_logits: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile (linear interpolation, numpy's default) of rows sorted descending."""
    n = sorted_logits.shape[-1]
    pos = (1.0 - q) * (n - 1)  # position in descending order
    lo, frac = int(math.floor(pos)), pos - math.floor(pos)
    hi = min(lo + 1, n - 1)
    return sorted_logits[..., lo] * (1.0 - frac) + sorted_logits[..., hi] * frac


def _zscore_pvalues(sorted_logits: torch.Tensor, temperature: float, null=None) -> torch.Tensor:
    """Per-token empirical null: z = (logit - median) / (IQR / 1.349), p = upper normal tail.

    Median and interquartile range come from the sort the selection needs anyway, so the null costs
    no extra pass; both ignore the few large logits of the experts that stand out. The statistic is
    location-scale invariant, so `temperature` has no effect here.
    """
    median = _quantile_sorted_desc(sorted_logits, 0.5)
    iqr = _quantile_sorted_desc(sorted_logits, 0.75) - _quantile_sorted_desc(sorted_logits, 0.25)
    scale = (iqr * _IQR_TO_SIGMA).clamp_min(torch.finfo(sorted_logits.dtype).tiny)
    z = (sorted_logits - median.unsqueeze(-1)) / scale.unsqueeze(-1)
    # a non-finite logit (cleaned to NONFINITE_LOGIT) gets p = 1 exactly: interpolating the quantiles of
    # several such values can round, and a tiny scale would then blow the rounding error up to z = +inf
    z = z.masked_fill(sorted_logits == NONFINITE_LOGIT, -math.inf)
    return 0.5 * torch.erfc(z * _SQRT1_2)


def _calibrated_pvalues(sorted_logits: torch.Tensor, temperature: float, null=None) -> torch.Tensor:
    """p = (1 + #{null >= logit / temperature}) / (n + 1) from the layer's calibration (shared null only
    here: a per-expert null needs the experts' identities, which `route` handles itself)."""
    if null is None:
        raise RoutingError("pvalue=calibrated needs the layer's calibration (null=...; see load_calibration)")
    return null.pvalue(sorted_logits if temperature == 1.0 else sorted_logits / temperature)


PValueFn = Callable[..., torch.Tensor]
PVALUES: dict[str, PValueFn] = {
    "zscore": _zscore_pvalues,
    "softmax": _softmax_pvalues,
    "calibrated": _calibrated_pvalues,
}


def _clean(logits: torch.Tensor) -> torch.Tensor:
    """float32 logits with every NaN/+inf/-inf replaced by NONFINITE_LOGIT (one fused kernel)."""
    return torch.nan_to_num(logits.float(), nan=NONFINITE_LOGIT, posinf=NONFINITE_LOGIT, neginf=NONFINITE_LOGIT)


def nonfinite_rows(logits: torch.Tensor) -> torch.Tensor:
    """Per-token flag: True where the token's router logits contain a NaN or an infinity."""
    return ~torch.isfinite(logits).all(dim=-1)


def pvalues(logits: torch.Tensor, method: str = "zscore", temperature: float = 1.0, null=None) -> torch.Tensor:
    """P-values of every expert for each token, in the experts' own order (for analysis and tests)."""
    x = _clean(logits)
    if method == "calibrated":  # in the experts' own order, which a per-expert null needs
        return _calibrated_pvalues(x, temperature, null)
    sorted_logits, order = x.sort(dim=-1, descending=True, stable=True)
    p_sorted = PVALUES[method](sorted_logits, temperature, null)
    return torch.empty_like(p_sorted).scatter_(-1, order, p_sorted)


def is_monotone(cfg: "RoutingConfig", null=None) -> bool:
    """Whether the p-values order the experts exactly like the logits (then top-k by logit = top-k by p).

    False only for ``pvalue=calibrated`` with a per-expert null (known from `null`, or read from the
    calibration file's header when `null` is not given).
    """
    if cfg.pvalue != "calibrated":
        return True
    if null is not None:
        return not getattr(null, "per_expert", False)
    from .calibration import read_header  # torch/numpy only; imported lazily

    return not bool(read_header(cfg.calibration).get("per_expert", False))


# --- selection rules: sorted p-values -> how many experts --------------------------------------


class Ranked(NamedTuple):
    """What a selection rule sees, per token, experts in selection order (p ascending, ties by larger
    logit): `p` the p-values, `logits` the (cleaned, float32) logits, `by_logit` whether that order is
    also descending logit order (true for monotone p-value methods)."""

    p: torch.Tensor
    logits: torch.Tensor
    by_logit: bool


def _bh_count_p(p_sorted: torch.Tensor, alpha: float) -> torch.Tensor:
    """Benjamini-Hochberg step-up: the largest i with p_(i) * (m / i) <= alpha (0 if none).

    Written exactly as scipy.stats.false_discovery_control adjusts (ps * (m / i)), so that the two
    agree bit for bit in the same dtype.
    """
    m = p_sorted.shape[-1]
    rank = torch.arange(1, m + 1, device=p_sorted.device, dtype=p_sorted.dtype)
    passed = p_sorted * (m / rank) <= alpha
    # the max is taken in the float dtype (exact for ranks up to 2^24): torch.compile's inductor fails on
    # an integer amax here (torch 2.11), and compiled routing is about 7x faster on a GPU
    return torch.where(passed, rank, 0.0).amax(dim=-1).long()


def benjamini_hochberg(pvalues: torch.Tensor, alpha: float) -> torch.Tensor:
    """Boolean rejection mask of the BH step-up procedure at level alpha over the last dimension.

    Computed in float64 if `pvalues` is float64, else float32; NaN p-values are never rejected.
    Identical to ``scipy.stats.false_discovery_control(p, axis=-1) <= alpha``.
    """
    p = pvalues if pvalues.dtype == torch.float64 else pvalues.float()
    p = p.nan_to_num(nan=1.0)
    p_sorted = p.sort(dim=-1).values
    k = _bh_count_p(p_sorted, alpha)
    cutoff = p_sorted.gather(-1, (k - 1).clamp_min(0).unsqueeze(-1))
    return (p <= cutoff) & (k > 0).unsqueeze(-1)


def _bh_count(r: Ranked, cfg: "RoutingConfig") -> torch.Tensor:
    return _bh_count_p(r.p, cfg.alpha)


def _hc_count(r: Ranked, cfg: "RoutingConfig") -> torch.Tensor:
    """Higher criticism (Donoho & Jin 2004): HC_i = sqrt(m) (i/m - p_(i)) / sqrt(p_(i) (1 - p_(i))),
    cut at the rank i in [min_k, max_k] that maximises it (the first such rank on ties).

    p is clamped to [1e-30, 1 - 1e-7] so that p = 0 gives a large finite value, not inf or NaN; a rank
    whose p is exactly 1 (e.g. a non-finite logit) gets HC = -inf, the formula's limit.
    """
    m = r.p.shape[-1]
    lo, hi = cfg.min_k, cfg.max_k if cfg.max_k is not None else m
    raw = r.p[..., :hi]
    p = raw.clamp(1e-30, 1.0 - 1e-7)
    rank = torch.arange(1, hi + 1, device=p.device, dtype=p.dtype)
    hc = math.sqrt(m) * (rank / m - p) * torch.rsqrt(p * (1.0 - p))
    hc = hc.masked_fill(raw >= 1.0, -math.inf)  # the limit of the formula at p = 1 (never worth a cut)
    if lo > 1:
        hc = hc.masked_fill(rank < lo, -math.inf)
    return hc.argmax(dim=-1) + 1


def _topp_count(r: Ranked, cfg: "RoutingConfig") -> torch.Tensor:
    """Top-p (Huang et al. 2024): the smallest number of experts, taken in descending router softmax
    probability (temperature 1, the probabilities the weights use), whose mass reaches top_p."""
    probs = torch.softmax(r.logits, dim=-1)
    if not r.by_logit:
        probs = probs.sort(dim=-1, descending=True).values
    below = torch.cumsum(probs, dim=-1) < cfg.top_p
    return (below.sum(dim=-1) + 1).clamp_max(probs.shape[-1])


def _topk_count(r: Ranked, cfg: "RoutingConfig") -> torch.Tensor:
    m = r.p.shape[-1]
    k = cfg.max_k if cfg.max_k is not None else m
    return torch.full(r.p.shape[:-1], k, dtype=torch.long, device=r.p.device)


CountFn = Callable[[Ranked, "RoutingConfig"], torch.Tensor]
SELECTIONS: dict[str, CountFn] = {"bh": _bh_count, "hc": _hc_count, "topp": _topp_count, "topk": _topk_count}


# --- configuration -----------------------------------------------------------------------------

MODES = ("patch", "analyze")


@dataclass(frozen=True)
class RoutingConfig:
    """Routing settings. `max_k=None` and `renormalize=None` mean "the model's own" (top_k, norm_topk_prob).

    `calibration` is the path of a file written by ``lm-eval-bh calibrate``; it is required iff
    ``pvalue="calibrated"``. `top_p` is used by ``selection="topp"`` only.
    """

    alpha: float = 0.05
    min_k: int = 1
    max_k: int | None = None
    temperature: float = 1.0
    pvalue: str = "zscore"
    selection: str = "bh"
    renormalize: bool | None = None
    mode: str = "patch"
    calibration: str | None = None
    top_p: float = 0.5

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("alpha", _as_float("alpha", self.alpha))
        if not 0.0 < self.alpha < 1.0:
            raise RoutingError(f"alpha must be in (0, 1), got {self.alpha!r}")
        set_("temperature", _as_float("temperature", self.temperature))
        if not (self.temperature > 0.0 and math.isfinite(self.temperature)):
            raise RoutingError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        set_("top_p", _as_float("top_p", self.top_p))
        if not 0.0 < self.top_p <= 1.0:
            raise RoutingError(f"top_p must be in (0, 1], got {self.top_p!r}")
        set_("min_k", _as_int("min_k", self.min_k))
        if self.max_k is not None:
            set_("max_k", _as_int("max_k", self.max_k))
        if self.min_k < 1:
            raise RoutingError(f"min_k must be an integer >= 1, got {self.min_k!r}")
        if self.max_k is not None and self.max_k < self.min_k:
            raise RoutingError(f"max_k must be an integer >= min_k ({self.min_k}), got {self.max_k!r}")
        for name, allowed in (("pvalue", PVALUES), ("selection", SELECTIONS), ("mode", MODES)):
            value = getattr(self, name)
            if value not in allowed:
                raise RoutingError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        if self.renormalize is not None:
            set_("renormalize", _as_bool("renormalize", self.renormalize))
        if self.calibration is not None:
            if not isinstance(self.calibration, (str, os.PathLike)) or not str(self.calibration):
                raise RoutingError(f"calibration must be the path of a calibration file, got {self.calibration!r}")
            set_("calibration", str(self.calibration))
        if self.pvalue == "calibrated":
            if self.calibration is None:
                raise RoutingError(
                    "calibration must be set to a file from `lm-eval-bh calibrate` when pvalue=calibrated"
                )
            if not os.path.isfile(self.calibration):
                raise RoutingError(f"calibration file not found: {self.calibration}")
        elif self.calibration is not None:
            raise RoutingError(
                f"calibration is only used with pvalue=calibrated; got calibration={self.calibration!r} "
                f"with pvalue={self.pvalue}"
            )

    def resolve(self, num_experts: int, top_k: int, norm_topk_prob: bool) -> "RoutingConfig":
        """Fill the model-dependent defaults and check the bounds against the model."""
        max_k = top_k if self.max_k is None else self.max_k
        if self.min_k > num_experts:
            raise RoutingError(f"min_k must be between 1 and the number of experts ({num_experts}), got {self.min_k}")
        if max_k > num_experts:
            raise RoutingError(f"max_k must be between min_k and the number of experts ({num_experts}), got {max_k}")
        if max_k < self.min_k:
            raise RoutingError(f"max_k must be >= min_k ({self.min_k}), got {max_k} (the model's top_k)")
        renormalize = norm_topk_prob if self.renormalize is None else self.renormalize
        return RoutingConfig(**{**asdict(self), "max_k": max_k, "renormalize": bool(renormalize)})

    @property
    def fixed_k(self) -> bool:
        return self.max_k is not None and (self.min_k == self.max_k or self.selection == "topk")

    def as_dict(self) -> dict:
        return asdict(self)


def _as_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RoutingError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except ValueError:
        raise RoutingError(f"{name} must be a number, got {value!r}") from None


def _as_int(name: str, value) -> int:
    # lm-eval's CLI turns "8" into 8 but "-1" into -1.0: accept integral floats, refuse 2.5 and "x".
    if isinstance(value, bool):
        raise RoutingError(f"{name} must be an integer, got {value!r}")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise RoutingError(f"{name} must be an integer, got {value!r}") from None
    if not f.is_integer():
        raise RoutingError(f"{name} must be an integer, got {value!r}")
    return int(f)


def _as_bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    raise RoutingError(f"{name} must be true or false, got {value!r}")


# --- the router -------------------------------------------------------------------------------


class Routed(NamedTuple):
    """Selected experts per token: `index` (T, max_k) with padding = num_experts, `weight` (T, max_k)
    float32 with padding = 0, `k` (T,) the number of real slots, `nonfinite` (T,) bool, True where
    the token's router logits had a NaN or an infinity."""

    index: torch.Tensor
    weight: torch.Tensor
    k: torch.Tensor
    nonfinite: torch.Tensor | None = None


def _rank(x: torch.Tensor, cfg: RoutingConfig, null) -> tuple[Ranked, torch.Tensor]:
    """Experts in selection order: (Ranked, order) from cleaned float32 logits `x`."""
    if cfg.pvalue == "calibrated" and getattr(null, "per_expert", False):
        # per-expert nulls are not monotone in the logit across experts: order by p, ties by the larger
        # logit, with two stable sorts (logit descending, then p ascending).
        p = _calibrated_pvalues(x, cfg.temperature, null)
        by_logit, order1 = x.sort(dim=-1, descending=True, stable=True)
        p_sorted, order2 = p.gather(-1, order1).sort(dim=-1, stable=True)
        return Ranked(p_sorted, by_logit.gather(-1, order2), False), order1.gather(-1, order2)
    sorted_logits, order = x.sort(dim=-1, descending=True, stable=True)
    p_sorted = PVALUES[cfg.pvalue](sorted_logits, cfg.temperature, null)
    return Ranked(p_sorted, sorted_logits, True), order


def _dead_k(cfg: RoutingConfig) -> int:
    """k for a token with no finite logit: min_k, or max_k when k is fixed (no padding may appear)."""
    return cfg.max_k if cfg.fixed_k else cfg.min_k


def select_count(
    logits: torch.Tensor, cfg: RoutingConfig, null=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order experts by p-value and count how many each token keeps: (logits in that order, order, k).

    Rows with no finite logit get k = `_dead_k(cfg)` (see `route`).
    """
    x = _clean(logits)
    ranked, order = _rank(x, cfg, null)
    k = SELECTIONS[cfg.selection](ranked, cfg).clamp(cfg.min_k, cfg.max_k)
    dead = ranked.logits[..., 0] == NONFINITE_LOGIT  # the best expert is non-finite: all are
    k = torch.where(dead, _dead_k(cfg), k)
    return ranked.logits, order, k


def route(logits: torch.Tensor, cfg: RoutingConfig, null=None) -> Routed:
    """Route each token (row of `logits`, shape (T, E)) to between min_k and max_k experts.

    `cfg` must be resolved (`cfg.resolve(...)`, so max_k is set); `null` is this layer's calibration
    (an element of `calibration.load_calibration(...)`, on the logits' device) when
    ``cfg.pvalue == "calibrated"``, else ignored.

    Weights are the router's softmax probabilities of the selected experts (renormalised over the
    selected ones when `cfg.renormalize`), matching the stock router at min_k = max_k = top_k.

    Non-finite logits: every NaN, +inf and -inf is treated as "no evidence" (replaced by
    NONFINITE_LOGIT = -1e30 before ranking): such an expert gets p = 1 and softmax weight 0, and is
    selected only when min_k forces more experts than the token has finite logits. A token with no
    finite logit at all is routed to experts 0 .. k0-1 with uniform weights 1/k0, where k0 = min_k
    (k0 = max_k when k is fixed: min_k == max_k or selection=topk, so no padding slot appears).
    Weights are never NaN. `Routed.nonfinite` flags the affected tokens for counting.
    """
    num_experts, max_k = logits.shape[-1], cfg.max_k
    nonfinite = nonfinite_rows(logits)
    sorted_logits, order, k = select_count(logits, cfg, null)
    valid = torch.arange(max_k, device=logits.device) < k.unsqueeze(-1)
    top_probs = torch.softmax(sorted_logits, dim=-1)[..., :max_k]
    weight = torch.where(valid, top_probs, 0.0)
    if cfg.renormalize:
        total = weight.sum(dim=-1, keepdim=True)
        # all selected probabilities can underflow to 0 only with a per-expert null: then uniform 1/k
        weight = torch.where(total > 0, weight / total.clamp_min(torch.finfo(weight.dtype).tiny), valid / k.unsqueeze(-1))
    dead = (sorted_logits[..., :1] == NONFINITE_LOGIT)  # (T, 1): no finite logit in the row
    weight = torch.where(dead, valid.float() / _dead_k(cfg), weight)
    index = torch.where(valid, order[..., :max_k], num_experts)
    return Routed(index, weight, k, nonfinite)
