"""model_args: the one parser and the one default model of the package (torch-free, cheap to import).

Every command that reads or builds lm-eval ``model_args`` (sweep, report, calibrate, the lm-eval
model class) uses `parse_model_args`, which reads them exactly as the stock ``lm_eval --model_args``
does: a JSON object, or ``key=value`` pairs split on top-level commas, values converted the same way
("0.05" -> 0.05, "8" -> 8, "true" -> True, "None" -> None).
"""

from __future__ import annotations

import difflib
from typing import Any

from .errors import UsageError

__all__ = ["DEFAULT_PRETRAINED", "ROUTING_ARGS", "LM_ARGS", "closest_lm_arg", "parse_model_args"]

DEFAULT_PRETRAINED = "allenai/OLMoE-1B-7B-0924"

# The fields of lm_eval_bh.config.RoutingConfig (kept here so that reading them needs no torch;
# tests/test_lm.py checks the two agree).
ROUTING_ARGS = ("alpha", "min_k", "max_k", "temperature", "pvalue", "selection", "renormalize", "mode",
                "calibration", "top_p", "beta", "entropy_scale", "target_k", "allocation", "layer_k", "layer_budget",
                "layer_knob", "fitted_k")
# Everything the lm-eval model class takes out of model_args before the rest goes on to HFLM.
LM_ARGS = ROUTING_ARGS + ("router_kernel", "compile_router", "fit_tokens")


def parse_model_args(model_args: str | dict | None) -> dict[str, Any]:
    """model_args as a dict: a dict is copied, a string is read as ``lm_eval --model_args`` reads it.

    A part without ``=``, or a ``{`` that is not a JSON object, is a UsageError (one line).
    """
    from lm_eval._cli.utils import handle_cli_value_string, split_top_level, try_parse_json

    if model_args is None:
        return {}
    if isinstance(model_args, dict):
        return dict(model_args)
    try:
        parsed = try_parse_json(model_args.strip())
    except ValueError as e:  # a '{' that is not a JSON object
        raise UsageError(f"model_args: {e}") from None
    if isinstance(parsed, dict):
        return parsed
    out: dict[str, Any] = {}
    for part in split_top_level(model_args.strip()):
        if "=" not in part:
            raise UsageError(f"model_args: '{part}' is not key=value; allowed: comma-separated key=value pairs")
        key, value = part.split("=", 1)
        out[key.strip()] = handle_cli_value_string(value.strip())
    return out


def _squash(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def closest_lm_arg(name: str) -> str | None:
    """The argument of ours that `name` looks like a typo of (`alpah`, `min-k`, `maxk`), else None."""
    squashed = {_squash(a): a for a in LM_ARGS}
    match = difflib.get_close_matches(_squash(name), list(squashed), n=1, cutoff=0.75)
    return squashed[match[0]] if match and name not in LM_ARGS and not name.startswith("__") else None
