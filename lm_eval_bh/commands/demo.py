"""``lm-eval-bh demo``: the first command to run. CPU only, offline, a couple of minutes.

It builds the embedded tiny OLMoE (random weights, so accuracies sit near chance: the point is the
plumbing and the cost accounting, not the numbers), then runs the real ``lm_eval`` CLI as
subprocesses, once per routing setting:

* ``--model olmoe_bh`` with BH routing at a few alphas (min_k=1, max_k=top_k),
* ``--model olmoe_bh`` with min_k=max_k=k for k in 1, top_k/2, top_k (stock top-k through the plugin),
* ``--model hf`` (stock transformers; must agree with the line above),

and prints the ``lm-eval-bh report`` table of those runs (accuracy next to mean experts per token),
also written to ``OUTPUT/report.md`` with a plot ``OUTPUT/accuracy_vs_experts.png``.

When lm-eval-bh is pip-installed, its start-up hook makes ``python -m lm_eval --model olmoe_bh``
work as is. From a source checkout that was not installed, the demo loads the same hook by hand
(``python -c "import _lm_eval_bh_hook; runpy.run_module('lm_eval')"``): same CLI, same code path.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import UsageError

PKG = Path(__file__).resolve().parents[1]
ROOT = PKG.parent
DEFAULT_OUT = "results/demo"


def add_arguments(parser) -> None:
    parser.add_argument("--output_path", default=DEFAULT_OUT, metavar="DIR", help=f"default {DEFAULT_OUT}/")
    parser.add_argument("--alphas", default="0.01,0.05,0.2,0.5", help="BH levels to run, comma-separated")
    parser.add_argument("--tasks", default="bh_offline", help="lm-eval tasks or groups (default bh_offline)")
    parser.add_argument("--include_path", default=None, help="task folder (default: the project's tasks/)")
    parser.add_argument("--limit", default="40", help="examples per task (default 40; 'none' for all)")
    parser.add_argument("--topk", default=None,
                        help="fixed top-k runs through olmoe_bh, comma-separated (default 1, top_k/2, top_k)")
    parser.add_argument("--jobs", default="2", help="lm_eval processes at once (default 2)")
    parser.add_argument("--verbose", action="store_true", help="show lm_eval's own output")


def find_tasks_dir() -> Path | None:
    for cand in (PKG / "tasks", ROOT / "tasks", Path.cwd() / "tasks"):
        if cand.is_dir() and any(cand.rglob("*.yaml")):
            return cand
    return None


def lm_eval_command() -> tuple[list[str], dict]:
    """The argv prefix that runs the stock lm_eval CLI with olmoe_bh registered, and env additions."""
    env = {}
    if importlib.util.find_spec("_lm_eval_bh_hook") is not None:
        return [sys.executable, "-m", "lm_eval"], env
    # source checkout: put the package and its start-up hook on the path, import the hook first
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(PKG / "_startup")])
    code = "import _lm_eval_bh_hook, runpy; runpy.run_module('lm_eval', run_name='__main__', alter_sys=True)"
    return [sys.executable, "-c", code], env


def plan(tiny: Path, top_k: int, alphas: list[float], topks: list[int] | None = None) -> list[tuple[str, str, str]]:
    """[(run id, --model, --model_args)]."""
    base = f"pretrained={tiny},dtype=float32"
    runs = [(f"bh_a{a:g}", "olmoe_bh", f"{base},alpha={a:g},min_k=1,max_k={top_k}") for a in alphas]
    # stock top-k through the plugin at a few k: the reference curve for the matched-cost column
    for k in sorted(set(topks) if topks else {1, max(1, top_k // 2), top_k}):
        runs.append((f"olmoe_bh_top{k}", "olmoe_bh", f"{base},min_k={k},max_k={k}"))
    runs.append((f"hf_top{top_k}", "hf", base))
    return runs


def run(args) -> int:
    alphas = []
    for t in str(args.alphas).split(","):
        try:
            a = float(t)
        except ValueError:
            raise UsageError(f"--alphas: '{t}' is not a number; allowed: numbers strictly between 0 and 1") from None
        if not 0 < a < 1:
            raise UsageError(f"--alphas: {t} is out of range; allowed: numbers strictly between 0 and 1")
        alphas.append(a)
    limit = None if str(args.limit).lower() == "none" else args.limit
    if limit is not None:
        try:
            if float(limit) <= 0:
                raise ValueError
        except ValueError:
            raise UsageError(f"--limit: '{args.limit}' is not allowed; allowed: a positive number or none") from None
    try:
        jobs = int(args.jobs)
        if jobs < 1:
            raise ValueError
    except ValueError:
        raise UsageError(f"--jobs: '{args.jobs}' is not allowed; allowed: a positive integer") from None
    tasks_dir = Path(args.include_path) if args.include_path else find_tasks_dir()
    if tasks_dir is None or not tasks_dir.is_dir():
        raise UsageError("--include_path: no task folder found; pass the project's tasks/ folder")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    t0 = time.time()
    from lm_eval_bh.tiny import ensure_tiny_olmoe

    tiny = Path(ensure_tiny_olmoe())
    from transformers import AutoConfig

    top_k = int(AutoConfig.from_pretrained(tiny, local_files_only=True).num_experts_per_tok)
    print(f"demo: tiny OLMoE at {tiny} (top_k={top_k}), built in {time.time() - t0:.1f}s", file=sys.stderr)

    out = Path(args.output_path)
    out.mkdir(parents=True, exist_ok=True)
    prefix, extra_env = lm_eval_command()
    env = {**os.environ, **extra_env}
    if "PYTHONPATH" in extra_env and os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = extra_env["PYTHONPATH"] + os.pathsep + os.environ["PYTHONPATH"]
    # keep each process to its share of the cores
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))

    topks = None
    if args.topk:
        try:
            topks = [int(t) for t in str(args.topk).split(",")]
            if not all(1 <= k <= top_k for k in topks):
                raise ValueError
        except ValueError:
            raise UsageError(f"--topk: '{args.topk}' is not allowed; allowed: integers 1..{top_k}, comma-separated") from None
    runs = plan(tiny, top_k, alphas, topks)

    def one(item):
        rid, model, model_args = item
        run_dir = out / rid
        before = set(run_dir.rglob("results_*.json")) if run_dir.exists() else set()
        cmd = [*prefix, "run", "--model", model, "--model_args", model_args, "--device", "cpu",
               "--batch_size", "8", "--include_path", str(tasks_dir), "--tasks", args.tasks,
               "--output_path", str(run_dir)]
        if limit is not None:
            cmd += ["--limit", str(limit)]
        shown = ["lm_eval", *cmd[len(prefix):]]
        print("demo: $ " + shlex.join(shown), file=sys.stderr)
        t = time.time()
        p = subprocess.run(cmd, env=env, cwd=os.getcwd(), text=True,
                           stdout=None if args.verbose else subprocess.PIPE,
                           stderr=None if args.verbose else subprocess.STDOUT)
        new = sorted(set(run_dir.rglob("results_*.json")) - before) if run_dir.exists() else []
        return rid, p.returncode, (p.stdout or ""), new, time.time() - t

    files, failed = [], []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for rid, rc, text, new, dt in pool.map(one, runs):
            if rc != 0 or not new:
                failed.append(rid)
                print(f"demo: {rid} failed (exit {rc}); last output:\n{text[-2000:]}", file=sys.stderr)
            else:
                print(f"demo: {rid} done in {dt:.1f}s -> {new[-1]}", file=sys.stderr)
                files.append(new[-1])

    from lm_eval_bh.commands.report import report

    text, rep = report(files, "md", output=out / "report.md", plot=out / "accuracy_vs_experts.png")
    print(text)
    _check_agreement(rep, top_k)
    print(f"demo: {len(files)} runs in {time.time() - t0:.0f}s; results under {out}/ "
          f"(report.md, accuracy_vs_experts.png); redo the table with: lm-eval-bh report {out}", file=sys.stderr)
    return 1 if failed else 0


def _check_agreement(rep, top_k: int) -> None:
    """The plugin at min_k=max_k=top_k must reproduce stock transformers exactly."""
    from lm_eval_bh.commands.report import AVERAGE

    t = rep[rep["rule"] == "top-k"]
    a = t[t["setting"] == f"olmoe_bh top-{top_k}"].set_index("task")["acc"]
    b = t[t["setting"] == f"hf top-{top_k}"].set_index("task")["acc"]
    common = a.index.intersection(b.index)
    if len(common) == 0:
        return
    diff = (a[common] - b[common]).abs().max()
    verdict = "agree" if diff < 1e-9 else f"DIFFER (max |Δacc| = {diff:.4f})"
    print(f"demo: olmoe_bh top-{top_k} and stock hf top-{top_k} {verdict} "
          f"({len(common) - (AVERAGE in common)} tasks and their average)")
