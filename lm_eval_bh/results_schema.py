"""The `config.routing` block of an lm-eval results file, as typed dataclasses: one definition that the
writer (`BHRouting.summary`) and the readers (`lm-eval-bh report`, tests) share.

``RoutingBlock.from_dict(d).to_dict() == d`` for every block this package writes. Reading is lenient
where files of older releases differ (a missing `diagnostics` or `active_params_per_token` reads as
None) and keeps keys it does not know in `extra`, so nothing is lost on a round trip.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = ["Diagnostics", "LayerDiagnostics", "ModelInfo", "RoutingBlock", "TaskStats", "layer_budget_profile",
           "routing_block"]


@dataclass
class LayerDiagnostics:
    """One MoE layer: the selection rule's mean count before the [min_k, max_k] clamp, the fractions of
    real tokens the clamp raised to min_k or cut to max_k, the counts of all experts' p-values of real
    tokens in 20 equal bins over [0, 1], and Storey's pi0 at lambda = 0.5 from that histogram."""

    mean_discoveries: float | None
    frac_raised_to_min_k: float | None
    frac_cut_to_max_k: float | None
    pvalue_histogram: list[int]
    pi0: float | None


@dataclass
class Diagnostics:
    """`per_layer`: one `LayerDiagnostics` per MoE layer, or None with a `note` saying why (fixed k: the
    stock router ran and computed no p-values)."""

    per_layer: list[LayerDiagnostics] | None
    note: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "Diagnostics":
        layers = d.get("per_layer")
        return cls(None if layers is None else [LayerDiagnostics(**x) for x in layers], d.get("note"))

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"per_layer": None if self.per_layer is None else [asdict(x) for x in self.per_layer]}
        if self.note is not None:
            out["note"] = self.note
        return out


@dataclass
class ModelInfo:
    """Model shape and parameter split, for cost accounting."""

    num_layers: int
    num_experts: int
    top_k: int
    total_params: int
    dense_params: int
    params_per_expert: int


@dataclass
class TaskStats:
    mean_experts_per_token: float | None
    tokens: int


@dataclass
class RoutingBlock:
    """`config.routing`: the settings (`RoutingConfig.as_dict()`), the model, and exact statistics over
    real tokens (k_histogram counts (token, MoE layer) pairs; means are over real tokens and layers).
    `calibration`: where a calibrated setting's null came from (written only for those): ``source``
    (auto, text or file), the text it was fitted on (``corpus``, ``licence``, ``corpus_sha256``,
    ``tokens``), ``under`` (stock or routing), ``status`` (fitted, cached or file), ``seconds``, ``path``."""

    settings: dict[str, Any]
    model: ModelInfo
    mean_experts_per_token: float | None
    per_layer_mean: list[float | None]
    k_histogram: dict[str, int]
    tokens: int
    per_task: dict[str, TaskStats]
    nonfinite_router_tokens: int
    active_params_per_token: float | None = None
    diagnostics: Diagnostics | None = None
    # where the null came from (calibration=auto, a text file or a file; lm_eval_bh/autocal.py)
    calibration: dict[str, Any] | None = None
    # a fitted budget (target_k, layer_k; lm_eval_bh/budget.py): the knob found, the mean k on the
    # calibration text, the text (corpus, tokens, hash), and `achieved_k`, this evaluation's mean k
    budget: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "RoutingBlock":
        known = {f.name for f in fields(cls)} - {"extra"}
        diag = d.get("diagnostics")
        return cls(
            settings=dict(d.get("settings") or {}),
            model=ModelInfo(**d["model"]),
            mean_experts_per_token=d.get("mean_experts_per_token"),
            per_layer_mean=list(d.get("per_layer_mean") or []),
            k_histogram={str(k): int(v) for k, v in (d.get("k_histogram") or {}).items()},
            tokens=int(d.get("tokens") or 0),
            per_task={name: TaskStats(**t) for name, t in (d.get("per_task") or {}).items()},
            nonfinite_router_tokens=int(d.get("nonfinite_router_tokens") or 0),
            active_params_per_token=d.get("active_params_per_token"),
            diagnostics=None if diag is None else Diagnostics.from_dict(diag),
            calibration=d.get("calibration"),
            budget=d.get("budget"),
            extra={k: v for k, v in d.items() if k not in known},
        )

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out["model"] = asdict(self.model)
        out["per_task"] = {name: asdict(t) for name, t in self.per_task.items()}
        out["diagnostics"] = None if self.diagnostics is None else self.diagnostics.to_dict()
        for name in ("calibration", "budget"):  # files without them keep their old shape
            if out[name] is None:
                del out[name]
        return {**out, **self.extra}


def routing_block(results: dict) -> RoutingBlock | None:
    """The routing block of an lm-eval results file (its parsed JSON), or None for a run without one
    (e.g. ``--model hf``)."""
    block = (results.get("config") or {}).get("routing")
    return RoutingBlock.from_dict(block) if isinstance(block, dict) else None


def layer_budget_profile(path) -> tuple[float, ...]:
    """The per-layer mean k of the run a results file records (lm-eval's results JSON, or a sweep's
    <setting_id>.json): the budget of its fixed top-k twin (`layer_budget=FILE`). One-line RoutingError
    when the file is missing, not JSON, or holds no complete per-layer means."""
    import json
    import os

    from .errors import RoutingError

    path = os.fspath(path)
    what = f"layer_budget {path}"
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise RoutingError(f"{what}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RoutingError(f"{what}: not a readable JSON results file ({type(e).__name__})") from None
    block = (data.get("config") or {}).get("routing") if isinstance(data, dict) else None
    means = block.get("per_layer_mean") if isinstance(block, dict) else None
    if not isinstance(means, list) or not means or not all(
            isinstance(m, (int, float)) and not isinstance(m, bool) and m >= 1 for m in means):
        raise RoutingError(f"{what}: no per-layer mean k (config.routing.per_layer_mean, numbers >= 1) in it; "
                           "give the results file of a moe_bh run that counted tokens")
    return tuple(float(m) for m in means)
