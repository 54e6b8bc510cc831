"""``lm-eval-bh sweep``: evaluate a grid of routing settings with lm-eval, loading the model once.

One results file per setting, ``OUTPUT_PATH/<setting_id>.json``, in lm-eval's own format (the dict
``lm_eval.simple_evaluate`` returns, serialized the way lm-eval's EvaluationTracker does it, with
``config["routing"]`` from the model's ``get_model_info``), next to its per-sample outputs
``<setting_id>.samples.jsonl`` (lm-eval's ``log_samples`` records without the document and prompt
text), which ``lm-eval-bh report`` uses for paired standard errors. Each file records the identity
of its evaluation under ``sweep.identity``: the model (path or hub id, a fingerprint of its config
and weights or the hub revision, its other model_args), tasks, limit, num_fewshot, the routing
settings, and the versions of lm-eval-bh, lm-eval and transformers.

Resumable: a setting is skipped only when its file exists with the same identity; a file from another
evaluation is a one-line error naming what differs (``--overwrite`` re-runs such settings). Files are
written to a temporary file and moved into place with ``os.replace`` (atomic on POSIX): a sweep killed,
or out of disk space, at any moment leaves either a complete results file or none for the setting it
was running.

Concurrency: a setting is run under an exclusive ``flock`` on ``.<setting_id>.lock``; several sweeps
on one folder run every setting exactly once, and one waits for the others' settings before printing
its table. The kernel drops the lock of a process that dies, so a killed sweep never leaves a stale
claim; the lock file it may leave behind (killed between writing a setting's results and removing the
file) is removed by the next sweep on the folder.

The model is built once and re-patched per setting with ``set_routing``, which also resets the routing
statistics. lm-eval's request cache (``use_cache``) keys requests on the model, never on the routing
settings: reusing one cache across settings would serve the first setting's answers to all of them,
so the sweep never passes it. (``cache_requests`` only caches the built prompts, and is safe.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError
from ..model_args import DEFAULT_PRETRAINED, ROUTING_ARGS
from ..model_args import parse_model_args as _parse_model_args

GRID_KEYS = ("alpha", "min_k", "max_k", "pvalue", "selection", "top_p", "calibration")
NOT_MODEL_IDENTITY = ("pretrained", "device", "batch_size", "max_batch_size", "compile_router", "router_kernel",
                      "parallelize")


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
    parser.add_argument("--calibration", default=None, metavar="FILE",
                        help="calibration file from `lm-eval-bh calibrate`, for --pvalues calibrated (any path)")
    parser.add_argument("--min_k", default="1", help="minimum experts per token (default 1)")
    parser.add_argument("--max_k", default=None, help="maximum experts per token (default: the model's top_k)")
    parser.add_argument("--topk", default=None,
                        help="fixed top-k baselines, comma-separated (default 1..top_k; 'none' for none)")
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
            flag = "--calibration" if k == "calibration" else "the grid flags"
            raise UsageError(f"--model_args: '{k}' is a grid key; set it with {flag} "
                             "(--alphas, --pvalues, --selections, --top_ps, --calibration, --min_k, --max_k, --topk)")
    return out


def setting_id(routing: dict) -> str:
    """File-name-safe id of a setting, naming only the parameters that change its routing
    (`RoutingConfig.setting_id`), e.g. 'topk8', 'bh-zscore_a0.05_k1-8', 'topp_p0.9_k1-8'."""
    from lm_eval_bh.config import RoutingConfig

    return RoutingConfig(**routing).setting_id()


def build_grid(args, top_k: int, num_experts: int, base_routing: dict) -> list[tuple[str, dict]]:
    """[(setting_id, routing kwargs for set_routing)]: distinct settings only, fixed top-k baselines first."""
    from lm_eval_bh.routing import PVALUES, SELECTIONS

    alphas = _floats("--alphas", args.alphas, 0.0, 1.0, "numbers strictly between 0 and 1")
    pvalues = _choices("--pvalues", args.pvalues, list(PVALUES))
    selections = _choices("--selections", args.selections, list(SELECTIONS))
    min_k = _int("--min_k", args.min_k, 1, num_experts)
    max_k = top_k if args.max_k is None else _int("--max_k", args.max_k, min_k, num_experts)
    calibration = getattr(args, "calibration", None)
    if "calibrated" in pvalues and not calibration:
        raise UsageError("--pvalues calibrated needs --calibration FILE (from `lm-eval-bh calibrate`)")
    if calibration and "calibrated" not in pvalues:
        raise UsageError("--calibration is only used with --pvalues calibrated")
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

    grid: list[dict] = [{**base_routing, "min_k": k, "max_k": k} for k in topks]
    for sel in selections:
        if SELECTIONS[sel].fixed:
            continue  # fixed top-k comes from --topk
        for pv in pvalues:
            cal = {"calibration": calibration} if pv == "calibrated" else {}
            common = {**base_routing, "selection": sel, "pvalue": pv, "min_k": min_k, "max_k": max_k, **cal}
            if "top_p" in SELECTIONS[sel].params:
                for p in _floats("--top_ps", args.top_ps, 0.0, 1.0, "numbers strictly between 0 and 1"):
                    grid.append({**common, "top_p": p})
            else:
                grid.extend({**common, "alpha": a} for a in alphas)
    if not grid:
        raise UsageError("--topk/--alphas: the grid is empty; give at least one setting")
    # validate every setting before any weights load; keep one setting per distinct effect
    from lm_eval_bh.config import RoutingConfig
    from lm_eval_bh.errors import RoutingError

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


# --------------------------------------------------------------------------- identity

def _sha256_file(path: Path, sample_over: int = 256 << 20, chunks: int = 16, chunk: int = 1 << 20) -> str:
    """sha256 of a file; above `sample_over` bytes, of its size and `chunks` evenly spaced MiB."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if size <= sample_over:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(str(size).encode())
            for i in range(chunks):
                fh.seek((size - chunk) * i // (chunks - 1))
                h.update(fh.read(chunk))
    return h.hexdigest()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json")


def model_fingerprint(pretrained: str, revision: str | None = None) -> dict:
    """{"fingerprint": sha256 of config.json and the weights} for a local folder; {"revision": commit}
    for a hub id (the snapshot of the local hub cache the model loads from)."""
    folder = Path(pretrained)
    if folder.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES):
            if f.suffix == ".json" and f.name not in ("config.json", "model.safetensors.index.json"):
                continue
            h.update(f"{f.relative_to(folder)}\0{_sha256_file(f)}\n".encode())
        return {"fingerprint": h.hexdigest()}
    try:
        from transformers.utils import cached_file

        snapshot = Path(cached_file(pretrained, "config.json", revision=revision)).parent
        if snapshot.parent.name == "snapshots":
            return {"revision": snapshot.name}
    except Exception:  # noqa: BLE001 - the model load reports an unreachable model
        pass
    return {"revision": revision or "unresolved"}


def versions() -> dict:
    import lm_eval
    import transformers

    import lm_eval_bh

    return {"lm_eval_bh": lm_eval_bh.__version__, "lm_eval": lm_eval.__version__,
            "transformers": transformers.__version__}


def evaluation_identity(pretrained: str, model_args: dict, tasks: list[str], limit, num_fewshot) -> dict:
    """Everything but the routing that decides what a setting's numbers are."""
    return {
        "model": {"pretrained": pretrained, **model_fingerprint(pretrained, model_args.get("revision")),
                  "args": {k: v for k, v in sorted(model_args.items()) if k not in NOT_MODEL_IDENTITY}},
        "tasks": list(tasks), "limit": limit, "num_fewshot": num_fewshot, "versions": versions(),
    }


def setting_identity(evaluation: dict, routing: dict) -> dict:
    """The identity of one setting's results, as stored (JSON round trip: tuples become lists)."""
    r = dict(routing)
    if r.get("calibration"):
        r["calibration_sha256"] = _sha256_file(Path(r["calibration"]))
    return json.loads(json.dumps({**evaluation, "routing": r}))


def _flat(d, prefix=""):
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def identity_diff(old, new: dict) -> list[str]:
    """'limit: 20 -> 30' for each field that differs ([] when equal)."""
    if not isinstance(old, dict):
        return ["no identity recorded (written by an older lm-eval-bh or another tool)"]
    a, b = _flat(old), _flat(new)
    if a.get("model.fingerprint") and a.get("model.fingerprint") == b.get("model.fingerprint"):
        a.pop("model.pretrained", None)  # the same files, in another folder (or on another machine)
        b.pop("model.pretrained", None)
    return [f"{k}: {a.get(k, '(none)')} -> {b.get(k, '(none)')}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def stored_identity(path: Path):
    """The identity recorded in a results file; None if it has none; raises OSError/ValueError if unreadable."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    return (data.get("sweep") or {}).get("identity") if isinstance(data, dict) else None


def check_existing(out: Path, grid, identities: dict, overwrite: bool) -> list:
    """The settings of `grid` still to run; a file of another evaluation is an error unless `overwrite`."""
    todo, stale = [], []
    for sid, routing in grid:
        path = out / f"{sid}.json"
        if not path.exists():
            todo.append((sid, routing))
            continue
        try:
            diff = identity_diff(stored_identity(path), identities[sid])
        except (OSError, ValueError) as e:
            diff = [f"unreadable ({type(e).__name__})"]
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

def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file moved into place: `path` is never partial.
    An OSError (full disk, no permission) is a UsageError naming the path; nothing is left behind."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # like a plain write (mkstemp creates 0600)
        os.replace(tmp, path)
    except OSError as e:
        _unlink(tmp)
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(path) -> None:
    if path:
        with contextlib.suppress(OSError):
            os.unlink(path)


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


@contextlib.contextmanager
def claim(out: Path, sid: str, wait: bool):
    """Exclusive claim of a setting: yields True while held (False if another sweep holds it and not
    `wait`). An flock, released by the kernel if the holder dies, so claims are never stale."""
    import fcntl

    path = out / f".{sid}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            yield False
            return
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break  # still the live lock file (its last holder did not remove it meanwhile)
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        for tmp in out.glob(f".{sid}.*.tmp"):  # left by a sweep killed while writing this setting
            _unlink(tmp)
        yield True
    finally:
        _unlink(path)
        os.close(fd)


def remove_stale_claims(out: Path, sids: list[str]) -> None:
    """Remove the lock files of finished settings that no live sweep holds (claimed and released at once)."""
    for sid in sids:
        if (out / f".{sid}.lock").exists():
            with claim(out, sid, wait=False):
                pass


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
    model_name: str = "moe_bh"
    grid: list = field(default_factory=list)
    identities: dict = field(default_factory=dict)
    task_manager: object = None  # lm-eval's, built by check_tasks


def run(args) -> int:
    plan = read_flags(args)
    quiet_lm_eval(args.verbose)
    lm = plan_grid(plan, args)  # the grid checked against the model's config, before any weights load
    todo = check_existing(plan.out, plan.grid, plan.identities, args.overwrite)
    if todo:  # lm-eval's task index takes seconds to build: only when there is something to evaluate
        check_tasks(plan, args.include_path)
    make_folder(plan.out)
    remove_stale_claims(plan.out, [sid for sid, _ in plan.grid if sid not in {t for t, _ in todo}])
    print(f"sweep: {len(plan.grid)} settings, {len(plan.grid) - len(todo)} already done, {len(todo)} to run "
          f"-> {plan.out}", file=sys.stderr)

    def evaluate(sid, routing):
        nonlocal lm
        lm = lm or _load_model(plan.model_name, plan, args.device)
        evaluate_setting(lm, plan, plan.task_manager, sid, routing, args.device)

    with env_info_once():
        ran, elsewhere = run_claimed(plan.out, todo, plan.identities, evaluate)
    print(f"sweep: {len(ran)} setting(s) run here, {len(elsewhere)} by another sweep on this folder", file=sys.stderr)

    from lm_eval_bh.commands.report import report

    text, _ = report([plan.out / f"{sid}.json" for sid, _ in plan.grid])  # the grid asked for, not other files
    sys.stdout.write(text)
    return 0


def read_flags(args) -> Plan:
    """Every flag checked and converted, one-line errors, nothing loaded yet."""
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
    if args.calibration is not None and not Path(args.calibration).is_file():
        raise UsageError(f"--calibration: {args.calibration} is not a file")
    base_routing = {k: model_args.pop(k) for k in list(model_args) if k in ROUTING_ARGS}
    pretrained = str(model_args.get("pretrained", DEFAULT_PRETRAINED))
    return Plan(out, tasks, limit, num_fewshot, bootstrap_iters, bs, pretrained, model_args, base_routing)


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


def plan_grid(plan: Plan, args):
    """Fill the plan's model name, grid and identities from the model's config (read on its own when
    it can be: then nothing is loaded and None is returned; else the loaded model is)."""
    from lm_eval_bh.families import config_shape

    lm = None
    config = read_model_config(plan.pretrained, plan.model_args.get("revision"))
    if config is None:  # config not readable on its own: load the model to learn its shape (tasks first)
        check_tasks(plan, args.include_path)
        lm = _load_model("moe_bh", plan, args.device)
        config = lm.model.config
    num_experts, top_k, _ = config_shape(config, source=plan.pretrained)
    plan.grid = build_grid(args, int(top_k), int(num_experts), plan.base_routing)
    plan.model_name = lm_eval_model_name(config)
    evaluation = evaluation_identity(plan.pretrained, plan.model_args, plan.tasks, plan.limit, plan.num_fewshot)
    plan.identities = {sid: setting_identity(evaluation, r) for sid, r in plan.grid}
    return lm


def check_tasks(plan: Plan, include_path) -> None:
    """plan.task_manager: lm-eval's TaskManager, after checking every task name (before any weights load)."""
    from lm_eval.tasks import TaskManager

    if plan.task_manager is not None:
        return
    tm = TaskManager(include_path=include_path)
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
        log_samples=True, bootstrap_iters=plan.bootstrap_iters,
    )  # never use_cache: see the module docstring
    if results is None:  # not rank 0
        return
    samples = results.pop("samples", None) or {}
    results["config"].update({"model": plan.model_name, "model_args": {**plan.model_args, **routing},
                              "batch_size": plan.batch_size, "device": device})
    results["model_name"] = plan.pretrained
    results["sweep"] = {"setting_id": sid, "identity": plan.identities[sid], "seconds": round(time.time() - t0, 2)}
    write_atomic(plan.out / f"{sid}.samples.jsonl", samples_jsonl(samples))
    write_atomic(plan.out / f"{sid}.json", results_json(results))


def run_claimed(out: Path, todo: list, identities: dict, evaluate) -> tuple[list[str], list[str]]:
    """Run each setting of `todo` under its claim; settings another sweep holds are waited for at the
    end, and run here if that sweep died first. Returns (run here, done elsewhere)."""
    from tqdm import tqdm

    def done(sid):
        try:
            return not identity_diff(stored_identity(out / f"{sid}.json"), identities[sid])
        except (OSError, ValueError):
            return False

    ran, elsewhere, busy = [], [], []
    bar = tqdm(total=len(todo), desc="settings", unit="setting", dynamic_ncols=True)
    try:
        for wait, items in ((False, todo), (True, busy)):
            for sid, routing in list(items):
                with claim(out, sid, wait=wait) as held:
                    if not held:
                        busy.append((sid, routing))
                        continue
                    bar.set_postfix_str(sid)
                    if done(sid):  # finished by another sweep since this one started
                        elsewhere.append(sid)
                    else:
                        evaluate(sid, routing)
                        ran.append(sid)
                bar.update(1)
    finally:
        bar.close()
    return ran, elsewhere


def _load_model(model_name: str, plan: Plan, device):
    import lm_eval_bh.lm  # noqa: F401  (registers olmoe_bh / moe_bh)
    from lm_eval.api.registry import get_model

    extra = {"batch_size": plan.batch_size, "device": device}
    return get_model(model_name).create_from_arg_obj({**plan.model_args, **plan.base_routing},
                                                     {k: v for k, v in extra.items() if v is not None})
