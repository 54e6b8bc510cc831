"""``lm-eval-bh sweep``: evaluate a grid of routing settings with lm-eval, loading the model once.

One results file per setting, ``OUTPUT_PATH/<setting_id>.json``, in lm-eval's own format (the dict
``lm_eval.simple_evaluate`` returns, serialized the way lm-eval's EvaluationTracker does it, with
``config["routing"]`` from ``OlmoeBHLM.get_model_info``), so ``lm-eval-bh report`` and any other
lm-eval tooling can read it.

Resumable: a setting whose file already exists is skipped. Each file is written to a temporary
file in the same folder and moved into place with ``os.replace`` (atomic on POSIX), so a sweep
killed at any moment leaves either a complete file or none for the setting it was running;
leftover temporary files (``.<setting_id>.*.tmp``) are removed when the sweep starts again.
(Two sweeps running at once on the same folder may both compute a setting; the file stays one.)

The model is built once (``get_model("olmoe_bh").create_from_arg_string``) and re-patched per
setting with ``OlmoeBHLM.set_routing``, which also resets the routing statistics.

Request cache: lm-eval's ``use_cache`` (``--use_cache`` on the CLI, a ``CachingLM`` sqlite file)
keys each request on the request itself plus the model's identity -- never on routing settings.
Reusing one cache across settings would hand every setting after the first the first one's answers
(stale accuracy with fresh, near-empty routing statistics). The sweep therefore never passes
``use_cache``. (``cache_requests`` only caches the built prompts, not model outputs, and is safe.)
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from ..errors import UsageError
from ..model_args import DEFAULT_PRETRAINED, ROUTING_ARGS
from ..model_args import parse_model_args as _parse_model_args

GRID_KEYS = ("alpha", "min_k", "max_k", "pvalue", "selection")


def add_arguments(parser) -> None:
    parser.add_argument("--model_args", default="", metavar="K=V,...",
                        help="lm-eval model_args without the grid keys: pretrained, dtype, and fixed routing "
                             "options such as temperature or renormalize (default pretrained: OLMoE-1B-7B-0924)")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks or groups")
    parser.add_argument("--include_path", default=None, help="extra task folder (e.g. tasks/)")
    parser.add_argument("--limit", default=None, help="examples per task (integer, or a fraction < 1)")
    parser.add_argument("--num_fewshot", default=None, help="few-shot examples (default: the task's)")
    parser.add_argument("--batch_size", default="1", help="integer or 'auto' (default 1)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:0 ... (default: lm-eval's)")
    parser.add_argument("--output_path", required=True, metavar="DIR", help="one <setting_id>.json per setting")
    parser.add_argument("--alphas", default="0.01,0.05,0.1,0.2", help="BH/HC levels, comma-separated")
    parser.add_argument("--pvalues", default="zscore", help="p-value methods, comma-separated")
    parser.add_argument("--selections", default="bh", help="selection rules, comma-separated")
    parser.add_argument("--top_ps", default="0.5,0.7,0.9", help="top_p values (selection topp only)")
    parser.add_argument("--min_k", default="1", help="minimum experts per token (default 1)")
    parser.add_argument("--max_k", default=None, help="maximum experts per token (default: the model's top_k)")
    parser.add_argument("--topk", default=None,
                        help="fixed top-k baselines, comma-separated (default 1..top_k; 'none' for none)")
    parser.add_argument("--bootstrap_iters", default="100000", help="lm-eval bootstrap iterations for stderr")
    parser.add_argument("--verbose", action="store_true", help="keep lm-eval's INFO logging")


# --------------------------------------------------------------------------- parsing / grid

def _split(flag: str, text: str | None) -> list[str]:
    items = [t.strip() for t in str(text or "").split(",") if t.strip()]
    return items


def _floats(flag, text, lo=None, hi=None, what="numbers"):
    out = []
    for t in _split(flag, text):
        try:
            v = float(t)
        except ValueError:
            raise UsageError(f"{flag}: '{t}' is not a number; allowed: {what}") from None
        if (lo is not None and not v > lo) or (hi is not None and not v < hi) or not math.isfinite(v):
            raise UsageError(f"{flag}: {t} is out of range; allowed: {what}")
        out.append(v)
    return out


def _int(flag, text, lo, hi):
    try:
        v = int(str(text).strip())
    except ValueError:
        raise UsageError(f"{flag}: '{text}' is not an integer; allowed: integers {lo}..{hi}") from None
    if not lo <= v <= hi:
        raise UsageError(f"{flag}: {v} is out of range; allowed: integers {lo}..{hi}")
    return v


def _choices(flag, text, allowed):
    vals = _split(flag, text)
    for v in vals:
        if v not in allowed:
            raise UsageError(f"{flag}: '{v}' is not allowed; allowed: {', '.join(allowed)}")
    return vals


def parse_model_args(text: str) -> dict:
    """lm-eval's 'k=v,k2=v2', without the grid keys."""
    out = _parse_model_args(text)
    for k in GRID_KEYS:
        if k in out:
            raise UsageError(f"--model_args: '{k}' is a grid key; set it with the grid flags "
                         "(--alphas, --pvalues, --selections, --min_k, --max_k, --topk)")
    return out


def _fmt(v) -> str:
    return format(v, "g") if isinstance(v, float) else str(v)


def setting_id(routing: dict) -> str:
    """File-name-safe id of a setting, e.g. 'topk8', 'bh-zscore_a0.05_k1-8', 'topp-zscore_p0.9_k1-8'."""
    if routing["min_k"] == routing["max_k"]:
        sid = f"topk{routing['max_k']}"
    elif "top_p" in _rule(routing["selection"]).params:
        sid = f"{routing['selection']}-{routing['pvalue']}_p{_fmt(routing['top_p'])}_k{routing['min_k']}-{routing['max_k']}"
    else:
        sid = f"{routing['selection']}-{routing['pvalue']}_a{_fmt(routing['alpha'])}_k{routing['min_k']}-{routing['max_k']}"
    return sid.replace("/", "_")


def _rule(name: str):
    from lm_eval_bh.routing import SELECTIONS

    return SELECTIONS[name]


def build_grid(args, top_k: int, num_experts: int, base_routing: dict) -> list[tuple[str, dict]]:
    """[(setting_id, routing kwargs for set_routing)], fixed top-k baselines first."""
    from lm_eval_bh.routing import PVALUES, SELECTIONS

    alphas = _floats("--alphas", args.alphas, 0.0, 1.0, "numbers strictly between 0 and 1")
    pvalues = _choices("--pvalues", args.pvalues, list(PVALUES))
    selections = _choices("--selections", args.selections, list(SELECTIONS))
    min_k = _int("--min_k", args.min_k, 1, num_experts)
    max_k = top_k if args.max_k is None else _int("--max_k", args.max_k, min_k, num_experts)
    if args.topk is None:
        topks = list(range(1, top_k + 1))
    elif str(args.topk).strip().lower() in ("none", ""):
        topks = []
    else:
        topks = [_int("--topk", t, 1, num_experts) for t in _split("--topk", args.topk)]

    grid: list[tuple[str, dict]] = []
    for k in topks:
        grid.append({**base_routing, "min_k": k, "max_k": k})
    for sel in selections:
        if SELECTIONS[sel].fixed:
            continue  # fixed top-k comes from --topk
        for pv in pvalues:
            if "top_p" in SELECTIONS[sel].params:
                for p in _floats("--top_ps", args.top_ps, 0.0, 1.0, "numbers strictly between 0 and 1"):
                    grid.append({**base_routing, "selection": sel, "pvalue": pv, "top_p": p,
                                 "min_k": min_k, "max_k": max_k})
                continue
            for a in alphas:
                grid.append({**base_routing, "selection": sel, "pvalue": pv, "alpha": a,
                             "min_k": min_k, "max_k": max_k})
    if not grid:
        raise UsageError("--topk/--alphas: the grid is empty; give at least one setting")
    # validate every setting before any weights load
    from lm_eval_bh.routing import RoutingConfig, RoutingError

    out, seen = [], set()
    for r in grid:
        try:
            RoutingConfig(**r)
        except (RoutingError, TypeError) as e:
            raise UsageError(f"grid setting {r}: {e}") from None
        sid = setting_id(r)
        if sid not in seen:
            seen.add(sid)
            out.append((sid, r))
    return out


def _read_moe_shape(pretrained: str) -> tuple[int, int] | None:
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(pretrained)
        return int(cfg.num_experts_per_tok), int(cfg.num_experts)
    except Exception:  # noqa: BLE001 - fall back to the loaded model
        return None


# --------------------------------------------------------------------------- files

def write_atomic(path: Path, results: dict) -> None:
    """Serialize like lm-eval's EvaluationTracker and move into place atomically."""
    from lm_eval.utils import handle_non_serializable

    dumped = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(dumped)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # like a plain write (mkstemp creates 0600)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def clean_temp_files(out: Path) -> list[Path]:
    removed = []
    for f in out.glob(".*.tmp"):
        try:
            f.unlink()
            removed.append(f)
        except OSError:
            pass
    return removed


# --------------------------------------------------------------------------- run

def run(args) -> int:
    from tqdm import tqdm

    out = Path(args.output_path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_path: {out} exists and is not a folder")
    model_args = parse_model_args(args.model_args)
    tasks = _split("--tasks", args.tasks)
    if not tasks:
        raise UsageError("--tasks: give at least one task or group name")
    limit = None
    if args.limit is not None:
        limit = _floats("--limit", args.limit, 0.0, None, "a positive integer or a fraction < 1")[0]
        limit = int(limit) if limit >= 1 else limit
    num_fewshot = None if args.num_fewshot is None else _int("--num_fewshot", args.num_fewshot, 0, 10_000)
    bootstrap_iters = _int("--bootstrap_iters", args.bootstrap_iters, 0, 10**9)
    bs = str(args.batch_size).strip()
    if not (bs == "auto" or bs.startswith("auto:") or bs.isdigit()):
        raise UsageError(f"--batch_size: '{bs}' is not allowed; allowed: a positive integer, auto or auto:N")
    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise UsageError(f"--include_path: {args.include_path} is not a folder")

    if not args.verbose:
        logging.getLogger("lm_eval").setLevel(logging.WARNING)

    routing_args = set(ROUTING_ARGS)
    pretrained = model_args.get("pretrained", DEFAULT_PRETRAINED)
    base_routing = {k: model_args.pop(k) for k in list(model_args) if k in routing_args}
    shape = _read_moe_shape(pretrained)
    grid = build_grid(args, shape[0], shape[1], base_routing) if shape else None  # check flags early

    # tasks: check names before any weights load
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=args.include_path)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise UsageError(f"--tasks: unknown task(s) {', '.join(unknown)}; list them with 'lm-eval ls tasks'"
                     + (f" --include_path {args.include_path}" if args.include_path else ""))

    out.mkdir(parents=True, exist_ok=True)
    for f in clean_temp_files(out):
        print(f"sweep: removed leftover temp file {f.name}", file=sys.stderr)

    lm = None
    if grid is None:  # config not readable on its own: load the model to learn its shape
        lm = _load_model(model_args, base_routing, args)
        grid = build_grid(args, int(lm.model.config.num_experts_per_tok), int(lm.model.config.num_experts),
                          base_routing)
    todo = [(sid, r) for sid, r in grid if not (out / f"{sid}.json").exists()]
    done = len(grid) - len(todo)
    print(f"sweep: {len(grid)} settings, {done} already done, {len(todo)} to run -> {out}", file=sys.stderr)

    if todo:
        if lm is None:
            lm = _load_model(model_args, base_routing, args)
        import lm_eval

        bar = tqdm(total=len(grid), initial=done, desc="settings", unit="setting", dynamic_ncols=True)
        try:
            for sid, routing in todo:
                bar.set_postfix_str(sid)
                t0 = time.time()
                lm.set_routing(**routing)
                results = lm_eval.simple_evaluate(
                    model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=tm,
                    log_samples=False, bootstrap_iters=bootstrap_iters,
                )  # never use_cache: see the module docstring
                if results is None:  # not rank 0
                    continue
                results.pop("samples", None)
                arg_string = ",".join(f"{k}={v}" for k, v in {**model_args, **routing}.items())
                results["config"].update({"model": "olmoe_bh", "model_args": arg_string,
                                          "batch_size": bs, "device": args.device})
                results["model_name"] = pretrained
                results["sweep"] = {"setting_id": sid, "routing": routing, "seconds": round(time.time() - t0, 2)}
                write_atomic(out / f"{sid}.json", results)
                bar.update(1)
        finally:
            bar.close()

    from lm_eval_bh.commands.report import report

    text, _ = report([out])
    sys.stdout.write(text)
    return 0


def _load_model(model_args: dict, base_routing: dict, args):
    import lm_eval_bh.lm  # noqa: F401  (registers olmoe_bh)
    from lm_eval.api.registry import get_model

    arg_string = ",".join(f"{k}={v}" for k, v in {**model_args, **base_routing}.items())
    extra = {"batch_size": str(args.batch_size), "device": args.device}
    return get_model("olmoe_bh").create_from_arg_string(arg_string, {k: v for k, v in extra.items() if v is not None})
