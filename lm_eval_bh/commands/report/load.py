"""Loading and grouping: lm-eval results files -> one tidy frame, one row per (file, task).

Unreadable files are collected with a reason, never raised. Each row's ``evaluation`` names its group
of comparable files (`assign_evaluations`); `dedupe` keeps the newest file per setting and task.
Runs of ``--model olmoe_bh``/``moe_bh`` carry ``config["routing"]`` (read as
`results_schema.RoutingBlock`); plain ``--model hf`` runs do not: their expert count is the fixed
top-k from ``model_args`` (``num_experts_per_tok=K``) or from the model's config.json.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from ...errors import UsageError
from ...model_args import parse_model_args as _parse_model_args
from ...results_schema import routing_block

AVERAGE = "(average)"
FIXED_RULE = "top-k"
LAYER_RULE = "layer-k"  # a fixed top-k with its own k per layer (layer_k= or layer_budget=)
BUDGET_FIELDS = ("target_k", "layer_k", "layer_budget")
ROUTED_MODELS = ("olmoe_bh", "moe_bh")  # lm-eval model names whose results carry config.routing
ANALYZE_PREFIX = "analyze:"
# Two accuracies (costs) closer than half the last printed digit are a tie on the Pareto front.
ACC_TIE, COST_TIE = 5e-5, 5e-4

# Columns of the tidy per-(setting, task) frame, in display order.
COLUMNS = [
    "model", "evaluation", "setting", "rule", "fixed_k", "alpha", "task", "metric", "higher_is_better", "scale",
    "value", "stderr",
    "mean_k", "top_k", "expert_fraction", "active_params", "n_tasks", "limit", "source", "file",
]
REPORT_COLUMNS = COLUMNS + [
    "avg_tasks", "target_k", "allocation", "pareto", "topk_value_at_k", "delta_vs_topk", "delta_se", "delta_se_kind", "no_delta",
    "topk_at_target", "delta_at_target", "delta_at_target_se",
    "twin", "delta_vs_twin", "delta_vs_twin_se", "alloc_delta", "alloc_se",
]
GROUP = ["model", "evaluation"]


def find_result_files(paths: Iterable[str | os.PathLike]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand files/folders (recursively) into ``*.json`` files. Returns (files, missing)."""
    files: list[Path] = []
    bad: list[tuple[str, str]] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*.json") if f.is_file() and not f.name.startswith(".")))
        elif p.is_file():
            files.append(p)
        else:
            bad.append((str(p), "no such file or folder"))
    seen: set[Path] = set()
    out = []
    for f in files:
        r = f.resolve()
        if r not in seen:
            seen.add(r)
            out.append(f)
    return out, bad


def _as_float(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def parse_model_args(model_args: Any) -> dict:
    """model_args as lm-eval stores it: a dict (CLI) or a 'k=v,k2=v2' string (Python API); {} if unreadable."""
    try:
        return _parse_model_args(model_args if isinstance(model_args, (str, dict)) else None)
    except UsageError:
        return {}


def primary_metric(task_result: dict) -> tuple[str | None, float, float]:
    """(metric name, value, stderr): acc_norm if present, else acc, else the first metric."""
    name, _, value, se = _primary_metric(task_result)
    return name, value, se


def _primary_metric(task_result: dict) -> tuple[str | None, str, float, float]:
    """(metric name, filter, value, stderr); a metric whose value is NaN stays (as NaN)."""
    metrics: dict[str, tuple[str, float, float]] = {}
    for key, val in task_result.items():
        if key == "alias" or "," not in key:
            continue
        name, filt = key.split(",", 1)
        if name.endswith("_stderr") or isinstance(val, (list, dict, bool)):
            continue
        v = _as_float(val)
        if math.isnan(v) and not isinstance(val, (int, float)):
            continue
        if name not in metrics:
            metrics[name] = (filt, v, _as_float(task_result.get(f"{name}_stderr,{filt}")))
    for name in ("acc_norm", "acc", *metrics):
        if name in metrics:
            return (name, *metrics[name])
    return (None, "none", math.nan, math.nan)


def higher_is_better(data: dict, task: str, metric: str) -> bool:
    """The metric's direction as lm-eval recorded it for the task (``higher_is_better`` in the results
    file), else as lm-eval's metric registry has it, else higher (an accuracy-like score)."""
    recorded = ((data.get("higher_is_better") or {}).get(task) or {}).get(metric)
    if isinstance(recorded, bool):
        return recorded
    registered = _registered(metric)[0]
    return True if registered is None else registered


def metric_scale(data: dict, task: str, metric: str) -> str:
    """'log' for a metric lm-eval aggregates as a perplexity (exp of a mean negative log-likelihood):
    mixing two settings over the tokens mixes its logarithm, so that is where it is interpolated;
    'linear' for every other metric. The aggregation is the task's (its config) or lm-eval's default."""
    agg = None
    for m in ((data.get("configs") or {}).get(task) or {}).get("metric_list") or []:
        if isinstance(m, dict) and m.get("metric") == metric and isinstance(m.get("aggregation"), str):
            agg = m["aggregation"]
    return "log" if (agg or _registered(metric)[1]) in ("perplexity", "weighted_perplexity") else "linear"


@lru_cache(maxsize=None)
def _registered(metric: str) -> tuple[bool | None, str | None]:
    """(higher_is_better, aggregation name) of a metric in lm-eval's metric registry; None where it has none."""
    if metric in ("acc", "acc_norm"):
        return True, "mean"  # without importing lm-eval's metrics
    try:
        import lm_eval.api.metrics  # noqa: F401  (fills lm-eval's metric registries)
        from lm_eval.api.registry import AGGREGATION_REGISTRY, HIGHER_IS_BETTER_REGISTRY, METRIC_AGGREGATION_REGISTRY
    except Exception:  # noqa: BLE001 - lm-eval's registry unreadable: the callers' defaults
        return None, None
    hib = HIGHER_IS_BETTER_REGISTRY.get(metric) if metric in HIGHER_IS_BETTER_REGISTRY else None
    fn = METRIC_AGGREGATION_REGISTRY.get(metric) if metric in METRIC_AGGREGATION_REGISTRY else None
    agg = next((name for name in AGGREGATION_REGISTRY if AGGREGATION_REGISTRY.get(name) is fn), None) if fn else None
    return hib, agg


def params_from_config(cfg: Any) -> dict | None:
    """Parameter counts of a supported MoE model from its HF config, exact (the model is built on the
    meta device; no weights read); None for a model type lm-eval-bh does not route.

    Returns {"dense_params", "per_k", "total_params"}: active params per token = dense + per_k * k.
    """
    from ...errors import RoutingError
    from ...families import config_param_split

    try:
        split = config_param_split(cfg)
    except RoutingError:
        return None
    return {
        "dense_params": float(split["dense_params"]),
        "per_k": float(split["params_per_expert"] * split["num_layers"]),
        "total_params": float(split["total_params"]),
    }


def read_model_config(pretrained: str):
    """The model's HF config from a local folder or the HF cache (never the network)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(pretrained, local_files_only=True)


def recorded_config(settings: dict):
    """The `RoutingConfig` a results file records, as it was run: not validated again (its calibration
    file, say, may live elsewhere now), only read for its label."""
    from ...config import RoutingConfig

    cfg = object.__new__(RoutingConfig)
    for name, field in RoutingConfig.__dataclass_fields__.items():
        object.__setattr__(cfg, name, settings.get(name, field.default))
    return cfg


def _setting_label(settings: dict, source: str = "olmoe_bh") -> tuple[str, str, int | None, float]:
    """(setting label, rule, fixed k or None, alpha) from config["routing"]["settings"]; the label
    names only the parameters that change the routing (`RoutingConfig.label`), plus the budget fields
    (`target_k`, `layer_k`, `layer_budget`) where the settings carry them. Top-k at a target K with
    allocation=uniform (K in every layer, a fractional K by a deterministic token split) is a fixed
    top-k: its k (None here) is the mean k it achieved, set by the caller."""
    cfg = recorded_config(settings)
    effective = dict(cfg.effective())
    label = LAYER_RULE if _per_layer(settings) else cfg.label()  # a k per layer: no one k, no rule, to name
    for name in BUDGET_FIELDS:
        value = settings.get(name)
        if value not in (None, "", []) and f"{name}=" not in label:
            text = os.path.basename(str(value)) if name == "layer_budget" else _budget_text(value)
            label += f" {name}={text}"
    if _per_layer(settings):
        alloc = f" alloc={cfg.allocation}" if cfg.target_k is not None and cfg.allocation != "uniform" else ""
        return f"{source} {label}{alloc}", LAYER_RULE, None, math.nan
    if "k" in effective and cfg.mode != "analyze":
        return f"{source} {label}", FIXED_RULE, int(effective["k"]), math.nan
    if cfg.budgeted and cfg.allocation == "uniform" and cfg.mode != "analyze":  # top-k at exactly K
        return f"{source} {label}", FIXED_RULE, None, math.nan
    rule = str(effective.get("selection", "topk")) + (f"/{effective['pvalue']}" if "pvalue" in effective else "")
    if cfg.mode == "analyze":
        # analyze mode routes with the stock top-k and only records what the rule would pick: its
        # accuracy and cost are the stock model's, so it is its own curve and never a reference
        rule = ANALYZE_PREFIX + rule
    return label, rule, None, _as_float(effective.get("alpha"))


def _budget_text(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(_short(float(v)) if isinstance(v, (int, float)) else str(v) for v in value)
    return _short(float(value)) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _per_layer(settings: dict) -> bool:
    """A fixed top-k with its own k per layer (`layer_k`, or `layer_budget` from another run's means); not
    an adaptive rule meeting per-layer means with a per-layer knob (`layer_k` with `layer_knob`, as
    `allocation=sensitivity` fits it)."""
    if settings.get("layer_knob") not in (None, "", []):
        return False
    return any(settings.get(n) not in (None, "", []) for n in ("layer_k", "layer_budget"))


def _block_problem(block) -> str | None:
    """Why a routing block cannot be reported (None when it can): unknown rule, bounds or no mean k."""
    from ...config import MODES, PVALUES, SELECTIONS

    st = block.settings
    for name, allowed in (("selection", SELECTIONS), ("pvalue", PVALUES), ("mode", MODES)):
        if st.get(name, "bh" if name == "selection" else "zscore" if name == "pvalue" else "patch") not in allowed:
            return f"routing block damaged: settings.{name}={st.get(name)!r} is not one of {', '.join(allowed)}"
    min_k, max_k = st.get("min_k", 1), st.get("max_k")
    if not _is_int(min_k) or min_k < 1 or (max_k is not None and (not _is_int(max_k) or max_k < min_k)):
        return f"routing block damaged: settings min_k={min_k!r}, max_k={max_k!r}"
    mean_k = _as_float(block.mean_experts_per_token)
    if not (math.isfinite(mean_k) and mean_k > 0):
        return f"routing block damaged: mean_experts_per_token={block.mean_experts_per_token!r}"
    if not (_is_int(block.model.top_k) and block.model.top_k > 0):
        return f"routing block damaged: model.top_k={block.model.top_k!r}"
    return None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def calibration_facts(block, identity: dict) -> tuple[str | None, bool | None]:
    """(sha256 of the calibration's content, whether its null is per expert), each None where unknown:
    from what the results file records (the routing block's calibration provenance, the settings, the
    sweep identity), else from the file at the recorded path if it is still there."""
    st = block.settings
    prov = block.calibration if block.calibration is not None else block.extra.get("calibration")
    prov = prov if isinstance(prov, dict) else {}
    sha = next((v for v in (prov.get("sha256"), prov.get("hash"), st.get("calibration_sha256"),
                            ((identity or {}).get("routing") or {}).get("calibration_sha256"))
                if isinstance(v, str) and v), None)
    per_expert = prov.get("per_expert") if isinstance(prov.get("per_expert"), bool) else None
    path = st.get("calibration")
    if isinstance(path, str) and os.path.isfile(path) and (sha is None or per_expert is None):
        from ...calibration import read_header

        if sha is None:
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            sha = h.hexdigest()
        if per_expert is None:
            try:
                per_expert = bool(read_header(path)["per_expert"])
            except Exception:  # noqa: BLE001 - unreadable now: unknown
                per_expert = None
    return sha, per_expert


def _with_calibration_hash(label: str, settings: dict, sha: str | None) -> str:
    """The label's ``cal=<name>`` word made unique: ``cal=<name>@<first 8 hex of its content hash>``, or
    the full recorded path where no hash is known (two files with one name never share a label)."""
    path = settings.get("calibration")
    if not isinstance(path, str) or not path:
        return label
    word = f"cal={os.path.basename(path)}"
    unique = f"{word}@{sha[:8]}" if sha else f"cal={path}"
    return label.replace(word, unique, 1) if word in label else f"{label} {unique}"


def reference_problem(block, per_expert: bool | None, model_renormalizes: bool | None) -> str | None:
    """None when a fixed-k run routes exactly like the stock router at that k (a valid top-k
    reference), else why not: a per-layer k, a per-expert null (it orders the experts otherwise), a
    null that cannot be read, or weights renormalized unlike the model's router."""
    from ...config import PVALUES

    st = block.settings
    if _per_layer(st):
        return "its k differs per layer"
    if not PVALUES[st.get("pvalue", "zscore")].monotone:
        if per_expert is None:
            return (f"pvalue={st.get('pvalue')} with a calibration that cannot be read now: whether its null "
                    "is per expert (then it selects other experts than the stock router) is unknown")
        if per_expert:
            return f"pvalue={st.get('pvalue')} with a per-expert null selects other experts than the stock router"
    renorm = st.get("renormalize")
    if isinstance(renorm, bool) and model_renormalizes is not None and renorm != model_renormalizes:
        return f"renormalize={renorm} unlike the model's router"
    return None


def _leaf_tasks(data: dict) -> list[str]:
    results = data.get("results") or {}
    groups = set((data.get("group_subtasks") or {}).keys()) | set((data.get("groups") or {}).keys())
    leaves = [t for t in results if t not in groups]
    return leaves or list(results)


def evaluation_key(data: dict, margs: dict, pretrained: str) -> dict:
    """What must agree for two files' numbers to be compared.

    What lm-eval records in every results file is compared as run, its defaults made explicit: no
    limit is "all", no chat template "none", the dtype is the one the model was loaded in (lm-eval's
    ``model_dtype``, else ``dtype=`` of model_args, else "unrecorded"): a field one file records
    differs from the other's default. The fields only a sweep records (``sweep.identity``: the model's
    fingerprint, task and tokenizer hashes, lm-eval-bh's version...) are None in a plain lm_eval run's
    key: None agrees with anything, but never joins two different groups (`assign_evaluations`)."""
    config = data.get("config") or {}
    identity = (data.get("sweep") or {}).get("identity")
    identity = identity if isinstance(identity, dict) else {}
    versions = identity.get("versions") if isinstance(identity.get("versions"), dict) else {}
    limit = _as_float(config.get("limit"))
    shots = sorted({str(v) for t, v in (data.get("n-shot") or {}).items() if t in _leaf_tasks(data)})
    dtype = config.get("model_dtype") or margs.get("dtype")
    template = data.get("chat_template_sha") or data.get("chat_template")
    system = data.get("system_instruction_sha") or data.get("system_instruction")
    key = {
        "model": pretrained,
        "limit": "all" if math.isnan(limit) else _short(limit),
        "num_fewshot": ",".join(shots) or "unrecorded",
        "dtype": str(dtype).removeprefix("torch.") if dtype not in (None, "", "auto") else "unrecorded",
        "chat_template": _short(_digest(template)) if template else "none",
        "system_instruction": _short(_digest(system)) if system else "none",
        "fewshot_as_multiturn": str(bool(data.get("fewshot_as_multiturn"))).lower(),
        "lm_eval": str(data.get("lm_eval_version") or versions.get("lm_eval") or "unrecorded"),
        "transformers": str(data.get("transformers_version") or versions.get("transformers") or "unrecorded"),
    }
    routing_args = set(_routing_fields()) | set(BUDGET_FIELDS)
    for name, value in _flat(identity).items():
        if name.startswith(("routing.", "tasks", "limit", "num_fewshot")) or name == "model.pretrained":
            continue
        if name.startswith("model.args.") and name[len("model.args."):] in routing_args | {"dtype"}:
            continue
        key[f"sweep:{name}"] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return key


def _digest(text) -> str:
    text = str(text)
    return text if len(text) == 64 else hashlib.sha256(text.encode()).hexdigest()


def _routing_fields() -> tuple[str, ...]:
    from ...config import RoutingConfig

    return tuple(RoutingConfig.__dataclass_fields__)


def _flat(d, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d} if prefix else {}


def load_results(files: Iterable[Path], config_reader=read_model_config) -> tuple["pd.DataFrame", list[tuple[str, str]]]:
    """Read lm-eval results files into a tidy frame (one row per file and task).

    Returns (frame, skipped) where skipped lists (file, reason) for files that could not be
    read (corrupt JSON, not an lm-eval results file, missing model config for an hf run...).
    Each row's ``evaluation`` names its group of comparable files (see `assign_evaluations`).
    """
    rows: list[dict] = []
    keys: list[dict] = []
    skipped: list[tuple[str, str]] = []
    config_cache: dict[str, Any] = {}

    def get_cfg(pretrained: str):
        if pretrained not in config_cache:
            try:
                config_cache[pretrained] = config_reader(pretrained)
            except Exception as e:  # noqa: BLE001 - any failure means "unreadable"
                config_cache[pretrained] = e
        return config_cache[pretrained]

    for f in files:
        try:
            with open(f, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError, UnicodeDecodeError) as e:
            skipped.append((str(f), f"unreadable ({type(e).__name__}: {str(e)[:80]})"))
            continue
        except RecursionError:
            skipped.append((str(f), "unreadable (JSON nested too deeply)"))
            continue
        try:
            new_rows, note, key = _rows_from_results(data, Path(f), get_cfg)
        except Exception as e:  # noqa: BLE001 - a malformed file must never stop the report
            skipped.append((str(f), f"malformed results ({type(e).__name__}: {str(e)[:80]})"))
            continue
        if note:
            skipped.append((str(f), note))
        for r in new_rows:
            r["_key"] = len(keys)
        if new_rows:
            keys.append(key)
        rows.extend(new_rows)
    labels = assign_evaluations(keys)
    for r in rows:
        r["evaluation"] = labels[r.pop("_key")]
    return pd.DataFrame(rows), skipped


def assign_evaluations(keys: list[dict]) -> list[str]:
    """A label per file key: files whose keys agree share one (a field a key lacks, or holds as None,
    agrees with anything, but must not join two different groups). The label names the fields, with
    their values, that tell the groups of one model apart ("" where the model has one group)."""
    groups: list[dict] = []
    member: list[int] = [0] * len(keys)
    fields = sorted({f for k in keys for f in k})
    order = sorted(range(len(keys)), key=lambda i: sum(keys[i].get(f) is None for f in fields))
    for i in order:
        k = keys[i]
        fits = [g for g, gk in enumerate(groups)
                if gk["model"] == k["model"] and all(k.get(f) is None or gk.get(f) is None or k.get(f) == gk.get(f)
                                                     for f in fields)]
        if len(fits) == 1:
            g = fits[0]
            groups[g].update({f: v for f, v in k.items() if v is not None})
        else:
            g = len(groups)
            groups.append(dict(k))
        member[i] = g
    names = []
    for g, gk in enumerate(groups):
        same_model = [o for o in groups if o["model"] == gk["model"]]
        if len(same_model) == 1:
            names.append("")
            continue
        differ = [f for f in fields if f != "model" and len({str(o.get(f)) for o in same_model}) > 1]
        names.append(" ".join(f"{f}={_short(gk.get(f)) if gk.get(f) is not None else 'unrecorded'}" for f in differ)
                     or f"#{g + 1}")
    return [names[g] for g in member]


def _short(v) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    s = str(v)
    return s[:10] if len(s) == 64 else s  # a sha256 fingerprint: its first digits


def _renormalizes(cfg) -> bool | None:
    """Whether the model's own router renormalizes its top-k weights; None if its config is unreadable."""
    from ...families import config_shape

    try:
        return config_shape(cfg)[2] if not isinstance(cfg, Exception) else None
    except Exception:  # noqa: BLE001 - not a routed family: unknown
        return None


def samples_source(file: Path, data: dict, task: str) -> tuple[Path, bool] | None:
    """Where the per-sample outputs of `task` are: a sweep's ``<id>.samples.jsonl`` (all tasks, one
    "task" field per line) or lm-eval's ``samples_<task>_<date>.jsonl`` next to ``results_<date>.json``."""
    if isinstance(data.get("sweep"), dict):
        path = file.with_name(file.stem + ".samples.jsonl")
        return (path, True) if path.is_file() else None
    if file.name.startswith("results_"):
        path = file.with_name(f"samples_{task}_{file.name[len('results_'):-len('.json')]}.jsonl")
        return (path, False) if path.is_file() else None
    return None


def _rows_from_results(data: Any, file: Path, get_cfg) -> tuple[list[dict], str | None, dict]:
    """(rows, a note on the file or None, its evaluation key); no rows (and the note says why) for a
    file that is not an lm-eval results file, or a routed run whose routing block is missing or damaged."""
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict) or not data["results"]:
        return [], "not an lm-eval results file (no 'results')", {}
    config = data.get("config") or {}
    margs = parse_model_args(config.get("model_args"))
    pretrained = str(margs.get("pretrained") or data.get("model_name") or config.get("model") or "?")
    source = str(config.get("model") or "?")
    raw = config.get("routing")
    if raw is None and source in ROUTED_MODELS:
        return [], f"a --model {source} run without its routing block (config.routing): its routing is unknown", {}
    if raw is not None and not isinstance(raw, dict):
        return [], f"routing block damaged: config.routing is a {type(raw).__name__}, not an object", {}
    try:
        block = routing_block(data)
    except (KeyError, TypeError, ValueError) as e:
        return [], f"routing block damaged ({type(e).__name__}: {str(e)[:80]})", {}
    date = _as_float(data.get("date"))
    limit = config.get("limit")
    note = None
    identity = (data.get("sweep") or {}).get("identity")

    per_task_k: dict = {}
    settings: dict = {}
    not_reference = None
    if block is not None:
        problem = _block_problem(block)
        if problem:
            return [], problem, {}
        settings = block.settings
        setting, rule, fixed_k, alpha = _setting_label(settings, source)
        sha, per_expert = (calibration_facts(block, identity if isinstance(identity, dict) else {})
                           if settings.get("calibration") else (None, None))
        setting = _with_calibration_hash(setting, settings, sha)
        if rule in (FIXED_RULE, LAYER_RULE):
            not_reference = reference_problem(block, per_expert, _renormalizes(get_cfg(pretrained)))
            if not_reference and rule == FIXED_RULE:
                rule = f"{FIXED_RULE} (not stock)"
        top_k = float(block.model.top_k)
        mean_k = _as_float(block.mean_experts_per_token)
        if rule.startswith(FIXED_RULE) and fixed_k is None:  # top-k at a target K: a reference at the k it achieved
            fixed_k = mean_k
        active = _as_float(block.active_params_per_token)
        dense = float(block.model.dense_params)
        per_k = float(block.model.params_per_expert * block.model.num_layers)
        if rule.startswith(ANALYZE_PREFIX):
            # the stock model ran: its cost is top_k experts per token, whatever the rule would pick
            setting += f" (routes stock top-{_short(top_k)}; the rule would use {mean_k:.3f})"
            mean_k = top_k
        else:
            per_task_k = block.per_task
        if math.isnan(active) or rule.startswith(ANALYZE_PREFIX):
            active = dense + per_k * mean_k
    else:
        cfg = get_cfg(pretrained)
        override = margs.get("num_experts_per_tok")
        if isinstance(cfg, Exception):
            cfg_top_k = math.nan
            dense = per_k = math.nan
            note = (f"model config for '{pretrained}' unreadable "
                    f"({type(cfg).__name__}); accuracy kept, cost unknown")
        else:
            cfg_top_k = _as_float(getattr(cfg, "num_experts_per_tok", None))
            p = params_from_config(cfg)
            dense, per_k = (p["dense_params"], p["per_k"]) if p else (math.nan, math.nan)
        k = _as_float(override) if override is not None else cfg_top_k
        fixed_k = None if math.isnan(k) else int(k)
        top_k = cfg_top_k
        mean_k = k
        active = dense + per_k * k
        alpha = math.nan
        rule = FIXED_RULE
        setting = f"{source} top-{fixed_k if fixed_k is not None else '?'}"

    rows = []
    for task in _leaf_tasks(data):
        res = data["results"][task]
        if not isinstance(res, dict):
            continue
        metric, filt, value, se = _primary_metric(res)
        if metric is None:
            continue
        t_k = mean_k
        pt = per_task_k.get(task)
        if pt is not None and not math.isnan(_as_float(pt.mean_experts_per_token)):
            t_k = _as_float(pt.mean_experts_per_token)
        t_active = active
        if not math.isnan(per_k) and not math.isnan(dense) and not math.isnan(t_k):
            t_active = dense + per_k * t_k
        rows.append({
            "model": pretrained, "setting": setting, "rule": rule, "fixed_k": fixed_k, "alpha": alpha,
            "task": task, "metric": metric, "higher_is_better": higher_is_better(data, task, metric),
            "scale": metric_scale(data, task, metric), "value": value, "stderr": se, "mean_k": t_k, "top_k": top_k,
            "expert_fraction": t_k / top_k if top_k and not math.isnan(top_k) else math.nan,
            "active_params": t_active, "n_tasks": 1, "limit": limit, "source": source, "file": str(file),
            "_date": date,
            "_tokens": _as_float(pt.tokens) if pt is not None else math.nan,
            "_dense": dense, "_per_k": per_k,
            "_filter": filt, "_samples": samples_source(file, data, task),
            "target_k": _as_float(settings.get("target_k")),
            "allocation": str(settings.get("allocation") or "uniform") if settings.get("target_k") is not None else "",
            "_not_reference": not_reference,
            "_per_layer": tuple(_as_float(x) for x in block.per_layer_mean) if block is not None else (),
            "_layer_budget": str(settings.get("layer_budget") or ""),
        })
    if not rows:
        return [], "no task with a numeric metric", {}
    return rows, note, evaluation_key(data, margs, pretrained)


def load_item_scores(source: tuple[Path, bool] | None, task: str, metric: str, filt: str) -> dict | None:
    """{doc_id: the metric's per-item value} from a per-sample file (None if there is none): a number,
    or for metrics lm-eval aggregates over the whole set (perplexities, bits per byte) the pair
    (log-likelihood, words or bytes) it records per document."""
    if source is None:
        return None
    path, has_task = source
    out = {}
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                s = json.loads(line)
                if (has_task and s.get("task") != task) or s.get("filter", "none") != filt or metric not in s:
                    continue
                v = s[metric]
                out[s["doc_id"]] = ((_as_float(v[0]), _as_float(v[1])) if isinstance(v, list) and len(v) == 2
                                    else _as_float(v))
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None
    return out or None



def dedupe(df: "pd.DataFrame") -> tuple["pd.DataFrame", list[str]]:
    """Keep the newest file per (model, evaluation, setting, task); returns the shadowed files too."""
    if df.empty:
        return df, []
    df = df.sort_values("_date", na_position="first", kind="stable")
    dup = df.duplicated(GROUP + ["setting", "task"], keep="last")
    shadowed = sorted(set(df.loc[dup, "file"]) - set(df.loc[~dup, "file"]))
    return df.loc[~dup].copy(), shadowed
