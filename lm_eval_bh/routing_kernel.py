"""The default router (z-score or calibrated p-values, Benjamini-Hochberg) as one Triton kernel launch per layer.

`routing.route` is the reference: about 50 small torch kernels per layer, which is what bounds a
launch-bound forward (decoding, one long sequence, lm-eval's short batches). This kernel does the
same work for one token per program, with no sort and no host synchronisation: each expert's rank
(descending logit, ties by the lower index: `sort(descending=True, stable=True)`) is a count of pairwise
comparisons; the median and quartiles are read at their ranks; the p-values, the BH count and the
selection follow in registers; the outputs are `routing.Routed`'s.

Exactness: the arithmetic is the reference's, operation by operation, in float32 with correctly rounded
division and square root, no fused multiply-add, CUDA's own `erfc`/`log1p`/`exp` (libdevice: the
functions torch's CUDA kernels call), and the softmax sum in the order of torch's CUDA softmax. On a GPU
the p-values, the BH counts, the selected experts and the weights then equal the reference's bit for bit
(bench/bench.py checks it on the device; with renormalize=true the renormalising sum may differ in the
last bit). Under Triton's CPU interpreter (the tests) libdevice is missing: `erfc` is then Numerical
Recipes' erfcc (relative error < 1.2e-7) and log1p the compensated log(1 + u), so there the p-values
agree to ~1e-6 and the rest exactly.

Supported: selection=bh with pvalue=zscore, or pvalue=calibrated when the layer's null is shared by its
experts; no `allowed` mask; at most 1024 experts. `supports` says so, and the patch routes everything else
through `routing.route`.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.runtime import driver as _DRIVER

from .routing import _IQR_TO_SIGMA, _NU_C, _NU_D, _SQRT1_2, NONFINITE_LOGIT, Routed, _bh_factor

__all__ = ["SUPPORTED", "runs_on", "supports", "supports_config", "route", "warm_up"]

MAX_EXPERTS = 1024


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


SUPPORTED = "pvalue=zscore or calibrated (a null shared by the layer's experts) with selection=bh"


def supports_config(cfg) -> bool:
    """Whether the kernel computes these settings (see SUPPORTED; `calibrated` also needs a shared null)."""
    return cfg.pvalue in ("zscore", "calibrated") and cfg.selection == "bh"


def supports(cfg, logits: torch.Tensor, null=None, allowed: torch.Tensor | None = None) -> bool:
    """Whether this kernel computes `routing.route(logits, cfg, null, allowed)` (else use that)."""
    return (
        supports_config(cfg)
        and (cfg.pvalue != "calibrated" or (null is not None and not null.per_expert and null.device == logits.device))
        and allowed is None
        and logits.dim() == 2
        and 0 < logits.shape[-1] <= MAX_EXPERTS
        and logits.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and runs_on(logits.device)
    )


def runs_on(device: torch.device) -> bool:
    """Whether the kernel can run on `device`: a GPU, or anywhere in Triton's CPU interpreter."""
    return device.type == "cuda" or _interpreted()


# routing.py's constants, as compile-time values of the kernel (one source for both)
NEG: tl.constexpr = tl.constexpr(NONFINITE_LOGIT)
IQR_TO_SIGMA: tl.constexpr = tl.constexpr(_IQR_TO_SIGMA)
SQRT1_2: tl.constexpr = tl.constexpr(_SQRT1_2)
TINY: tl.constexpr = tl.constexpr(torch.finfo(torch.float32).tiny)
NU_C0, NU_C1, NU_C2, NU_C3 = (tl.constexpr(v) for v in _NU_C)
NU_D0, NU_D1, NU_D2, NU_D3 = (tl.constexpr(v) for v in _NU_D)

@triton.jit
def _erfc(x, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        return libdevice.erfc(x)
    else:  # Numerical Recipes' erfcc (interpreter only)
        z = tl.abs(x)
        t = 1.0 / (1.0 + 0.5 * z)
        poly = -1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
            -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (
                -0.82215223 + t * 0.17087277))))))))
        r = t * tl.exp(-z * z + poly)
        return tl.where(x >= 0, r, 2.0 - r)

@triton.jit
def _exp(x, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        return libdevice.exp(x)  # CUDA's expf (tl.exp is the faster, less exact ex2.approx)
    else:
        return tl.exp(x)


@triton.jit
def _halve(s, HALF: tl.constexpr):
    # one butterfly step of a warp reduction: lane l adds lane l ^ HALF (the same sum for both lanes)
    return tl.sum(tl.reshape(s, (2, HALF)), axis=0)


@triton.jit
def _softmax_sum(e, rank, BLOCK_E: tl.constexpr):
    """sum(e) in the order of torch's CUDA softmax (softmax_warp_forward) over the experts sorted by rank:
    lane l of a warp of W = min(BLOCK_E, 32) lanes adds the sorted values l, l + W, l + 2W, ... in turn,
    then the lanes are combined by a butterfly. Same order, same roundings: the same float32 sum."""
    W: tl.constexpr = 32 if BLOCK_E > 32 else BLOCK_E
    lane = tl.arange(0, W)
    s = tl.zeros([W], dtype=tl.float32)
    for it in tl.static_range(0, BLOCK_E // W):
        # the sorted values it*W + lane: one match per lane, so the masked sum is exact
        s += tl.sum(tl.where(rank[None, :] == (it * W + lane)[:, None], e[None, :], 0.0), axis=1)
    if W >= 32:
        s = _halve(s, 16)
    if W >= 16:
        s = _halve(s, 8)
    if W >= 8:
        s = _halve(s, 4)
    if W >= 4:
        s = _halve(s, 2)
    if W >= 2:
        s = _halve(s, 1)
    return tl.sum(s, axis=0)


@triton.jit
def _log1p(u, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        return libdevice.log1p(u)
    else:  # log(1 + u) * u / ((1 + u) - 1), exact to rounding (interpreter only)
        v = 1.0 + u
        return tl.where(v == 1.0, u, tl.where(v == float("inf"), v, tl.log(v) * (u / (v - 1.0))))

@triton.jit
def _clean(raw):
    bad = (raw != raw) | (tl.abs(raw) == float("inf"))
    return tl.where(bad, NEG, raw), bad

@triton.jit
def _at_rank(x, rank, r):
    # the one lane whose rank is r (adding zeros is exact)
    return tl.sum(tl.where(rank == r, x, 0.0), axis=0)

@triton.jit
def _quantile(x, rank, last, q: tl.constexpr):
    # routing._quantiles_desc: linear interpolation at position (1 - q) * last of the descending order
    pos = (1.0 - q) * last
    lo = tl.floor(pos)
    frac = pos - lo
    hi = tl.minimum(lo + 1.0, last)
    a = _at_rank(x, rank, lo.to(tl.int32))
    b = _at_rank(x, rank, hi.to(tl.int32))
    return a * (1.0 - frac) + b * frac

@triton.jit
def _zscore_pvalue(x, rank, LIBDEVICE: tl.constexpr):
    # routing._zscore_pvalues: robust z over the finite logits, Hill's Student-t tail
    finite = x > NEG
    n = tl.sum(finite.to(tl.float32), axis=0)
    last = tl.maximum(n - 1.0, 0.0)
    median = _quantile(x, rank, last, 0.5)
    q75 = _quantile(x, rank, last, 0.75)
    q25 = _quantile(x, rank, last, 0.25)
    scale = tl.maximum((q75 - q25) * IQR_TO_SIGMA, TINY)
    z = tl.math.div_rn(x - median, scale)
    z = tl.where(finite, z, -float("inf"))
    # degrees of freedom (routing._zscore_nu)
    r = n - 4.0 * tl.floor(n * 0.25)
    c = tl.where(r == 0.0, NU_C0, tl.where(r == 1.0, NU_C1, tl.where(r == 2.0, NU_C2, NU_C3)))
    d = tl.where(r == 0.0, NU_D0, tl.where(r == 1.0, NU_D1, tl.where(r == 2.0, NU_D2, NU_D3)))
    nu = tl.maximum(0.37 * n + c - tl.math.div_rn(d, tl.maximum(n, 1.0)), 1.0)
    # Hill's Student-t tail (routing._student_t_sf)
    a = nu - 0.5
    b = 48.0 * a * a
    w = tl.minimum(tl.math.sqrt_rn(a * _log1p(tl.math.div_rn(z * z, nu), LIBDEVICE)), 40.0)
    w2 = w * w
    inner = ((4.0 * w2 + 33.0) * w2 + 240.0) * w2 + 855.0
    den = 10.0 * b * (b + 0.8 * w2 * w2 + 100.0)
    w = w + tl.math.div_rn(w * (w2 + 3.0), b) - tl.math.div_rn(w * inner, den)
    w = tl.where(z < 0.0, -w, w)
    p = 0.5 * _erfc(w * SQRT1_2, LIBDEVICE)
    return p


# Not specialised on these arguments (values, pointer alignment): one compilation per expert count, dtype and
# renormalisation, which `warm_up` can make ahead of the first call whatever the batch shape.
@triton.jit(do_not_specialize=["stride_x", "null_ptr", "index_ptr", "weight_ptr", "k_ptr", "found_ptr", "nonfinite_ptr", "p_ptr",
                               "min_k", "max_k", "dead_k"])
def route_kernel(
    x_ptr, stride_x, factor_ptr, null_ptr,
    index_ptr, weight_ptr, k_ptr, found_ptr, nonfinite_ptr, p_ptr,
    alpha, min_k, max_k, dead_k,
    E: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_I: tl.constexpr,
    CALIBRATED: tl.constexpr, RENORMALIZE: tl.constexpr, LIBDEVICE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_E)
    real = j < E
    x, bad = _clean(tl.load(x_ptr + row * stride_x + j, mask=real, other=0.0).to(tl.float32))
    x = tl.where(real, x, NEG)  # padding lanes sort after every real expert (higher index on ties)
    nonfinite = tl.max((bad & real).to(tl.int32), axis=0)

    # rank_j = #{i before j in sort(descending=True, stable=True)}
    rank = tl.zeros([BLOCK_E], dtype=tl.int32)
    for start in tl.static_range(0, BLOCK_E, BLOCK_I):
        i = start + tl.arange(0, BLOCK_I)
        xi, _ = _clean(tl.load(x_ptr + row * stride_x + i, mask=i < E, other=0.0).to(tl.float32))
        xi = tl.where(i < E, xi, NEG)
        before = (xi[:, None] > x[None, :]) | ((xi[:, None] == x[None, :]) & (i[:, None] < j[None, :]))
        rank += tl.sum(before.to(tl.int32), axis=0)

    if CALIBRATED:  # the layer's fitted null, loc and scale (calibration.LayerNull.pvalue)
        z = tl.math.div_rn(x - tl.load(null_ptr), tl.load(null_ptr + 1))
        p = 0.5 * _erfc(z * SQRT1_2, LIBDEVICE)
    else:
        p = _zscore_pvalue(x, rank, LIBDEVICE)

    # Benjamini-Hochberg count (routing._bh_count_p): the largest rank i with p_(i) * (m / i) <= alpha
    factor = tl.load(factor_ptr + rank, mask=real, other=1.0)
    passed = (p * factor <= alpha) & real
    found = tl.max(tl.where(passed, rank + 1, 0), axis=0)
    dead = tl.max(x, axis=0) == NEG  # no finite logit
    k = tl.where(dead, dead_k, tl.minimum(tl.maximum(found, min_k), max_k))

    # weights: the router's softmax probabilities of the selected experts (routing.route), summed in the
    # order torch's softmax sums the sorted logits
    valid = rank < k
    e = tl.where(real, _exp(x - tl.max(x, axis=0), LIBDEVICE), 0.0)
    prob = tl.math.div_rn(e, _softmax_sum(e, rank, BLOCK_E))
    weight = tl.where(valid, prob, 0.0)
    if RENORMALIZE:  # (torch's sum over the slots may add in another order: the last bit can differ)
        total = tl.sum(weight, axis=0)
        uniform = tl.math.div_rn(valid.to(tl.float32), k.to(tl.float32))
        weight = tl.where(total > 0.0, tl.math.div_rn(weight, tl.maximum(total, TINY)), uniform)
    weight = tl.where(dead, tl.math.div_rn(valid.to(tl.float32), dead_k.to(tl.float32)), weight)

    slot = rank < max_k
    tl.store(index_ptr + row * max_k + rank, tl.where(valid, j, E).to(tl.int64), mask=slot)
    tl.store(weight_ptr + row * max_k + rank, weight, mask=slot)
    tl.store(p_ptr + row * E + rank, p, mask=real)
    tl.store(k_ptr + row, k.to(tl.int64))
    tl.store(found_ptr + row, found.to(tl.int64))
    tl.store(nonfinite_ptr + row, nonfinite.to(tl.int8))



_COMPILED: dict = {}  # what Triton specialises the kernel on -> the kernel it compiled for that


def _run(tokens: int, args: tuple, meta: dict) -> None:
    """Launch `route_kernel` over `tokens` programs. The first launch of a variant goes through Triton's JIT
    (which binds the arguments, works out the specialisation and compiles); later ones call the compiled
    kernel's launcher directly, which saves most of the ~20 us of host time a launch through the JIT
    costs: that host time bounds decoding (one launch per layer and step). The key holds everything the JIT
    specialises on here: the dtypes of the tensors, the 16-byte alignment of the two pointers that are
    specialised (the others are in `do_not_specialize`) and the compile-time arguments."""
    x, null = args[0], args[3]
    key = (x.device, x.dtype, x.data_ptr() % 16 == 0, null.dtype, *meta.values())
    compiled = _COMPILED.get(key)
    if compiled is None or _interpreted():
        compiled = route_kernel[(tokens,)](*args, **meta)
        if not _interpreted():
            _COMPILED[key] = compiled
        return
    stream = _DRIVER.active.get_current_stream(x.device.index)
    constants = tuple(meta[name] for name in _CONSTEXPRS)
    enter, leave = triton.knobs.runtime.launch_enter_hook, triton.knobs.runtime.launch_exit_hook
    if not (getattr(enter, "calls", enter) or getattr(leave, "calls", leave)):  # no launch hooks (profilers) set
        compiled.run(tokens, 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None,
                     *args, *constants)
        return
    launch_metadata = compiled.launch_metadata((tokens, 1, 1), stream, *args, *constants)
    compiled.run(tokens, 1, 1, stream, compiled.function, compiled.packed_metadata, launch_metadata,
                 enter, leave, *args, *constants)


_CONSTEXPRS = ("E", "BLOCK_E", "BLOCK_I", "CALIBRATED", "RENORMALIZE", "LIBDEVICE")  # route_kernel's, in order

_FACTORS: dict = {}


def _factor(m: int, device: torch.device) -> torch.Tensor:
    key = (m, device)
    if key not in _FACTORS:
        _FACTORS[key] = _bh_factor(m, torch.float32, device).contiguous()
    return _FACTORS[key]


_WARMING: dict = {}  # (experts, dtype, pvalue, renormalize, device) -> the thread compiling the kernel for them


def _key(cfg, num_experts: int, dtype: torch.dtype, device: torch.device) -> tuple:
    return num_experts, dtype, cfg.pvalue, bool(cfg.renormalize), device


def warm_up(cfg, num_experts: int, dtype: torch.dtype, device: torch.device) -> None:
    """Compile the kernel for these settings in a background thread: Triton's first compilation in a
    process takes ~2 s, which then overlaps lm-eval's own set-up (building tasks and requests) instead of
    delaying the first forward. `route` waits for it rather than compiling a second time."""
    if device.type == "cuda" and device.index is None:  # "cuda" as lm-eval passes it: the current GPU
        device = torch.device("cuda", torch.cuda.current_device())
    key = _key(cfg, num_experts, dtype, device)
    if key in _WARMING:
        return

    def compile_once():
        try:
            with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                _launch(torch.zeros(1, num_experts, dtype=dtype, device=device), cfg,
                        torch.tensor([0.0, 1.0, 1.0], device=device))
        except Exception:  # the first real call compiles again and reports the error there
            pass

    thread = _WARMING[key] = threading.Thread(target=compile_once, name="lm-eval-bh-router-warm-up", daemon=True)
    thread.start()


def route(logits: torch.Tensor, cfg, null=None) -> Routed:
    """`routing.route(logits, cfg, null)` for settings and input that `supports` accepts, in one launch."""
    if _WARMING:
        thread = _WARMING.get(_key(cfg, logits.shape[-1], logits.dtype, logits.device))
        if thread is not None and thread.is_alive():
            thread.join()
    return _launch(logits, cfg, null.fit if cfg.pvalue == "calibrated" else None)


def _launch(logits: torch.Tensor, cfg, fit: torch.Tensor | None) -> Routed:
    tokens, num_experts = logits.shape
    max_k = cfg.max_k
    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    device = x.device
    # three allocations (each costs host time in a launch-bound forward), every output a contiguous view
    ints = torch.empty(tokens * (max_k + 2), dtype=torch.long, device=device)
    floats = torch.empty(tokens * (max_k + num_experts), dtype=torch.float32, device=device)
    index, (k, found) = ints[: tokens * max_k].view(tokens, max_k), ints[tokens * max_k:].view(2, tokens)
    weight, p = floats[: tokens * max_k].view(tokens, max_k), floats[tokens * max_k:].view(tokens, num_experts)
    nonfinite = torch.empty(tokens, dtype=torch.int8, device=device)
    if tokens:
        block_e = triton.next_power_of_2(num_experts)
        factor = _factor(num_experts, device)
        args = (x, x.stride(0), factor, factor if fit is None else fit, index, weight, k, found, nonfinite, p,
                float(cfg.alpha), int(cfg.min_k), int(max_k), int(cfg.max_k if cfg.fixed_k else cfg.min_k))
        meta = dict(E=num_experts, BLOCK_E=block_e, BLOCK_I=max(1, min(block_e, 4096 // block_e)),
                    CALIBRATED=fit is not None, RENORMALIZE=bool(cfg.renormalize), LIBDEVICE=not _interpreted(),
                    num_warps=4 if block_e <= 128 else 8, enable_fp_fusion=False)
        if device.type == "cuda" and device.index != torch.cuda.current_device():
            with torch.cuda.device(device):  # a model spread over GPUs: launch on the logits' one
                _run(tokens, args, meta)
        else:
            _run(tokens, args, meta)
    return Routed(index, weight, k, nonfinite.view(torch.bool), found, p)

