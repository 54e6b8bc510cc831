"""Coercion and validation of single routing arguments, below both the routing maths and the settings.

lm-eval passes model_args as strings or as what it guessed ("8" -> 8, "-1" -> -1.0); these turn them
into numbers, or raise a one-line `RoutingError` naming the argument and what is allowed. routing.py
(its public functions) and config.py (`RoutingConfig`) both use them, so neither imports the other
for its checks.
"""

from __future__ import annotations

import math

import torch

from .errors import RoutingError

__all__ = ["as_bool", "as_float", "as_int", "check_alpha", "check_temperature", "check_unit", "parse_profile"]

_DTYPE = torch.float32  # the dtype the router computes p-values and thresholds in


def check_alpha(alpha, name: str = "alpha") -> float:
    """alpha as a float in (0, 1) that the router's float32 arithmetic can represent (not 0 there)."""
    a = as_float(name, alpha)
    if not 0.0 < a < 1.0:
        raise RoutingError(f"{name} must be in (0, 1), got {a!r}")
    if torch.tensor(a, dtype=_DTYPE).item() < torch.finfo(_DTYPE).tiny:
        raise RoutingError(
            f"{name} must be at least {torch.finfo(_DTYPE).tiny:.3g} (float32's smallest normal number), got {a!r}"
        )
    return a


def check_temperature(temperature, name: str = "temperature") -> float:
    """temperature as a finite float > 0 whose reciprocal is finite in float32 (logits / T must not overflow to inf)."""
    t = as_float(name, temperature)
    if not (t > 0.0 and math.isfinite(t)):
        raise RoutingError(f"{name} must be a finite number > 0, got {t!r}")
    fi = torch.finfo(_DTYPE)
    if not fi.tiny <= t <= fi.max:
        raise RoutingError(f"{name} must be between {fi.tiny:.3g} and {fi.max:.3g} (float32's normal range), got {t!r}")
    return t


def check_unit(value, name: str) -> float:
    """A float in (0, 1] (top_p, beta)."""
    v = as_float(name, value)
    if not 0.0 < v <= 1.0:
        raise RoutingError(f"{name} must be in (0, 1], got {v!r}")
    return v


def as_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RoutingError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (ValueError, OverflowError):
        raise RoutingError(f"{name} must be a number, got {value!r}") from None


def as_int(name: str, value) -> int:
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


def as_bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    raise RoutingError(f"{name} must be true or false, got {value!r}")


def parse_profile(name: str, value) -> tuple[float, ...]:
    """A per-layer profile: numbers separated by ';' ("8;2;2.5;3": lm-eval's model_args parser splits on
    commas, so a comma list would not survive it), or a list/tuple of numbers; each finite and > 0."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.strip().strip("[]()").replace(",", ";").split(";")]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [value]
    if not parts or parts == [""]:
        raise RoutingError(f"{name} must be per-layer numbers separated by ';' (e.g. {name}=8;2;2.5;3), got {value!r}")
    out = []
    for part in parts:
        try:
            v = as_float(name, part)
        except RoutingError:
            raise RoutingError(f"{name} must be per-layer numbers separated by ';' (e.g. {name}=8;2;2.5;3), "
                               f"got {value!r}") from None
        if not (math.isfinite(v) and v > 0):
            raise RoutingError(f"{name} entries must be finite numbers > 0, got {part!r} in {value!r}")
        out.append(v)
    return tuple(out)
