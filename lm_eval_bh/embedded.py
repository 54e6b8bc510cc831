"""The embedded models: checkpoints built on the user's machine, offline, and cached.

``tiny`` (random-weight OLMoE, for tests and plumbing), ``real`` (a Qwen2-MoE made from the real
weights of SmolLM2-135M-Instruct by MoEfication, uniform router) and ``real-router`` (``real`` with a
fitted, non-uniform softmax router).  ``model_dir(name)`` builds a model on first use and
returns its folder; ``cached_dir(name)`` says where it is or would be, without building.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UsageError

MODELS = {
    "tiny": "random-weight OLMoE (2 layers, 16 experts, top-4, 0.76 M parameters): plumbing and tests; "
            "chance-level accuracy",
    "real": "Qwen2-MoE (30 layers, 16 experts + shared, top-4) MoEfied from SmolLM2-135M-Instruct's real weights",
    "real-router": "`real` with a genuine softmax router (fitted by layer-wise distillation, shipped in the wheel) "
                   "and its experts' down projections refitted to it: for rules that read router probabilities; "
                   "builds `real` first",
}
REAL_LIKE = {"real", "real-router"}
UNTRAINED = {"tiny"}


def _check(name: str) -> str:
    if name not in MODELS:
        raise UsageError(f"unknown embedded model '{name}'; allowed: {', '.join(MODELS)}")
    return name


def cached_dir(name: str) -> Path:
    """Where the model's folder is (or will be once built)."""
    if _check(name) == "tiny":
        from .tiny import default_tiny_model_dir

        return default_tiny_model_dir()
    if name == "real-router":
        from .real_router import default_real_router_dir

        return default_real_router_dir()
    from .real import default_real_dir

    return default_real_dir()


def is_built(name: str) -> bool:
    d = cached_dir(name)
    return (d / "config.json").is_file() and (name not in REAL_LIKE or (d / "lm_eval_bh_real.json").is_file())


def missing(name: str) -> str | None:
    """The install command that building the model still needs here; None when it is built or buildable."""
    if _check(name) == "tiny" or is_built(name):
        return None  # (real-router names the wheel too: it is built from `real`, which needs it)
    from .real import INSTALL_HINT, find_gguf

    try:
        find_gguf()
    except UsageError:
        return INSTALL_HINT
    return None


def model_dir(name: str, progress: bool = True) -> Path:
    """The model's folder, built (deterministically, offline) on first use."""
    if _check(name) == "tiny":
        from .tiny import ensure_tiny_olmoe

        return Path(ensure_tiny_olmoe())
    if name == "real-router":
        from .real_router import ensure_real_router

        return ensure_real_router(progress=progress)
    from .real import ensure_real

    return ensure_real(progress=progress)
