"""The transformers MoE families the routing patch knows, and how each one forms expert weights.

In transformers 5.x every supported router returns `(logits, weights, indices)` and every experts
module takes `(hidden, indices, weights)`. The families differ only in where the router sits, how
logits are computed, and whether the weights of the selected experts are renormalised:

| family | router | weights of the selected experts | `renormalize` default |
|---|---|---|---|
| OLMoE, Qwen2-MoE, Qwen3-MoE | `block.gate`, softmax | softmax mass | `norm_topk_prob` (OLMoE: false) |
| Mixtral | `block.gate`, softmax | softmax mass, renormalised | true |
| GPT-OSS | `block.router`, logits + bias | softmax over the selected logits (= renormalised mass) | true |

With `renormalize=false` the weights are the raw softmax mass of the selected experts; with `true`
they are rescaled to sum to 1 over the selected experts, whatever their number. Qwen2-MoE's shared
expert always runs and counts as dense compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import RoutingError

__all__ = ["Family", "FAMILIES", "UNSUPPORTED", "MoELayer", "find_moe_layers", "config_shape"]


@dataclass(frozen=True)
class Family:
    router_attr: str = "gate"
    renormalizes: bool | None = None  # None: the router's `norm_topk_prob` decides


FAMILIES = {
    "OlmoeTopKRouter": Family(),
    "Qwen2MoeTopKRouter": Family(),
    "Qwen3MoeTopKRouter": Family(),
    "MixtralTopKRouter": Family(renormalizes=True),
    "GptOssTopKRouter": Family(router_attr="router", renormalizes=True),
}
MODEL_TYPES = ("olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "gpt_oss")

_DEEPSEEK = (
    "it selects experts by bias-corrected sigmoid scores within expert groups, which no p-value of the router "
    "logits reproduces, so min_k = max_k = top_k could not give the stock model back"
)
UNSUPPORTED = {
    "DeepseekV3TopkRouter": _DEEPSEEK, "deepseek_v3": _DEEPSEEK,
    "DeepseekV2TopkRouter": _DEEPSEEK, "deepseek_v2": _DEEPSEEK,
}


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
        if self.family.renormalizes is not None:
            return self.family.renormalizes
        return bool(self.router.norm_topk_prob)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.router.weight
        return F.linear(hidden.reshape(-1, weight.shape[-1]), weight, getattr(self.router, "bias", None))


def find_moe_layers(model: torch.nn.Module) -> list[MoELayer]:
    """The model's MoE blocks in order; a clear error when there are none we can route."""
    layers, found = [], set()
    for module in model.modules():
        experts = getattr(module, "experts", None)
        for attr in ("gate", "router"):
            router = getattr(module, attr, None)
            if experts is None or not isinstance(router, torch.nn.Module):
                continue
            name = type(router).__name__
            if name in UNSUPPORTED:
                raise RoutingError(f"{name} is not supported: {UNSUPPORTED[name]}")
            family = FAMILIES.get(name)
            if family is None or family.router_attr != attr:
                found.add(f"{type(module).__name__}.{attr}={name}")
                continue
            layers.append(MoELayer(module, router, experts, family))
    if not layers:
        what = ", ".join(sorted(found)) or f"no MoE router in {type(model).__name__}"
        raise RoutingError(
            f"model has no supported MoE router (found: {what}); supported routers: {', '.join(FAMILIES)} "
            "(transformers >= 5.6)"
        )
    return layers


def config_shape(config, source: str = "model") -> tuple[int, int, bool]:
    """(num_experts, top_k, renormalizes) from a model config, to check settings before weights load."""
    model_type = getattr(config, "model_type", None)
    if model_type in UNSUPPORTED:
        raise RoutingError(f"{source} is a {model_type!r} model, which is not supported: {UNSUPPORTED[model_type]}")
    if model_type not in MODEL_TYPES:
        raise RoutingError(
            f"{source} is a {model_type!r} model, which has no supported MoE router; "
            f"supported model types: {', '.join(MODEL_TYPES)}"
        )
    num_experts = getattr(config, "num_experts", None) or config.num_local_experts
    return num_experts, config.num_experts_per_tok, bool(getattr(config, "norm_topk_prob", True))
