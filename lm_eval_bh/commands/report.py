"""``lm-eval-bh report``: accuracy per unit of expert compute, from lm-eval results files.

Three small layers, each usable on its own:

* loading   -- :func:`find_result_files`, :func:`load_results` (files -> tidy DataFrame,
  one row per (file, task); unreadable files are collected, never raised);
* computing -- :func:`add_average`, :func:`mark_pareto`, :func:`add_matched_cost`,
  :func:`build_report` (pure pandas/numpy on that frame);
* rendering -- :func:`render` (md/csv/json) and :func:`make_plot` (matplotlib Figure).

Inputs are lm-eval's own results JSON (``--output_path`` of ``lm_eval run`` or of
``lm-eval-bh sweep``). Runs of ``--model olmoe_bh`` carry ``config["routing"]``; plain
``--model hf`` runs do not: their expert count is the fixed top-k from ``model_args``
(``num_experts_per_tok=K``) or from the model's config.json.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from ..errors import UsageError
from ..model_args import parse_model_args as _parse_model_args

AVERAGE = "(average)"
FIXED_RULE = "top-k"
ANALYZE_PREFIX = "analyze:"

# Columns of the tidy per-(setting, task) frame, in display order.
COLUMNS = [
    "model", "setting", "rule", "fixed_k", "alpha", "task", "metric", "acc", "stderr",
    "mean_k", "top_k", "expert_fraction", "active_params", "n_tasks", "limit", "source", "file",
]


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
    # de-duplicate while keeping order
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
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v


def parse_model_args(model_args: Any) -> dict:
    """model_args as lm-eval stores it: a dict (CLI) or a 'k=v,k2=v2' string (Python API); {} if unreadable."""
    try:
        return _parse_model_args(model_args if isinstance(model_args, (str, dict)) else None)
    except UsageError:
        return {}


def primary_metric(task_result: dict) -> tuple[str | None, float, float]:
    """(metric name, value, stderr): acc_norm if present, else acc, else the first metric."""
    metrics: dict[str, tuple[float, float]] = {}
    order: list[str] = []
    for key, val in task_result.items():
        if key == "alias" or "," not in key:
            continue
        name, filt = key.split(",", 1)
        if name.endswith("_stderr"):
            continue
        if isinstance(val, (list, dict)) or isinstance(val, bool):
            continue
        v = _as_float(val)
        if math.isnan(v) and not isinstance(val, (int, float)):
            continue
        se = _as_float(task_result.get(f"{name}_stderr,{filt}"))
        if name not in metrics:
            metrics[name] = (v, se)
            order.append(name)
    for name in ("acc_norm", "acc"):
        if name in metrics:
            return (name, *metrics[name])
    if order:
        return (order[0], *metrics[order[0]])
    return (None, math.nan, math.nan)


def params_from_config(cfg: Any) -> dict | None:
    """Parameter counts of an OLMoE-style MoE from its HF config (estimate; no weights read).

    Returns {"dense_params", "per_k", "total_params"}: active params per token = dense + per_k * k.
    """
    try:
        h = int(cfg.hidden_size)
        inter = int(getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size)
        n_layers = int(cfg.num_hidden_layers)
        n_exp = int(getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts"))
        heads = int(cfg.num_attention_heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        vocab = int(cfg.vocab_size)
    except (AttributeError, TypeError, ValueError):
        return None
    head_dim = int(getattr(cfg, "head_dim", None) or h // heads)
    q = heads * head_dim
    kv = kv_heads * head_dim
    attn = h * q + 2 * h * kv + q * h + q + kv  # q,k,v,o + q/k norms
    per_layer_dense = attn + 2 * h + h * n_exp  # two layer norms + router
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    dense = n_layers * per_layer_dense + vocab * h * (1 if tied else 2) + h
    per_expert = 3 * h * inter
    return {
        "dense_params": float(dense),
        "per_k": float(n_layers * per_expert),
        "total_params": float(dense + n_layers * n_exp * per_expert),
    }


def read_model_config(pretrained: str):
    """The model's HF config from a local folder or the HF cache (never the network)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(pretrained, local_files_only=True)


def _setting_label(settings: dict) -> tuple[str, str, int | None, float]:
    """(setting label, rule, fixed k or None, alpha) from config["routing"]["settings"]."""
    sel = str(settings.get("selection", "bh"))
    pv = str(settings.get("pvalue", "zscore"))
    min_k = settings.get("min_k")
    max_k = settings.get("max_k")
    alpha = _as_float(settings.get("alpha"))
    fixed = None
    if sel == "topk":
        fixed = settings.get("k") or max_k
    elif min_k is not None and max_k is not None and int(min_k) == int(max_k):
        fixed = min_k
    if fixed is not None:
        fixed = int(fixed)
        return f"olmoe_bh top-{fixed}", FIXED_RULE, fixed, math.nan
    from ..routing import SELECTIONS

    spec = SELECTIONS.get(sel)
    # top-p reads the softmax mass, not the p-values
    rule = sel if spec is not None and not spec.uses_pvalues else f"{sel}/{pv}"
    if settings.get("mode") == "analyze":
        # analyze mode routes with the stock top-k and only records what the rule would pick:
        # its accuracy is top-k's, so it is its own curve and never a matched-cost point
        rule = ANALYZE_PREFIX + rule
    parts = [rule]
    parts += [f"{name}={settings.get(name)}" for name in (spec.params if spec is not None else ("alpha",))]
    parts.append(f"k={min_k}..{max_k}")
    temp = settings.get("temperature")
    if temp is not None and _as_float(temp) != 1.0:
        parts.append(f"T={temp}")
    if settings.get("renormalize"):
        parts.append("renorm")
    if settings.get("calibration"):
        parts.append(f"cal={Path(str(settings['calibration'])).name}")
    return " ".join(parts), rule, None, alpha


def _leaf_tasks(data: dict) -> list[str]:
    results = data.get("results") or {}
    groups = set((data.get("group_subtasks") or {}).keys()) | set((data.get("groups") or {}).keys())
    leaves = [t for t in results if t not in groups]
    return leaves or list(results)


def load_results(files: Iterable[Path], config_reader=read_model_config) -> tuple["pd.DataFrame", list[tuple[str, str]]]:
    """Read lm-eval results files into a tidy frame (one row per file and task).

    Returns (frame, skipped) where skipped lists (file, reason) for files that could not be
    read (corrupt JSON, not an lm-eval results file, missing model config for an hf run...).
    """

    rows: list[dict] = []
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
            new_rows, note = _rows_from_results(data, str(f), get_cfg)
        except Exception as e:  # noqa: BLE001 - a malformed file must never stop the report
            skipped.append((str(f), f"malformed results ({type(e).__name__}: {str(e)[:80]})"))
            continue
        if note:
            skipped.append((str(f), note))
        rows.extend(new_rows)
    frame = pd.DataFrame(rows)
    return frame, skipped


def _rows_from_results(data: Any, fname: str, get_cfg) -> tuple[list[dict], str | None]:
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict) or not data["results"]:
        return [], "not an lm-eval results file (no 'results')"
    config = data.get("config") or {}
    margs = parse_model_args(config.get("model_args"))
    pretrained = str(margs.get("pretrained") or data.get("model_name") or config.get("model") or "?")
    routing = config.get("routing")
    date = _as_float(data.get("date"))
    limit = config.get("limit")
    note = None

    per_task_k: dict[str, dict] = {}
    if isinstance(routing, dict):
        settings = routing.get("settings") or {}
        setting, rule, fixed_k, alpha = _setting_label(settings)
        model_info = routing.get("model") or {}
        top_k = _as_float(model_info.get("top_k"))
        mean_k = _as_float(routing.get("mean_experts_per_token"))
        active = _as_float(routing.get("active_params_per_token"))
        dense = _as_float(model_info.get("dense_params"))
        if not math.isnan(active) and not math.isnan(dense) and mean_k and mean_k > 0:
            per_k = (active - dense) / mean_k
        else:
            ppe = _as_float(model_info.get("params_per_expert"))
            nl = _as_float(model_info.get("num_layers"))
            per_k = ppe * nl
            if math.isnan(active):
                active = dense + per_k * mean_k
        per_task_k = routing.get("per_task") or {}
        source = "olmoe_bh"
    else:
        model_name = str(config.get("model", "hf"))
        source = model_name
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
        setting = f"{model_name} top-{fixed_k if fixed_k is not None else '?'}"

    rows = []
    for task in _leaf_tasks(data):
        res = data["results"][task]
        if not isinstance(res, dict):
            continue
        metric, acc, se = primary_metric(res)
        if metric is None:
            continue
        t_k = mean_k
        pt = per_task_k.get(task) if isinstance(per_task_k, dict) else None
        if isinstance(pt, dict) and not math.isnan(_as_float(pt.get("mean_experts_per_token"))):
            t_k = _as_float(pt["mean_experts_per_token"])
        t_active = active
        if not math.isnan(per_k) and not math.isnan(dense) and not math.isnan(t_k):
            t_active = dense + per_k * t_k
        rows.append({
            "model": pretrained,
            "setting": setting,
            "rule": rule,
            "fixed_k": fixed_k,
            "alpha": alpha,
            "task": task,
            "metric": metric,
            "acc": acc,
            "stderr": se,
            "mean_k": t_k,
            "top_k": top_k,
            "expert_fraction": t_k / top_k if top_k and not math.isnan(top_k) else math.nan,
            "active_params": t_active,
            "n_tasks": 1,
            "limit": limit,
            "source": source,
            "file": fname,
            "_date": date,
            "_tokens": _as_float(pt.get("tokens")) if isinstance(pt, dict) else math.nan,
            "_dense": dense,
            "_per_k": per_k,
        })
    if not rows:
        return [], "no task with a numeric metric"
    return rows, note


# --------------------------------------------------------------------------- computing

def dedupe(df: "pd.DataFrame") -> tuple["pd.DataFrame", list[str]]:
    """Keep the newest file per (model, setting, task); returns the shadowed files too."""
    if df.empty:
        return df, []
    df = df.sort_values("_date", na_position="first", kind="stable")
    dup = df.duplicated(["model", "setting", "task"], keep="last")
    shadowed = sorted(set(df.loc[dup, "file"]) - set(df.loc[~dup, "file"]))
    return df.loc[~dup].copy(), shadowed


def add_average(df: "pd.DataFrame") -> "pd.DataFrame":
    """Append one AVERAGE row per (model, setting): the mean over the tasks that every setting
    of that model has (so averages compare like with like). Its stderr assumes independent
    tasks; its mean_k is token-weighted when per-task token counts exist."""

    if df.empty:
        return df
    out = [df]
    for model, g in df.groupby("model", sort=False):
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
                "acc": float(use["acc"].mean()),
                "stderr": float(np.sqrt(np.sum(se ** 2)) / n) if np.all(np.isfinite(se)) else math.nan,
                "mean_k": mk,
                "expert_fraction": mk / first["top_k"] if first["top_k"] and np.isfinite(first["top_k"]) else math.nan,
                "active_params": dense + per_k * mk if np.isfinite(dense) and np.isfinite(per_k) else first["active_params"],
                "n_tasks": n,
                "file": ";".join(sorted(set(use["file"]))),
            })
            out.append(pd.DataFrame([row]))
    return pd.concat(out, ignore_index=True)


def pareto_mask(acc, cost) -> list[bool]:
    """True where no other point has acc >= and cost <= with one of them strict (NaNs never on it)."""
    pts = list(zip(acc, cost))
    mask = []
    for i, (a, c) in enumerate(pts):
        if not (math.isfinite(a) and math.isfinite(c)):
            mask.append(False)
            continue
        dominated = any(
            j != i and math.isfinite(a2) and math.isfinite(c2) and a2 >= a and c2 <= c and (a2 > a or c2 < c)
            for j, (a2, c2) in enumerate(pts)
        )
        mask.append(not dominated)
    return mask


def mark_pareto(df: "pd.DataFrame") -> "pd.DataFrame":
    """Column 'pareto': on the max-accuracy / min-mean-k frontier of the task average, per model."""
    df = df.copy()
    df["pareto"] = False
    avg = df["task"] == AVERAGE
    cand = avg & ~df["rule"].str.startswith(ANALYZE_PREFIX)
    for _, g in df[cand].groupby("model", sort=False):
        m = pareto_mask(g["acc"].tolist(), g["mean_k"].tolist())
        df.loc[g.index, "pareto"] = m
    return df


def interpolate_fixed(ks, accs, at: float) -> float:
    """Stock top-k accuracy at mean k = ``at``: linear between the fixed-k points present
    (several points at one k are averaged); NaN outside their range (no extrapolation)."""

    pts: dict[float, list[float]] = {}
    for k, a in zip(ks, accs):
        if math.isfinite(k) and math.isfinite(a):
            pts.setdefault(float(k), []).append(float(a))
    if not pts or not math.isfinite(at):
        return math.nan
    xs = sorted(pts)
    ys = [float(np.mean(pts[x])) for x in xs]
    if at < xs[0] - 1e-9 or at > xs[-1] + 1e-9:
        return math.nan
    return float(np.interp(at, xs, ys))


def add_matched_cost(df: "pd.DataFrame") -> "pd.DataFrame":
    """Columns 'topk_acc_at_k' (stock top-k interpolated at the same mean k, same model and task)
    and 'delta_vs_topk' (acc minus it) for adaptive settings."""
    df = df.copy()
    df["topk_acc_at_k"] = math.nan
    df["delta_vs_topk"] = math.nan
    for _, g in df.groupby(["model", "task"], sort=False):
        fixed = g[g["rule"] == FIXED_RULE]
        if fixed.empty:
            continue
        ks = fixed["fixed_k"].astype(float).tolist()
        accs = fixed["acc"].tolist()
        adaptive = (g["rule"] != FIXED_RULE) & ~g["rule"].str.startswith(ANALYZE_PREFIX)
        for idx, row in g[adaptive].iterrows():
            ref = interpolate_fixed(ks, accs, float(row["mean_k"]))
            df.at[idx, "topk_acc_at_k"] = ref
            df.at[idx, "delta_vs_topk"] = row["acc"] - ref
    return df


def build_report(df: "pd.DataFrame") -> "pd.DataFrame":
    """Tidy frame -> report frame: de-duplicated, with averages, Pareto marks and matched-cost columns."""

    if df.empty:
        return pd.DataFrame(columns=COLUMNS + ["pareto", "topk_acc_at_k", "delta_vs_topk"])
    df = add_average(df)
    df = mark_pareto(df)
    df = add_matched_cost(df)
    df["_fixed_first"] = (df["rule"] != FIXED_RULE).astype(int)
    df = df.sort_values(["model", "task", "_fixed_first", "rule", "mean_k", "setting"], kind="stable")
    df = df[[c for c in COLUMNS + ["pareto", "topk_acc_at_k", "delta_vs_topk"] if c in df.columns]]
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


def summary_table(rep: "pd.DataFrame") -> "pd.DataFrame":
    """One row per setting (task average), human-formatted."""

    avg = rep[rep["task"] == AVERAGE]
    multi_model = avg["model"].nunique() > 1
    rows = []
    for _, r in avg.iterrows():
        row = {}
        if multi_model:
            row["model"] = _short_model(r["model"])
        row.update({
            "setting": r["setting"],
            "rule": r["rule"],
            "tasks": int(r["n_tasks"]),
            "acc ± se": f"{_fmt(r['acc'])} ± {_fmt(r['stderr'])}" if math.isfinite(r["stderr"]) else _fmt(r["acc"]),
            "mean k": _fmt(r["mean_k"], 3),
            "k / top-k": _fmt(r["expert_fraction"], 3),
            "active params": _fmt_params(r["active_params"]),
            "top-k acc @ same k": _fmt(r["topk_acc_at_k"]),
            "Δ vs top-k": f"{r['delta_vs_topk']:+.4f}" if math.isfinite(r["delta_vs_topk"]) else "",
            "pareto": "*" if r["pareto"] else "",
        })
        rows.append(row)
    return pd.DataFrame(rows)


def per_task_table(rep: "pd.DataFrame") -> "pd.DataFrame":

    t = rep[rep["task"] != AVERAGE]
    multi_model = t["model"].nunique() > 1
    rows = []
    for _, r in t.iterrows():
        row = {"model": _short_model(r["model"])} if multi_model else {}
        row.update({
            "task": r["task"], "setting": r["setting"], "metric": r["metric"],
            "value": _fmt(r["acc"]), "stderr": _fmt(r["stderr"]), "mean k": _fmt(r["mean_k"], 3),
            "Δ vs top-k": f"{r['delta_vs_topk']:+.4f}" if math.isfinite(r["delta_vs_topk"]) else "",
        })
        rows.append(row)
    return pd.DataFrame(rows)


def _to_markdown(frame: "pd.DataFrame") -> str:
    try:
        return frame.to_markdown(index=False)
    except ImportError:  # tabulate missing: plain pipe table
        cols = list(frame.columns)
        lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        for _, r in frame.iterrows():
            lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
        return "\n".join(lines)


def render(rep: "pd.DataFrame", fmt: str = "md") -> str:
    if fmt == "csv":
        return rep.to_csv(index=False)
    if fmt == "json":
        return rep.to_json(orient="records", indent=2)
    if rep.empty:
        return "(no results)\n"
    parts = ["## Task average per setting (Pareto: * = max accuracy for min mean experts per token)\n",
             _to_markdown(summary_table(rep)), "",
             "## Per task (primary metric: acc_norm, else acc, else the task's first metric)\n",
             _to_markdown(per_task_table(rep)), ""]
    return "\n".join(parts)


def make_plot(rep: "pd.DataFrame", task: str = AVERAGE):
    """Accuracy vs mean experts per token, one curve per rule (fixed top-k: dashed reference).
    Returns the matplotlib Figure (not saved)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    d = rep[rep["task"] == task]
    multi_model = d["model"].nunique() > 1
    for (model, rule), g in d.groupby(["model", "rule"], sort=True):
        g = g[g["mean_k"].notna() & g["acc"].notna()]
        if g.empty:
            continue
        if rule == FIXED_RULE:
            # several fixed runs at one k (hf and olmoe_bh) collapse into one point
            g = g.groupby("mean_k", as_index=False).agg(acc=("acc", "mean"), stderr=("stderr", "mean"))
        g = g.sort_values("mean_k")
        label = f"{_short_model(model)}: {rule}" if multi_model else rule
        yerr = g["stderr"].fillna(0).to_numpy()
        style = dict(linestyle="--", color="black", marker="s") if rule == FIXED_RULE else dict(marker="o")
        ax.errorbar(g["mean_k"], g["acc"], yerr=yerr, capsize=3, label=label, **style)
    ax.set_xlabel("mean experts per token")
    ax.set_ylabel("accuracy (task average)" if task == AVERAGE else f"accuracy ({task})")
    ax.set_title("Accuracy vs expert compute")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[1]:
        ax.legend()
    return fig


# --------------------------------------------------------------------------- CLI

def add_arguments(parser) -> None:
    parser.add_argument("paths", nargs="+", metavar="RESULTS_DIR_OR_FILE",
                        help="lm-eval results files or folders (searched recursively for *.json)")
    parser.add_argument("--format", default="md", choices=("md", "csv", "json"), help="md (default), csv or json")
    parser.add_argument("--output", default=None, metavar="FILE", help="write here instead of stdout")
    parser.add_argument("--plot", default=None, metavar="FILE.png",
                        help="accuracy vs mean experts per token, one curve per rule")


def report(paths, fmt="md", output=None, plot=None, err=None) -> tuple[str, "pd.DataFrame"]:
    """Library entry: files -> rendered text (also written to ``output``/``plot`` if given)."""
    err = err or sys.stderr
    files, missing = find_result_files(paths)
    df, skipped = load_results(files)
    for name, why in missing + skipped:
        print(f"lm-eval-bh report: skipped {name}: {why}", file=err)
    df, shadowed = dedupe(df)
    if shadowed:
        print(f"lm-eval-bh report: {len(shadowed)} older file(s) with the same setting ignored "
              f"(newest kept): {', '.join(shadowed)}", file=err)
    rep = build_report(df)
    text = render(rep, fmt)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text, encoding="utf-8")
    if plot:
        fig = make_plot(rep)
        Path(plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(plot, dpi=120, bbox_inches="tight")
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
