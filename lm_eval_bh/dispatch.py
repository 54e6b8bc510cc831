"""Run a transformers experts module on a variable number of experts per token.

The router hands over `index` (T, max_k) whose unused slots hold the sentinel `num_experts` with
weight 0. Those padding slots must cost nothing and change nothing, and the stock experts backends
disagree on what a padding index means (see the project notes): so no padding ever reaches
transformers code. Two interchangeable implementations:

- `grouped`: torch's grouped GEMM, our own code. One sort puts padding last; the GEMM offsets (one
  searchsorted) end at the last real pair, so no padding row is ever multiplied. Two sizes of the work:
  * exact (>= EXACT_MIN_PAIRS slots: prefill, lm-eval's loglikelihood batches): one host sync reads the
    number of real pairs n and every later pass (gather, activation, GEMMs, combine) runs over exactly
    n rows. The routing weight is folded into the activation (the down projection is linear) and the
    per-token sum is a deterministic `index_put_(accumulate=True)` (float32 accumulation, one rounding).
  * padded (smaller calls: decoding): no host sync; the element-wise passes run over all T * max_k rows
    (a few hundred while decoding), masked; the GEMMs still skip the padding. Calls of at most
    GRAPH_MAX_TOKENS tokens on CUDA replay it from a CUDA graph (see `_Graph`): decoding is bound by
    kernel launches, and the graph turns ~16 of them into 5.
- `compact`: for other backends (`eager`, or where grouped GEMMs do not run). The real (token, expert)
  pairs are gathered (one host sync, `nonzero`) and handed to the stock backend as a top-1 call,
  then summed back per token.

`experts_forward` chooses per call: `grouped` wherever torch's grouped GEMM runs for the module's
weights and the stock backend is `grouped_mm` or `batched_mm`, `compact` otherwise (bench/bench.py
forces each one to compare them). Measured on an H200 (bench/README.md, results/bench/), one layer of OLMoE-1B-7B, k forced
uniform over 1..7 (mean 4): at 8,192 tokens exact 1.46 ms, padded 2.83, compact 2.65, stock top-4
2.10, stock top-8 3.79; at 32 tokens under batched_mm padded 0.27 ms, exact 0.34, compact 1.15,
stock top-4 0.99; exact and padded cross near 1,024 tokens x 8 slots.
"""

from __future__ import annotations

import functools
import weakref

import torch

__all__ = ["backend_name", "experts_forward", "compact_forward", "grouped_forward", "grouped_supported"]

# The patch registers this dispatch with transformers' experts interface (the registry behind
# `set_experts_implementation`, transformers >= 5.7) as "<prefix><stock backend>", one name per stock backend.
BACKEND_PREFIX = "lm_eval_bh+"

# Above this many routing slots (tokens * max_k) the grouped path pays one host sync to run exactly
# the real pairs; below it (decoding), it runs padded rows through the element-wise passes instead.
EXACT_MIN_PAIRS = 8192

# Backends for which the grouped path replaces the stock one when grouped GEMMs run here.
GROUPED_BACKENDS = ("grouped_mm", "batched_mm")


def backend_name(stock: str) -> str:
    """Register (again: idempotent) the padding-aware dispatch in front of the `stock` experts backend with
    transformers' experts interface; returns the name to pass to `model.set_experts_implementation`."""
    from transformers.integrations.moe import ExpertsInterface

    def forward(experts, hidden, index, weight):
        return experts_forward(experts, hidden, index, weight, stock)

    name = BACKEND_PREFIX + stock
    ExpertsInterface.register(name, forward)
    return name


def _configured(experts) -> str:
    backend = getattr(getattr(experts, "config", None), "_experts_implementation", None) or "eager"
    return backend[len(BACKEND_PREFIX):] if backend.startswith(BACKEND_PREFIX) else backend


def _stock_forward(experts, hidden, index, weight, stock: str | None = None):
    """The `stock` experts backend of transformers (default: the module's configured one, ours excepted)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    stock = stock or _configured(experts)
    cls_forward = type(experts).forward
    fn = ALL_EXPERTS_FUNCTIONS[stock] if stock in ALL_EXPERTS_FUNCTIONS else getattr(cls_forward, "__wrapped__", cls_forward)
    return fn(experts, hidden, index, weight)


def compact_forward(experts, hidden: torch.Tensor, index: torch.Tensor, weight: torch.Tensor,
                    stock: str | None = None) -> torch.Tensor:
    """Hand only the real (token, expert) pairs to the stock backend, as a top-1 call."""
    token, slot = (index < experts.num_experts).nonzero(as_tuple=True)
    out = torch.zeros_like(hidden)
    if token.numel():
        pair_index = index[token, slot].unsqueeze(-1)
        pair_weight = weight[token, slot].unsqueeze(-1)
        y = _stock_forward(experts, hidden[token], pair_index, pair_weight, stock)
        out.index_put_((token,), y.to(out.dtype), accumulate=True)  # deterministic, unlike index_add_
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
    if not hasattr(experts, "down_proj") or getattr(experts, "has_post_expert_norm", False):
        return False
    if getattr(experts, "is_concatenated", True) is False:
        return False
    weight = experts.down_proj
    return _grouped_runs_on(weight.device, weight.dtype)


@functools.lru_cache(maxsize=None)
def _grouped_runs_on(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's grouped GEMM runs on this device for weights of this dtype (asked once: every experts
    call asks)."""
    if not (hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm")):
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 9)


_BOUNDS: dict = {}


def _offsets(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Grouped-GEMM offsets from expert ids sorted ascending: offs[e] = #pairs with id <= e (int32).

    One searchsorted launch (histc + cumsum take three); the sentinel id num_experts counts nowhere.
    """
    key = (ids.device, ids.dtype, num_experts)
    bounds = _BOUNDS.get(key)
    if bounds is None:
        bounds = _BOUNDS[key] = torch.arange(1, num_experts + 1, device=ids.device, dtype=ids.dtype)
    return torch.searchsorted(ids, bounds, out_int32=True)


def grouped_forward(
    experts,
    hidden: torch.Tensor,
    index: torch.Tensor,
    weight: torch.Tensor,
    exact: bool | None = None,
) -> torch.Tensor:
    """Sort pairs by expert (padding sorts last), grouped GEMMs over the real pairs only.

    `exact`: None chooses by size (EXACT_MIN_PAIRS); True syncs once and runs n real rows; False
    never syncs and masks the padded rows.
    """
    num_tokens, k = index.shape
    num_experts = experts.num_experts
    if index.numel() == 0:
        return torch.zeros_like(hidden)
    if exact is None:
        exact = index.numel() >= EXACT_MIN_PAIRS
    ids, perm = index.reshape(-1).sort()
    offs = _offsets(ids, num_experts)
    has_gate = getattr(experts, "has_gate", True)
    has_bias = getattr(experts, "has_bias", False)
    pad = None
    if exact:
        n = int(offs[-1])  # the one host sync: from here on every pass has exactly n rows
        if n == 0:
            return torch.zeros_like(hidden)
        ids, perm = ids[:n], perm[:n]
    else:
        pad = (ids >= num_experts).unsqueeze(-1)
        if has_bias:
            ids = ids.clamp(max=num_experts - 1)  # only for bias lookups; those rows are masked below
    token = perm.div(k, rounding_mode="floor")

    up_bias = getattr(experts, "gate_up_proj_bias" if has_gate else "up_proj_bias", None) if has_bias else None
    up = experts.gate_up_proj if has_gate else experts.up_proj
    h = _grouped_linear(experts, hidden[token], up, up_bias, ids, offs)
    h = experts._apply_gate(h) if has_gate else experts.act_fn(h)
    down_bias = getattr(experts, "down_proj_bias", None) if has_bias else None

    if pad is not None:
        # Padded (no sync): rows past the last offset were never written by the kernel, so they are
        # masked (not multiplied by 0: NaN * 0). Back in (token, slot) order the routing weights need
        # no gather; the sum over slots accumulates in float32, like the stock backends.
        y = _grouped_linear(experts, h, experts.down_proj, down_bias, ids, offs).masked_fill(pad, 0)
        unsorted = torch.empty_like(y)
        unsorted[perm] = y
        y = unsorted.view(num_tokens, k, y.shape[-1]) * weight.reshape(num_tokens, k, 1).to(y.dtype)
        return y.sum(dim=1).to(hidden.dtype)

    w = weight.reshape(-1)[perm].unsqueeze(-1).to(h.dtype)
    if down_bias is None:
        # down(h) * w == down(h * w): weight the intermediate rows (half as wide as the output).
        y = _grouped_linear(experts, h * w, experts.down_proj, None, ids, offs)
    else:
        y = _grouped_linear(experts, h, experts.down_proj, down_bias, ids, offs) * w
    out = torch.zeros_like(hidden)
    # Sorted by token internally; each token's rows are summed in float32 and rounded once.
    return out.index_put_((token,), y.to(out.dtype), accumulate=True)


def choose(experts, hidden: torch.Tensor, stock: str | None = None) -> str:
    """The strategy `experts_forward` uses for this module and input in front of the `stock` backend."""
    if (stock or _configured(experts)) in GROUPED_BACKENDS and grouped_supported(experts, hidden):
        return "grouped"
    return "compact"


def experts_forward(experts, hidden: torch.Tensor, index: torch.Tensor, weight: torch.Tensor,
                    stock: str | None = None) -> torch.Tensor:
    """Padding-aware forward of an experts module (transformers' signature) in front of the `stock` backend
    (default: the module's configured one)."""
    stock = stock or _configured(experts)
    if choose(experts, hidden, stock) == "grouped":
        if _graphable(hidden, index):
            return _graphed(experts, hidden, index, weight)
        return grouped_forward(experts, hidden, index, weight)
    return compact_forward(experts, hidden, index, weight, stock)


# --- decoding: the padded path replayed as a CUDA graph ----------------------------------------------
#
# Decoding calls the experts with a few tokens per layer and step, where the host's kernel launches set the
# time (about 16 launches for the padded path; generate() switches the stock backend to batched_mm, ~9).
# The padded path never syncs and its shapes are fixed by the token count, so for small calls on CUDA it is
# captured once per (module, shape) as a CUDA graph and replayed: three input copies, one graph launch and
# one output copy. The graph runs the same kernels on the same inputs: the output is bit-identical.

GRAPH_MAX_TOKENS = 64  # calls of at most this many tokens (decoding batches; also short prefills) use graphs
GRAPH_AFTER_CALLS = 2  # a shape is captured at its third call (decoding repeats it; prefill lengths vary)
GRAPHS_PER_MODULE = 8  # at most this many shapes per module are kept as graphs
USE_GRAPHS = True  # bench/bench.py switches it off to compare

_GRAPHS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # experts module -> {key: _Graph or count}


def _graphable(hidden: torch.Tensor, index: torch.Tensor) -> bool:
    return (USE_GRAPHS and hidden.is_cuda and 0 < hidden.shape[0] <= GRAPH_MAX_TOKENS
            and index.numel() < EXACT_MIN_PAIRS and not torch.is_grad_enabled()
            and not torch.cuda.is_current_stream_capturing() and not torch.compiler.is_compiling())


def _graphed(experts, hidden: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`grouped_forward(..., exact=False)`, from a CUDA graph once the shape has been seen GRAPH_AFTER_CALLS times."""
    up = experts.gate_up_proj if getattr(experts, "has_gate", True) else experts.up_proj
    key = (hidden.shape, hidden.dtype, hidden.device, index.shape, index.dtype, weight.dtype,
           up.data_ptr(), experts.down_proj.data_ptr())  # new weights (a reload) mean a new graph
    graphs = _GRAPHS.setdefault(experts, {})
    entry = graphs.get(key, 0)
    if isinstance(entry, _Graph):
        return entry(hidden, index, weight)
    if entry < GRAPH_AFTER_CALLS or sum(isinstance(g, _Graph) for g in graphs.values()) >= GRAPHS_PER_MODULE:
        graphs[key] = entry + 1 if entry < GRAPH_AFTER_CALLS else entry
        return grouped_forward(experts, hidden, index, weight, exact=False)
    graph = graphs[key] = _Graph(experts, hidden, index, weight)
    return graph(hidden, index, weight)


class _Graph:
    """The padded grouped path of one experts module for one input shape, captured as a CUDA graph."""

    def __init__(self, experts, hidden: torch.Tensor, index: torch.Tensor, weight: torch.Tensor):
        device = hidden.device
        # plain tensors (not inference tensors): the graph may be replayed inside or outside inference_mode
        with torch.inference_mode(False), torch.no_grad(), torch.cuda.device(device):
            self.inputs = [torch.empty(t.shape, dtype=t.dtype, device=device) for t in (hidden, index, weight)]
            for static, t in zip(self.inputs, (hidden, index, weight)):
                static.copy_(t)
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.stream(stream):
                grouped_forward(experts, *self.inputs, exact=False)  # warm-up: library handles, cached offsets
                # thread_local: the router kernel's warm-up thread may launch work meanwhile
                self.graph.capture_begin(capture_error_mode="thread_local")
                try:
                    self.output = grouped_forward(experts, *self.inputs, exact=False)
                finally:
                    self.graph.capture_end()
            torch.cuda.current_stream(device).wait_stream(stream)

    def __call__(self, hidden: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        for static, t in zip(self.inputs, (hidden, index, weight)):
            static.copy_(t)
        self.graph.replay()
        return self.output.clone()  # the next replay overwrites the static output
