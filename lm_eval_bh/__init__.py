"""lm-eval-bh: Benjamini-Hochberg adaptive expert routing for MoE models, evaluated with lm-eval."""

from .families import find_moe_layers
from .patch import BHRouting
from .routing import RoutingConfig, RoutingError, benjamini_hochberg, pvalues, route

__all__ = ["BHRouting", "RoutingConfig", "RoutingError", "benjamini_hochberg", "find_moe_layers", "pvalues", "route"]
__version__ = "0.1.0"
