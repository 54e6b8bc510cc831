"""The transformers MoE model types the routing patch supports, one declarative record each.

In transformers 5.x the routers of these families return `(logits, weights, indices)` and their
experts modules take `(hidden, indices, weights)`. They differ in where the router sits, how it scores
experts (softmax or sigmoid of the logits), whether a correction bias and expert groups restrict the
selection, and how the selected experts' weights are formed. A `Family` says all of that as data;
`MoELayer` turns it into the three things the patch needs per router call:

- the selection scores (what p-values are computed from, in selection order) and, for group-limited
  routers, the experts allowed for each token;
- the weights of the selected experts, exactly the stock router's at min_k = max_k = top_k;
- the parameter count of one expert (for the cost columns).

Adding a family means one record in FAMILIES (and its tests); a model type that cannot be supported
goes in REFUSED with the reason. The README's family table lists every decoder MoE model type of the
supported transformers release.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import torch
import torch.nn.functional as F

from .errors import RoutingError
from .routing import NONFINITE_LOGIT, Routed

__all__ = [
    "Family", "FAMILIES", "REFUSED", "MoELayer", "find_moe_layers", "config_shape", "check_settings", "param_split",
    "config_param_split",
]

RouterValue = Union[str, bool, None, Callable[[torch.nn.Module], object]]


@dataclass(frozen=True)
class Family:
    """How one model type routes. Values that depend on the checkpoint are read off the router module
    (a callable field gets the router)."""

    router_class: str  # class name of the router module; its MoE block has it as `router` and has `experts`
    router: str = "gate"  # the MoE block's attribute holding the router
    linear: str = ""  # the router's sub-module holding the router weight (and bias); "" = the router itself
    score: RouterValue = "softmax"  # how experts are scored from the logits: "softmax", "sigmoid" or
    # "fn" (the router's own `score_fn`, e.g. transformers' activation named by config.scoring_func)
    bias: str | None = None  # selection-only correction: "router.<attr>", "block.<attr>" or "arg" (router's 2nd input)
    bias_on_logits: bool = False  # the bias is added to the logits, not to the scores (Kolibri)
    groups: str | None = None  # group-limited: "top2" (groups ranked by their 2 best biased scores), "max"
    renormalizes: RouterValue = None  # weights rescaled to sum to 1; None: the router's `norm_topk_prob`
    scale: str | None = None  # router attribute multiplying the weights (routed_scaling_factor)
    softcap: str | None = None  # router attribute: logits = tanh(logits / c) * c when c > 0 (Laguna)
    # config attributes of the expert count and top_k (the first one present)
    num_experts: tuple[str, ...] = ("n_routed_experts", "num_local_experts", "moe_num_experts", "num_experts")
    top_k: tuple[str, ...] = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k")
    expert_params: Callable[[torch.nn.Module], int] = None  # experts module -> parameters of one routed expert

    def __post_init__(self):
        if self.expert_params is None:
            object.__setattr__(self, "expert_params", stacked_expert_params)


def stacked_expert_params(experts: torch.nn.Module) -> int:
    """Parameters of one expert where every parameter of the experts module stacks the experts on dim 0
    (transformers 5.x: gate_up_proj, down_proj and their biases)."""
    return sum(p[0].numel() for p in experts.parameters())


def _value(value: RouterValue, router: torch.nn.Module):
    return value(router) if callable(value) else value


# --- the records ---------------------------------------------------------------------------------

_SOFTMAX = Family(router_class="")  # template: softmax -> top-k -> optional renormalisation (OLMoE)
_TOPK_SOFTMAX = Family(router_class="", router="router", renormalizes=True)  # top-k logits -> softmax
# DeepSeek-V3: sigmoid scores; top-k of score + e_score_correction_bias within the best groups;
# weights are the unbiased scores, optionally renormalised, times routed_scaling_factor.
_DEEPSEEK_V3 = Family(
    router_class="", score="sigmoid", bias="router.e_score_correction_bias", groups="top2",
    scale="routed_scaling_factor",
)


def _like(template: Family, router_class: str, **changes) -> Family:
    return Family(**{**template.__dict__, "router_class": router_class, **changes})


FAMILIES: dict[str, Family] = {
    # softmax routers
    "olmoe": _like(_SOFTMAX, "OlmoeTopKRouter"),
    "flex_olmo": _like(_SOFTMAX, "FlexOlmoTopKRouter"),
    "qwen2_moe": _like(_SOFTMAX, "Qwen2MoeTopKRouter"),
    "qwen3_moe": _like(_SOFTMAX, "Qwen3MoeTopKRouter"),
    "qwen3_next": _like(_SOFTMAX, "Qwen3NextTopKRouter"),
    "qwen4_exp": _like(_SOFTMAX, "Qwen4ExpTextTopKRouter"),
    "qwen4_exp_text": _like(_SOFTMAX, "Qwen4ExpTextTopKRouter"),
    "mellum": _like(_SOFTMAX, "MellumTopKRouter"),
    "lara_mini": _like(_SOFTMAX, "LaraMiniTopKRouter"),
    "jamba": _like(_SOFTMAX, "JambaTopKRouter", router="router", renormalizes=False),
    "mixtral": _like(_SOFTMAX, "MixtralTopKRouter", renormalizes=True),
    "minimax": _like(_SOFTMAX, "MiniMaxTopKRouter", renormalizes=True),
    "qwen3_5_moe": _like(_SOFTMAX, "Qwen3_5MoeTopKRouter", renormalizes=True),
    "qwen3_5_moe_text": _like(_SOFTMAX, "Qwen3_5MoeTopKRouter", renormalizes=True),
    "hunyuan_v1_moe": _like(_SOFTMAX, "HunYuanMoEV1Gate", linear="wg", renormalizes=True),
    "ernie4_5_moe": _like(
        _SOFTMAX, "Ernie4_5_MoeTopKRouter", bias="router.moe_statics.e_score_correction_bias", renormalizes=True,
    ),
    "deepseek_v2": _like(_SOFTMAX, "DeepseekV2TopkRouter", groups="max", renormalizes=False,
                         scale="routed_scaling_factor"),
    # top-k of the logits, softmax over the selected ones (= the renormalised softmax mass)
    "gpt_oss": _like(_TOPK_SOFTMAX, "GptOssTopKRouter"),
    "granitemoe": _like(_TOPK_SOFTMAX, "GraniteMoeTopKRouter"),
    "granitemoe_swa": _like(_TOPK_SOFTMAX, "GraniteMoeSWATopKRouter"),
    "granitemoeshared": _like(_TOPK_SOFTMAX, "GraniteMoeSharedTopKRouter"),
    "granitemoehybrid": _like(_TOPK_SOFTMAX, "GraniteMoeHybridTopKRouter"),
    "aria_text": _like(_TOPK_SOFTMAX, "AriaTextTopKRouter"),
    "cohere2_moe": _like(
        _TOPK_SOFTMAX, "Cohere2MoeTopKRouter", router="gate", score=lambda r: r.expert_selection_fn,
        renormalizes=lambda r: r.expert_selection_fn == "softmax" or bool(r.norm_topk_prob),
    ),
    # sigmoid routers with a correction bias, group-limited (DeepSeek-V3 and its descendants)
    **{
        model_type: _like(_DEEPSEEK_V3, router_class)
        for model_type, router_class in {
            "deepseek_v3": "DeepseekV3TopkRouter",
            "sarvam_mla": "DeepseekV3TopkRouter",
            "deepseek_v32": "DeepseekV32TopkRouter",
            "glm4_moe": "Glm4MoeTopkRouter",
            "sarvam_moe": "Glm4MoeTopkRouter",
            "glm4_moe_lite": "Glm4MoeLiteTopkRouter",
            "glm_moe_dsa": "GlmMoeDsaTopkRouter",
            "dots1": "Dots1TopkRouter",
            "exaone_moe": "ExaoneMoeTopkRouter",
            "solar_open": "SolarOpenTopkRouter",
            "kimi_linear": "KimiLinearTopkRouter",
            "mimo_v2_flash": "MiMoV2FlashTopkRouter",
            "nemotron_h": "NemotronHTopkRouter",
            "bailing_hybrid": "BailingHybridTopkRouter",
            "hy_v4": "HYV4TopkRouter",
            "axk1": "AXK1TopkRouter",
            "axk2": "AXK2TopkRouter",
            "dots3_note": "Dots3NoteTextTopkRouter",  # the vision encoder's own MoE stays stock
            "dots3_note_text": "Dots3NoteTextTopkRouter",
        }.items()
    },
    "beam": _like(_DEEPSEEK_V3, "BeamTopKRouter", scale=None),  # BeamMoE scales the experts' sum itself
    # sigmoid routers with a correction bias, no groups
    "minimax_m2": _like(_DEEPSEEK_V3, "MiniMaxM2TopKRouter", bias="arg", groups=None, renormalizes=True, scale=None),
    "minimax_m3_vl_text": _like(_DEEPSEEK_V3, "MiniMaxM3VLTopKRouter", groups=None, renormalizes=True, scale=None),
    "hy_v3": _like(_DEEPSEEK_V3, "HYV3TopKRouter", bias="arg", groups=None, renormalizes=True,
                   scale="router_scaling_factor"),
    "afmoe": _like(_DEEPSEEK_V3, "AfmoeTokenChoiceRouter", router="router", linear="gate", bias="arg", groups=None,
                   renormalizes=True, scale="route_scale"),
    "laguna": _like(_DEEPSEEK_V3, "LagunaTopKRouter", groups=None, renormalizes=True, scale=None,
                    softcap="router_logit_softcapping"),
    "lfm2_moe": _like(_DEEPSEEK_V3, "Lfm2MoeTopKRouter", bias="arg", groups=None),
    "kolibri1": _like(_DEEPSEEK_V3, "Kolibri1TopKRouter", bias_on_logits=True, groups=None, scale=None),
    # the router's own score function (config.scoring_func), a correction bias, renormalised, scaled
    "inkling2_text": _like(_DEEPSEEK_V3, "Inkling2TopKRouter", score="fn", groups=None, renormalizes=True),
    "inkling2_loop_text": _like(_DEEPSEEK_V3, "Inkling2LoopTopKRouter", score="fn", groups=None, renormalizes=True),
    # sigmoid routers without a bias
    "flint": _like(_DEEPSEEK_V3, "FlintTopKRouter", bias=None, groups=None, scale=None),
}

_GEMMA4 = (
    "not supported yet: its router scores a normalised, rescaled copy of the hidden state, returns "
    "probabilities instead of logits and multiplies each selected weight by a learned per-expert scale"
)
_LLAMA4 = (
    "its router returns a dense (tokens x experts) score matrix that the block multiplies into the input of "
    "every expert, running all experts on every token: there is no (index, weight) interface to route through"
)
REFUSED: dict[str, str] = {
    "llama4": _LLAMA4,
    "llama4_text": _LLAMA4,
    "dbrx": "its block, not the router, selects the experts and normalises their weights by a p-norm "
            "(moe_normalize_expert_weights), which no router patch reaches",
    "phimoe": "its sparsemixer router picks exactly two experts in sequence, each weighted by a softmax over "
              "a masked logit range; its weights are defined for top-2 only",
    "jetmoe": "its gating returns expert-sorted token batches for JetMoE's parallel experts (and mixture of "
              "attention heads), not per-token (index, weight) pairs",
    "longcat_flash": "its router also selects zero-computation (identity) experts, which its experts module "
                     "handles itself; the dispatch and the cost accounting assume every selected expert is an FFN",
    "zaya": "its router is an MLP that carries a state across layers and selects an extra skip expert",
    "inkling_text": "its router normalises the weights of the selected and the shared experts together and "
                    "returns a fourth output, the shared experts' weights",
    "deepseek_v4": "its first layers route by a token-id hash table, which has no per-token scores to test",
    "gemma4": _GEMMA4,
    "gemma4_text": _GEMMA4,
    "doge": "its cross-domain MoE retrieves experts by product keys (embedding-table experts), not through a "
            "top-k router over an experts module",
}


# --- one MoE block ---------------------------------------------------------------------------------


@dataclass
class MoELayer:
    """One MoE block: its router and experts, with what the routing needs to know."""

    block: torch.nn.Module
    router: torch.nn.Module
    experts: torch.nn.Module
    family: Family

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    @property
    def top_k(self) -> int:
        return self.router.top_k

    @property
    def renormalizes(self) -> bool:
        value = _value(self.family.renormalizes, self.router)
        return bool(self.router.norm_topk_prob if value is None else value)

    @property
    def score(self) -> str:
        return _value(self.family.score, self.router)

    @property
    def params_per_expert(self) -> int:
        return self.family.expert_params(self.experts)

    def _linear(self) -> torch.nn.Module:
        return getattr(self.router, self.family.linear) if self.family.linear else self.router

    @property
    def weight(self) -> torch.Tensor:
        """The router weight (experts x hidden)."""
        return self._linear().weight

    @property
    def _scores_in_float32(self) -> bool:
        # routers of the sigmoid/bias kind score in float32
        return self.weight.dtype == torch.float32 or self.score != "softmax" or self.family.bias is not None

    @property
    def scores_dtype(self) -> torch.dtype:
        """The dtype of the selection scores `scores` returns (hidden states in the router weight's dtype)."""
        capped = bool(self.family.softcap) and (getattr(self.router, self.family.softcap, 0.0) or 0.0) > 0
        return torch.float32 if self._scores_in_float32 or capped else self.weight.dtype

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The router logits as the stock router computes them (the first output it returns)."""
        linear = self._linear()
        weight, bias = linear.weight, getattr(linear, "bias", None)
        hidden = hidden.reshape(-1, weight.shape[-1])
        if self._scores_in_float32:
            hidden = hidden.float()
        logits = F.linear(hidden, weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype))
        cap = getattr(self.router, self.family.softcap, 0.0) if self.family.softcap else 0.0
        if cap and cap > 0:
            logits = torch.tanh(logits.float() / cap) * cap
        return logits

    def _bias(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        spec = self.family.bias
        if spec is None:
            return None
        if spec == "arg":
            return args[0] if args else next(iter(kwargs.values()), None)
        owner, _, path = spec.partition(".")
        value = self.router if owner == "router" else self.block
        for name in path.split("."):
            value = getattr(value, name, None)
        return value

    def scores(self, hidden: torch.Tensor, args: tuple = (), kwargs: dict | None = None):
        """(logits, scores, allowed) for one router call: the router's own logits; the scores that order
        the experts for selection (the logits, unless a correction bias takes part: then the biased score,
        NaN wherever the logit is not finite); and the experts the groups allow (None: all)."""
        logits = self.logits(hidden)
        bias = self._bias(args, kwargs or {})
        grouped = self._groups()
        if bias is None and grouped is None:
            return logits, logits, None
        x = logits.float()
        scores = x if self.family.bias_on_logits else self._score(x)
        if bias is not None:
            scores = torch.where(torch.isfinite(x), scores + bias.to(scores.device, torch.float32), torch.nan)
        allowed = None if grouped is None else self._allowed(scores, *grouped)
        return logits, (logits if bias is None else scores), allowed

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        """Per-expert scores from float32 logits, as the stock router forms them."""
        kind = self.score
        if kind == "sigmoid":
            return torch.sigmoid(x)
        if kind == "fn":
            return self.router.score_fn(x)
        return torch.softmax(x, dim=-1)

    def _groups(self) -> tuple[str, int, int] | None:
        """(kind, number of groups, groups kept) when the router limits each token to its best groups."""
        kind, router = self.family.groups, self.router
        groups = getattr(router, "num_group", None)
        if kind is None or not groups or groups <= 1 or router.topk_group >= groups:
            return None
        if kind == "max" and getattr(router, "topk_method", None) != "group_limited_greedy":
            return None
        return kind, groups, router.topk_group

    def _allowed(self, scores: torch.Tensor, kind: str, groups: int, keep: int) -> torch.Tensor:
        """The stock router's group choice: groups ranked by their best score ("max") or the sum of their
        two best ("top2"); a token may use the experts of its `keep` best groups."""
        grouped = scores.nan_to_num(nan=NONFINITE_LOGIT).view(-1, groups, self.num_experts // groups)
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1) if kind == "top2" else grouped.amax(dim=-1)
        chosen = group_scores.topk(keep, dim=-1, sorted=False)[1]
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, chosen, True)
        return mask.unsqueeze(-1).expand_as(grouped).reshape(-1, self.num_experts)

    def weights(self, logits: torch.Tensor, routed: Routed, renormalize: bool) -> torch.Tensor:
        """The selected experts' weights as the stock router forms them (float32; padding 0)."""
        if self.family.bias is None and self.score == "softmax":
            weight = routed.weight  # route() was given the logits: its weights are the softmax mass
        else:
            x = logits.float()
            valid = routed.index < self.num_experts
            index = routed.index.clamp_max(self.num_experts - 1)
            clean = x.nan_to_num(nan=NONFINITE_LOGIT, posinf=NONFINITE_LOGIT, neginf=NONFINITE_LOGIT)
            chosen = self._score(clean).gather(-1, index)
            weight = torch.where(valid, chosen, 0.0)
            if renormalize:
                total = weight.sum(dim=-1, keepdim=True)
                uniform = valid / routed.k.clamp_min(1).unsqueeze(-1)
                weight = torch.where(total > 0, weight / total.clamp_min(torch.finfo(weight.dtype).tiny), uniform)
        if self.family.scale:
            weight = weight * getattr(self.router, self.family.scale)
        return weight


# --- finding the blocks, checking the settings -------------------------------------------------------


def _model_type(config) -> str | None:
    return getattr(config, "model_type", None)


def family_of(config, source: str = "model") -> Family:
    """The record of a model's type; a RoutingError naming the reason when it is not supported."""
    model_type = _model_type(config)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if model_type in REFUSED:
        raise RoutingError(f"{source} is a {model_type!r} model, which is not supported: {REFUSED[model_type]}")
    raise RoutingError(
        f"{source} is a {model_type!r} model, which has no supported MoE router; "
        f"supported model types: {', '.join(sorted(FAMILIES))}"
    )


def find_moe_layers(model: torch.nn.Module) -> list[MoELayer]:
    """The model's MoE blocks in order; a clear error when there are none we can route."""
    family = family_of(getattr(model, "config", None), type(model).__name__)
    layers = []
    for module in model.modules():
        router = getattr(module, family.router, None)
        experts = getattr(module, "experts", None)
        if isinstance(router, torch.nn.Module) and experts is not None and type(router).__name__ == family.router_class:
            layers.append(MoELayer(module, router, experts, family))
    if not layers:
        raise RoutingError(f"{type(model).__name__} has no {family.router_class} router (transformers >= 5.7)")
    return layers


def param_split(model: torch.nn.Module, layers: list[MoELayer] | None = None) -> dict:
    """The cost model's parameter counts: active parameters per token = dense_params + params_per_expert
    x (experts used, summed over the MoE layers). Dense = everything but the routed experts (shared
    experts, dense layers, attention, embeddings)."""
    layers = find_moe_layers(model) if layers is None else layers
    total = sum(p.numel() for p in model.parameters())
    return {
        "num_layers": len(layers),
        "num_experts": layers[0].num_experts,
        "top_k": layers[0].top_k,
        "total_params": total,
        "dense_params": total - sum(l.params_per_expert * l.num_experts for l in layers),
        "params_per_expert": layers[0].params_per_expert,
    }


def config_param_split(config) -> dict:
    """`param_split` of the model a config describes, built on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    family_of(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return param_split(model)


def _first(config, names: tuple[str, ...], default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    if default is not None:
        return default
    raise RoutingError(f"model config has none of {', '.join(names)}")


def config_shape(config, source: str = "model") -> tuple[int, int, bool]:
    """(num_experts, top_k, renormalizes) from a model config, to check settings before weights load
    (renormalizes: the config's `norm_topk_prob`, or the family's fixed convention)."""
    family = family_of(config, source)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    renormalizes = family.renormalizes
    if callable(renormalizes) or renormalizes is None:
        renormalizes = _first(text, ("norm_topk_prob", "moe_renormalize"), default=True)
    return int(_first(text, family.num_experts)), int(_first(text, family.top_k)), bool(renormalizes)


def check_settings(layer: MoELayer, cfg) -> None:
    """Refuse settings that have no meaning for a family's router (one clear line)."""
    if cfg.selection == "topp" and not (layer.score == "softmax" and layer.family.bias is None):
        raise RoutingError(
            f"selection=topp needs softmax router probabilities; {type(layer.router).__name__} scores experts "
            "by sigmoid or with a correction bias (use bh, hc or topk)"
        )
    if cfg.calibration is not None and layer.family.bias is not None:
        raise RoutingError(
            f"calibration files are fitted on router logits; {type(layer.router).__name__} selects experts by "
            f"bias-corrected scores (pvalue={cfg.pvalue}, selection={cfg.selection} need a calibration; use "
            "pvalue=zscore or softmax)"
        )
