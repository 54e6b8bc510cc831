#!/usr/bin/env python3
"""Wall time of BH routing against stock routing through lm-eval itself, in one process, on one device.

Builds the OLMoE-1B-7B architecture with random weights (on the device, from its config), saves it with the
tokenizer shipped in lm_eval_bh/assets so that lm-eval loads it by path, then:

1. constructs lm-eval's own models, timed: ``get_model("hf" | "olmoe_bh").create_from_arg_string(...)``;
2. probes alpha for a mean of about 4 and about 2 experts per token on workload (a)'s text;
3. times the first variable-k `simple_evaluate` of the process (router warm-up included) against warm ones;
4. times `simple_evaluate` for every setting x workload, settings interleaved over --rounds rounds:

   settings   hf8 (stock top-8), hf4 (stock top-4: every router's top_k = 4, as num_experts_per_tok=4 sets
              it), bh8 (olmoe_bh min_k = max_k = 8), bhvar4 / bhvar2 (olmoe_bh min_k = 1, max_k = 8, alpha
              probed for a mean k of ~4 / ~2); the router as the product runs it by default (router_kernel=auto:
              the fused Triton kernel on CUDA); a trailing "e" (bhvar4e): the eager reference router
              (router_kernel=torch), "c" (bhvar4c): the reference compiled (router_kernel=compile).
              hf* share one loaded model, bh* another (`set_routing`).
   workloads  a32 / aauto: the offline multiple-choice pack (tasks/offline, bh_offline) at batch 32 / auto;
              b: rolling log-likelihood over long documents (bench/tasks, bh_bench_longdocs), 2048-token
              windows; c: generate_until, 32 new tokens, batch 32 (bench/tasks, bh_bench_generate);

5. with --profile, one warm run of a32 per setting with where the time goes (see `Profiler`).

Writes harness.json (device, versions, every figure) and harness.md. `--tiny` runs a tiny config on the CPU
(a smoke test of the whole path; tests/test_bench.py runs it).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

for _k, _v in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_k, _v)

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import OlmoeConfig, OlmoeForCausalLM  # noqa: E402

import lm_eval  # noqa: E402
import lm_eval.models  # noqa: E402,F401
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import lm_eval_bh.lm  # noqa: E402,F401  (registers olmoe_bh where the .pth hook is not installed)
from lm_eval_bh import dispatch, routing  # noqa: E402
from lm_eval_bh.lm import MoEBHLM  # noqa: E402
from lm_eval_bh.patch import BHRouting  # noqa: E402
from lm_eval_bh.routing import RoutingConfig  # noqa: E402
from results_io import render, save, write_json  # noqa: E402  (bench/, this script's folder)

EXACT_MIN_PAIRS = dispatch.EXACT_MIN_PAIRS  # the product's default

TOKENIZER = REPO / "lm_eval_bh" / "assets" / "tokenizer"
INCLUDE = [str(REPO / "tasks" / "offline"), str(REPO / "bench" / "tasks")]

# OLMoE-1B-7B-0924's shape (as bench/bench.py); the vocabulary stays 50304 (the tokenizer uses its first 4096).
FULL = dict(
    vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
    num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, norm_topk_prob=False,
    max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    rms_norm_eps=1e-5, hidden_act="silu", bos_token_id=None, tie_word_embeddings=False, clip_qkv=None,
)
TINY = dict(FULL, vocab_size=4096, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, num_experts=16)

WORKLOADS = {  # name: (task, batch size, limit per task (None: all))
    "a32": ("bh_offline", 32, None),
    "aauto": ("bh_offline", "auto", None),
    "b": ("bh_bench_longdocs", 8, None),
    "c": ("bh_bench_generate", 32, 64),
}
SETTINGS = ["hf8", "hf4", "bh8", "bhvar4", "bhvar4e", "bhvar4c", "bhvar2"]
MAX_LENGTH = 2048


def log(*a):
    print(f"[harness {time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --- the model on disk ---------------------------------------------------------------------------------


def build_and_save(cfg: dict, out: Path, device: torch.device, dtype: torch.dtype) -> dict:
    """Random weights initialised on the device in `dtype`, saved with the shipped tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    eos = tok.eos_token_id
    t0 = time.perf_counter()
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = OlmoeForCausalLM(OlmoeConfig(**cfg, eos_token_id=eos, pad_token_id=eos))
    finally:
        torch.set_default_dtype(previous)
    sync()
    built = time.perf_counter() - t0
    model.generation_config.do_sample = False
    model.generation_config.pad_token_id = eos
    model.save_pretrained(out)
    for f in TOKENIZER.iterdir():
        shutil.copy(f, out / f.name)
    saved = time.perf_counter() - t0 - built
    params = sum(p.numel() for p in model.parameters())
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"build_s": built, "save_s": saved, "params": params}


# --- settings --------------------------------------------------------------------------------------------


def routers(model):
    return [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]


def apply_setting(name: str, lms: dict, alphas: dict, top_k: int):
    """Put the shared lm objects into setting `name`; returns the lm to evaluate."""
    if name.startswith("hf"):
        lm = lms["hf"]
        for r in routers(lm.model):
            r.top_k = top_k if name == "hf8" else top_k // 2
        return lm
    lm = lms["bh"]
    base = name.rstrip("cepn")  # a trailing "c" / "e": the same setting, router compiled / eager reference;
    # "p": the experts dispatch never syncs (its padded strategy at every size); "n": no CUDA graphs in decoding
    wanted = (dict(min_k=top_k, max_k=top_k) if base == "bh8"
              else dict(alpha=alphas[base], min_k=1, max_k=top_k))
    kernel = {"c": "compile", "e": "torch"}.get(name[-1], lms["router_kernel"])
    dispatch.EXACT_MIN_PAIRS = 1 << 62 if name.endswith("p") else EXACT_MIN_PAIRS
    dispatch.USE_GRAPHS = not name.endswith("n")
    current = lm.routing_config
    if any(getattr(current, k) != v for k, v in wanted.items()) or lm._router_kernel != kernel:
        lm._router_kernel = kernel
        lm.set_routing(**wanted)
    lm.routing.stats.reset()
    return lm


def set_batch(lm, batch_size):
    lm.batch_size_per_gpu = batch_size
    lm.batch_sizes = {}
    lm.batch_schedule = 1


def probe_alphas(lm, targets=(4.0, 2.0), tokens=2048) -> dict:
    """Bisect log(alpha) so that the mean k over all layers on workload (a)'s text is each target."""
    records = (json.loads(line) for line in open(REPO / "tasks" / "offline" / "mmlu_dev.jsonl", encoding="utf-8"))
    text = "\n\n".join(f"Question: {r['question']}\nAnswer: {r['choices'][0]}" for r in records if "question" in r)
    ids = lm.tok_encode(text)[:tokens]
    captured, handles = [], []
    for r in routers(lm.model):
        handles.append(r.register_forward_hook(lambda m, a, out: captured.append(out[0].detach().float())))
    try:
        with torch.no_grad():
            lm.model(torch.tensor([ids], device=lm.device))
    finally:
        for h in handles:
            h.remove()
    num_experts, top_k = captured[0].shape[-1], routers(lm.model)[0].top_k

    def mean_k(alpha):
        cfg = RoutingConfig(alpha=alpha, min_k=1, max_k=top_k).resolve(num_experts, top_k, False)
        return float(torch.stack([routing.select_count(x, cfg)[2].float().mean() for x in captured]).mean())

    out = {}
    for target in targets:
        lo, hi = math.log(1e-6), math.log(0.999)
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if mean_k(math.exp(mid)) < target else (lo, mid)
        out[target] = {"alpha": math.exp(hi), "probe_mean_k": mean_k(math.exp(hi))}
    return out


# --- one evaluation ----------------------------------------------------------------------------------------


def evaluate(lm, workload: str, task_manager, limit=None) -> dict:
    task, batch, default_limit = WORKLOADS[workload]
    set_batch(lm, batch)
    limit = default_limit if limit is None else (limit if default_limit is None else min(limit, default_limit))
    sync()
    t0 = time.perf_counter()
    res = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=task_manager, limit=limit,
                                  bootstrap_iters=0, log_samples=False, verbosity="ERROR")
    sync()
    wall = time.perf_counter() - t0
    out = {"s": wall}
    if isinstance(lm, MoEBHLM):
        summary = lm.routing.summary()
        out["mean_k"], out["k_histogram"] = summary["mean_experts_per_token"], summary["k_histogram"]
    metrics = res["results"].get(task, {})
    out["metric"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and "stderr" not in k}
    return out


# --- where the time goes ---------------------------------------------------------------------------------


class Profiler:
    """Host time of the pieces of one warm run, by wrapping them (no extra device synchronisation, except
    the one after each forward that gives its wall time; lm-eval reads the logits on the host right after).

    - forward: `HFLM._model_call`, wall until the device is done (torch.cuda.synchronize after it);
    - tokenize: `tok_encode` + `tok_batch_encode`;
    - plugin bookkeeping: the real-token mask (`MoEBHLM._real_token_mask`), the model hooks
      (`BHRouting._before_forward` / `_after_forward`: which tokens count, one statistics update per forward),
      `BHRouting._record` per layer;
    - router launch: `BHRouting._route` per layer (host time to launch the routing kernels; compiled or eager);
    - dispatch: `dispatch.experts_forward` per layer (host time incl. its one wait on the device when exact).
    GPU time of a typical forward comes from `device_profile`.
    """

    TARGETS = {
        "tokenize": [("HFLM", "tok_encode"), ("HFLM", "tok_batch_encode")],
        "mask": [("MoEBHLM", "_real_token_mask")],
        "hooks": [("BHRouting", "_before_forward"), ("BHRouting", "_after_forward"), ("BHRouting", "_record")],
        "router_launch": [("BHRouting", "_route")],
    }

    def __init__(self):
        from lm_eval.models.huggingface import HFLM

        self.classes = {"HFLM": HFLM, "MoEBHLM": MoEBHLM, "BHRouting": BHRouting}
        self.totals: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.sample_input = None
        self._saved = []

    def _wrap(self, owner, attr, key, synced=False):
        original = owner.__dict__[attr] if attr in owner.__dict__ else getattr(owner, attr)
        self._saved.append((owner, attr, owner.__dict__.get(attr)))

        @functools.wraps(original)
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                if synced:
                    sync()
                self.totals[key] = self.totals.get(key, 0.0) + time.perf_counter() - t0
                self.calls[key] = self.calls.get(key, 0) + 1

        setattr(owner, attr, wrapper)

    def __enter__(self):
        for key, targets in self.TARGETS.items():
            for cls, attr in targets:
                self._wrap(self.classes[cls], attr, key)
        self._wrap(dispatch, "experts_forward", "dispatch")
        self._wrap(self.classes["HFLM"], "_model_generate", "forward", synced=True)
        self._wrap(self.classes["HFLM"], "_model_call", "forward", synced=True)
        original = self.classes["HFLM"].__dict__["_model_call"]

        def keep_input(lm_self, inps, *a, **kw):
            if self.sample_input is None or inps.numel() > self.sample_input.numel():
                self.sample_input = inps
            return original(lm_self, inps, *a, **kw)

        self.classes["HFLM"]._model_call = keep_input
        return self

    def __exit__(self, *exc):
        self.classes["HFLM"]._model_call = self._saved[-1][2]
        for owner, attr, old in reversed(self._saved):
            if old is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, old)

    def report(self, wall: float) -> dict:
        n = self.calls.get("forward", 0)
        fwd = self.totals.get("forward", 0.0)
        per = {k: v / n if n else None for k, v in self.totals.items()}
        plugin = sum(self.totals.get(k, 0.0) for k in ("mask", "hooks", "router_launch"))
        return {
            "wall_s": wall, "forwards": n, "forward_total_s": fwd, "forward_mean_ms": 1e3 * fwd / n if n else None,
            "outside_forwards_s": wall - fwd, "totals_s": self.totals, "calls": self.calls,
            "per_forward_ms": {k: 1e3 * v for k, v in per.items() if v is not None},
            "plugin_host_s": plugin, "plugin_host_share_of_forward": plugin / fwd if fwd else None,
            "bookkeeping_share_of_forward": (self.totals.get("mask", 0.0) + self.totals.get("hooks", 0.0)) / fwd
            if fwd else None,
        }


def device_profile(lm, inps: torch.Tensor, reps: int = 3) -> dict:
    """One typical forward of the run (the largest input lm-eval sent), replayed: wall per forward and
    the device's kernel time per forward (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        lm.model(inps)  # warm
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            lm.model(inps)
        sync()
        wall = (time.perf_counter() - t0) / reps
        if not torch.cuda.is_available():
            return {"shape": list(inps.shape), "wall_ms": 1e3 * wall}
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                lm.model(inps)
            sync()
    events = prof.key_averages()
    device_us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx",
                                                         "cudaLaunchKernelExC"))
    syncs = sum(e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                      "cudaMemcpyAsync"))
    return {"shape": list(inps.shape), "wall_ms": 1e3 * wall, "device_ms": device_us / 1e3 / reps,
            "launches": launches / reps, "memcpy_or_sync": syncs / reps}


# --- summary -----------------------------------------------------------------------------------------------


def median_spread(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def summarise(res: dict) -> dict:
    runs = res["runs"]
    table = {}
    for w in res["workloads"]:
        table[w] = {}
        for s in res["settings"]:
            times = [r["s"] for r in runs if r["workload"] == w and r["setting"] == s]
            if not times:
                continue
            row = median_spread(times)
            ks = [r["mean_k"] for r in runs if r["workload"] == w and r["setting"] == s and r.get("mean_k")]
            if ks:
                row["mean_k"] = statistics.mean(ks)
            table[w][s] = row
    ratios = {}
    for w, row in table.items():
        def speed(a, b):  # how much faster a runs than b: t_b / t_a (median wall times)
            return row[b]["median"] / row[a]["median"] if a in row and b in row else None

        ratios[w] = {"hf4/hf8": speed("hf4", "hf8")}
        for s in res["settings"]:
            if s.startswith("bh"):
                ref = "hf8" if s.startswith("bh8") else "hf4"
                ratios[w][f"{s}/{ref}"] = speed(s, ref)
    # the default router (fused kernel on CUDA) and the compiled one against the eager reference (bhvar4e):
    # same requests, same batches
    same = {}
    for other in ("bhvar4", "bhvar4c"):
        for w in res["workloads"]:
            pairs = [(r, q) for r in runs for q in runs if r["workload"] == q["workload"] == w
                     and r["setting"] == "bhvar4e" and q["setting"] == other and r["round"] == q["round"]]
            if pairs:
                same.setdefault(other, {})[w] = {
                    "k_histogram_equal": all(r.get("k_histogram") == q.get("k_histogram") for r, q in pairs),
                    "metrics_equal": all(r["metric"] == q["metric"] for r, q in pairs), "runs": len(pairs)}
    return {"table": table, "ratios": ratios, "vs_eager_reference": same}


def markdown(res: dict) -> str:
    env, summ = res["env"], res["summary"]
    lines = [f"# Harness benchmark ({env['device_name']})", "",
             f"{env['device_name']}, torch {env['torch']}, transformers {env['transformers']}, lm-eval "
             f"{env['lm_eval']}, Python {env['python']}; {env['model']} ({env['params'] / 1e9:.2f} B parameters, "
             f"{env['dtype']}); {res['args']['rounds']} interleaved rounds, medians (min-max). "
             f"Command: `{res['command']}`", ""]
    lines += ["Model construction (`get_model(...).create_from_arg_string`, weights from local disk):", "",
              "| model | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in res["construction_s"].items()]
    lines += ["", f"alpha probe (mean k on workload (a)'s text): " + ", ".join(
        f"{s}: alpha {v['alpha']:.4g} (probe mean k {v['probe_mean_k']:.2f})" for s, v in res["alphas"].items()), ""]
    for s, fc in res.get("first_call", {}).items():
        if fc["extra_s"] is None:
            continue
        lines += [f"First {s} `simple_evaluate` of the process (a32; bhvar4 right after construction, "
                  f"then bhvar4e, bhvar4c): {fc['first_s']:.2f} s against a warm median of {fc['warm_median_s']:.2f} s: "
                  f"**{fc['extra_s']:+.2f} s**.", ""]
    names = {"a32": "(a) bh_offline, batch 32", "aauto": "(a) bh_offline, batch auto",
             "b": "(b) rolling log-likelihood, 2048-token windows", "c": "(c) generate_until, 32 new tokens, batch 32"}
    settings = res["settings"]
    lines += ["Wall time of `simple_evaluate` (s):", "",
              "| workload | " + " | ".join(settings) + " |", "|---|" + "---:|" * len(settings)]
    for w, row in summ["table"].items():
        cells = []
        for s in settings:
            c = row.get(s)
            if c is None:
                cells.append("")
                continue
            k = f", k {c['mean_k']:.2f}" if "mean_k" in c else ""
            cells.append(f"{c['median']:.2f} ({c['min']:.2f}-{c['max']:.2f}{k})")
        lines.append(f"| {names.get(w, w)} | " + " | ".join(cells) + " |")
    keys = list(next(iter(summ["ratios"].values()), {}))
    lines += ["", "Speed ratios (median wall time of the second over the first; > 1: faster):", "",
              "| workload | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for w, r in summ["ratios"].items():
        lines.append(f"| {names.get(w, w)} | " + " | ".join("" if r[k] is None else f"{r[k]:.3f}" for k in keys) + " |")
    for other, same in summ.get("vs_eager_reference", {}).items():
        lines += ["", f"{other} against the eager reference router (bhvar4e), run for run: " + "; ".join(
            f"{w}: k histograms {'identical' if v['k_histogram_equal'] else 'DIFFERENT'}, metrics "
            f"{'identical' if v['metrics_equal'] else 'different'}" for w, v in same.items()) + "."]
    prof = res.get("profile")
    if prof:
        lines += ["", "Where the time goes, one warm run each (`--profile`; per forward, ms; for (c) a 'forward' "
                  "is one generate call of 32 steps):", "",
                  "| setting, workload | run s | forwards | forward wall | outside forwards (s) | tokenize (s) | mask | hooks+stats "
                  "| router launch | dispatch | plugin host / forward | typical forward: shape, wall ms, device ms, "
                  "launches |", "|---|" + "---:|" * 11]
        for s, p in prof.items():
            pf = p["per_forward_ms"]
            d = p.get("device", {})
            share = p["plugin_host_share_of_forward"]
            lines.append(
                f"| {s} | {p['wall_s']:.2f} | {p['forwards']} | {p['forward_mean_ms']:.1f} | "
                f"{p['outside_forwards_s']:.2f} | {p['totals_s'].get('tokenize', 0):.2f} | {pf.get('mask', 0):.2f} | "
                f"{pf.get('hooks', 0):.2f} | {pf.get('router_launch', 0):.2f} | {pf.get('dispatch', 0):.2f} | "
                f"{100 * share:.2f} % | {'x'.join(map(str, d.get('shape', [])))}, {d.get('wall_ms', 0):.1f}, "
                f"{d.get('device_ms', float('nan')):.1f}, {d.get('launches', float('nan')):.0f} |"
                if share is not None else f"| {s} | {p['wall_s']:.2f} | {p['forwards']} | | | | | | | | | |")
    return "\n".join(lines)


def env_info(device, build) -> dict:
    info = {"torch": torch.__version__, "transformers": transformers.__version__, "lm_eval": lm_eval.__version__,
            "python": platform.python_version(), "device": str(device), "cuda": torch.version.cuda,
            "params": build["params"]}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    else:
        info["device_name"] = f"CPU ({platform.machine()})"
    return info


# --- main ----------------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny config on the CPU, few documents (smoke test)")
    p.add_argument("--out-dir", default=None, help="where harness.json and harness.md go")
    p.add_argument("--model-dir", default=None, help="where the random-weight model is saved (default: a temp dir)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--limit", type=int, default=None, help="documents per task (default: all; --tiny: 4)")
    p.add_argument("--profile", default=None, help="comma list of settings to profile (one warm run each)")
    p.add_argument("--profile-workloads", default="a32", help="comma list of workloads to profile")
    p.add_argument("--router-kernel", default=None, help="olmoe_bh's router_kernel (default: the product's)")
    p.add_argument("--render", default=None, metavar="HARNESS_JSON", help="only rewrite the .md beside a "
                   "harness JSON written earlier (also one cut short) and print it")
    args = p.parse_args(argv)
    if args.render:
        return render(args.render, lambda res: markdown({**res, "summary": summarise(res)}))
    tiny = args.tiny
    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rounds = args.rounds if args.rounds is not None else (1 if tiny else 3)
    limit = args.limit if args.limit is not None else (4 if tiny else None)
    settings = [s for s in args.settings.split(",") if s]
    workloads = [w for w in args.workloads.split(",") if w]
    if tiny:
        torch.set_num_threads(1)
    res = {"command": "python3 bench/harness.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "args": {**vars(args), "rounds": rounds, "limit": limit}, "settings": settings, "workloads": workloads,
           "runs": [], "construction_s": {}}

    tmp = None
    model_dir = Path(args.model_dir) if args.model_dir else Path(tmp := tempfile.mkdtemp(prefix="harness-model-"))
    try:
        build = build_and_save(TINY if tiny else FULL, model_dir, device, dtype)
        res["env"] = {**env_info(device, build), "dtype": str(dtype).replace("torch.", ""),
                      "model": "tiny OLMoE, random weights" if tiny else "OLMoE-1B-7B architecture, random weights"}
        res["build"] = build
        log(f"model built in {build['build_s']:.1f}s, saved in {build['save_s']:.1f}s on {res['env']['device_name']}")
        common = f"pretrained={model_dir},dtype={str(dtype).replace('torch.', '')},max_length={MAX_LENGTH}"
        extra = {"batch_size": 32, "device": str(device)}
        tm = TaskManager(include_path=INCLUDE)

        t0 = time.perf_counter()
        hf = get_model("hf").create_from_arg_string(common, extra)
        res["construction_s"]["hf"] = time.perf_counter() - t0
        top_k = routers(hf.model)[0].top_k
        probe = probe_alphas(hf)
        alphas = {"bhvar4": probe[4.0]["alpha"], "bhvar2": probe[2.0]["alpha"]}
        res["alphas"] = {"bhvar4": probe[4.0], "bhvar2": probe[2.0]}
        log(f"hf constructed in {res['construction_s']['hf']:.1f}s; alphas {res['alphas']}")
        # lm-eval's own first-run costs (imports, task indexing, CUDA handles) before anything is timed
        evaluate(hf, "a32", tm, limit=2)

        bh_args = f"{common},alpha={alphas['bhvar4']},min_k=1"
        if args.router_kernel is not None:
            bh_args += f",router_kernel={args.router_kernel}"
        t0 = time.perf_counter()
        bh = get_model("olmoe_bh").create_from_arg_string(bh_args, extra)
        res["construction_s"]["olmoe_bh (variable k)"] = time.perf_counter() - t0
        lms = {"hf": hf, "bh": bh, "router_kernel": bh._router_kernel}
        log(f"olmoe_bh constructed in {res['construction_s']['olmoe_bh (variable k)']:.1f}s")

        firsts = {}  # the first variable-k run of the process: the default router, then eager, then compiled
        for s in ("bhvar4", "bhvar4e", "bhvar4c"):
            if s in settings and "a32" in workloads:
                firsts[s] = evaluate(apply_setting(s, lms, alphas, top_k), "a32", tm, limit=limit)
                log(f"first {s} run: {firsts[s]['s']:.2f}s")
        # no timed run pays a setting's first use, nor the first generation at full batch
        for s in settings:
            evaluate(apply_setting(s, lms, alphas, top_k), "a32", tm, limit=2)
        for s in ("hf4", "bhvar4"):
            if s in settings and "c" in workloads:
                evaluate(apply_setting(s, lms, alphas, top_k), "c", tm, limit=WORKLOADS["c"][1])

        for r in range(rounds):
            order = settings[r % len(settings):] + settings[: r % len(settings)]
            for w in workloads:
                for s in order:
                    out = evaluate(apply_setting(s, lms, alphas, top_k), w, tm, limit=limit)
                    res["runs"].append({"round": r, "workload": w, "setting": s, **out})
                    log(f"round {r} {w} {s}: {out['s']:.2f}s" + (f" mean k {out['mean_k']:.2f}" if "mean_k" in out else ""))
                    if args.out_dir:  # partial results survive a run cut short
                        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
                        write_json(Path(args.out_dir) / "harness.json", res)
        res["summary"] = summarise(res)
        if device.type == "cuda":
            res["env"]["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        res["first_call"] = {}
        for s, first in firsts.items():
            warm = res["summary"]["table"].get("a32", {}).get(s, {}).get("median")
            res["first_call"][s] = {"first_s": first["s"], "warm_median_s": warm,
                                    "extra_s": None if warm is None else first["s"] - warm}

        res["profile"] = {}
        for s in (args.profile or "").split(","):
            for w in args.profile_workloads.split(","):
                if not s or w not in workloads:
                    continue
                lm = apply_setting(s, lms, alphas, top_k)
                with Profiler() as prof:
                    if isinstance(lm, MoEBHLM):  # re-patch so that the hooks bound at patch time are the wrapped ones
                        cfg = lm.routing_config
                        lm.set_routing(**{k: getattr(cfg, k) for k in ("alpha", "min_k", "max_k")})
                        lm.routing.stats.reset()
                    t0 = time.perf_counter()
                    evaluate(lm, w, tm, limit=limit)
                    rep = prof.report(time.perf_counter() - t0)
                    sample = prof.sample_input
                if sample is not None:
                    rep["device"] = device_profile(lm, sample)
                res["profile"][f"{s} {w}"] = rep
                if args.out_dir:
                    write_json(Path(args.out_dir) / "harness.json", res)
                log(f"profile {s} {w}: {json.dumps(rep['per_forward_ms'])}")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    md = markdown(res)
    print(md, flush=True)
    if args.out_dir:
        log("wrote " + " and ".join(map(str, save(Path(args.out_dir), "harness", res, md))))
    return res


if __name__ == "__main__":
    main()
