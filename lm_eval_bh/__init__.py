"""lm-eval-bh: Benjamini-Hochberg adaptive expert routing for MoE models, evaluated with lm-eval.

The public names load on first use, so `lm-eval-bh --help` does not wait for torch.
"""

import importlib

__version__ = "0.1.0"
_EXPORTS = {
    "BHRouting": "patch",
    "find_moe_layers": "families",
    "RoutingConfig": "config",
    "RoutingError": "errors",
    "benjamini_hochberg": "routing",
    "pvalues": "routing",
    "route": "routing",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
