#!/usr/bin/env python3
"""What `calibration=auto` adds to loading the model, on the OLMoE-1B-7B shape (random bf16 weights, GPU).

    python3 bench/autocal_cost.py [--out results/bench/autocal_cost]

Builds the OLMoE-1B-7B architecture once (bench/harness.py), then loads it through lm-eval's model class
(`moe_bh`, the class `olmoe_bh` subclasses) in interleaved rounds: stock routing (the load alone), and
`pvalue=calibrated,calibration=auto` with the calibration cache emptied (fitted at load under the routing:
the built-in corpus, 8,192 tokens) and kept (read from the cache). The page cache is warm after the first
load, so the load times are a floor and the calibration's share an upper bound. Writes <out>.json/.md.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (sets the offline environment, REPO on sys.path)

from lm_eval_bh.lm import MoEBHLM  # noqa: E402

ROUTINGS = {"stock load": {}, "calibration=auto, fitted": {"pvalue": "calibrated", "calibration": "auto"},
            "calibration=auto, cached": {"pvalue": "calibrated", "calibration": "auto"}}


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load(path: Path, routing: dict) -> float:
    harness.sync()
    t0 = time.perf_counter()
    lm = MoEBHLM(pretrained=str(path), dtype="bfloat16", device=str(DEVICE), alpha=0.05, min_k=1, max_k=8, **routing)
    harness.sync()
    seconds = time.perf_counter() - t0
    del lm
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/bench/autocal_cost")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="a tiny config (checks the script on a CPU)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp())
    os.environ["LM_EVAL_BH_CACHE"] = str(work / "cache")
    built = harness.build_and_save(harness.TINY if args.tiny else harness.FULL, work / "olmoe", DEVICE, torch.bfloat16)
    load(work / "olmoe", {})  # warms the page cache and CUDA
    times: dict[str, list[float]] = {name: [] for name in ROUTINGS}
    for _ in range(args.rounds):
        for name, routing in ROUTINGS.items():
            if name.endswith("fitted"):
                shutil.rmtree(work / "cache" / "calibration", ignore_errors=True)
            times[name].append(load(work / "olmoe", routing))
            print(name, round(times[name][-1], 2), flush=True)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    res = {"device": torch.cuda.get_device_name(0) if DEVICE.type == "cuda" else "cpu", "torch": torch.__version__,
           "transformers": __import__("transformers").__version__, "params": built["params"],
           "rounds": args.rounds, "seconds": times, "median_seconds": med,
           "fit_over_load": (med["calibration=auto, fitted"] - med["stock load"]) / med["stock load"],
           "cached_over_load": (med["calibration=auto, cached"] - med["stock load"]) / med["stock load"],
           "command": "python3 bench/autocal_cost.py"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(res, indent=1) + "\n")
    lines = [f"# calibration=auto at load, OLMoE-1B-7B shape ({res['device']}, torch {res['torch']}, "
             f"transformers {res['transformers']}, bf16, {res['params'] / 1e9:.2f} B parameters)", "",
             f"Median of {args.rounds} interleaved rounds, warm page cache. Reproduce: `{res['command']}`", "",
             "| load | seconds (median) | rounds | added vs stock load |", "|---|---|---|---|"]
    for name, ts in times.items():
        extra = "" if name == "stock load" else f"{(med[name] - med['stock load']) / med['stock load']:+.1%}"
        lines.append(f"| {name} | {med[name]:.2f} | {', '.join(f'{t:.2f}' for t in ts)} | {extra} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
