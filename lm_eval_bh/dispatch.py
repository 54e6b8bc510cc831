"""Run a transformers experts module on a variable number of experts per token.

The router hands over `index` (T, max_k) whose unused slots hold the sentinel `num_experts` with
weight 0. Those padding slots must cost nothing and change nothing, and the stock experts backends
disagree on what a padding index means (see the project notes): so no padding ever reaches
transformers code. Two interchangeable implementations, chosen per call from the backend the model
is configured with (generate() switches it to batched_mm for decoding by itself):

- `grouped`: for `grouped_mm`. One sort puts padding last; grouped GEMMs whose offsets end at the
  last real pair never compute a padding row; masked rows are dropped before the reduction.
- `compact`: for every other backend (`eager`, `batched_mm`, ...). The real (token, expert) pairs are
  gathered and handed to the stock backend as a top-1 call, then summed back per token.
"""

from __future__ import annotations

import torch

__all__ = ["DISPATCH", "experts_forward", "compact_forward", "grouped_forward"]


def _stock_forward(experts, hidden, index, weight):
    """The experts module's class forward: transformers' dispatch to the configured backend."""
    return type(experts).forward(experts, hidden, index, weight)


def compact_forward(experts, hidden: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Hand only the real (token, expert) pairs to the stock backend, as a top-1 call."""
    token, slot = (index < experts.num_experts).nonzero(as_tuple=True)
    out = torch.zeros_like(hidden)
    if token.numel():
        pair_index = index[token, slot].unsqueeze(-1)
        pair_weight = weight[token, slot].unsqueeze(-1)
        y = _stock_forward(experts, hidden[token], pair_index, pair_weight)
        out.index_add_(0, token, y.to(out.dtype))
    return out


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    mm = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    return mm(x.to(w.dtype), w, offs=offs)


def _grouped_linear(experts, x, weight, bias, ids, offs):
    # transformers stores expert weights as (E, out, in) unless `is_transposed` ((E, in, out)).
    w = weight if getattr(experts, "is_transposed", False) else weight.transpose(-2, -1)
    y = _grouped_mm(x, w, offs)
    return y if bias is None else y + bias[ids]


def grouped_supported(experts, hidden: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM runs here for this module's weights (else use `compact`)."""
    if not (hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm")):
        return False
    if not hasattr(experts, "down_proj") or getattr(experts, "has_post_expert_norm", False):
        return False
    if getattr(experts, "is_concatenated", True) is False:
        return False
    weight = experts.down_proj
    if weight.device.type == "cuda":
        return weight.dtype == torch.bfloat16 and torch.cuda.get_device_capability(weight.device) >= (8, 0)
    return weight.device.type == "cpu" and tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 9)


def grouped_forward(experts, hidden: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Sort pairs by expert (padding sorts last), grouped GEMMs over the real pairs only."""
    num_tokens, k = index.shape
    num_experts = experts.num_experts
    ids, perm = index.reshape(-1).sort()
    x = hidden[perm // k]
    counts_input = ids.float() if ids.device.type == "cpu" else ids.int()
    counts = torch.histc(counts_input, bins=num_experts, min=0, max=num_experts - 1)  # drops the sentinel
    offs = counts.cumsum(0, dtype=torch.int32)
    real = (ids < num_experts).unsqueeze(-1)
    ids = ids.clamp(max=num_experts - 1)  # only for bias lookups; those rows are masked below

    has_gate = getattr(experts, "has_gate", True)
    bias = getattr(experts, "gate_up_proj_bias" if has_gate else "up_proj_bias", None)
    up = experts.gate_up_proj if has_gate else experts.up_proj
    h = _grouped_linear(experts, x, up, bias if getattr(experts, "has_bias", False) else None, ids, offs)
    h = experts._apply_gate(h) if has_gate else experts.act_fn(h)
    bias = getattr(experts, "down_proj_bias", None) if getattr(experts, "has_bias", False) else None
    y = _grouped_linear(experts, h, experts.down_proj, bias, ids, offs)

    # Rows past the last offset were never written by the kernel: mask, do not multiply by 0 (NaN * 0).
    y = torch.where(real, y * weight.reshape(-1)[perm].unsqueeze(-1).to(y.dtype), 0)
    unsorted = torch.empty_like(y)
    unsorted[perm] = y
    return unsorted.view(num_tokens, k, -1).sum(dim=1).to(hidden.dtype)


DISPATCH = {"grouped": grouped_forward, "compact": compact_forward}


def experts_forward(experts, hidden: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Forward of a patched experts module: the stock signature, padding-aware."""
    backend = getattr(getattr(experts, "config", None), "_experts_implementation", None)
    if backend == "grouped_mm" and grouped_supported(experts, hidden):
        return grouped_forward(experts, hidden, index, weight)
    return compact_forward(experts, hidden, index, weight)
