"""``lm-eval-bh report``: quality (accuracy, perplexity, ...) per unit of expert compute, from lm-eval results files.

Three small layers, each usable on its own:

* loading   -- :func:`find_result_files`, :func:`load_results` (files -> tidy DataFrame,
  one row per (file, task); unreadable files are collected, never raised);
* computing -- :func:`add_average`, :func:`mark_pareto`, :func:`add_matched_cost`,
  :func:`build_report` (pure pandas/numpy on that frame);
* rendering -- :func:`render` (md/csv/json) and :func:`make_plot` (matplotlib Figure).

Inputs are lm-eval's own results JSON (``--output_path`` of ``lm_eval run`` or of
``lm-eval-bh sweep``). Runs of ``--model olmoe_bh``/``moe_bh`` carry ``config["routing"]`` (read as
`results_schema.RoutingBlock`); plain
``--model hf`` runs do not: their expert count is the fixed top-k from ``model_args``
(``num_experts_per_tok=K``) or from the model's config.json.

What the report only admits when it can label it truthfully:

* files of different evaluations (model fingerprint, limit, few-shot, dtype, versions) are never
  mixed: each is its own group (column ``evaluation``), with its own averages, Pareto front and
  matched-cost reference;
* analyze-mode runs route with the stock top-k: they are labelled ``analyze:`` with the stock
  model's cost, and are never a top-k reference or on the Pareto front;
* a setting with an undefined (NaN) metric on a task has an undefined average, and is left out of
  the Pareto front and the matched-cost comparison.

Each task is judged by its primary metric in the direction lm-eval records for it
(``higher_is_better`` in the results file). Higher-is-better tasks (accuracies) are averaged per
setting; a lower-is-better task (a perplexity) is never averaged with them: it is its own summary,
with its own Pareto front (min metric for min cost) and matched-cost comparison.
"""

from __future__ import annotations

import json
import math
import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from ..errors import UsageError
from ..model_args import parse_model_args as _parse_model_args
from ..results_schema import routing_block

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


# --------------------------------------------------------------------------- loading

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
    from ..errors import RoutingError
    from ..families import config_param_split

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
    from ..config import RoutingConfig

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


# --------------------------------------------------------------------------- computing

def dedupe(df: "pd.DataFrame") -> tuple["pd.DataFrame", list[str]]:
    """Keep the newest file per (model, evaluation, setting, task); returns the shadowed files too."""
    if df.empty:
        return df, []
    df = df.sort_values("_date", na_position="first", kind="stable")
    dup = df.duplicated(GROUP + ["setting", "task"], keep="last")
    shadowed = sorted(set(df.loc[dup, "file"]) - set(df.loc[~dup, "file"]))
    return df.loc[~dup].copy(), shadowed


def add_average(df: "pd.DataFrame") -> "pd.DataFrame":
    """Append one AVERAGE row per setting: the mean over the higher-is-better tasks that every
    setting of its evaluation group has (so averages compare like with like; a perplexity is never
    averaged with accuracies). A NaN on any of those tasks makes the average NaN (the denominator
    never shrinks). Its stderr assumes independent tasks; its mean_k is token-weighted when per-task
    token counts exist."""
    if df.empty:
        return df
    out = [df]
    for _, g in df[df["higher_is_better"]].groupby(GROUP, sort=False):
        sets = [set(s["task"]) for _, s in g.groupby("setting", sort=False)]
        common = set.intersection(*sets) if sets else set()
        for setting, s in g.groupby("setting", sort=False):
            use = s[s["task"].isin(common)] if common else s
            n = len(use)
            w = use["_tokens"].to_numpy(dtype=float)
            ks = use["mean_k"].to_numpy(dtype=float)
            if n and np.all(np.isfinite(w)) and w.sum() > 0:
                mk = float(np.sum(w * ks) / w.sum())
            else:
                mk = float(np.nanmean(ks)) if np.any(np.isfinite(ks)) else math.nan
            first = use.iloc[0]
            se = use["stderr"].to_numpy(dtype=float)
            row = first.to_dict()
            dense, per_k = first["_dense"], first["_per_k"]
            row.update({
                "task": AVERAGE,
                "metric": "/".join(sorted(set(use["metric"]))),
                "value": float(np.mean(use["value"].to_numpy(dtype=float))),  # NaN if any task is NaN
                "stderr": float(np.sqrt(np.sum(se ** 2)) / n) if np.all(np.isfinite(se)) else math.nan,
                "mean_k": mk,
                "expert_fraction": mk / first["top_k"] if first["top_k"] and np.isfinite(first["top_k"]) else math.nan,
                "active_params": dense + per_k * mk if np.isfinite(dense) and np.isfinite(per_k) else first["active_params"],
                "n_tasks": n,
                "file": ";".join(sorted(set(use["file"]))),
                "_tasks": tuple(sorted(use["task"])),
                "_samples": None,
            })
            out.append(pd.DataFrame([row]))
    return pd.concat(out, ignore_index=True)


def undefined_settings(rep: "pd.DataFrame") -> list[str]:
    """'setting (task, ...)' for each setting with a task whose metric is NaN (no average, Pareto mark or Δ)."""
    out = []
    for (_, _, setting), g in rep.groupby(GROUP + ["setting"], sort=False):
        bad = g[(g["task"] != AVERAGE) & g["value"].isna()]
        if len(bad):
            out.append(f"{setting} ({', '.join(bad['task'])})")
    return out


def pareto_mask(acc, cost, acc_tol: float = ACC_TIE, cost_tol: float = COST_TIE, higher_is_better: bool = True) -> list[bool]:
    """True where no other point has a quality as good (acc >= or, for a lower-is-better metric, <=)
    and cost <= with one of them better by more than the tolerance (NaNs never on it). Points tied
    within the tolerances are starred once: the first."""
    pts = list(zip(acc if higher_is_better else [-a for a in acc], cost))
    ok = [math.isfinite(a) and math.isfinite(c) for a, c in pts]
    mask = []
    for i, (a, c) in enumerate(pts):
        if not ok[i]:
            mask.append(False)
            continue
        dominated = False
        for j, (a2, c2) in enumerate(pts):
            if j == i or not ok[j] or a2 < a - acc_tol or c2 > c + cost_tol:
                continue
            tie = abs(a2 - a) <= acc_tol and abs(c2 - c) <= cost_tol
            if not tie or j < i:  # strictly better beyond a tolerance, or an earlier tie
                dominated = True
                break
        mask.append(not dominated)
    return mask


def is_summary(df: "pd.DataFrame") -> "pd.Series":
    """The rows that summarise a setting: the task average, and each lower-is-better task on its own."""
    return (df["task"] == AVERAGE) | ~df["higher_is_better"].astype(bool)


def mark_pareto(df: "pd.DataFrame") -> "pd.DataFrame":
    """Column 'pareto': per group, on the best-quality / min-mean-k frontier of each summary (the task
    average: max accuracy; a lower-is-better task: min metric); fixed top-k first among ties, analyze
    runs and undefined values never on it."""
    df = df.copy()
    df["pareto"] = False
    cand = is_summary(df) & ~df["rule"].str.startswith(ANALYZE_PREFIX) & df["value"].notna()
    for _, g in df[cand].groupby(GROUP + ["task"], sort=False):
        g = g.assign(_adaptive=g["rule"] != FIXED_RULE).sort_values(["_adaptive", "mean_k", "setting"], kind="stable")
        df.loc[g.index, "pareto"] = pareto_mask(g["value"].tolist(), g["mean_k"].tolist(),
                                                higher_is_better=bool(g["higher_is_better"].iloc[0]))
    return df


def interpolation_weights(ks, at: float) -> list[tuple[float, float]]:
    """[(k, weight)] of the fixed-k points (distinct ks) whose linear interpolation gives mean k
    `at`; [] outside their range (no extrapolation)."""
    xs = sorted({float(k) for k in ks if math.isfinite(k)})
    if not xs or not math.isfinite(at) or at < xs[0] - 1e-9 or at > xs[-1] + 1e-9:
        return []
    hi = next(i for i, x in enumerate(xs) if x >= at - 1e-9)
    if abs(xs[hi] - at) <= 1e-9 or hi == 0:
        return [(xs[hi], 1.0)]
    lo = hi - 1
    w = (at - xs[lo]) / (xs[hi] - xs[lo])
    return [(xs[lo], 1.0 - w), (xs[hi], w)]


def interpolate_fixed(ks, accs, at: float, scale: str = "linear") -> float:
    """Stock top-k value at mean k = ``at``: linear between the fixed-k points present (in the
    logarithm for ``scale="log"``: perplexities; several points at one k are averaged there); NaN
    outside their range (no extrapolation)."""
    to, back = (math.log, math.exp) if scale == "log" else (float, float)
    pts: dict[float, list[float]] = {}
    for k, a in zip(ks, accs):
        if math.isfinite(k) and math.isfinite(a) and (scale != "log" or a > 0):
            pts.setdefault(float(k), []).append(to(float(a)))
    ws = interpolation_weights(list(pts), at)
    return back(float(sum(w * np.mean(pts[k]) for k, w in ws))) if ws else math.nan


def _paired_task(row, task: str, refs: dict, weights) -> tuple[float, float, int] | None:
    """(Δ, variance of Δ, n) of `row` on `task` against the interpolated fixed top-k on the same items,
    or None without matching per-sample outputs.

    Per-item scores (accuracies): Δ is the mean per-item difference, its variance that of a mean.
    Per-document (log-likelihood, words or bytes) pairs (perplexities, bits per byte): the metric is
    f(L) with L = sum(s_d) / sum(n_d), s_d a document's negative log-likelihood and n_d its words (or
    bytes); f = exp for a perplexity, else f(L) = c L (bits per byte). The reference is interpolated in
    L (what mixing two k's over the tokens gives): L_ref = sum(r_d) / sum(n_d), r_d the weighted
    top-k s_d. Δ = f(L) - f(L_ref) is linearised over documents (the delta method for ratios of sums):
    its variance is n / (n - 1) * sum(z_d^2) / sum(n_d)^2 with
    z_d = f'(L) (s_d - L n_d) - f'(L_ref) (r_d - L_ref n_d)."""
    def load(r):  # a log-scale metric with one log-likelihood per item (lm-eval's `perplexity`): n_d = 1
        scores = load_item_scores(r["_samples"], task, r["metric"], r["_filter"])
        if scores and row["scale"] == "log":
            scores = {i: v if isinstance(v, tuple) else (v, 1.0) for i, v in scores.items()}
        return scores

    mine = load(row)
    if mine is None:
        return None
    ids = sorted(mine)
    pairs = all(isinstance(mine[i], tuple) for i in ids)
    if not pairs and any(isinstance(mine[i], tuple) for i in ids):
        return None
    ref = np.zeros(len(ids))
    sizes = np.array([mine[i][1] for i in ids]) if pairs else None
    for k, w in weights:
        rows = refs.get(k, [])
        runs = [s for s in (load(r) for r in rows) if s]
        if not runs or any(sorted(s) != ids for s in runs):
            return None
        if len(runs) < len(rows) and len({float(r["value"]) for r in rows}) > 1:
            return None  # a run at this k without per-sample outputs scored differently: no pairing
        if pairs:
            if any(not isinstance(s[i], tuple) or s[i][1] != mine[i][1] for s in runs for i in ids):
                return None  # other documents (words, bytes) than the row's
            ref += w * np.mean([[s[i][0] for i in ids] for s in runs], axis=0)
        else:
            ref += w * np.mean([[s[i] for i in ids] for s in runs], axis=0)
    n = len(ids)
    if not pairs:
        d = np.array([mine[i] for i in ids]) - ref
        if not np.all(np.isfinite(d)):
            return None
        return float(d.mean()), (float(np.var(d, ddof=1)) / n if n > 1 else math.nan), n
    s_d, r_d = -np.array([mine[i][0] for i in ids]), -ref  # negative log-likelihoods, per document
    total = float(sizes.sum())
    if not (np.all(np.isfinite(s_d)) and np.all(np.isfinite(r_d)) and np.all(np.isfinite(sizes)) and total > 0):
        return None
    big_l, l_ref = float(s_d.sum()) / total, float(r_d.sum()) / total
    value = float(row["value"])
    if row["scale"] == "log":
        if not math.isclose(math.exp(big_l), value, rel_tol=1e-6):
            return None  # the per-sample file does not give the row's value: not the same run
        slope, slope_ref, delta = value, math.exp(l_ref), value - math.exp(l_ref)
    else:
        slope = slope_ref = value / big_l if big_l else math.nan  # f(L) = c L (bits per byte: c = 1 / ln 2)
        delta = slope * (big_l - l_ref)
    z = slope * (s_d - big_l * sizes) - slope_ref * (r_d - l_ref * sizes)
    var = n / (n - 1) * float(np.sum(z ** 2)) / total ** 2 if n > 1 else math.nan
    return delta, var, n


def add_matched_cost(df: "pd.DataFrame") -> "pd.DataFrame":
    """For adaptive settings: 'topk_value_at_k' (stock top-k of the same group and task interpolated
    at the same mean k; in the logarithm for perplexities), 'delta_vs_topk' (the value minus it: for
    a lower-is-better metric, negative is better) and its standard error 'delta_se'.

    The SE is paired ('delta_se_kind' = "paired") where per-sample outputs of the same items exist
    for the setting and its fixed-k references (see `_paired_task`; for the task average: the
    per-task SEs combined as independent tasks). Otherwise it is the unpaired SE from the tasks' own
    SEs ("unpaired"), NaN where lm-eval gives none (perplexities: then Δ stands without an SE)."""
    df = df.copy()
    for c in ("topk_value_at_k", "delta_vs_topk", "delta_se"):
        df[c] = math.nan
    df["delta_se_kind"] = ""
    for _, g in df.groupby(GROUP + ["task"], sort=False):
        fixed = g[(g["rule"] == FIXED_RULE) & g["value"].notna()]
        if fixed.empty:
            continue
        adaptive = (g["rule"] != FIXED_RULE) & ~g["rule"].str.startswith(ANALYZE_PREFIX) & g["value"].notna()
        for idx, row in g[adaptive].iterrows():
            weights = interpolation_weights(fixed["fixed_k"].astype(float).tolist(), float(row["mean_k"]))
            if not weights:
                continue
            at_k = {k: fixed[fixed["fixed_k"].astype(float) == k] for k, _ in weights}
            ref = interpolate_fixed(fixed["fixed_k"].astype(float).tolist(), fixed["value"].tolist(),
                                    float(row["mean_k"]), row["scale"])
            df.at[idx, "topk_value_at_k"] = ref
            df.at[idx, "delta_vs_topk"] = row["value"] - ref
            se, kind = _delta_se(df, row, weights, at_k, ref)
            df.at[idx, "delta_se"] = se
            df.at[idx, "delta_se_kind"] = kind
    return df


def _delta_se(df, row, weights, at_k, ref: float) -> tuple[float, str]:
    tasks = row["_tasks"] if row["task"] == AVERAGE else (row["task"],)
    per_task = df[(df["model"] == row["model"]) & (df["evaluation"] == row["evaluation"]) & (df["task"] != AVERAGE)]
    paired = []
    for t in tasks:
        mine = per_task[(per_task["setting"] == row["setting"]) & (per_task["task"] == t)]
        refs = {k: [r for _, r in per_task[(per_task["rule"] == FIXED_RULE) & (per_task["task"] == t)
                                            & (per_task["fixed_k"].astype(float) == k)].iterrows()]
                for k, _ in weights}
        res = _paired_task(mine.iloc[0], t, refs, weights) if len(mine) == 1 else None
        if res is None:
            paired = None
            break
        paired.append(res)
    if paired:
        return math.sqrt(sum(v for _, v, _ in paired)) / len(paired), "paired"
    # the reference's SE from its points' (a log-interpolated reference scales each by ref / value)
    scale = {k: ref / at_k[k]["value"].mean() if row["scale"] == "log" else 1.0 for k, _ in weights}
    var = row["stderr"] ** 2 + sum((w * scale[k] * at_k[k]["stderr"].mean()) ** 2 for k, w in weights)
    return (math.sqrt(var) if math.isfinite(var) else math.nan), "unpaired"


def build_report(df: "pd.DataFrame") -> "pd.DataFrame":
    """Tidy frame -> report frame: with averages, Pareto marks and matched-cost columns."""
    if df.empty:
        return pd.DataFrame(columns=REPORT_COLUMNS)
    if "evaluation" not in df.columns:
        df = df.assign(evaluation="")
    df = add_average(df)
    df = mark_pareto(df)
    df = add_matched_cost(df)
    df["_fixed_first"] = (df["rule"] != FIXED_RULE).astype(int)
    df = df.sort_values(["model", "evaluation", "task", "_fixed_first", "rule", "mean_k", "setting"], kind="stable")
    df = df[[c for c in REPORT_COLUMNS if c in df.columns]]
    return df.reset_index(drop=True)


# --------------------------------------------------------------------------- rendering

def _fmt(x, nd=4):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return ""
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _fmt_params(x) -> str:
    if x is None or not math.isfinite(x):
        return ""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.0f}"


def _short_model(m: str) -> str:
    return Path(m).name if os.sep in m or "/" in m else m


def _fmt_delta(r) -> str:
    if not math.isfinite(r["delta_vs_topk"]):
        return ""
    se = f" ± {r['delta_se']:.4f}" if math.isfinite(r["delta_se"]) else ""
    return f"{r['delta_vs_topk']:+.4f}{se}" + (" (unpaired)" if se and r["delta_se_kind"] == "unpaired" else "")


def _group_columns(frame: "pd.DataFrame", r) -> dict:
    row = {}
    if frame["model"].nunique() > 1:
        row["model"] = _short_model(r["model"])
    if (frame["evaluation"] != "").any():
        row["evaluation"] = r["evaluation"]
    return row


def summary_tasks(rep: "pd.DataFrame") -> list[str]:
    """The summaries, in display order: the task average (if any task is higher-is-better), then
    each lower-is-better task."""
    summary = rep[is_summary(rep)]
    tasks = sorted(set(summary["task"]) - {AVERAGE})
    return ([AVERAGE] if (summary["task"] == AVERAGE).any() else []) + tasks


def _metric_of(rep: "pd.DataFrame", task: str) -> str:
    return "acc" if task == AVERAGE else "/".join(sorted(set(rep.loc[rep["task"] == task, "metric"])))


def summary_table(rep: "pd.DataFrame", task: str = AVERAGE) -> "pd.DataFrame":
    """One row per setting for one summary (the task average, or a lower-is-better task), human-formatted."""
    avg = rep[rep["task"] == task]
    m = _metric_of(rep, task)
    rows = []
    for _, r in avg.iterrows():
        row = _group_columns(avg, r)
        row.update({"setting": r["setting"], "rule": r["rule"]})
        if task == AVERAGE:
            row["tasks"] = int(r["n_tasks"])
        row.update({
            f"{m} ± se": f"{_fmt(r['value'])} ± {_fmt(r['stderr'])}" if math.isfinite(r["stderr"]) else _fmt(r["value"]) or "NaN",
            "mean k": _fmt(r["mean_k"], 3),
            "k / top-k": _fmt(r["expert_fraction"], 3),
            "active params": _fmt_params(r["active_params"]),
            f"top-k {m} @ same k": _fmt(r["topk_value_at_k"]),
            "Δ vs top-k ± se": _fmt_delta(r),
        })
        if task != AVERAGE:
            rel = r["value"] / r["topk_value_at_k"] - 1 if r["topk_value_at_k"] else math.nan
            row["Δ / top-k"] = f"{rel:+.1%}" if math.isfinite(rel) else ""
        row["pareto"] = "*" if r["pareto"] else ""
        rows.append(row)
    return pd.DataFrame(rows)


def per_task_table(rep: "pd.DataFrame") -> "pd.DataFrame":
    t = rep[rep["task"] != AVERAGE]
    rows = []
    for _, r in t.iterrows():
        row = _group_columns(t, r)
        row.update({
            "task": r["task"], "setting": r["setting"], "metric": r["metric"] + ("" if r["higher_is_better"] else " ↓"),
            "value": _fmt(r["value"]) or "NaN", "stderr": _fmt(r["stderr"]), "mean k": _fmt(r["mean_k"], 3),
            "Δ vs top-k ± se": _fmt_delta(r),
        })
        rows.append(row)
    return pd.DataFrame(rows)


def _to_markdown(frame: "pd.DataFrame") -> str:
    return frame.to_markdown(index=False, disable_numparse=True)


def _se_note(rows: "pd.DataFrame") -> str:
    rows = rows[rows["delta_vs_topk"].notna()]
    notes = []
    if (rows["delta_se_kind"] == "paired").any():
        notes.append("se: paired, from the per-item differences on the same items" if rows["higher_is_better"].all()
                     else "se: paired, from the per-document log-likelihood differences on the same documents "
                          "(a ratio of sums, linearised over documents)")
    unpaired = rows[rows["delta_se_kind"] == "unpaired"]
    if unpaired["delta_se"].notna().any():
        notes.append("se: unpaired (no per-sample outputs for this row or its top-k references)")
    if len(unpaired) and unpaired["delta_se"].isna().any():
        notes.append("no se where lm-eval records none and there are no per-sample outputs")
    return "; ".join(notes)


def render(rep: "pd.DataFrame", fmt: str = "md") -> str:
    if fmt == "csv":
        return rep.to_csv(index=False)
    if fmt == "json":
        return rep.to_json(orient="records", indent=2)
    if rep.empty:
        return "(no results)\n"
    parts = []
    for task in summary_tasks(rep):
        rows = rep[rep["task"] == task]
        note = _se_note(rows)
        if task == AVERAGE:
            parts += ["## Task average per setting (Pareto: * = max accuracy for min mean experts per token)\n",
                      "Δ vs top-k: accuracy minus the stock top-k accuracy interpolated at the same mean k"
                      + (f"; {note}" if note else "") + ".\n" if rows["delta_vs_topk"].notna().any() else None]
        else:
            m = _metric_of(rep, task)
            log = (rows["scale"] == "log").all()
            parts += [f"## {task}: {m} per setting (lower is better; Pareto: * = min {m} for min mean experts "
                      "per token)\n",
                      f"Δ vs top-k: {m} minus the stock top-k {m} interpolated at the same mean k"
                      + (f" (in log {m}: what mixing two k's over the tokens gives)" if log else "")
                      + "; negative is better" + (f"; {note}" if note else "") + ".\n"
                      if rows["delta_vs_topk"].notna().any() else None]
        parts += [_to_markdown(summary_table(rep, task)), ""]
    lower = "" if rep["higher_is_better"].astype(bool).all() else "; ↓: lower is better"
    parts += [f"## Per task (primary metric: acc_norm, else acc, else the task's first metric{lower})\n",
              _to_markdown(per_task_table(rep)), ""]
    return "\n".join(p for p in parts if p is not None)


def _point_label(r) -> str:
    if r["rule"] == FIXED_RULE:
        return f"k={_short(r['mean_k'])}" if math.isfinite(r["mean_k"]) else ""
    if math.isfinite(_as_float(r.get("alpha"))):
        return f"α={r['alpha']:g}"
    return r["setting"].split(" ")[1] if " " in r["setting"] else r["setting"]


def make_plot(rep: "pd.DataFrame"):
    """Quality vs mean experts per token, one panel per summary (the task average's accuracy, then
    each lower-is-better task, on a log axis for perplexities), one curve per rule (fixed top-k:
    dashed reference), each point labelled with its alpha (top_p, or k); the legend sits outside the
    axes. Returns the matplotlib Figure (not saved)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    tasks = summary_tasks(rep) or [AVERAGE]
    fig = Figure(figsize=(8.5, 4.5 * len(tasks)))
    for i, task in enumerate(tasks):
        _plot_panel(fig.add_subplot(len(tasks), 1, i + 1), rep, task)
    fig.subplots_adjust(hspace=0.35)
    return fig


def _plot_panel(ax, rep: "pd.DataFrame", task: str) -> None:
    d = rep[rep["task"] == task]
    multi = d.groupby(GROUP).ngroups > 1
    for (model, evaluation, rule), g in d.groupby(GROUP + ["rule"], sort=True):
        g = g[g["mean_k"].notna() & g["value"].notna()]
        if g.empty:
            continue
        if rule == FIXED_RULE:
            # several fixed runs at one k (hf and olmoe_bh) collapse into one point
            g = g.groupby("mean_k", as_index=False).agg(value=("value", "mean"), stderr=("stderr", "mean"),
                                                       rule=("rule", "first"), setting=("setting", "first"))
        g = g.sort_values("mean_k")
        name = " ".join(x for x in (_short_model(model), evaluation) if x)
        label = f"{name}: {rule}" if multi else rule
        yerr = g["stderr"].fillna(0).to_numpy()
        style = dict(linestyle="--", color="black", marker="s") if rule == FIXED_RULE else dict(marker="o")
        ax.errorbar(g["mean_k"], g["value"], yerr=yerr, capsize=3, label=label, **style)
        for _, r in g.iterrows():
            ax.annotate(_point_label(r), (r["mean_k"], r["value"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
    ax.set_xlabel("mean experts per token")
    if task == AVERAGE:
        ax.set_ylabel("accuracy (task average)")
        ax.set_title("Accuracy vs expert compute")
    else:
        m = _metric_of(rep, task)
        if (d["scale"] == "log").all() and (d["value"].dropna() > 0).all():
            ax.set_yscale("log")
        ax.set_ylabel(f"{m} (lower is better)")
        ax.set_title(f"{task}: {m} vs expert compute")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[1]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8)


# --------------------------------------------------------------------------- CLI

def add_arguments(parser) -> None:
    parser.add_argument("paths", nargs="+", metavar="RESULTS_DIR_OR_FILE",
                        help="lm-eval results files or folders (searched recursively for *.json)")
    parser.add_argument("--format", default="md", choices=("md", "csv", "json"), help="md (default), csv or json")
    parser.add_argument("--output", default=None, metavar="FILE", help="write here instead of stdout")
    parser.add_argument("--plot", default=None, metavar="FILE.png",
                        help="accuracy (and each lower-is-better metric) vs mean experts per token, one curve per rule")


def _check_writable(flag: str, path) -> Path:
    """One line naming the path if it cannot be a file we write (checked before any work)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag}: {path} is a folder; give a file name")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"{flag}: cannot write {path}: permission denied or not a folder")
    return path


def _write(flag: str, path: Path, write) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
    except OSError as e:
        raise UsageError(f"{flag}: cannot write {path}: {e.strerror or e}") from None


def report(paths, fmt="md", output=None, plot=None, err=None) -> tuple[str, "pd.DataFrame"]:
    """Library entry: files -> rendered text (also written to ``output``/``plot`` if given; each file
    written is named on `err`)."""
    err = err or sys.stderr
    output = _check_writable("--output", output) if output else None
    plot = _check_writable("--plot", plot) if plot else None
    files, missing = find_result_files(paths)
    df, skipped = load_results(files)
    for name, why in missing + skipped:
        print(f"lm-eval-bh report: skipped {name}: {why}", file=err)
    if not df.empty and (df["evaluation"] != "").any():
        for model, g in df.groupby("model"):
            if g["evaluation"].nunique() > 1:
                print(f"lm-eval-bh report: {_short_model(model)}: files of {g['evaluation'].nunique()} different "
                      f"evaluations ({'; '.join(sorted(g['evaluation'].unique()))}); each is reported on its own "
                      "(column 'evaluation'), never mixed", file=err)
    df, shadowed = dedupe(df)
    if shadowed:
        print(f"lm-eval-bh report: {len(shadowed)} older file(s) with the same setting ignored "
              f"(newest kept): {', '.join(shadowed)}", file=err)
    rep = build_report(df)
    undefined = undefined_settings(rep) if not rep.empty else []
    if undefined:
        print("lm-eval-bh report: undefined metric (NaN), so no average, Pareto mark or Δ for: "
              + "; ".join(undefined), file=err)
    text = render(rep, fmt)
    if output:
        _write("--output", output, lambda p: p.write_text(text, encoding="utf-8"))
        print(f"lm-eval-bh report: wrote {output}", file=err)
    if plot:
        fig = make_plot(rep)
        _write("--plot", plot, lambda p: fig.savefig(p, dpi=120, bbox_inches="tight"))
        print(f"lm-eval-bh report: wrote {plot}", file=err)
    return text, rep


def run(args) -> int:
    if args.format not in ("md", "csv", "json"):
        raise UsageError(f"--format: '{args.format}' is not allowed; use md, csv or json")
    if args.plot and not str(args.plot).lower().endswith(".png"):
        raise UsageError(f"--plot: '{args.plot}' must be a .png file name")
    text, rep = report(args.paths, args.format, args.output, args.plot)
    if not args.output:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    if rep.empty:
        print("lm-eval-bh report: no readable results found", file=sys.stderr)
        return 1
    return 0
