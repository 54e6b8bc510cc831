"""Routing settings: `RoutingConfig`, the coercion of user arguments, and the labels of a setting.

lm-eval passes model_args as strings or as what it guessed ("8" -> 8, "-1" -> -1.0); everything is
coerced and validated here, before any weights load, with one-line `RoutingError`s naming the
argument. Which fields matter for a setting comes from the p-value and selection specs in
`routing.PVALUES` / `routing.SELECTIONS`, so a label never shows a parameter that has no effect.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import asdict, dataclass

from .checks import as_bool, as_float, as_int, check_alpha, check_temperature, check_unit, parse_profile
from .errors import RoutingError
from .routing import PVALUES, SELECTIONS

__all__ = ["ALLOCATIONS", "MODES", "PVALUES", "SELECTIONS", "RoutingConfig"]

MODES = ("patch", "analyze")
ALLOCATIONS = ("uniform", "sensitivity")  # how target_k spreads the budget over the layers (lm_eval_bh/budget.py)
# a target_k's allocation when model_args name none: the fitted per-layer budget beat the uniform one at every
# target, for top-k and BH alike, on both real-weight models (README, "Which routing wins")
TARGET_ALLOCATION = "sensitivity"


@dataclass(frozen=True)
class RoutingConfig:
    """Routing settings. `max_k=None` and `renormalize=None` mean "the model's own" (top_k, norm_topk_prob).

    `calibration` is the path of a file written by ``lm-eval-bh calibrate``, of a plain-text file to fit
    on at load, or ``"auto"`` (fit on the built-in corpus at load, cached; lm_eval_bh/autocal.py); it is
    required iff the p-value method needs a null (``pvalue="calibrated"``). `top_p` is used by
    ``selection="topp"`` only, `beta` by ``skip``, `entropy_scale` by ``entropy``.

    Budgets (lm_eval_bh/budget.py, docs/rules.md): `target_k` asks for a mean of K experts per token on
    the calibration text; the fit sets the rule's knob (or `layer_knob`, or `layer_k` for topk) and
    `fitted_k`, the mean k it reached there. `layer_k` is a per-layer k profile (fixed top-k per layer,
    fractional means by a deterministic token split; for an adaptive rule, per-layer target means that
    the fit meets with a per-layer knob); `layer_budget` takes that profile from a results file (the
    fixed top-k twin of a run); `allocation` says how target_k spreads its budget over the layers.
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
    beta: float = 0.5
    entropy_scale: float = 1.0
    target_k: float | None = None
    allocation: str = "uniform"
    layer_k: tuple[float, ...] | None = None
    layer_budget: str | None = None
    layer_knob: tuple[float, ...] | None = None
    fitted_k: float | None = None

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("alpha", check_alpha(self.alpha))
        set_("temperature", check_temperature(self.temperature))
        set_("top_p", check_unit(self.top_p, "top_p"))
        set_("beta", check_unit(self.beta, "beta"))
        set_("entropy_scale", _positive("entropy_scale", self.entropy_scale))
        set_("min_k", as_int("min_k", self.min_k))
        if self.max_k is not None:
            set_("max_k", as_int("max_k", self.max_k))
        if self.min_k < 1:
            raise RoutingError(f"min_k must be an integer >= 1, got {self.min_k!r}")
        if self.max_k is not None and self.max_k < self.min_k:
            raise RoutingError(f"max_k must be an integer >= min_k ({self.min_k}), got {self.max_k!r}")
        for name, allowed in (("pvalue", PVALUES), ("selection", SELECTIONS), ("mode", MODES)):
            value = getattr(self, name)
            if value not in allowed:
                raise RoutingError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        if self.renormalize is not None:
            set_("renormalize", as_bool("renormalize", self.renormalize))
        if self.calibration is not None:
            if not isinstance(self.calibration, (str, os.PathLike)) or not str(self.calibration):
                raise RoutingError(f"calibration must be the path of a calibration file, got {self.calibration!r}")
            set_("calibration", str(self.calibration))
        needs_null = [n for n in (self.pvalue, self.selection) if (PVALUES.get(n) or SELECTIONS[n]).needs_null]
        if needs_null:
            if self.calibration is None:
                raise RoutingError(
                    f"calibration must be set to a file from `lm-eval-bh calibrate` when "
                    f"{'pvalue' if needs_null[0] == self.pvalue else 'selection'}={needs_null[0]}"
                )
            if self.calibration != "auto" and not os.path.isfile(self.calibration):
                raise RoutingError(f"calibration file not found: {self.calibration} (calibration=auto fits one "
                                   "on the built-in corpus at load)")
        elif self.calibration is not None:
            users = " or ".join([f"pvalue={n}" for n, s in PVALUES.items() if s.needs_null]
                                + [f"selection={n}" for n, s in SELECTIONS.items() if s.needs_null])
            raise RoutingError(
                f"calibration is only used with {users}; got calibration={self.calibration!r} with pvalue={self.pvalue}"
            )

        self._check_budget(set_)

    def _check_budget(self, set_) -> None:
        """The budget fields: each alone valid, and no two that contradict each other."""
        rule = SELECTIONS[self.selection]
        for name in ("target_k", "fitted_k"):
            if getattr(self, name) is not None:
                set_(name, _positive(name, getattr(self, name)))
        if self.allocation not in ALLOCATIONS:
            raise RoutingError(f"allocation must be one of {', '.join(ALLOCATIONS)}; got {self.allocation!r}")
        if self.allocation != "uniform" and self.target_k is None:
            raise RoutingError(f"allocation={self.allocation} spreads a target_k over the layers: give target_k too")
        for name in ("layer_k", "layer_knob"):
            if getattr(self, name) is not None:
                set_(name, parse_profile(name, getattr(self, name)))
        if self.layer_budget is not None:
            from .results_schema import layer_budget_profile

            if not isinstance(self.layer_budget, (str, os.PathLike)) or not str(self.layer_budget):
                raise RoutingError(f"layer_budget must be the path of a results file, got {self.layer_budget!r}")
            set_("layer_budget", str(self.layer_budget))
            if not rule.fixed:
                raise RoutingError(f"layer_budget is the fixed top-k twin of a run: use it with selection=topk, "
                                   f"got selection={self.selection}")
            if self.layer_k is not None or self.target_k is not None:
                raise RoutingError("layer_budget sets the per-layer budget itself: give it without layer_k and target_k")
            layer_budget_profile(self.layer_budget)  # a missing or damaged file fails here, in one line
        if self.layer_k is not None and self.target_k is not None and self.fitted_k is None:
            raise RoutingError("target_k fits the per-layer budget itself: give target_k or layer_k, not both")
        if self.layer_knob is not None:
            if rule.knob is None or self.layer_k is None or len(self.layer_knob) != len(self.layer_k):
                raise RoutingError("layer_knob is the per-layer knob the fit finds for layer_k: one value per layer "
                                   f"of layer_k, with a rule that has a knob (got selection={self.selection})")
        if (self.target_k is not None or self.layer_k is not None) and self.min_k == self.max_k:
            raise RoutingError(f"min_k = max_k = {self.min_k} fixes k: a budget (target_k, layer_k) needs min_k < max_k")
        profile = self.layer_k or ()
        for k in (*profile, *((self.target_k,) if self.target_k is not None else ())):
            if k < self.min_k or (self.max_k is not None and k > self.max_k):
                name = "layer_k" if k in profile else "target_k"
                raise RoutingError(f"{name} must lie within min_k..max_k ({self.min_k}..{self.max_k or 'top_k'}), "
                                   f"got {_num(k)}")

    def profile(self) -> tuple[float, ...] | None:
        """The per-layer k profile: `layer_k`, or the per-layer means of the `layer_budget` file."""
        if self.layer_budget is not None:
            from .results_schema import layer_budget_profile

            return layer_budget_profile(self.layer_budget)
        return self.layer_k

    @property
    def needs_fit(self) -> bool:
        """Whether the budget must still be fitted on calibration text (lm_eval_bh/budget.py) before routing."""
        rule = SELECTIONS[self.selection]
        if rule.fixed:
            return self.target_k is not None and self.allocation != "uniform" and self.layer_k is None
        return (self.target_k is not None and self.fitted_k is None) or (
            self.layer_k is not None and self.layer_knob is None)

    def resolve(self, num_experts: int, top_k: int, norm_topk_prob: bool) -> "RoutingConfig":
        """Fill the model-dependent defaults and check the bounds against the model."""
        profile = self.profile() or ()
        if self.max_k is None and SELECTIONS[self.selection].fixed and (profile or self.target_k):
            # a fixed rule's budget is its k: the slots must hold the largest per-layer k
            max_k = max(top_k, math.ceil(max((*profile, self.target_k or 0))))
        else:
            max_k = top_k if self.max_k is None else self.max_k
        if self.min_k > num_experts:
            raise RoutingError(f"min_k must be between 1 and the number of experts ({num_experts}), got {self.min_k}")
        if max_k > num_experts:
            raise RoutingError(f"max_k must be between min_k and the number of experts ({num_experts}), got {max_k}")
        if max_k < self.min_k:
            raise RoutingError(f"max_k must be >= min_k ({self.min_k}), got {max_k} (the model's top_k)")
        for k in (*profile, *((self.target_k,) if self.target_k is not None else ())):
            if not self.min_k <= k <= max_k:
                raise RoutingError(f"a budget of {_num(k)} experts per token lies outside min_k..max_k "
                                   f"({self.min_k}..{max_k}) for this model")
        renormalize = norm_topk_prob if self.renormalize is None else self.renormalize
        return RoutingConfig(**{**asdict(self), "max_k": max_k, "renormalize": bool(renormalize)})

    @property
    def budgeted(self) -> bool:
        """A fixed rule with a per-layer or fractional budget (layer_k, layer_budget, target_k)."""
        return SELECTIONS[self.selection].fixed and (
            self.layer_k is not None or self.layer_budget is not None or self.target_k is not None)

    @property
    def fixed_k(self) -> bool:
        return self.max_k is not None and not self.budgeted and (
            self.min_k == self.max_k or SELECTIONS[self.selection].fixed)

    def for_layer(self, i: int) -> "RoutingConfig":
        """This config as layer i routes it: the rule's knob set to `layer_knob[i]` when fitted per layer."""
        if self.layer_knob is None:
            return self
        return RoutingConfig(**{**asdict(self), SELECTIONS[self.selection].knob.param: self.layer_knob[i]})

    def layer_budget_k(self, i: int, num_layers: int) -> float | None:
        """Layer i's mean k under a fixed rule's budget (None: no per-layer budget)."""
        if not self.budgeted:
            return None
        profile = self.profile()
        if profile is None:  # target_k with allocation=uniform: every layer gets K
            return self.target_k
        if len(profile) != num_layers:
            source = f"layer_budget {self.layer_budget}" if self.layer_budget else "layer_k"
            raise RoutingError(f"{source} has {len(profile)} per-layer values; this model has {num_layers} MoE layers")
        return profile[i]

    def as_dict(self) -> dict:
        return asdict(self)

    # --- labels -------------------------------------------------------------------------------

    def effective(self) -> list[tuple[str, object]]:
        """The settings that change what this config routes, in label order: (name, value) pairs.

        A fixed k shows only k (the p-values matter there only when they can reorder the experts:
        a method that is not monotone in the logit). The selection rule's own parameters (its spec's
        `params`) follow; `temperature` only where the p-values are read and the method uses it.
        """
        rule, method = SELECTIONS[self.selection], PVALUES[self.pvalue]
        fixed = rule.fixed or (self.max_k is not None and self.min_k == self.max_k)
        pvalues_matter = (rule.uses_pvalues and not fixed) or not method.monotone
        out: list[tuple[str, object]] = []
        if self.mode != "patch":
            out.append(("mode", self.mode))
        if fixed and not self.budgeted:
            out.append(("k", self.max_k))
        else:
            out.append(("selection", self.selection))
        if pvalues_matter:
            out.append(("pvalue", self.pvalue))
        # a budget names the setting instead of the knob it fits (the found value is in the settings)
        if self.layer_budget is not None:
            out.append(("layer_budget", self.layer_budget))
        elif self.target_k is not None:
            out.append(("target_k", self.target_k))
            if self.allocation != "uniform":
                out.append(("allocation", self.allocation))
        elif self.layer_k is not None:
            out.append(("layer_k", self.layer_k))
        elif not fixed:
            out += [(name, getattr(self, name)) for name in rule.params]
        if not fixed:
            out.append(("k_range", (self.min_k, self.max_k)))
        if pvalues_matter and "temperature" in method.params and self.temperature != 1.0:
            out.append(("temperature", self.temperature))
        if self.renormalize:
            out.append(("renormalize", True))
        if self.calibration is not None:
            out.append(("calibration", self.calibration))
        return out

    def label(self) -> str:
        """One human-readable label, e.g. ``bh/zscore alpha=0.05 k=1..8``, ``topp top_p=0.5 k=1..8``, ``top-4``."""
        words: list[str] = []
        for name, value in self.effective():
            if name == "mode":
                words.append(str(value))
            elif name == "k":
                words.append(f"top-{'k' if value is None else value}")
            elif name == "selection":
                words.append(SELECTIONS[value].label)
            elif name == "pvalue":  # joined to the rule: bh/zscore
                words[-1] += f"/{PVALUES[value].label}"
            elif name == "k_range":
                words.append(f"k={value[0]}..{'top_k' if value[1] is None else value[1]}")
            elif name == "temperature":
                words.append(f"T={_num(value)}")
            elif name == "renormalize":
                words.append("renorm")
            elif name == "calibration":
                words.append(f"cal={os.path.basename(value)}")
            elif name == "layer_budget":
                words.append(f"twin={os.path.basename(value)}")
            elif name == "layer_k":
                words.append(f"layer_k={';'.join(_num(v) for v in value)}")
            elif name == "allocation":
                words.append(f"alloc={value}")
            else:
                words.append(f"{name}={_num(value)}")
        return " ".join(words)

    def setting_id(self) -> str:
        """A file-name-safe id from the same source as `label`, e.g. ``bh-zscore_a0.05_k1-8``, ``topk4``."""
        short = {"alpha": "a", "top_p": "p", "temperature": "T", "beta": "b", "entropy_scale": "c", "target_k": "K"}
        words: list[str] = []
        for name, value in self.effective():
            if name == "mode":
                words.append(str(value))
            elif name == "k":
                words.append(f"topk{'' if value is None else value}")
            elif name == "selection":
                words.append(str(value))
            elif name == "pvalue":
                words[-1] += f"-{value}"
            elif name == "k_range":
                words.append(f"k{value[0]}-{'auto' if value[1] is None else value[1]}")
            elif name == "renormalize":
                words.append("renorm")
            elif name in ("calibration", "layer_budget"):
                stem = os.path.splitext(os.path.basename(value))[0]
                tag = "cal" if name == "calibration" else "twin"
                words.append(f"{tag}-{stem}-{hashlib.sha1(value.encode()).hexdigest()[:6]}")
            elif name == "layer_k":
                words.append("lk" + "-".join(_num(v) for v in value))
            elif name == "allocation":
                words.append(value)
            else:
                words.append(f"{short.get(name, name)}{_num(value)}")
        return re.sub(r"[^A-Za-z0-9._-]", "_", "_".join(words))


def _positive(name: str, value) -> float:
    v = as_float(name, value)
    if not (math.isfinite(v) and v > 0):
        raise RoutingError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def _num(value) -> str:
    """Shortest round-trip text of a number (0.05 -> '0.05', 2.0 -> '2'): distinct values, distinct text."""
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    return str(value)
