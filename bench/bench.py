#!/usr/bin/env python3
"""Throughput of BH adaptive routing against the stock OLMoE routing, in one process, on one device.

Builds the full-size OLMoE-1B-7B architecture from its config with random bf16 weights directly on the
GPU and measures, after warm-up and with device synchronisation:

- prefill: tokens/s of a forward with logits over B x L tokens (1x2048, 16x512, 64x256);
- decode: new tokens/s of `model.generate` (batch 1 and 32, 128 new tokens forced, greedy);
- routing: time of `routing.route` on captured router logits against the whole forward;
- dispatch: the experts call alone (one layer), every dispatch strategy against stock top-8 / top-4,
  plus a float32 reference check of every strategy;
- kernel check: the fused Triton router against the reference `routing.route` on captured router
  logits of every layer (selected experts, counts, p-values bit for bit; weights);

for these settings (`+` adds a modifier):

  stock8, stock4   the stock router with top_k 8 / 4 (router.top_k changed)
  bh8, bh4         BHRouting(min_k=max_k=8 / 4)
  bhvar            BHRouting(alpha=A, min_k=1, max_k=8), A calibrated so that the mean k is ~4 on these
                   random weights (random routers carry little signal)
  bhforced         bhvar with k forced per token uniformly over 1..7 (mean 4): `routing.route` is wrapped
                   (here only) to route with min_k = max_k, then keep the first k slots of each token
  +exact/+padded/+compact   force a dispatch strategy (default: dispatch's automatic choice)
  +torch           the reference router `routing.route`, eager (router_kernel=torch); the default is the
                   fused Triton kernel on CUDA (router_kernel=auto, lm_eval_bh/routing_kernel.py)
  +compiled        routing.route through torch.compile(dynamic=True) (router_kernel=compile)
  +nostats         BHRouting's per-layer statistics recording switched off (to price it)
  +nograph         decoding without dispatch.py's CUDA graphs (the padded path launched kernel by kernel)
  +jit             every router-kernel launch through Triton's JIT launcher (no cached compiled kernel)

Writes bench.json (device, versions, shapes, every figure, ratios) and bench.md (Markdown tables) to
--out-dir and prints the tables. `--tiny` runs a tiny config on the CPU in seconds (smoke test).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import OlmoeConfig, OlmoeForCausalLM  # noqa: E402

from lm_eval_bh import dispatch, routing  # noqa: E402
from results_io import render, save  # noqa: E402  (bench/, this script's folder)
from lm_eval_bh.patch import BHRouting, find_moe_layers  # noqa: E402
from lm_eval_bh.routing import RoutingConfig  # noqa: E402

# OLMoE-1B-7B-0924 (allenai/OLMoE-1B-7B-0924 config.json); QK RMSNorm is part of the OLMoE modeling code.
FULL = dict(
    vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
    num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, norm_topk_prob=False,
    max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    rms_norm_eps=1e-5, hidden_act="silu",
    pad_token_id=1, eos_token_id=50279, bos_token_id=None, tie_word_embeddings=False, clip_qkv=None,
)
TINY = dict(
    FULL, vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, num_experts=16, num_experts_per_tok=8, max_position_embeddings=256,
    pad_token_id=0, eos_token_id=1,
)

BASE = ["stock8", "stock4", "bh8", "bh4", "bhvar", "bhforced"]
PREFILL_SETTINGS = BASE + [
    "bhforced+exact", "bhforced+padded", "bh8+nostats", "bh4+nostats", "bhvar+torch", "bhvar+compiled",
    "bhforced+compiled", "bhforced+compiled+exact", "bhforced+compiled+padded", "bhvar+nostats", "stock8",
]
DECODE_SETTINGS = BASE + [
    "bhforced+exact", "bhforced+compact", "bh8+nostats", "bh4+nostats", "bhvar+torch", "bhvar+compiled",
    "bhforced+compiled", "bhvar+nostats", "stock4",
]
# Forced dispatch strategies (the product chooses by backend and size): replace dispatch.experts_forward.
FORCED = {
    "exact": lambda e, h, i, w, stock=None: dispatch.grouped_forward(e, h, i, w, exact=True),
    "padded": lambda e, h, i, w, stock=None: dispatch.grouped_forward(e, h, i, w, exact=False),
    "compact": lambda e, h, i, w, stock=None: dispatch.compact_forward(e, h, i, w, stock),
}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# --- model -------------------------------------------------------------------------------------------


def build_model(cfg: dict, device: torch.device, dtype: torch.dtype) -> OlmoeForCausalLM:
    """Random weights, initialised directly on the device in the target dtype (no CPU copy)."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = OlmoeForCausalLM(OlmoeConfig(**cfg))
    finally:
        torch.set_default_dtype(previous)
    model = model.to(dtype).eval()
    model.set_experts_implementation("grouped_mm")
    model.generation_config.do_sample = False
    model.generation_config.pad_token_id = cfg["pad_token_id"]
    return model


def gates(model):
    return [layer.router for layer in find_moe_layers(model)]


# --- timing ------------------------------------------------------------------------------------------


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps: int, warmup: int) -> list[float]:
    """Seconds per call of fn(), each call timed alone after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def per_call(fn, device, iters: int, warmup: int = 2) -> float:
    """Seconds per call of fn() over `iters` back-to-back calls (launch overhead included)."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


# --- settings ----------------------------------------------------------------------------------------


class ForcedK:
    """A `routing.route` stand-in: route with min_k = max_k (the same work as the real call), then keep
    the first k slots of each token with k drawn uniformly from 1..max_k-1 (a fixed random stream)."""

    def __init__(self, inner, max_k: int, device, n: int = 1 << 21, seed: int = 1234):
        gen = torch.Generator().manual_seed(seed)
        self.k = torch.randint(1, max_k, (n,), generator=gen).to(device)
        self.slots = torch.arange(max_k, device=device)
        self.inner, self.pos, self._full = inner, 0, {}

    def __call__(self, logits, cfg, *args, **kwargs):
        full_cfg = self._full.get(cfg)
        if full_cfg is None:
            full_cfg = self._full[cfg] = dataclasses.replace(cfg, min_k=cfg.max_k)
        full = self.inner(logits, full_cfg, *args, **kwargs)
        t = logits.shape[0]
        if self.pos + t > self.k.numel():
            self.pos = 0
        k = self.k[self.pos : self.pos + t]
        self.pos += t
        valid = self.slots < k.unsqueeze(-1)
        index = torch.where(valid, full.index, logits.shape[-1])
        return full._replace(index=index, weight=torch.where(valid, full.weight, 0.0), k=k)


class Bench:
    def __init__(self, model, args, device):
        self.model, self.args, self.device = model, args, device
        self.top_k = model.config.num_experts_per_tok
        self.alpha = None
        self._compiled = None

    def compiled_route(self):
        if self._compiled is None:
            routing.prepare_compile()
            self._compiled = torch.compile(routing.route, dynamic=True)
        return self._compiled

    @contextlib.contextmanager
    def setting(self, spec: str):
        base, *mods = spec.split("+")
        fused = _fused_module()
        saved = (routing.route, fused and fused.route, BHRouting._record, dispatch.experts_forward,
                 dispatch.USE_GRAPHS, fused and fused._COMPILED)
        gate_list = gates(self.model)
        top_ks = [g.top_k for g in gate_list]
        kernel = "compile" if "compiled" in mods else "torch" if "torch" in mods else "auto"
        try:
            if "compiled" in mods:
                routing.route = self.compiled_route()
            if base == "bhforced":  # whichever router runs, it routes at min_k = max_k, then k is forced
                routing.route = ForcedK(routing.route, self.top_k, self.device)
                if fused is not None:
                    fused.route = ForcedK(fused.route, self.top_k, self.device)
            if "nostats" in mods:
                BHRouting._record = lambda *a, **kw: None
            if "nograph" in mods:
                dispatch.USE_GRAPHS = False
            if "jit" in mods and fused is not None:
                fused._COMPILED = _NoCache()
            for m in mods:
                if m in FORCED:
                    dispatch.experts_forward = FORCED[m]
            if base in ("stock8", "stock4"):
                for g in gate_list:
                    g.top_k = self.top_k if base == "stock8" else self.top_k // 2
                yield None
            else:
                if base in ("bh8", "bh4"):
                    k = self.top_k if base == "bh8" else self.top_k // 2
                    cfg = RoutingConfig(min_k=k, max_k=k)
                else:
                    cfg = RoutingConfig(alpha=self.alpha, min_k=1, max_k=self.top_k)
                with BHRouting(cfg, kernel=kernel).patch(self.model) as r:
                    yield r
        finally:
            routing.route, fused_route, BHRouting._record, dispatch.experts_forward, dispatch.USE_GRAPHS, compiled = saved
            if fused is not None:
                fused.route, fused._COMPILED = fused_route, compiled
            for g, k in zip(gate_list, top_ks):
                g.top_k = k

    # --- calibration ---------------------------------------------------------------------------------

    def capture_logits(self, ids) -> list[torch.Tensor]:
        """Router logits of every layer for one stock forward."""
        captured, handles = [], []
        for g in gates(self.model):
            handles.append(g.register_forward_hook(lambda m, a, out: captured.append(out[0].detach())))
        try:
            with torch.inference_mode():
                self.model(input_ids=ids, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return captured

    def calibrate(self, logits: list[torch.Tensor], target: float = 4.0) -> dict:
        """Bisect log(alpha) so that the mean k over all layers' tokens is ~target."""
        num_experts = logits[0].shape[-1]

        def mean_k(alpha):
            cfg = RoutingConfig(alpha=alpha, min_k=1, max_k=self.top_k).resolve(num_experts, self.top_k, False)
            ks = [routing.select_count(lg, cfg)[2].float().mean() for lg in logits]
            return float(torch.stack(ks).mean())

        lo, hi = math.log(1e-6), math.log(0.999)
        if mean_k(math.exp(hi)) < target:
            self.alpha = math.exp(hi)
        else:
            for _ in range(30):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if mean_k(math.exp(mid)) < target else (lo, mid)
            self.alpha = math.exp(hi)
        return {"alpha": self.alpha, "mean_k": mean_k(self.alpha), "target": target,
                "mean_k_at": {str(a): mean_k(a) for a in (0.01, 0.05, 0.2, 0.5, 0.9)}}


class _NoCache(dict):
    """A cache that keeps nothing: every launch goes through Triton's JIT."""

    def __setitem__(self, key, value):
        pass


def _fused_module():
    """lm_eval_bh.routing_kernel where Triton imports (the kernel itself runs only on CUDA), else None."""
    try:
        from lm_eval_bh import routing_kernel
    except ImportError:
        return None
    return routing_kernel


# --- measurements ------------------------------------------------------------------------------------


def random_ids(shape, vocab, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randint(2, vocab, shape, generator=gen, device=device)


def summary_of(r) -> dict:
    if r is None:
        return {}
    s = r.summary()
    return {"mean_k": s["mean_experts_per_token"], "k_histogram": s["k_histogram"]}


def run_prefill(bench: Bench, shapes, settings) -> dict:
    """Median forward time per setting; settings are interleaved over `rounds` so that slow drifts of the
    host (the shorter shapes are partly bound by kernel launches) spread over all of them."""
    args, model, device = bench.args, bench.model, bench.device
    out = {}
    for b, l in shapes:
        ids = random_ids((b, l), model.config.vocab_size, device, seed=b * 100003 + l)
        key = f"{b}x{l}"
        names = [s if s not in settings[:i] else s + "#2" for i, s in enumerate(settings)]
        times, stats = {n: [] for n in names}, {}
        for rnd in range(args.rounds):
            for spec, name in zip(settings, names):
                with torch.inference_mode(), bench.setting(spec) as r:
                    times[name] += timed(lambda: model(input_ids=ids, use_cache=False), device, args.reps,
                                         args.warmup if rnd == 0 else 1)
                    stats[name] = summary_of(r)
        out[key] = {}
        for name in names:
            sec = statistics.median(times[name])
            out[key][name] = {"tok_s": b * l / sec, "ms": sec * 1e3, "times_ms": [t * 1e3 for t in times[name]],
                              **stats[name]}
            log(f"prefill {key:>8} {name:28s} {b * l / sec:10.0f} tok/s  {sec * 1e3:8.2f} ms  "
                f"(min {min(times[name]) * 1e3:.2f})  {stats[name].get('mean_k', '')}")
    return out


def run_decode(bench: Bench, batches, settings) -> dict:
    """New tokens/s of generate per setting; settings interleaved over `decode_rounds` rounds (median), so
    that drifts of the host's speed (decoding is bound by kernel launches) spread over all of them."""
    args, model, device = bench.args, bench.model, bench.device
    out = {}
    new = args.new_tokens
    for b in batches:
        prompt = random_ids((b, args.prompt_len), model.config.vocab_size, device, seed=7 + b)
        mask = torch.ones_like(prompt)
        key = f"b{b}"
        out[key] = {}

        def gen(n):
            return model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=model.config.pad_token_id)

        with torch.inference_mode():
            gen(new)  # full-length warm-up once per batch size: cuDNN attention plans for every length
        names = [s if s not in settings[:i] else s + "#2" for i, s in enumerate(settings)]
        times, stats = {n: [] for n in names}, {}
        for rnd in range(args.decode_rounds):
            for spec, name in zip(settings, names):
                with torch.inference_mode(), bench.setting(spec) as r:
                    if rnd == 0:
                        gen(min(8, new))  # warm-up of this setting (kernel variants, graphs of this shape)
                    sync(device)
                    t0 = time.perf_counter()
                    seq = gen(new)
                    sync(device)
                    times[name].append(time.perf_counter() - t0)
                    stats[name] = summary_of(r)
                assert seq.shape[1] == args.prompt_len + new, seq.shape
        for name in names:
            sec = statistics.median(times[name])
            out[key][name] = {"tok_s": b * new / sec, "s": sec, "ms_per_step": sec / new * 1e3,
                              "rounds_s": times[name], **stats[name]}
            log(f"decode  {key:>8} {name:28s} {b * new / sec:10.1f} tok/s  {sec / new * 1e3:8.2f} ms/step  "
                f"(rounds {', '.join(f'{t / new * 1e3:.2f}' for t in times[name])})  {stats[name].get('mean_k', '')}")
    return out


def graph_time(fn, iters: int = 50):
    """Seconds per call of fn() replayed from a CUDA graph (device time, no launch overhead); None if
    fn cannot be captured."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    except Exception as exc:  # noqa: BLE001 - report, do not fail the run
        log(f"graph capture failed: {type(exc).__name__}: {exc}")
        return None


def stock_select(logits, top_k):
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    w, i = torch.topk(probs, top_k, dim=-1)
    return w.to(logits.dtype), i


def run_routing(bench: Bench, logits_by_t: dict[int, torch.Tensor]) -> dict:
    """Seconds per routing call on one layer's logits (T, E), back to back (launch overhead included)."""
    device, top_k = bench.device, bench.top_k
    num_experts = next(iter(logits_by_t.values())).shape[-1]
    cfg = RoutingConfig(alpha=bench.alpha, min_k=1, max_k=top_k).resolve(num_experts, top_k, False)
    out = {}
    for t, lg in logits_by_t.items():
        iters = 50 if device.type == "cuda" else 2
        row = {
            "stock_softmax_topk_s": per_call(lambda: stock_select(lg, top_k), device, iters),
            "route_eager_s": per_call(lambda: routing.route(lg, cfg), device, iters),
        }
        fused = _fused_module() if device.type == "cuda" else None
        if fused is not None:
            row["route_triton_s"] = per_call(lambda: fused.route(lg, cfg), device, iters)
            with bench.setting("bhvar+jit"):  # every launch through Triton's JIT launcher: its host cost
                row["route_triton_jit_s"] = per_call(lambda: fused.route(lg, cfg), device, iters)
        if bench.args.compile:
            fn = bench.compiled_route()
            row["route_compiled_s"] = per_call(lambda: fn(lg, cfg), device, iters)
        if device.type == "cuda":  # device time alone (no launch overhead): CUDA-graph replays
            row["stock_softmax_topk_gpu_s"] = graph_time(lambda: stock_select(lg, top_k))
            row["route_eager_gpu_s"] = graph_time(lambda: routing.route(lg, cfg))
            if fused is not None:
                row["route_triton_gpu_s"] = graph_time(lambda: fused.route(lg, cfg))
            if bench.args.compile:
                row["route_compiled_gpu_s"] = graph_time(lambda: fn(lg, cfg))
        out[str(t)] = row
        log(f"routing T={t:6d} " + "  ".join(f"{k}={v * 1e6:8.1f}us" for k, v in row.items()))
    return out


def run_kernel_check(bench: Bench, logits: list[torch.Tensor]) -> dict:
    """The fused Triton router against the reference `routing.route` on every layer's captured logits, at
    the calibrated alpha and at 0.01, 0.05, 0.2: tokens whose selected experts or count differ, p-values
    not bit-identical, the largest weight difference."""
    fused = _fused_module()
    if fused is None or bench.device.type != "cuda":
        return {"skipped": "needs CUDA and triton"}
    num_experts, top_k = logits[0].shape[-1], bench.top_k
    out = {}
    for alpha in (bench.alpha, 0.01, 0.05, 0.2):
        cfg = RoutingConfig(alpha=alpha, min_k=1, max_k=top_k).resolve(num_experts, top_k, False)
        rows = diff_rows = p_diff = 0
        weight_diff = 0.0
        for lg in logits:
            a, b = fused.route(lg, cfg), routing.route(lg, cfg)
            rows += lg.shape[0]
            diff_rows += int(((a.index != b.index).any(-1) | (a.k != b.k) | (a.discoveries != b.discoveries)).sum())
            p_diff += int((a.pvalues != b.pvalues).sum())
            weight_diff = max(weight_diff, float((a.weight - b.weight).abs().max()))
        out[f"{alpha:.4g}"] = {"token_layer_pairs": rows, "differing_selection": diff_rows,
                               "pvalues_not_bit_identical": p_diff, "pvalues": rows * num_experts,
                               "max_weight_abs_diff": weight_diff}
        log(f"kernel check alpha={alpha:.4g}: {out[f'{alpha:.4g}']}")
    return out


def reference_experts(experts, hidden, index, weight):
    """Float32 loop over experts (no padding reaches the weights)."""
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    h32 = hidden.float()
    for e in range(experts.num_experts):
        tok, slot = (index == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        gate, up = torch.nn.functional.linear(h32[tok], experts.gate_up_proj[e].float()).chunk(2, dim=-1)
        y = torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[e].float())
        out.index_add_(0, tok, y * weight[tok, slot].float().unsqueeze(-1))
    return out


def run_dispatch(bench: Bench, logits_by_t: dict[int, torch.Tensor]) -> dict:
    """One layer's experts call: stock top-8 / top-4 vs every strategy on forced variable k (mean 4)."""
    model, device, top_k = bench.model, bench.device, bench.top_k
    layer = find_moe_layers(model)[0]
    experts = layer.experts
    num_experts = layer.num_experts
    cfg = RoutingConfig(min_k=top_k, max_k=top_k).resolve(num_experts, top_k, False)
    forced = ForcedK(routing.route, top_k, device, seed=99)
    saved_impl = model.config._experts_implementation
    out = {}
    try:
        for t, lg in logits_by_t.items():
            hidden = torch.randn(t, model.config.hidden_size, device=device, dtype=experts.down_proj.dtype)
            routed = forced(lg, cfg)
            idx, w = routed.index, routed.weight.to(hidden.dtype)
            w8, i8 = stock_select(lg, top_k)
            w4, i4 = stock_select(lg, top_k // 2)
            backend = "batched_mm" if t <= 32 else "grouped_mm"  # generate() decodes with batched_mm
            model.set_experts_implementation(backend)
            iters = 20 if device.type == "cuda" else 1
            fns = {
                "stock8": lambda: dispatch._stock_forward(experts, hidden, i8, w8, backend),
                "stock4": lambda: dispatch._stock_forward(experts, hidden, i4, w4, backend),
                "auto": lambda: dispatch.experts_forward(experts, hidden, idx, w, backend),
                "grouped_exact": lambda: dispatch.grouped_forward(experts, hidden, idx, w, exact=True),
                "grouped_padded": lambda: dispatch.grouped_forward(experts, hidden, idx, w, exact=False),
                "compact": lambda: dispatch.compact_forward(experts, hidden, idx, w, backend),
            }
            row = {"backend": backend, "auto_choice": dispatch.choose(experts, hidden, backend),
                   "pairs": int((idx < num_experts).sum())}
            with torch.inference_mode():
                for name, fn in fns.items():
                    row[name + "_s"] = per_call(fn, device, iters)
                # correctness of every strategy against a float32 reference, on fresh inputs
                if t <= 8192:
                    ref = reference_experts(experts, hidden, idx, w)
                    for name in ("auto", "grouped_exact", "grouped_padded", "compact"):
                        got = fns[name]().float()
                        row[name + "_relerr"] = float((got - ref).norm() / ref.norm())
                        assert torch.isfinite(got).all(), name
                    a, b = fns["grouped_exact"](), fns["grouped_exact"]()
                    row["grouped_exact_deterministic"] = bool(torch.equal(a, b))
            out[str(t)] = row
            log(f"dispatch T={t:6d} {backend:10s} " + "  ".join(
                f"{k[:-2]}={v * 1e6:.0f}us" for k, v in row.items() if k.endswith("_s")))
    finally:
        model.set_experts_implementation(saved_impl)
    return out


def profile(bench: Bench, shape) -> str:
    """Kernel-level time of one prefill forward per setting (torch.profiler), for diagnosis."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    ids = random_ids(shape, bench.model.config.vocab_size, bench.device, seed=11)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.device.type == "cuda" else [])
    text = []
    for spec in ("stock4", "bhforced", "bhforced+compiled"):
        if "compiled" in spec and not bench.args.compile:
            continue
        with torch.inference_mode(), bench.setting(spec):
            bench.model(input_ids=ids, use_cache=False)
            sync(bench.device)
            with torch_profile(activities=acts) as prof:
                bench.model(input_ids=ids, use_cache=False)
                sync(bench.device)
        avg = prof.key_averages()
        for key in ("self_device_time_total", "self_cuda_time_total", "self_cpu_time_total"):
            try:
                table = avg.table(sort_by=key, row_limit=40)
                break
            except Exception:  # noqa: BLE001 - the key's name changed across torch versions
                continue
        text.append(f"=== {spec} {shape[0]}x{shape[1]} ===\n{table}\n")
    return "\n".join(text)


def decode_launches(bench: Bench, specs) -> dict:
    """Kernel launches and host synchronisations per decode step at batch 1, from torch.profiler."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model, device = bench.model, bench.device
    prompt = random_ids((1, bench.args.prompt_len), model.config.vocab_size, device, seed=3)

    def gen(n):
        return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=model.config.pad_token_id)

    def count(n):
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            gen(n)
            sync(device)
        launches = syncs = 0
        for ev in prof.key_averages():
            name = ev.key
            if "LaunchKernel" in name or name.startswith("cuLaunch") or "GraphLaunch" in name:
                launches += ev.count
            if "Synchronize" in name or name in ("cudaMemcpyAsync", "cudaMemcpy"):
                syncs += ev.count
        return launches, syncs

    out, text = {}, []
    for spec in specs:
        with torch.inference_mode(), bench.setting(spec):
            gen(6)
            l2, s2 = count(2)
            l6, s6 = count(6)
            text.append(f"=== {spec}: host time by Python function, generate of 16 new tokens at batch 1 ===\n"
                        + host_profile(lambda: (gen(16), sync(device))))
        out[spec] = {"launches_per_step": (l6 - l2) / 4, "syncs_per_step": (s6 - s2) / 4}
        log(f"launches {spec:28s} {out[spec]}")
    return out, "\n".join(text)


def host_profile(fn, rows: int = 30) -> str:
    """cProfile of fn(): the functions with the most own host time (torch ops appear as their Python
    entry points), for where a launch-bound step spends its time."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(rows)
    return buf.getvalue()


# --- report ------------------------------------------------------------------------------------------


def ratios(res: dict) -> dict:
    """Every setting over stock top-4 and stock top-8, per run; plus the repeat of a stock setting (noise)."""
    out = {}
    for phase in ("prefill", "decode"):
        for key, row in res.get(phase, {}).items():
            tok = {k: v["tok_s"] for k, v in row.items()}
            r = {}
            for a in tok:
                for b in ("stock4", "stock8"):
                    if b in tok and a != b and not a.startswith("stock"):
                        r[f"{a}/{b}"] = tok[a] / tok[b]
            if "stock4" in tok and "stock8" in tok:
                r["stock4/stock8"] = tok["stock4"] / tok["stock8"]
            for a in ("stock8", "stock4"):
                if a in tok and a + "#2" in tok:
                    r[f"{a} repeat/{a} (noise)"] = tok[a + "#2"] / tok[a]
            out[f"{phase} {key}"] = r
    return out


def routing_share(res: dict, num_layers: int) -> dict:
    """Routing time over forward time: layers x route(T) / forward(T) with the bhvar setting."""
    out = {}
    rt = res.get("routing", {})
    for key, row in res.get("prefill", {}).items():
        b, l = map(int, key.split("x"))
        r = rt.get(str(b * l))
        if r and "bhvar" in row:
            fwd = row["bhvar"]["ms"] / 1e3
            out[f"prefill {key}"] = {k[:-2]: num_layers * v / fwd for k, v in r.items() if v is not None}
    for key, row in res.get("decode", {}).items():
        r = rt.get(key[1:])
        if r and "bhvar" in row:
            step = row["bhvar"]["ms_per_step"] / 1e3
            out[f"decode {key}"] = {k[:-2]: num_layers * v / step for k, v in r.items() if v is not None}
    return out


def markdown(res: dict) -> str:
    dev = res["env"]["device_name"]
    lines = [f"Device: {dev}; torch {res['env']['torch']}, transformers {res['env']['transformers']}; "
             f"{res['env']['model']}; alpha for bhvar = {res['calibration']['alpha']:.4g} "
             f"(calibrated mean k {res['calibration']['mean_k']:.2f}).", ""]
    base = [s for s in BASE]
    lines.append("| run | " + " | ".join(base) + " |")
    lines.append("|---|" + "---:|" * len(base))
    for phase, unit in (("prefill", "tok/s"), ("decode", "new tok/s")):
        for key, row in res.get(phase, {}).items():
            cells = []
            for s in base:
                v = row.get(s)
                cells.append("" if v is None else f"{v['tok_s']:,.0f}" + (
                    f" (k {v['mean_k']:.2f})" if v.get("mean_k") is not None and s.startswith("bhv") else ""))
            lines.append(f"| {phase} {key} ({unit}) | " + " | ".join(cells) + " |")
    lines.append("")
    cols = ["bh8/stock8", "bh4/stock4", "bhvar/stock4", "bhvar+torch/stock4", "bhvar+compiled/stock4",
            "bhvar/stock8", "bhforced/stock4", "stock4/stock8"]
    share = res.get("routing_share", {})
    share_cols = ["route_triton", "route_triton_gpu", "route_eager", "route_eager_gpu", "route_compiled"]
    lines.append("| run | " + " | ".join(cols) + " | " + " | ".join(f"routing share: {c}" for c in share_cols) + " |")
    lines.append("|---|" + "---:|" * (len(cols) + len(share_cols)))
    fmt = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
    for key, r in res.get("ratios", {}).items():
        sh = share.get(key, {})
        lines.append(f"| {key} | " + " | ".join(fmt(r.get(c)) for c in cols) + " | " +
                     " | ".join(fmt(sh.get(c)) for c in share_cols) + " |")
    lines.append("")
    extra = sorted({c for r in res.get("ratios", {}).values() for c in r} - set(cols))
    if extra:
        runs = list(res.get("ratios", {}))
        lines.append("| ratio | " + " | ".join(runs) + " |")
        lines.append("|---|" + "---:|" * len(runs))
        for c in extra:
            lines.append(f"| {c} | " + " | ".join(fmt(res["ratios"][k].get(c)) for k in runs) + " |")
        lines.append("")
    check = res.get("kernel_check", {})
    if check and "skipped" not in check:
        lines.append("Fused Triton router against the reference `routing.route`, every layer's captured logits:")
        lines.append("")
        lines.append("| alpha | token-layer pairs | differing selection or count | p-values not bit-identical | max weight diff |")
        lines.append("|---:|---:|---:|---:|---:|")
        for alpha, row in check.items():
            lines.append(f"| {alpha} | {row['token_layer_pairs']:,} | {row['differing_selection']} | "
                         f"{row['pvalues_not_bit_identical']} of {row['pvalues']:,} | {row['max_weight_abs_diff']:.2g} |")
        lines.append("")
    launches = res.get("decode_launches", {})
    if launches:
        lines.append("Per decode step at batch 1 (torch.profiler, difference of 6- and 2-token generate):")
        lines.append("")
        lines.append("| setting | kernel launches | cudaMemcpy / Synchronize calls |")
        lines.append("|---|---:|---:|")
        for spec, row in launches.items():
            lines.append(f"| {spec} | {row['launches_per_step']:.0f} | {row['syncs_per_step']:.1f} |")
        lines.append("")
    for phase in ("prefill", "decode"):
        rows = res.get(phase, {})
        if not rows:
            continue
        specs = list(dict.fromkeys(s for row in rows.values() for s in row))
        lines.append(f"{phase}, every setting (tok/s):")
        lines.append("")
        lines.append("| setting | " + " | ".join(rows) + " |")
        lines.append("|---|" + "---:|" * len(rows))
        for spec in specs:
            lines.append(f"| {spec} | " + " | ".join(
                f"{rows[k][spec]['tok_s']:,.0f}" if spec in rows[k] else "" for k in rows) + " |")
        lines.append("")
    disp = res.get("dispatch", {})
    if disp:
        names = [k for k in next(iter(disp.values())) if k.endswith("_s")]
        lines.append("One layer's experts call (us), forced k mean 4 for the BH strategies:")
        lines.append("")
        lines.append("| T | backend | auto choice | " + " | ".join(n[:-2] for n in names) + " |")
        lines.append("|---:|---|---|" + "---:|" * len(names))
        for t, row in disp.items():
            lines.append(f"| {t} | {row['backend']} | {row['auto_choice']} | " +
                         " | ".join(f"{row[n] * 1e6:.0f}" for n in names) + " |")
        lines.append("")
    return "\n".join(lines)


def env_info(device, model) -> dict:
    info = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "device": str(device), "cuda": torch.version.cuda,
            "model": "OLMoE-1B-7B architecture, random weights" if model.config.hidden_size == 2048
            else "tiny OLMoE, random weights",
            "params": sum(p.numel() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype)}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["capability"] = list(torch.cuda.get_device_capability(device))
    else:
        info["device_name"] = platform.processor() or platform.machine()
    return info


def parse_shapes(text):
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",") if s]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny config on the CPU (smoke test, seconds)")
    p.add_argument("--device", default=None)
    p.add_argument("--out-dir", default=None, help="where bench.json and bench.md go (default: none for --tiny, "
                   "results/bench otherwise)")
    p.add_argument("--shapes", default=None, help="prefill shapes, e.g. 1x2048,16x512,64x256")
    p.add_argument("--batches", default=None, help="decode batch sizes, e.g. 1,32")
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds over the prefill settings")
    p.add_argument("--decode-rounds", type=int, default=None, help="interleaved rounds over the decode settings")
    p.add_argument("--prefill-settings", default=None, help="comma list (default: all)")
    p.add_argument("--decode-settings", default=None, help="comma list (default: all)")
    p.add_argument("--skip", default="", help="comma list of parts to skip: prefill,decode,routing,dispatch,check")
    p.add_argument("--profile", action="store_true", help="write a torch.profiler table of one prefill forward "
                   "(stock4 and bhforced) to profile.txt in --out-dir")
    p.add_argument("--launch-settings", default=None, help="settings of the decode launch count and host "
                   "profile (with --profile; comma list)")
    p.add_argument("--dispatch-t", default=None, help="extra token counts for the one-layer dispatch timings")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="measure the +compiled proposal (default: on CUDA only)")
    p.add_argument("--render", default=None, metavar="BENCH_JSON", help="only print the Markdown tables of a "
                   "bench.json written earlier (and rewrite the .md of the same name beside it)")
    args = p.parse_args(argv)
    if args.render:
        return render(args.render, markdown)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    tiny = args.tiny
    if args.compile is None:
        args.compile = device.type == "cuda"
    args.shapes = parse_shapes(args.shapes or ("1x32,2x16" if tiny else "1x2048,16x512,64x256"))
    batches = [int(b) for b in (args.batches or ("1,2" if tiny else "1,32")).split(",") if b]
    args.new_tokens = args.new_tokens or (4 if tiny else 128)
    args.prompt_len = args.prompt_len or (8 if tiny else 32)
    args.reps = args.reps or (1 if tiny else 3)
    args.rounds = args.rounds or (1 if tiny else 3)
    args.decode_rounds = args.decode_rounds or (1 if tiny else 3)
    if tiny:  # a smoke test: every code path once, no meaningful timings
        args.warmup = min(args.warmup, 1)
        torch.set_num_threads(1)
        args.prefill_settings = args.prefill_settings or ",".join(
            BASE + ["bhforced+exact", "bhforced+compact", "bh8+nostats"])
        args.decode_settings = args.decode_settings or ",".join(BASE + ["bhforced+padded"])
    skip = set(filter(None, args.skip.split(",")))
    out_dir = Path(args.out_dir) if args.out_dir else (None if tiny else REPO / "results" / "bench")

    def settings_for(text, default):
        chosen = text.split(",") if text else default
        return [s for s in chosen if args.compile or "compiled" not in s]

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t_build = time.perf_counter()
    model = build_model(TINY if tiny else FULL, device, dtype)
    sync(device)
    res = {"env": env_info(device, model), "config": TINY if tiny else FULL,
           "args": {k: v for k, v in vars(args).items()}, "build_s": time.perf_counter() - t_build,
           "dispatch_params": {"EXACT_MIN_PAIRS": dispatch.EXACT_MIN_PAIRS,
                               "GROUPED_BACKENDS": list(dispatch.GROUPED_BACKENDS)}}
    log(f"built {res['env']['model']} on {res['env']['device_name']} in {res['build_s']:.1f}s; "
        f"experts backend {model.config._experts_implementation}")
    bench = Bench(model, args, device)

    # Calibrate alpha on router logits of a mid-size prefill; keep per-T logits for the routing timings.
    b0, l0 = args.shapes[min(1, len(args.shapes) - 1)]
    captured = bench.capture_logits(random_ids((b0, l0), model.config.vocab_size, device, seed=5))
    res["calibration"] = bench.calibrate(captured)
    log(f"alpha calibrated: {res['calibration']}")
    logits0 = captured[0]
    num_layers = len(captured)
    ts = sorted({b * l for b, l in args.shapes} | set(batches))

    def logits_for(t):
        reps = -(-t // logits0.shape[0])
        return logits0.repeat(reps, 1)[:t].contiguous()

    logits_by_t = {t: logits_for(t) for t in ts}
    extra_t = [int(t) for t in (args.dispatch_t or ("" if tiny else "128,256,512,1024")).split(",") if t]
    dispatch_logits = {t: logits_for(t) for t in sorted(set(ts) | set(extra_t))}

    if "prefill" not in skip:
        res["prefill"] = run_prefill(bench, args.shapes, settings_for(args.prefill_settings, PREFILL_SETTINGS))
    if "routing" not in skip:
        res["routing"] = run_routing(bench, logits_by_t)
    if "dispatch" not in skip:
        res["dispatch"] = run_dispatch(bench, dispatch_logits)
    if "check" not in skip:
        res["kernel_check"] = run_kernel_check(bench, captured)
    if args.profile and out_dir is not None:
        (out_dir / "profile.txt").write_text(profile(bench, args.shapes[min(1, len(args.shapes) - 1)]))
    if "decode" not in skip:
        res["decode"] = run_decode(bench, batches, settings_for(args.decode_settings, DECODE_SETTINGS))
    if args.profile and device.type == "cuda":
        res["decode_launches"], host = decode_launches(bench, settings_for(args.launch_settings, [
            "stock4", "stock8", "bh8", "bh8+nostats", "bhvar", "bhvar+torch", "bhvar+compiled", "bhvar+nostats"]))
        if out_dir is not None:
            (out_dir / "profile_decode.txt").write_text(host)
    res["ratios"] = ratios(res)
    res["routing_share"] = routing_share(res, num_layers)
    md = markdown(res)
    print(md, flush=True)
    if out_dir is not None:
        log("wrote " + " and ".join(map(str, save(out_dir, "bench", res, md))))
    return res


if __name__ == "__main__":
    main()
