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

import torch

from .errors import RoutingError
from .routing import PVALUES, SELECTIONS

__all__ = ["MODES", "PVALUES", "SELECTIONS", "RoutingConfig"]

MODES = ("patch", "analyze")
_DTYPE = torch.float32  # the dtype the router computes p-values and thresholds in


@dataclass(frozen=True)
class RoutingConfig:
    """Routing settings. `max_k=None` and `renormalize=None` mean "the model's own" (top_k, norm_topk_prob).

    `calibration` is the path of a file written by ``lm-eval-bh calibrate``, of a plain-text file to fit
    on at load, or ``"auto"`` (fit on the built-in corpus at load, cached; lm_eval_bh/autocal.py); it is
    required iff the p-value method needs a null (``pvalue="calibrated"``). `top_p` is used by
    ``selection="topp"`` only.
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
        set_("alpha", check_alpha(self.alpha))
        set_("temperature", check_temperature(self.temperature))
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
        return self.max_k is not None and (self.min_k == self.max_k or SELECTIONS[self.selection].fixed)

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
        if fixed:
            out.append(("k", self.max_k))
        else:
            out.append(("selection", self.selection))
        if pvalues_matter:
            out.append(("pvalue", self.pvalue))
        if not fixed:
            out += [(name, getattr(self, name)) for name in rule.params]
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
            else:
                words.append(f"{name}={_num(value)}")
        return " ".join(words)

    def setting_id(self) -> str:
        """A file-name-safe id from the same source as `label`, e.g. ``bh-zscore_a0.05_k1-8``, ``topk4``."""
        short = {"alpha": "a", "top_p": "p", "temperature": "T"}
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
            elif name == "calibration":
                stem = os.path.splitext(os.path.basename(value))[0]
                words.append(f"cal-{stem}-{hashlib.sha1(value.encode()).hexdigest()[:6]}")
            else:
                words.append(f"{short.get(name, name)}{_num(value)}")
        return re.sub(r"[^A-Za-z0-9._-]", "_", "_".join(words))


def _num(value) -> str:
    """Shortest round-trip text of a number (0.05 -> '0.05', 2.0 -> '2'): distinct values, distinct text."""
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    return str(value)


# --- coercion and validation of single arguments (also used by the public functions) ------------


def check_alpha(alpha, name: str = "alpha") -> float:
    """alpha as a float in (0, 1) that the router's float32 arithmetic can represent (not 0 there)."""
    a = _as_float(name, alpha)
    if not 0.0 < a < 1.0:
        raise RoutingError(f"{name} must be in (0, 1), got {a!r}")
    if torch.tensor(a, dtype=_DTYPE).item() < torch.finfo(_DTYPE).tiny:
        raise RoutingError(
            f"{name} must be at least {torch.finfo(_DTYPE).tiny:.3g} (float32's smallest normal number), got {a!r}"
        )
    return a


def check_temperature(temperature, name: str = "temperature") -> float:
    """temperature as a finite float > 0 whose reciprocal is finite in float32 (logits / T must not overflow to inf)."""
    t = _as_float(name, temperature)
    if not (t > 0.0 and math.isfinite(t)):
        raise RoutingError(f"{name} must be a finite number > 0, got {t!r}")
    fi = torch.finfo(_DTYPE)
    if not fi.tiny <= t <= fi.max:
        raise RoutingError(f"{name} must be between {fi.tiny:.3g} and {fi.max:.3g} (float32's normal range), got {t!r}")
    return t


def _as_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RoutingError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (ValueError, OverflowError):
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
