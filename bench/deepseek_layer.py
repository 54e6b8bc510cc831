#!/usr/bin/env python3
"""One full-size DeepSeek-V3 MoE layer (Kimi-K2's architecture): BH routing against the stock layer.

Builds transformers' own `DeepseekV3MoE` block (256 routed experts of width 2048, top-8, 8 groups of which
4 are kept, hidden 7168, one shared expert) with random bf16 weights on the GPU and times, after warm-up
and with device synchronisation (median of repeats, CUDA events):

- block: the whole MoE block forward (router, routed experts, shared expert) for the stock router at
  top-8 and top-4, for `BHRouting(min_k=max_k=8)` (the fixed path: stock router, stock speed expected),
  and for BH adaptive routing at several alphas (the group-limited sigmoid + bias router of
  lm_eval_bh.families, the variable-k dispatch), each with its mean experts per token;
- experts: the experts call alone, with k forced per token uniformly over 1..8 (mean 4.5, padding slots
  in the remaining ones) through the variable-k dispatch, against the stock experts module at top-8
  and top-4;

at prefill sizes (4,096 and 16,384 tokens) and a decode-like size (64 tokens). The router weights and
correction biases are random, so BH's mean k on them says nothing about a trained model: the timing at
a given mean k is the point. Writes deepseek_layer.json and deepseek_layer.md to --out-dir.
`--tiny` runs a small config on the CPU (smoke test).
"""

from __future__ import annotations

import argparse
import json
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
from transformers import DeepseekV3Config  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE  # noqa: E402

from lm_eval_bh import dispatch  # noqa: E402
from lm_eval_bh.families import find_moe_layers  # noqa: E402
from lm_eval_bh.patch import BHRouting  # noqa: E402

FULL = dict(hidden_size=7168, moe_intermediate_size=2048, n_routed_experts=256, num_experts_per_tok=8,
            n_group=8, topk_group=4, n_shared_experts=1, norm_topk_prob=True, routed_scaling_factor=2.5)
TINY = dict(hidden_size=64, moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=4,
            n_group=4, topk_group=2, n_shared_experts=1, norm_topk_prob=True, routed_scaling_factor=2.5)


class Layer(torch.nn.Module):
    """The MoE block as a model of its own (BHRouting patches models: it needs a config and a forward)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.mlp = DeepseekV3MoE(config)

    def forward(self, hidden):
        return self.mlp(hidden)


def build(shape: dict, device: str, dtype: torch.dtype) -> Layer:
    config = DeepseekV3Config(**shape, num_hidden_layers=1, first_k_dense_replace=0)
    config._experts_implementation = "grouped_mm" if device == "cuda" else "eager"
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 directly (the router keeps its own float32 weight and bias)
    try:
        with torch.device(device):
            layer = Layer(config)
    finally:
        torch.set_default_dtype(default)
    h = shape["hidden_size"]
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.normal_(0, h ** -0.5 if "gate.weight" in name else 0.02)
        layer.mlp.gate.e_score_correction_bias.normal_(0, 0.02)
    return layer.eval()


def timeit(fn, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of `fn()` on the device."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@torch.inference_mode()
def run(shape: dict, sizes: list[int], alphas: list[float], device: str, repeats: int, save=None) -> dict:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    layer = build(shape, device, dtype)
    gate, experts = layer.mlp.gate, layer.mlp.experts
    rows = []
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "dtype": str(dtype),
        "router_dtype": str(gate.weight.dtype), "shape": shape,
        "experts_implementation": layer.config._experts_implementation, "repeats": repeats, "rows": rows,
    }
    for tokens in sizes:
        hidden = torch.randn(1, tokens, shape["hidden_size"], device=device, dtype=dtype)
        row = {"tokens": tokens}
        for k in (8, 4):
            gate.top_k = min(k, shape["num_experts_per_tok"])
            row[f"stock_top{k}_ms"] = timeit(lambda: layer(hidden), repeats)
        gate.top_k = shape["num_experts_per_tok"]
        top = shape["num_experts_per_tok"]
        with BHRouting(min_k=top, max_k=top).patch(layer) as routing:
            row["bh_fixed_ms"] = timeit(lambda: layer(hidden), repeats)
        for alpha in alphas:
            with BHRouting(alpha=alpha, min_k=1, max_k=top).patch(layer) as routing:
                ms = timeit(lambda: layer(hidden), repeats)
                row[f"bh_a{alpha}_ms"] = ms
                row[f"bh_a{alpha}_mean_k"] = round(routing.summary()["mean_experts_per_token"], 3)
        # the experts call alone, k forced uniformly over 1..top (padding in the other slots)
        flat = hidden.reshape(-1, shape["hidden_size"])
        _, weight, index = gate(flat)
        k = torch.randint(1, top + 1, (tokens,), device=device, generator=torch.Generator(device).manual_seed(0))
        pad = torch.arange(top, device=device) >= k.unsqueeze(-1)
        padded_index = index.masked_fill(pad, shape["n_routed_experts"])
        padded_weight = weight.masked_fill(pad, 0.0)
        row["experts_forced_mean_k"] = round(float(k.float().mean()), 3)
        row["experts_stock_top8_ms"] = timeit(lambda: experts(flat, index, weight), repeats)
        row["experts_stock_top4_ms"] = timeit(lambda: experts(flat, index[:, : top // 2], weight[:, : top // 2]), repeats)
        row["experts_variable_ms"] = timeit(
            lambda: dispatch.experts_forward(experts, flat, padded_index, padded_weight), repeats)
        # correctness at this size: the variable-k dispatch against the stock module on the real slots
        reference = torch.zeros_like(flat)
        for n in range(1, top + 1):
            sel = k == n
            if sel.any():
                reference[sel] = experts(flat[sel], index[sel, :n], weight[sel, :n])
        out = dispatch.experts_forward(experts, flat, padded_index, padded_weight)
        row["experts_variable_max_abs_diff"] = float((out.float() - reference.float()).abs().max())
        row["experts_reference_max_abs"] = float(reference.float().abs().max())
        rows.append(row)
        print(json.dumps(row), flush=True)
        if save is not None:  # after every size: a run stopped early keeps what it measured
            save(result)
    return result


def markdown(result: dict, alphas: list[float]) -> str:
    lines = [
        f"# One DeepSeek-V3 MoE layer: BH routing vs the stock layer ({result['device']})",
        "",
        f"torch {result['torch']}, transformers {result['transformers']}, {result['dtype']}, experts backend "
        f"`{result['experts_implementation']}` (router in {result['router_dtype']}), shape "
        f"{json.dumps(result['shape'])}; median of {result['repeats']} "
        "timed calls (ms), random weights. Command: `python bench/deepseek_layer.py --out-dir results/bench`.",
        "",
        "Whole MoE block (router + routed experts + shared expert):",
        "",
        "| tokens | stock top-8 | stock top-4 | BH fixed k = 8 | "
        + " | ".join(f"BH alpha={a} (mean k)" for a in alphas) + " |",
        "|---:|---:|---:|---:|" + "---:|" * len(alphas),
    ]
    for r in result["rows"]:
        cells = [f"{r['stock_top8_ms']:.3f}", f"{r['stock_top4_ms']:.3f}", f"{r['bh_fixed_ms']:.3f}"]
        cells += [f"{r[f'bh_a{a}_ms']:.3f} ({r[f'bh_a{a}_mean_k']})" for a in alphas]
        lines.append(f"| {r['tokens']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Routed experts alone, k forced uniformly over 1..8 per token (variable-k dispatch) vs the stock module:",
        "",
        "| tokens | stock top-8 | stock top-4 | variable k (mean) | max abs diff vs per-k stock reference |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['tokens']} | {r['experts_stock_top8_ms']:.3f} | {r['experts_stock_top4_ms']:.3f} | "
            f"{r['experts_variable_ms']:.3f} ({r['experts_forced_mean_k']}) | "
            f"{r['experts_variable_max_abs_diff']:.3g} (of {r['experts_reference_max_abs']:.3g}) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="results/bench")
    parser.add_argument("--tiny", action="store_true", help="small config on the CPU (smoke test)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sizes", default="64,4096,16384")
    parser.add_argument("--alphas", default="0.05,0.5")
    args = parser.parse_args(argv)
    alphas = [float(a) for a in args.alphas.split(",")]
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    shape = TINY if args.tiny else FULL
    sizes = [64, 256] if args.tiny else [int(s) for s in args.sizes.split(",")]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def save(result):
        (out / "deepseek_layer.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "deepseek_layer.md").write_text(markdown(result, alphas))

    result = run(shape, sizes, alphas, device, 3 if args.tiny else args.repeats, save)
    print(markdown(result, alphas))


if __name__ == "__main__":
    main()
