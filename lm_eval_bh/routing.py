"""Pure routing maths: router logits -> p-values -> a variable number of experts per token.

Torch only (no transformers), fully vectorised over tokens. Every rule works on the experts
sorted by p-value (ties broken by the larger logit) and picks a per-token count k in
[min_k, max_k]; the first k sorted experts are selected and the remaining max_k - k slots are
padding (index = num_experts, weight 0) that the dispatch never runs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple

import torch

__all__ = [
    "PVALUES",
    "SELECTIONS",
    "RoutingConfig",
    "RoutingError",
    "Routed",
    "benjamini_hochberg",
    "pvalues",
    "route",
]


class RoutingError(ValueError):
    """A bad routing argument or model: the message is one line naming the argument and what is allowed."""


# --- p-values --------------------------------------------------------------------------------
# Each function maps logits sorted in descending order along the last dim to their p-values (same
# order). All built-in methods are decreasing in the logit, so sorting logits descending sorts
# p-values ascending with ties broken by the larger logit, as the selection rules require.

_SQRT1_2 = 1.0 / math.sqrt(2.0)
_IQR_TO_SIGMA = 1.0 / 1.3489795003921634  # IQR of a standard normal


def _softmax_pvalues(sorted_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """p = 1 - softmax probability (the original design; with many experts BH rarely rejects)."""
    return 1.0 - torch.softmax(sorted_logits / temperature, dim=-1)


def _quantile_sorted_desc(sorted_logits: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile (linear interpolation, numpy's default) of rows sorted descending."""
    n = sorted_logits.shape[-1]
    pos = (1.0 - q) * (n - 1)  # position in descending order
    lo, frac = int(math.floor(pos)), pos - math.floor(pos)
    hi = min(lo + 1, n - 1)
    return sorted_logits[..., lo] * (1.0 - frac) + sorted_logits[..., hi] * frac


def _zscore_pvalues(sorted_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-token empirical null: z = (logit - median) / (IQR / 1.349), p = upper normal tail.

    Median and interquartile range come from the sort the selection needs anyway, so the null costs
    no extra pass; both ignore the few large logits of the experts that stand out. The statistic is
    location-scale invariant, so `temperature` has no effect here.
    """
    del temperature
    median = _quantile_sorted_desc(sorted_logits, 0.5)
    iqr = _quantile_sorted_desc(sorted_logits, 0.75) - _quantile_sorted_desc(sorted_logits, 0.25)
    scale = (iqr * _IQR_TO_SIGMA).clamp_min(torch.finfo(sorted_logits.dtype).tiny)
    z = (sorted_logits - median.unsqueeze(-1)) / scale.unsqueeze(-1)
    return 0.5 * torch.erfc(z * _SQRT1_2)


PValueFn = Callable[[torch.Tensor, float], torch.Tensor]
PVALUES: dict[str, PValueFn] = {"zscore": _zscore_pvalues, "softmax": _softmax_pvalues}


def pvalues(logits: torch.Tensor, method: str = "zscore", temperature: float = 1.0) -> torch.Tensor:
    """P-values of every expert for each token, in the experts' own order (for analysis and tests)."""
    sorted_logits, order = logits.float().sort(dim=-1, descending=True, stable=True)
    p_sorted = PVALUES[method](sorted_logits, temperature)
    return torch.empty_like(p_sorted).scatter_(-1, order, p_sorted)


# --- selection rules: sorted p-values -> how many experts --------------------------------------


def _bh_count(p_sorted: torch.Tensor, alpha: float) -> torch.Tensor:
    """Benjamini-Hochberg step-up: the largest i with p_(i) <= i * alpha / m (0 if none)."""
    m = p_sorted.shape[-1]
    rank = torch.arange(1, m + 1, device=p_sorted.device)
    passed = p_sorted <= rank.to(p_sorted.dtype) * (alpha / m)
    return (passed * rank).amax(dim=-1)


def benjamini_hochberg(pvalues: torch.Tensor, alpha: float) -> torch.Tensor:
    """Boolean rejection mask of the BH step-up procedure at level alpha over the last dimension."""
    p = pvalues.float().nan_to_num(nan=1.0)
    p_sorted = p.sort(dim=-1).values
    k = _bh_count(p_sorted, alpha)
    cutoff = p_sorted.gather(-1, (k - 1).clamp_min(0).unsqueeze(-1))
    return (p <= cutoff) & (k > 0).unsqueeze(-1)


CountFn = Callable[[torch.Tensor, "RoutingConfig"], torch.Tensor]
SELECTIONS: dict[str, CountFn] = {"bh": lambda p_sorted, cfg: _bh_count(p_sorted, cfg.alpha)}


# --- configuration -----------------------------------------------------------------------------

MODES = ("patch", "analyze")


@dataclass(frozen=True)
class RoutingConfig:
    """Routing settings. `max_k=None` and `renormalize=None` mean "the model's own" (top_k, norm_topk_prob)."""

    alpha: float = 0.05
    min_k: int = 1
    max_k: int | None = None
    temperature: float = 1.0
    pvalue: str = "zscore"
    selection: str = "bh"
    renormalize: bool | None = None
    mode: str = "patch"

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("alpha", _as_float("alpha", self.alpha))
        if not 0.0 < self.alpha < 1.0:
            raise RoutingError(f"alpha must be in (0, 1), got {self.alpha!r}")
        set_("temperature", _as_float("temperature", self.temperature))
        if not (self.temperature > 0.0 and math.isfinite(self.temperature)):
            raise RoutingError(f"temperature must be a finite number > 0, got {self.temperature!r}")
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
        return self.max_k is not None and self.min_k == self.max_k

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
    float32 with padding = 0, `k` (T,) the number of real slots."""

    index: torch.Tensor
    weight: torch.Tensor
    k: torch.Tensor


def select_count(logits: torch.Tensor, cfg: RoutingConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort experts by p-value and count how many each token keeps: (sorted logits, order, k)."""
    sorted_logits, order = logits.float().sort(dim=-1, descending=True, stable=True)
    p_sorted = PVALUES[cfg.pvalue](sorted_logits, cfg.temperature)
    k = SELECTIONS[cfg.selection](p_sorted, cfg).clamp(cfg.min_k, cfg.max_k)
    return sorted_logits, order, k


def route(logits: torch.Tensor, cfg: RoutingConfig) -> Routed:
    """Route each token (row of `logits`, shape (T, E)) to between min_k and max_k experts.

    Weights are the router's softmax probabilities of the selected experts (renormalised over the
    selected ones when `cfg.renormalize`), matching the stock router at min_k = max_k = top_k.
    """
    num_experts = logits.shape[-1]
    sorted_logits, order, k = select_count(logits, cfg)
    top_probs = torch.softmax(sorted_logits, dim=-1)[..., : cfg.max_k]
    valid = torch.arange(cfg.max_k, device=logits.device) < k.unsqueeze(-1)
    weight = torch.where(valid, top_probs, 0.0)
    if cfg.renormalize:
        weight = weight / weight.sum(dim=-1, keepdim=True)
    index = torch.where(valid, order[..., : cfg.max_k], num_experts)
    return Routed(index, weight, k)
