"""``lm-eval-bh demo``: the first command to run. CPU only, offline, a few minutes.

Steps:
1. build (once, cached) the embedded model: ``real`` by default (a Qwen2-MoE made from SmolLM2-135M's
   real weights, see ``lm_eval_bh.real``), or ``--model tiny`` (random weights: chance-level accuracy);
2. evaluate, in one process with the model loaded once (``lm-eval-bh sweep``), the fixed top-k curve
   and BH routing at a few alphas on the offline task pack (multiple choice, and perplexity on
   held-out prose: ``pydoc_perplexity_offline``), ``--limit`` examples per task;
3. run the stock ``lm_eval --model hf`` CLI once at the model's own top-k: it must agree with the
   plugin's top-k row on every task (the plugin changes nothing at fixed k);
4. print the ``lm-eval-bh report`` tables: accuracy (task average) and perplexity, mean experts per
   token, and for every BH row the value of fixed top-k interpolated at the same cost and the
   difference (paired standard error).

Everything goes to a fresh folder (``--output_path``, default ``demo-<model>-<time>/``), never into the
committed results.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import logging
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from ..embedded import MODELS, UNTRAINED
from ..errors import UsageError

PKG = Path(__file__).resolve().parents[1]
ROOT = PKG.parent
DEFAULTS = {  # per model: (alphas, fixed top-k curve, max_k of the adaptive rules, examples per task)
    "real": ("0.05,0.2,0.5", "1,2,4,8,16", "16", "5"),
    "tiny": ("0.01,0.05,0.2,0.5", "1,2,4", "4", "40"),
}
DEFAULT_TASKS = "bh_offline,pydoc_perplexity_offline"  # multiple choice, and perplexity on held-out prose


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="real", choices=list(MODELS), help="embedded model (default real)")
    parser.add_argument("--output_path", default=None, metavar="DIR",
                        help="a new (or empty) folder; default demo-<model>-<time>/ in the current folder")
    parser.add_argument("--alphas", default=None, help="BH levels, comma-separated (default real: 0.05,0.2,0.5)")
    parser.add_argument("--topk", default=None, help="fixed top-k curve (default real: 1,2,4,8,16; tiny: 1,2,4)")
    parser.add_argument("--max_k", default=None, help="most experts BH may pick per token (default real: 16)")
    parser.add_argument("--tasks", default=DEFAULT_TASKS, help=f"lm-eval tasks or groups (default {DEFAULT_TASKS})")
    parser.add_argument("--include_path", default=None, help="task folder (default: the project's tasks/)")
    parser.add_argument("--limit", default=None, help="examples per task (default real: 5, tiny: 40; 'none' for all)")
    parser.add_argument("--verbose", action="store_true", help="show lm-eval's own output")


def find_tasks_dir() -> Path | None:
    for cand in (PKG / "tasks", ROOT / "tasks", Path.cwd() / "tasks"):
        if cand.is_dir() and any(cand.rglob("*.yaml")):
            return cand
    return None


def lm_eval_command() -> tuple[list[str], dict]:
    """The argv prefix that runs the stock lm_eval CLI with the plugin registered, and env additions."""
    if importlib.util.find_spec("_lm_eval_bh_hook") is not None:
        return [sys.executable, "-m", "lm_eval"], {}
    # source checkout: put the package and its start-up hook on the path, import the hook first
    paths = [str(ROOT), str(PKG / "_startup"), os.environ.get("PYTHONPATH", "")]
    env = {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    code = "import _lm_eval_bh_hook, runpy; runpy.run_module('lm_eval', run_name='__main__', alter_sys=True)"
    return [sys.executable, "-c", code], env


def _output_dir(args) -> Path:
    if args.output_path is None:
        return Path(f"demo-{args.model}-{time.strftime('%Y%m%d-%H%M%S')}")
    out = Path(args.output_path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--output_path: {out} is not a new or empty folder; the demo never mixes runs")
    return out


def _limit(text: str) -> str | None:
    if str(text).lower() == "none":
        return None
    try:
        if float(text) <= 0:
            raise ValueError
    except ValueError:
        raise UsageError(f"--limit: '{text}' is not allowed; allowed: a positive number or none") from None
    return str(text)


def run(args) -> int:
    alphas, topk, max_k, limit = DEFAULTS[args.model]
    alphas, topk, max_k = args.alphas or alphas, args.topk or topk, args.max_k or max_k
    limit = _limit(args.limit or limit)
    tasks_dir = Path(args.include_path) if args.include_path else find_tasks_dir()
    if tasks_dir is None or not tasks_dir.is_dir():
        raise UsageError("--include_path: no task folder found; pass the project's tasks/ folder")
    out = _output_dir(args)
    for k, v in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(k, v)

    if not args.verbose:
        logging.getLogger("lm_eval.api.task").addFilter(_NoMetadataHint())
    t0 = time.time()
    model_dir = _build(args.model)
    sweep_dir = out / "sweep"
    _sweep(model_dir, sweep_dir, tasks_dir, args, alphas, topk, max_k, limit)
    top_k = _top_k(model_dir)
    stock = _stock_cli(model_dir, out / f"hf_top{top_k}", tasks_dir, args, limit)

    from lm_eval_bh.commands.report import report

    text, rep = report([out], "md", output=out / "report.md", plot=out / "pareto.png")
    print(text)
    if stock:
        _check_agreement(rep, top_k)
    scope = "all examples" if limit is None else f"--limit {limit}: the first {limit} examples of each task"
    print(f"demo: model {args.model} ({model_dir}); {scope}; {time.time() - t0:.0f}s in all")
    if limit is not None:
        print(noise_caveat(limit))
    if args.model in UNTRAINED:
        print(f"demo: the {args.model} model has random weights: its accuracies are chance-level and their "
              "differences are noise; it shows the plumbing and the cost accounting only (use --model real)")
    print(f"demo: results under {out}/ (report.md, pareto.png); redo the table with: "
          f"lm-eval-bh report {out}")
    return 0 if stock else 1


def noise_caveat(limit: str) -> str:
    """What a --limit leaves of the accuracies: a binomial standard error of up to 0.5 / sqrt(n) per task."""
    if float(limit) < 1:  # lm-eval takes this fraction of each task's examples
        size = f"--limit {limit} takes that fraction of each task's examples"
    else:
        n = int(float(limit))
        size = (f"--limit {limit} leaves at most {n} examples per task: a task's accuracy has a standard error "
                f"of up to {0.5 / math.sqrt(n):.2f} (binomial, 0.5/sqrt({n}))")
    return (f"demo: {size}; differences within about two standard errors (the ± se columns) are noise; "
            "--limit none evaluates every example")


class _NoMetadataHint(logging.Filter):
    """Drops lm-eval's advice to pass `--metadata` to a task built by a Python function: the offline task
    pack's functions take none, and a newcomer would read it as something to do."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed to `--metadata`" not in record.getMessage()


def _build(name: str) -> Path:
    from lm_eval_bh.embedded import is_built, model_dir

    t = time.time()
    fresh = not is_built(name)
    path = model_dir(name)
    print(f"demo: model {name}: {MODELS[name]}", file=sys.stderr)
    print(f"demo: {'built' if fresh else 'cached'} at {path}" + (f" in {time.time() - t:.0f}s" if fresh else ""),
          file=sys.stderr)
    return path


def _top_k(model_dir: Path) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model_dir, local_files_only=True).num_experts_per_tok)


def _sweep(model_dir, sweep_dir, tasks_dir, args, alphas, topk, max_k, limit) -> None:
    """The fixed top-k curve and BH at each alpha, one process, the model loaded once."""
    from lm_eval_bh.commands import sweep

    argv = ["--model_args", f"pretrained={model_dir},dtype=float32", "--device", "cpu", "--batch_size", "8",
            "--include_path", str(tasks_dir), "--tasks", args.tasks, "--output_path", str(sweep_dir),
            "--alphas", alphas, "--selections", "bh", "--pvalues", "zscore", "--topk", topk, "--max_k", max_k]
    if limit is not None:
        argv += ["--limit", limit]
    if args.verbose:
        argv.append("--verbose")
    parser = argparse.ArgumentParser(prog="lm-eval-bh sweep")
    sweep.add_arguments(parser)
    print("demo: $ lm-eval-bh sweep " + shlex.join(argv), file=sys.stderr)
    with contextlib.redirect_stdout(io.StringIO()):  # the demo prints the full report itself
        sweep.run(parser.parse_args(argv))


def _stock_cli(model_dir, run_dir, tasks_dir, args, limit) -> bool:
    """Stock transformers through the real lm_eval CLI at the model's own top-k."""
    prefix, extra_env = lm_eval_command()
    cmd = [*prefix, "run", "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32",
           "--device", "cpu", "--batch_size", "8", "--include_path", str(tasks_dir), "--tasks", args.tasks,
           "--output_path", str(run_dir)]
    if limit is not None:
        cmd += ["--limit", limit]
    print("demo: $ " + shlex.join(["lm_eval", *cmd[len(prefix):]]), file=sys.stderr)
    t = time.time()
    p = subprocess.run(cmd, env={**os.environ, **extra_env}, text=True,
                       stdout=None if args.verbose else subprocess.PIPE,
                       stderr=None if args.verbose else subprocess.STDOUT)
    if p.returncode != 0 or not list(run_dir.rglob("results_*.json")):
        print(f"demo: stock lm_eval --model hf failed (exit {p.returncode}); last output:\n{(p.stdout or '')[-2000:]}",
              file=sys.stderr)
        return False
    print(f"demo: stock lm_eval --model hf done in {time.time() - t:.0f}s", file=sys.stderr)
    return True


def _check_agreement(rep, top_k: int) -> None:
    """The plugin at min_k=max_k=top_k must reproduce stock transformers exactly."""
    from lm_eval_bh.commands.report import AVERAGE, FIXED_RULE

    t = rep[(rep["rule"] == FIXED_RULE) & (rep["task"] != AVERAGE)]
    t = t[t["mean_k"] == top_k]
    stock = t[t["setting"].str.startswith("hf ")].set_index("task")["value"]
    plugin = t[~t["setting"].str.startswith("hf ")].set_index("task")["value"]
    common = stock.index.intersection(plugin.index)
    if len(common) == 0:
        print(f"demo: no task to compare the plugin's top-{top_k} with stock hf")
        return
    rel = ((stock[common] - plugin[common]).abs() / plugin[common].abs().clip(lower=1.0)).max()
    verdict = "agree" if rel < 1e-9 else f"DIFFER (max relative difference {rel:.2e})"
    print(f"demo: plugin top-{top_k} and stock `lm_eval --model hf` top-{top_k} {verdict} on {len(common)} tasks")
