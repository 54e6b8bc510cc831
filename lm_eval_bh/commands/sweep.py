"""``lm-eval-bh sweep``: evaluate a grid of routing settings with lm-eval, loading the model once.

One results file per setting, ``OUTPUT_PATH/<setting_id>.json``, in lm-eval's own format (the dict
``lm_eval.simple_evaluate`` returns, serialized the way lm-eval's EvaluationTracker does it, with
``config["routing"]`` from the model's ``get_model_info``), next to its per-sample outputs
``<setting_id>.samples.jsonl`` (lm-eval's ``log_samples`` records without the document and prompt
text), which ``lm-eval-bh report`` uses for paired standard errors. Each file records the identity
of its evaluation under ``sweep.identity`` (`identity.py`: model files, tasks and their definitions,
limit, few-shot, chat formatting, dtype, versions) and its routing settings.

Resumable: a setting is skipped only when its file exists with the same identity; a file from another
evaluation is a one-line error naming what differs (``--overwrite`` re-runs such settings). Files are
written to a temporary file and moved into place with ``os.replace`` (atomic on POSIX): a sweep killed,
or out of disk space, at any moment leaves either a complete results file or none for the setting it
was running.

Spreading a grid (`claims.py`): several sweeps on one folder claim settings with ``flock`` and run
every setting exactly once (one waits for the others' settings before printing its table); a sweep of
another evaluation is refused while one runs there. ``--shard I/N`` runs a deterministic part of the
grid, balanced by expected cost, with no lock and no shared folder (a Slurm job array, one process per
GPU); ``report DIR1 DIR2 ...`` joins the parts. ``--list`` prints the grid and each setting's shard.

The model is built once and re-patched per setting with ``set_routing``, which also resets the routing
statistics. lm-eval's request cache (``use_cache``) keys requests on the model, never on the routing
settings: reusing one cache across settings would serve the first setting's answers to all of them,
so the sweep never passes it. (``cache_requests`` only caches the built prompts, and is safe.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BudgetUnmet, UsageError
from ..model_args import DEFAULT_PRETRAINED, ROUTING_ARGS
from ..model_args import parse_model_args as _parse_model_args
from . import identity as I
from .claims import claim, evaluation_lock, remove_stale_claims, write_atomic

GRID_KEYS = ("alpha", "min_k", "max_k", "pvalue", "selection", "top_p", "calibration", "target_k", "allocation",
             "layer_budget")


def add_arguments(parser) -> None:
    parser.add_argument("--model_args", default="", metavar="K=V,...",
                        help="lm-eval model_args without the grid keys: pretrained, dtype, and fixed routing "
                             "options such as temperature or renormalize (default pretrained: OLMoE-1B-7B-0924)")
    parser.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks or groups (required)")
    parser.add_argument("--include_path", default=None, help="extra task folder (e.g. tasks/)")
    parser.add_argument("--limit", default=None, help="examples per task (integer, or a fraction < 1)")
    parser.add_argument("--num_fewshot", default=None, help="few-shot examples (default: the task's)")
    parser.add_argument("--apply_chat_template", nargs="?", const=True, default=False, metavar="TEMPLATE",
                        help="format prompts with the tokenizer's chat template (optionally the named one), as lm-eval")
    parser.add_argument("--fewshot_as_multiturn", nargs="?", const="true", default=None, metavar="BOOL",
                        help="few-shot examples as a multi-turn chat (default: on with --apply_chat_template), as lm-eval")
    parser.add_argument("--system_instruction", default=None, metavar="TEXT", help="system instruction, as lm-eval")
    parser.add_argument("--batch_size", default="1", help="integer or 'auto' (default 1)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:0 ... (default: lm-eval's)")
    parser.add_argument("--output_path", default=None, metavar="DIR",
                        help="one <setting_id>.json per setting (required)")
    parser.add_argument("--alphas", default="0.01,0.05,0.1,0.2", help="BH/HC/lfdr levels, comma-separated")
    parser.add_argument("--pvalues", default="zscore", help="p-value methods, comma-separated")
    parser.add_argument("--selections", default="bh", help="selection rules, comma-separated")
    parser.add_argument("--top_ps", default="0.5,0.7,0.9", help="top_p values (selection topp only)")
    parser.add_argument("--target_ks", default=None, metavar="K,...",
                        help="mean experts per token to target: each rule with a parameter (alpha, top_p) runs "
                             "once per K (and allocation) with target_k=K instead of its --alphas / --top_ps; with "
                             "--selections topk, top-k at exactly K (and the fitted per-layer budget, allocation "
                             "sensitivity) joins the grid")
    parser.add_argument("--allocations", default="uniform", metavar="A,...",
                        help="with --target_ks: how each target spreads over the layers, comma-separated: uniform "
                             "(K in every layer) and/or sensitivity (per-layer budgets fitted to the calibration loss, "
                             "Alloc-MoE style)")
    parser.add_argument("--twins", action="store_true",
                        help="after each adaptive setting, its layer-budget twin: fixed top-k with that setting's "
                             "per-layer mean k (layer_budget=<its results file>)")
    parser.add_argument("--calibration", default=None, metavar="auto|FILE",
                        help="the null of every setting that needs one (--pvalues calibrated or ecdf, --selections "
                             "lfdr), as lm-eval's calibration= model_arg: auto (fitted at load on the built-in "
                             "corpus under each setting's routing, cached), a text file to fit on (.txt, .text, .md, "
                             ".jsonl), or a calibration file from `lm-eval-bh calibrate` (any path)")
    parser.add_argument("--min_k", default="1", help="minimum experts per token (default 1)")
    parser.add_argument("--max_k", default=None, help="maximum experts per token (default: the model's top_k)")
    parser.add_argument("--topk", default=None,
                        help="fixed top-k baselines, comma-separated (default 1..top_k; 'none' for none)")
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="run only shard I of N (0 <= I < N): a deterministic part of the grid balanced by "
                             "expected cost; no lock or shared folder needed (see docs/scaling.md)")
    parser.add_argument("--list", action="store_true",
                        help="print the grid (setting ids, shard of each, expected cost) and exit; loads nothing")
    parser.add_argument("--bootstrap_iters", default="100000", help="lm-eval bootstrap iterations for stderr")
    parser.add_argument("--overwrite", action="store_true",
                        help="re-run settings whose existing file comes from another evaluation (other model, "
                             "tasks, limit, ... or versions) and replace it")
    parser.add_argument("--verbose", action="store_true", help="keep lm-eval's INFO logging")


# --------------------------------------------------------------------------- parsing / grid

def _split(flag: str, text: str | None) -> list[str]:
    return [t.strip() for t in str(text or "").split(",") if t.strip()]


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
    try:
        out = _parse_model_args(text)
    except UsageError as e:
        raise UsageError(f"--{e}") from None
    for k in GRID_KEYS:
        if k in out:
            flag = {"calibration": "--calibration", "allocation": "--allocations"}.get(
                k, "the grid flags (--alphas, --pvalues, --selections, --top_ps, --target_ks, --allocations, --twins, "
                   "--calibration, --min_k, --max_k, --topk)")
            raise UsageError(f"--model_args: '{k}' is a grid key; set it with {flag}")
    return out


def routing_config(routing: dict):
    """The `RoutingConfig` of a grid setting, checked before any weights load (one line naming the setting).
    A layer-budget twin reads a results file that exists only once its source setting has run: it is
    checked without it and then holds the file's name, so its id is the same in any folder."""
    from lm_eval_bh.config import RoutingConfig
    from lm_eval_bh.errors import RoutingError

    budget = routing.get("layer_budget")
    try:
        cfg = RoutingConfig(**{**routing, "layer_budget": None})
    except (RoutingError, TypeError) as e:
        raise UsageError(f"grid setting {routing}: {e}") from None
    if budget is not None:
        object.__setattr__(cfg, "layer_budget", Path(budget).name)  # as RoutingConfig keeps it, unread
    return cfg


def setting_id(routing: dict) -> str:
    """File-name-safe id of a setting (`RoutingConfig.setting_id`), naming only the parameters that change
    its routing, e.g. 'topk4', 'bh-zscore_a0.05_k1-4', 'bh-zscore_K2_k1-4', 'topk_twin-bh-zscore_K2_k1-4-<hash>'."""
    return routing_config(routing).setting_id()


def build_grid(args, top_k: int, num_experts: int, base_routing: dict, out: Path = Path(".")) -> list[tuple[str, dict]]:
    """[(setting_id, routing kwargs for set_routing)]: distinct settings only, fixed top-k baselines first;
    with --target_ks and --selections topk, top-k at each target next (per allocation; uniform at an
    integer K that --topk runs is that baseline); with --twins each adaptive setting is followed by its
    layer-budget twin (reading its results in `out`)."""
    from lm_eval_bh.config import ALLOCATIONS
    from lm_eval_bh.routing import PVALUES, SELECTIONS

    alphas = _floats("--alphas", args.alphas, 0.0, 1.0, "numbers strictly between 0 and 1")
    pvalues = _choices("--pvalues", args.pvalues, list(PVALUES))
    selections = _choices("--selections", args.selections, list(SELECTIONS))
    min_k = _int("--min_k", args.min_k, 1, num_experts)
    max_k = top_k if args.max_k is None else _int("--max_k", args.max_k, min_k, num_experts)
    target_ks = None
    if args.target_ks is not None:
        target_ks = _floats("--target_ks", args.target_ks, 0.0, None, f"numbers from min_k ({min_k}) to max_k ({max_k})")
        if not target_ks or any(not min_k <= k <= max_k for k in target_ks):
            raise UsageError(f"--target_ks: '{args.target_ks}' is out of range; allowed: mean experts per token "
                             f"from min_k ({min_k}) to max_k ({max_k}), comma-separated")
    analyze = str(base_routing.get("mode", "patch")) == "analyze"
    if args.topk is None:
        topks = [] if analyze else list(range(1, top_k + 1))
    elif str(args.topk).strip().lower() in ("none", ""):
        topks = []
    elif analyze:
        raise UsageError("--topk: mode=analyze always routes the stock top-k, so it has no fixed top-k "
                         "baselines; give --topk none (or run them without mode=analyze)")
    else:
        topks = [_int("--topk", t, 1, num_experts) for t in _split("--topk", args.topk)]
    if args.twins and analyze:
        raise UsageError("--twins: mode=analyze routes the stock top-k, so its settings have no layer-budget twin")

    allocations = _choices("--allocations", args.allocations, list(ALLOCATIONS))
    if not allocations or (target_ks is None and allocations != ["uniform"]):
        raise UsageError(f"--allocations: '{args.allocations}' is not allowed; allowed: uniform, or with --target_ks "
                         "a comma-separated list of uniform, sensitivity")
    # the routing kwargs of each target: uniform is RoutingConfig's default, left out (the ids and identities
    # of uniform settings are those of sweeps before --allocations)
    targets = [{"target_k": k, **({} if a == "uniform" else {"allocation": a})}
               for k in target_ks or () for a in allocations]
    grid: list[dict] = [{**base_routing, "min_k": k, "max_k": k} for k in topks]
    if "topk" in selections and not analyze:  # top-k at each target: the references at exactly K
        grid.extend({**base_routing, "selection": "topk", "min_k": min_k, "max_k": max_k, **t} for t in targets
                    if t.get("allocation") or not (float(t["target_k"]).is_integer() and t["target_k"] in topks))
    needs_null = False
    for sel in selections:
        if SELECTIONS[sel].fixed:
            continue  # fixed top-k comes from --topk
        for pv in pvalues:
            null = SELECTIONS[sel].needs_null or PVALUES[pv].needs_null  # served by --calibration
            needs_null |= null
            common = {**base_routing, "selection": sel, "pvalue": pv, "min_k": min_k, "max_k": max_k,
                      **({"calibration": args.calibration} if null and args.calibration else {})}
            if target_ks is not None and SELECTIONS[sel].params:
                grid.extend({**common, **t} for t in targets)
            elif "top_p" in SELECTIONS[sel].params:
                for p in _floats("--top_ps", args.top_ps, 0.0, 1.0, "numbers strictly between 0 and 1"):
                    grid.append({**common, "top_p": p})
            else:
                grid.extend({**common, "alpha": a} for a in alphas)
    users = ", ".join([f"--pvalues {n}" for n, s in PVALUES.items() if s.needs_null]
                      + [f"--selections {n}" for n, s in SELECTIONS.items() if s.needs_null])
    if needs_null and not args.calibration:
        raise UsageError(f"--calibration: {users} need(s) a null; give --calibration auto (fitted at load on the "
                         "built-in corpus), a text file to fit on, or a file from `lm-eval-bh calibrate`")
    if args.calibration and not needs_null:
        raise UsageError(f"--calibration is only used with {users}")
    if not grid:
        raise UsageError("--topk/--alphas: the grid is empty; give at least one setting")
    # validate every setting before any weights load; keep one setting per distinct effect
    out_grid, seen = [], set()
    for r in grid:
        cfg = routing_config(r)
        sid = cfg.setting_id()
        if sid in seen:
            continue
        seen.add(sid)
        out_grid.append((sid, r))
        if args.twins and not (SELECTIONS[cfg.selection].fixed or cfg.min_k == cfg.max_k):
            twin = {**base_routing, "selection": "topk", "layer_budget": str(out / f"{sid}.json")}
            out_grid.append((setting_id(twin), twin))
    return out_grid


# --------------------------------------------------------------------------- shards

def parse_shard(text) -> tuple[int, int]:
    """'I/N' -> (I, N), 0 <= I < N; one line for anything else."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise UsageError(f"--shard: '{text}' is not I/N; allowed: two integers 0 <= I < N, e.g. 0/4")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1:
        raise UsageError(f"--shard: N={n} must be at least 1; allowed: I/N with 0 <= I < N")
    if i >= n:
        raise UsageError(f"--shard: I={i} must be less than N={n}; allowed: I/N with 0 <= I < N")
    return i, n


def expected_cost(routing: dict, top_k: int) -> float:
    """Relative time of a setting: a dense part (attention, embeddings: about the experts' share at
    the model's top_k) plus experts per token (fixed k, the target, or the middle of the k range)."""
    if routing.get("target_k") is not None:
        return 1.0 + float(routing["target_k"]) / top_k
    return 1.0 + (int(routing.get("min_k", 1)) + int(routing.get("max_k") or top_k)) / 2 / top_k


def assign_shards(grid, n: int, top_k: int) -> dict[str, int]:
    """{setting_id: shard}: the grid split into `n` parts of about equal expected cost (the longest
    first, each to the least loaded part, ties to the lower index: the same on every machine). A
    layer-budget twin goes with the setting it reads, and runs after it."""
    units: dict[str, list[str]] = {}
    cost: dict[str, float] = {}
    for sid, r in grid:
        source = Path(r["layer_budget"]).stem if r.get("layer_budget") else None
        head = source if source in units else sid
        units.setdefault(head, []).append(sid)
        cost[head] = cost.get(head, 0.0) + expected_cost(r, top_k)
    order = {sid: i for i, (sid, _) in enumerate(grid)}
    load = [0.0] * n
    shard: dict[str, int] = {}
    for head in sorted(units, key=lambda h: (-round(cost[h], 9), order[h])):
        part = min(range(n), key=lambda j: (round(load[j], 9), j))
        load[part] += cost[head]
        for sid in units[head]:
            shard[sid] = part
    return shard


def read_model_config(pretrained: str, revision: str | None = None):
    """The model's transformers config, or None where it cannot be read (then the model load says why)."""
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(pretrained, **({"revision": revision} if revision else {}))
    except Exception:  # noqa: BLE001 - fall back to the loaded model
        return None


def lm_eval_model_name(config) -> str:
    """`olmoe_bh` for OLMoE, `moe_bh` for every other family (so results are labelled with the right model)."""
    return "olmoe_bh" if getattr(config, "model_type", None) == "olmoe" else "moe_bh"


# --------------------------------------------------------------------------- resume

def check_existing(out: Path, grid, identities: dict, overwrite: bool) -> list:
    """The settings of `grid` still to run; a file of another evaluation is an error unless `overwrite`,
    a FIFO or other non-regular file named like a results file always is (reading it would block)."""
    todo, stale = [], []
    for sid, routing in grid:
        path = out / f"{sid}.json"
        for p in (path, out / f"{sid}.samples.jsonl"):
            if (p.exists() or p.is_symlink()) and not p.is_file():
                raise UsageError(f"--output_path: {p} is not a regular file; remove it, or choose another --output_path")
        if not path.exists():
            todo.append((sid, routing))
            continue
        try:
            diff = I.identity_diff(I.stored_identity(path), identities[sid])
        except (OSError, ValueError) as e:
            diff = [f"unreadable ({type(e).__name__}: {e})"]
        if diff:
            stale.append((path, diff))
            todo.append((sid, routing))
    if stale and not overwrite:
        path, diff = stale[0]
        more = f" (and {len(stale) - 1} more file(s))" if len(stale) > 1 else ""
        raise UsageError(f"--output_path: {path} comes from another evaluation: {'; '.join(diff[:3])}"
                         f"{' ...' if len(diff) > 3 else ''}{more}; pass --overwrite to re-run, "
                         "or choose another --output_path")
    return todo


# --------------------------------------------------------------------------- files

def results_json(results: dict) -> str:
    """Serialized like lm-eval's EvaluationTracker."""
    from lm_eval.utils import handle_non_serializable

    return json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)


def samples_jsonl(samples: dict) -> str:
    """lm-eval's per-sample records, one line each with its task, without the document and prompt text."""
    from lm_eval.utils import handle_non_serializable

    lines = []
    for task, records in samples.items():
        for s in records:
            s = {k: v for k, v in s.items() if k not in ("doc", "arguments", "resps")}
            lines.append(json.dumps({"task": task, **s}, default=handle_non_serializable, ensure_ascii=False))
    return "\n".join(lines) + "\n"


class _Once(logging.Filter):
    """Let each distinct message through once (lm-eval repeats some warnings for every evaluation)."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record):
        msg = record.getMessage()
        if "Custom kwargs can be passed to `--metadata`" not in msg:
            return True
        if msg in self.seen:
            return False
        self.seen.add(msg)
        return True


# --------------------------------------------------------------------------- run

@dataclass
class Plan:
    """What one sweep evaluates: the checked flags, the model and its grid."""

    out: Path
    tasks: list
    limit: int | float | None
    num_fewshot: int | None
    bootstrap_iters: int
    batch_size: str
    pretrained: str
    model_args: dict  # without the routing arguments
    base_routing: dict  # the routing arguments of --model_args, shared by every setting
    chat: dict  # apply_chat_template, fewshot_as_multiturn, system_instruction (as lm-eval takes them)
    shard: tuple[int, int] = (0, 1)
    model_name: str = "moe_bh"
    grid: list = field(default_factory=list)  # this shard's settings
    evaluation: dict = field(default_factory=dict)  # the identity shared by every setting
    identities: dict = field(default_factory=dict)
    task_defaults: bool = True  # whether the run needs lm-eval's own task index (see resolve_tasks)
    task_manager: object = None  # lm-eval's, built by check_tasks


def run(args) -> int:
    plan = read_flags(args)
    quiet_lm_eval(args.verbose)
    if args.list:
        return list_grid(plan, args)
    lm = plan_grid(plan, args)  # the grid checked against the model's config, before any weights load
    todo = check_existing(plan.out, plan.grid, plan.identities, args.overwrite)
    if todo:
        check_tasks(plan, args.include_path)
    make_folder(plan.out)
    with evaluation_lock(plan.out, plan.evaluation):
        remove_stale_claims(plan.out, [sid for sid, _ in plan.grid if sid not in {t for t, _ in todo}])
        shard = f" (shard {plan.shard[0]}/{plan.shard[1]})" if plan.shard[1] > 1 else ""
        print(f"sweep: {len(plan.grid)} settings{shard}, {len(plan.grid) - len(todo)} already done, {len(todo)} "
              f"to run -> {plan.out}", file=sys.stderr)

        def evaluate(sid, routing):
            nonlocal lm
            lm = lm or _load_model(plan.model_name, plan, args.device)
            evaluate_setting(lm, plan, plan.task_manager, sid, routing, args.device)

        with env_info_once():
            ran, elsewhere, skipped = run_claimed(plan.out, todo, plan.identities, evaluate)
    print(f"sweep: {len(ran)} setting(s) run here, {len(elsewhere)} by another sweep on this folder", file=sys.stderr)
    for sid, why in skipped.items():
        print(f"sweep: skipped {sid}: {why}", file=sys.stderr)
    if not plan.grid:
        return 0

    from lm_eval_bh.commands.report import report

    files = [plan.out / f"{sid}.json" for sid, _ in plan.grid if sid not in skipped]  # the grid asked for
    text, _ = report(files)
    sys.stdout.write(text)
    return 1 if skipped else 0


def read_flags(args) -> Plan:
    """Every flag checked and converted, one-line errors, nothing loaded yet."""
    check_single_process()
    shard = parse_shard(args.shard) if args.shard is not None else (0, 1)
    for flag in ("tasks", "output_path"):
        if getattr(args, flag) is None and not args.list:
            raise UsageError(f"--{flag} is required")
    out = Path(args.output_path or ".")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_path: {out} exists and is not a folder")
    model_args = parse_model_args(args.model_args)
    tasks = _split("--tasks", args.tasks)
    if not tasks and not args.list:
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
    if args.calibration is not None:
        check_calibration(args.calibration)
    check_device(args.device)
    base_routing = {k: model_args.pop(k) for k in list(model_args) if k in ROUTING_ARGS}
    pretrained = str(model_args.get("pretrained", DEFAULT_PRETRAINED))
    return Plan(out, tasks, limit, num_fewshot, bootstrap_iters, bs, pretrained, model_args, base_routing,
                chat_flags(args), shard)


def check_calibration(value: str) -> None:
    """--calibration: auto, or an existing file; a text file to fit on holds documents (read here, so a
    malformed one is one line before any weights load)."""
    from lm_eval_bh.calibration import source_kind
    from lm_eval_bh.corpus import read_texts

    allowed = ("allowed: auto, a text file to fit on (.txt, .text, .md, .jsonl) or a file from "
               "`lm-eval-bh calibrate`")
    if value == "auto":
        return
    if not Path(value).is_file():
        raise UsageError(f"--calibration: {value} is not a file; {allowed}")
    if source_kind(value) == "text":
        try:
            texts = read_texts(value)
        except UsageError as e:
            raise UsageError(f"--calibration: {e}") from None
        if not texts:
            raise UsageError(f"--calibration: {value} holds no text; {allowed}")


def check_single_process() -> None:
    """`accelerate launch` / `torchrun` start one sweep per rank: each would claim other settings and then
    wait inside lm-eval for the others to join its evaluation. Refused; --shard spreads a grid instead."""
    world = os.environ.get("WORLD_SIZE", "1").strip() or "1"
    if world != "1":
        raise UsageError(f"sweep runs as one process per model, and WORLD_SIZE={world} says accelerate launch or "
                         "torchrun started several; run one sweep per GPU with --shard I/N instead "
                         "(CUDA_VISIBLE_DEVICES=I lm-eval-bh sweep --shard I/N ..., see docs/scaling.md)")


def check_device(device) -> None:
    """A device torch cannot use is one line here, not an AssertionError from the router kernel's warm-up."""
    if device is None or not str(device).strip().startswith(("cuda", "mps")):
        return
    import torch

    d = str(device).strip()
    if d == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError("--device: mps is not available here; allowed: cpu")
        return
    m = re.fullmatch(r"cuda(?::(\d+))?", d)
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    allowed = ", ".join(["cpu", "cuda"] + [f"cuda:{i}" for i in range(n)]) if n else "cpu"
    if not n:
        why = "was built without CUDA" if torch.version.cuda is None else "sees no GPU"
        raise UsageError(f"--device: {d} is not available here (torch {torch.__version__} {why}); allowed: {allowed}")
    if not m or (m.group(1) is not None and int(m.group(1)) >= n):
        raise UsageError(f"--device: '{d}' is not available here; allowed: {allowed}")


def chat_flags(args) -> dict:
    """--apply_chat_template, --fewshot_as_multiturn and --system_instruction as lm-eval's CLI reads them
    (few-shot as multi-turn defaults to on with a chat template, and needs one)."""
    apply = args.apply_chat_template
    multiturn = args.fewshot_as_multiturn
    if multiturn is None:
        multiturn = bool(apply)
    elif str(multiturn).strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        multiturn = str(multiturn).strip().lower() in ("true", "1", "yes")
    else:
        raise UsageError(f"--fewshot_as_multiturn: '{multiturn}' is not allowed; allowed: true or false")
    if multiturn and not apply:
        raise UsageError("--fewshot_as_multiturn: few-shot examples as a multi-turn chat need --apply_chat_template")
    return {"apply_chat_template": apply, "fewshot_as_multiturn": multiturn,
            "system_instruction": args.system_instruction}


def quiet_lm_eval(verbose: bool) -> None:
    if not verbose:
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
    logging.getLogger("lm_eval.api.task").addFilter(_Once())


@contextlib.contextmanager
def env_info_once():
    """lm-eval collects the environment (torch's collect_env: subprocesses, seconds) in every simple_evaluate;
    the settings of a sweep share one process: collect it for the first and copy it into the others."""
    import lm_eval.evaluator as evaluator

    original, collected = evaluator.add_env_info, {}

    def once(storage: dict) -> None:
        if not collected:
            before = set(storage)
            original(storage)
            collected.update({k: storage[k] for k in storage if k not in before})
        else:
            storage.update(collected)

    evaluator.add_env_info = once
    try:
        yield
    finally:
        evaluator.add_env_info = original


def model_shape(plan: Plan):
    """(config, num_experts, top_k) from the model's config file alone, or None where it cannot be read."""
    from lm_eval_bh.families import config_shape

    config = read_model_config(plan.pretrained, plan.model_args.get("revision"))
    if config is None:
        return None
    num_experts, top_k, _ = config_shape(config, source=plan.pretrained)
    return config, int(num_experts), int(top_k)


def list_grid(plan: Plan, args) -> int:
    """sweep --list: the grid, each setting's shard and expected cost; reads the model's config only."""
    shape = model_shape(plan)
    if shape is None:
        raise UsageError(f"--list: cannot read the config of the model '{plan.pretrained}' (a local folder, or a "
                         "hub id in the local cache, is needed to know its experts)")
    _, num_experts, top_k = shape
    grid = build_grid(args, top_k, num_experts, plan.base_routing, plan.out)
    n = plan.shard[1]
    shards = assign_shards(grid, n, top_k)
    load = [sum(expected_cost(r, top_k) for sid, r in grid if shards[sid] == j) for j in range(n)]
    print(f"# {len(grid)} settings in {n} shard(s); expected cost per shard: {', '.join(f'{c:.2f}' for c in load)}")
    print("shard\tcost\tsetting")
    for sid, r in grid:
        print(f"{shards[sid]}/{n}\t{expected_cost(r, top_k):.2f}\t{sid}")
    return 0


def plan_grid(plan: Plan, args):
    """Fill the plan's model name, grid (this shard's part) and identities from the model's config (read
    on its own when it can be: then nothing is loaded and None is returned; else the loaded model is)."""
    from lm_eval_bh.families import config_shape

    lm = None
    shape = model_shape(plan)
    if shape is None:  # config not readable on its own: load the model to learn its shape (tasks first)
        resolve_tasks(plan, args.include_path)
        check_tasks(plan, args.include_path)
        lm = _load_model("moe_bh", plan, args.device)
        config = lm.model.config
        num_experts, top_k, _ = (int(x) for x in config_shape(config, source=plan.pretrained))
    else:
        config, num_experts, top_k = shape
    grid = build_grid(args, top_k, num_experts, plan.base_routing, plan.out)
    shards = assign_shards(grid, plan.shard[1], top_k)
    plan.grid = [(sid, r) for sid, r in grid if shards[sid] == plan.shard[0]]
    plan.model_name = lm_eval_model_name(config)
    task_sha256 = resolve_tasks(plan, args.include_path)
    tokenizer = plan.model_args.get("tokenizer")
    chat = {**plan.chat, "chat_template_sha256": I.chat_template_sha256(
        tokenizer if isinstance(tokenizer, str) else plan.pretrained, plan.chat["apply_chat_template"],
        plan.model_args.get("revision"))}
    plan.evaluation = I.evaluation_identity(plan.pretrained, plan.model_args, plan.tasks, plan.limit, plan.num_fewshot,
                                            task_sha256=task_sha256, chat=chat,
                                            dtype=I.resolved_dtype(plan.model_args.get("dtype"), config))
    plan.identities = {sid: I.setting_identity(plan.evaluation, r) for sid, r in plan.grid}
    return lm


def resolve_tasks(plan: Plan, include_path) -> dict:
    """{task: sha256 of its definition}. Resolved in the include path's own index when that defines every
    task asked for and all their members (then the run needs nothing else: milliseconds), else in
    lm-eval's full index (seconds to build), which checks every name."""
    small = I.include_index(include_path)
    try:
        I.closure(plan.tasks, small)
        plan.task_defaults = False
        return I.task_hashes(plan.tasks, small)
    except I.TaskNotIndexed:
        plan.task_defaults = True
        check_tasks(plan, include_path)
        return I.task_hashes(plan.tasks, plan.task_manager.task_index)


def check_tasks(plan: Plan, include_path) -> None:
    """plan.task_manager: lm-eval's TaskManager, after checking every task name (before any weights load)."""
    if plan.task_manager is not None:
        return
    tm = I.task_manager(include_path, plan.task_defaults)
    unknown = [t for t in plan.tasks if t not in tm.all_tasks]
    if unknown:
        raise UsageError(f"--tasks: unknown task(s) {', '.join(unknown)}; list them with 'lm-eval ls tasks'"
                         + (f" --include_path {include_path}" if include_path else ""))
    plan.task_manager = tm


def make_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--output_path: cannot create {out}: {e.strerror or e}") from None


def evaluate_setting(lm, plan: Plan, task_manager, sid: str, routing: dict, device) -> None:
    """One setting through lm_eval.simple_evaluate; its samples, then its results file (the marker of done)."""
    import lm_eval

    t0 = time.time()
    lm.set_routing(**routing)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=plan.tasks, num_fewshot=plan.num_fewshot, limit=plan.limit, task_manager=task_manager,
        log_samples=True, bootstrap_iters=plan.bootstrap_iters, **plan.chat,
    )  # never use_cache: see the module docstring
    if results is None:  # not rank 0
        return
    samples = results.pop("samples", None) or {}
    results["config"].update({"model": plan.model_name, "model_args": {**plan.model_args, **routing},
                              "batch_size": plan.batch_size, "device": device})
    results["model_name"] = plan.pretrained
    results["sweep"] = {"setting_id": sid, "identity": plan.identities[sid], "seconds": round(time.time() - t0, 2),
                        "shard": list(plan.shard)}
    write_atomic(plan.out / f"{sid}.samples.jsonl", samples_jsonl(samples))
    write_atomic(plan.out / f"{sid}.json", results_json(results))


def run_claimed(out: Path, todo: list, identities: dict, evaluate) -> tuple[list[str], list[str], dict]:
    """Run each setting of `todo` under its claim; settings another sweep holds are waited for at the
    end, and run here if that sweep died first (a layer-budget twin waits with the setting it reads).
    A setting whose budget its rule cannot meet (`BudgetUnmet`, known only once fitted) is skipped with
    its twin, and the rest of the grid runs. Returns (run here, done elsewhere, {skipped: why})."""
    from tqdm import tqdm

    def done(sid):
        try:
            return not I.identity_diff(I.stored_identity(out / f"{sid}.json"), identities[sid])
        except (OSError, ValueError):
            return False

    ran, elsewhere, busy, skipped = [], [], [], {}
    bar = tqdm(total=len(todo), desc="settings", unit="setting", dynamic_ncols=True)
    try:
        for wait, items in ((False, todo), (True, busy)):
            for sid, routing in list(items):
                source = Path(routing["layer_budget"]).stem if routing.get("layer_budget") else None
                if not wait and source in {s for s, _ in busy}:
                    busy.append((sid, routing))
                    continue
                with claim(out, sid, wait=wait) as held:
                    if not held:
                        busy.append((sid, routing))
                        continue
                    bar.set_postfix_str(sid)
                    if source in skipped:
                        skipped[sid] = f"its setting {source} was skipped"
                    elif done(sid):  # finished by another sweep since this one started
                        elsewhere.append(sid)
                    else:
                        try:
                            evaluate(sid, routing)
                            ran.append(sid)
                        except BudgetUnmet as e:
                            skipped[sid] = str(e)
                bar.update(1)
    finally:
        bar.close()
    return ran, elsewhere, skipped


def _load_model(model_name: str, plan: Plan, device):
    import lm_eval_bh.lm  # noqa: F401  (registers olmoe_bh / moe_bh)
    from lm_eval.api.registry import get_model

    extra = {"batch_size": plan.batch_size, "device": device}
    return get_model(model_name).create_from_arg_obj({**plan.model_args, **plan.base_routing},
                                                     {k: v for k, v in extra.items() if v is not None})
