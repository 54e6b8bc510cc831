"""The project's error types, in one module that everything may import (torch-free)."""


class RoutingError(ValueError):
    """A bad routing argument or model: the message is one line naming the argument and what is allowed."""


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit code 2."""


class BudgetUnmet(RoutingError):
    """A budget (target_k, a per-layer profile) that the rule cannot meet on the calibration text: known only
    once the model is loaded, so a sweep skips that setting (and its twin) and runs the rest."""
