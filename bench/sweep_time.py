#!/usr/bin/env python3
"""User-level time of a sweep: `lm-eval-bh sweep` over a grid of routing settings, timed from the inside.

Builds the OLMoE-1B-7B shape with random bf16 weights on the GPU, saves it with the shipped tokenizer to a
local folder (as bench/harness.py does; the sweep loads a model by path), then runs the sweep command
in-process with its pieces timed: model load (once), lm-eval's task index (once), per setting lm-eval's
task building (`TaskManager.load`), its evaluation (`lm_eval.evaluator.evaluate`: requests, forwards,
metrics) and of that the model's own calls, and the rest (results files, the report). Writes
sweep_time.json and sweep_time.md to --out-dir.

    python3 bench/sweep_time.py --out-dir "$OUT" -- --tasks bh_offline,pydoc_perplexity_offline \
        --topk 1,2,4,6,8 --alphas 0.005,0.01,0.02,0.05,0.1,0.2,0.4,0.7 --batch_size 32
    python bench/sweep_time.py --tiny --out-dir /tmp/st -- --tasks mmlu_dev_offline --limit 2 --topk 1 --alphas 0.1
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import harness  # noqa: E402  (bench/, this script's folder: the model build and environment)
import lm_eval.evaluator  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
import torch  # noqa: E402

from lm_eval_bh import cli  # noqa: E402
from lm_eval_bh.commands import sweep  # noqa: E402
from lm_eval_bh.lm import MoEBHLM  # noqa: E402
from results_io import save  # noqa: E402

REPO = harness.REPO


class Timer:
    """Wall time of wrapped functions, by label (the outermost call of a label only; CUDA synchronised)."""

    def __init__(self):
        self.total = collections.defaultdict(float)
        self.calls = collections.Counter()
        self.per_setting: list[dict] = []
        self._depth = collections.Counter()

    def wrap(self, owner, attr, label):
        fn = getattr(owner, attr)

        def wrapper(*a, **kw):
            if self._depth[label]:
                return fn(*a, **kw)
            self._depth[label] += 1
            harness.sync()
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                harness.sync()
                self.total[label] += time.perf_counter() - t0
                self.calls[label] += 1
                self._depth[label] -= 1

        setattr(owner, attr, wrapper)
        return fn


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, sweep_args = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--model-dir", default=None, help="where the model is saved (a folder holding one is reused)")
    args = p.parse_args(ours)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model_dir = Path(args.model_dir or tempfile.mkdtemp(prefix="sweep-model-"))
    build = ({"reused": str(model_dir)} if (model_dir / "config.json").exists()
             else harness.build_and_save(harness.TINY if args.tiny else harness.FULL, model_dir, device, dtype))
    results_dir = Path(tempfile.mkdtemp(prefix="sweep-out-"))
    command = ["sweep", "--model_args", f"pretrained={model_dir},dtype={str(dtype).replace('torch.', '')},"
               f"max_length={harness.MAX_LENGTH}", "--include_path", str(REPO / "tasks" / "offline"),
               "--device", str(device), "--output_path", str(results_dir), *sweep_args]

    timer = Timer()
    timer.wrap(sweep, "_load_model", "model load")
    timer.wrap(sweep, "check_tasks", "task index")
    timer.wrap(TaskManager, "load", "task building")
    timer.wrap(lm_eval.evaluator, "evaluate", "evaluation")
    timer.wrap(lm_eval.evaluator, "add_env_info", "environment info")  # lm-eval's, once per simple_evaluate
    timer.wrap(MoEBHLM, "_model_call", "model calls")
    timer.wrap(MoEBHLM, "_model_generate", "model calls")
    run_setting = sweep.evaluate_setting

    def timed_setting(lm, plan, task_manager, sid, routing, device_):
        before = dict(timer.total)
        t0 = time.perf_counter()
        run_setting(lm, plan, task_manager, sid, routing, device_)
        row = {"setting": sid, "s": time.perf_counter() - t0}
        row.update({k: timer.total[k] - before.get(k, 0.0) for k in ("task building", "evaluation", "model calls",
                                                                 "environment info")})
        data = json.loads((plan.out / f"{sid}.json").read_text())
        routing_block = data["config"]["routing"]
        row.update(tokens=routing_block["tokens"], mean_k=routing_block["mean_experts_per_token"])
        timer.per_setting.append(row)
        print(f"setting {sid}: {row['s']:.2f}s (tasks {row['task building']:.2f}, evaluation {row['evaluation']:.2f}, "
              f"model {row['model calls']:.2f}) tokens {row['tokens']} mean k {row['mean_k']}", file=sys.stderr, flush=True)

    sweep.evaluate_setting = timed_setting
    t0 = time.perf_counter()
    rc = cli.main(command)
    total = time.perf_counter() - t0
    settings_s = sum(r["s"] for r in timer.per_setting)
    evaluation = timer.total["evaluation"]
    res = {
        "command": "python3 bench/sweep_time.py " + " ".join(argv), "sweep_command": "lm-eval-bh " + " ".join(command),
        "rc": rc, "env": {**harness.env_info(device, {"params": build.get("params")}), "model": "OLMoE-1B-7B architecture, random weights"
                          if not args.tiny else "tiny OLMoE, random weights"},
        "build": build, "total_s": total,
        "split_s": {"model load": timer.total["model load"], "task index": timer.total["task index"],
                    "task building (all settings)": timer.total["task building"],
                    "evaluation (all settings)": evaluation, "of which model calls": timer.total["model calls"],
                    "environment info (lm-eval's add_env_info)": timer.total["environment info"],
                    "rest of the settings (results files, samples)": settings_s - timer.total["task building"] - evaluation
                    - timer.total["environment info"],
                    "outside the settings (start, grid, report)": total - settings_s - timer.total["model load"]
                    - timer.total["task index"]},
        "overhead_share": (total - evaluation) / total,
        "settings": timer.per_setting,
        "tokens_per_setting": timer.per_setting[0]["tokens"] if timer.per_setting else None,
    }
    md = markdown(res)
    print(md)
    save(Path(args.out_dir), "sweep_time", res, md)
    return rc


def markdown(res: dict) -> str:
    lines = [f"`{res['sweep_command']}`", "", f"Device: {res['env']['device_name']}; torch {res['env']['torch']}, "
             f"transformers {res['env']['transformers']}, lm-eval {res['env'].get('lm_eval')}; {res['env']['model']}.", "",
             f"Total {res['total_s']:.1f} s for {len(res['settings'])} settings; outside evaluation "
             f"{res['overhead_share']:.1%}.", "", "| part | s | share |", "|---|---:|---:|"]
    for k, v in res["split_s"].items():
        lines.append(f"| {k} | {v:.2f} | {v / res['total_s']:.1%} |")
    lines += ["", "| setting | s | task building | evaluation | model calls | tokens | mean k |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["settings"]:
        lines.append(f"| {r['setting']} | {r['s']:.2f} | {r['task building']:.2f} | {r['evaluation']:.2f} | "
                     f"{r['model calls']:.2f} | {r['tokens']:,} | {r['mean_k']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
