"""Loading and grouping: lm-eval results files -> one tidy frame, one row per (file, task).

Unreadable files are collected with a reason, never raised. Each row's ``evaluation`` names its group
of comparable files (`assign_evaluations`); `dedupe` keeps the newest file per setting and task.
Runs of ``--model olmoe_bh``/``moe_bh`` carry ``config["routing"]`` (read as
`results_schema.RoutingBlock`); plain ``--model hf`` runs do not: their expert count is the fixed
top-k from ``model_args`` (``num_experts_per_tok=K``) or from the model's config.json.
"""

from __future__ import annotations

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
ANALYZE_PREFIX = "analyze:"
# Two accuracies (costs) closer than half the last printed digit are a tie on the Pareto front.
ACC_TIE, COST_TIE = 5e-5, 5e-4

# Columns of the tidy per-(setting, task) frame, in display order.
COLUMNS = [
    "model", "evaluation", "setting", "rule", "fixed_k", "alpha", "task", "metric", "higher_is_better", "scale",
    "value", "stderr",
    "mean_k", "top_k", "expert_fraction", "active_params", "n_tasks", "limit", "source", "file",
]
REPORT_COLUMNS = COLUMNS + ["pareto", "topk_value_at_k", "delta_vs_topk", "delta_se", "delta_se_kind"]
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
    names only the parameters that change the routing (`RoutingConfig.label`)."""
    cfg = recorded_config(settings)
    effective = dict(cfg.effective())
    label = cfg.label()
    if "k" in effective and cfg.mode != "analyze":
        return f"{source} {label}", FIXED_RULE, int(effective["k"]), math.nan
    rule = str(effective.get("selection", "topk")) + (f"/{effective['pvalue']}" if "pvalue" in effective else "")
    if cfg.mode == "analyze":
        # analyze mode routes with the stock top-k and only records what the rule would pick: its
        # accuracy and cost are the stock model's, so it is its own curve and never a reference
        rule = ANALYZE_PREFIX + rule
    return label, rule, None, _as_float(effective.get("alpha"))


def _leaf_tasks(data: dict) -> list[str]:
    results = data.get("results") or {}
    groups = set((data.get("group_subtasks") or {}).keys()) | set((data.get("groups") or {}).keys())
    leaves = [t for t in results if t not in groups]
    return leaves or list(results)


def evaluation_key(data: dict, margs: dict, pretrained: str) -> dict:
    """What must agree for two files' numbers to be compared (None = not recorded, matches anything)."""
    identity = (data.get("sweep") or {}).get("identity") or {}
    model = identity.get("model") or {}
    versions = identity.get("versions") or {}
    limit = _as_float(data.get("config", {}).get("limit"))
    shots = sorted({str(v) for t, v in (data.get("n-shot") or {}).items() if t in _leaf_tasks(data)})
    sha = (data.get("config") or {}).get("model_sha")
    return {
        "model": pretrained,
        "fingerprint": model.get("fingerprint") or model.get("revision") or sha or None,
        "limit": None if math.isnan(limit) else limit,
        "num_fewshot": ",".join(shots) or None,
        "dtype": str(margs.get("dtype")) if margs.get("dtype") is not None else None,
        "lm_eval": data.get("lm_eval_version") or versions.get("lm_eval"),
        "transformers": data.get("transformers_version") or versions.get("transformers"),
        "lm_eval_bh": versions.get("lm_eval_bh"),
    }


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
    """A label per file key: files whose keys agree (a field not recorded agrees with anything, but
    must not join two different groups) share one. The label names the fields that tell the groups
    of one model apart ("" where the model has one group)."""
    groups: list[dict] = []
    member: list[int] = [0] * len(keys)
    order = sorted(range(len(keys)), key=lambda i: sum(v is None for v in keys[i].values()))
    for i in order:
        k = keys[i]
        fits = [g for g, gk in enumerate(groups)
                if gk["model"] == k["model"] and all(a is None or b is None or a == b
                                                     for f, a in k.items() for b in [gk.get(f)])]
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
        differ = [f for f in gk if f != "model" and len({str(o.get(f)) for o in same_model}) > 1]
        names.append(" ".join(f"{f}={_short(gk.get(f))}" for f in differ) or f"#{g + 1}")
    return [names[g] for g in member]


def _short(v) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    s = str(v)
    return s[:10] if len(s) == 64 else s  # a sha256 fingerprint: its first digits


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
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict) or not data["results"]:
        return [], "not an lm-eval results file (no 'results')", {}
    config = data.get("config") or {}
    margs = parse_model_args(config.get("model_args"))
    pretrained = str(margs.get("pretrained") or data.get("model_name") or config.get("model") or "?")
    block = routing_block(data)
    date = _as_float(data.get("date"))
    limit = config.get("limit")
    source = str(config.get("model") or "?")
    note = None

    per_task_k: dict = {}
    if block is not None:
        setting, rule, fixed_k, alpha = _setting_label(block.settings, source)
        top_k = float(block.model.top_k)
        mean_k = _as_float(block.mean_experts_per_token)
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
    except (OSError, ValueError, KeyError, TypeError):
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
