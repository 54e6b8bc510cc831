"""Rendering of the report frame: Markdown tables (a summary per task average and lower-is-better task,
then every task), CSV or JSON."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from .load import AVERAGE
from .stats import WIN_SE, compared, gain_z, is_summary, rule_name, winners


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


def _fmt_delta(r, col: str = "delta_vs_topk", se_col: str = "delta_se", kind: str | None = None) -> str:
    d, se = r.get(col, math.nan), r.get(se_col, math.nan)
    if not (isinstance(d, float) and math.isfinite(d)):
        return ""
    se_text = f" ± {se:.4f}" if isinstance(se, float) and math.isfinite(se) else ""
    kind = r["delta_se_kind"] if kind is None else kind
    return f"{d:+.4f}{se_text}" + (" (unpaired)" if se_text and kind == "unpaired" else "")


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
    """One row per setting for one summary (the task average, or a lower-is-better task), human-formatted;
    with the layer-budget twin's split of Δ where a setting has a twin."""
    avg = rep[rep["task"] == task]
    m = _metric_of(rep, task)
    twins = "twin" in avg.columns and (avg["twin"].fillna("") != "").any()
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
            d = r["delta_vs_topk"]
            rel = (math.exp(d) - 1 if r["scale"] == "log" else r["value"] / r["topk_value_at_k"] - 1) \
                if math.isfinite(d) and r["topk_value_at_k"] else math.nan
            row["Δ / top-k"] = f"{rel:+.1%}" if math.isfinite(rel) else ""
        if twins:
            row["layer-budget twin"] = r["twin"] or ""
            row["allocation: twin vs top-k ± se"] = _fmt_delta(r, "alloc_delta", "alloc_se", kind="") if r["twin"] else ""
            row["adaptivity: setting vs twin ± se"] = _fmt_delta(r, "delta_vs_twin", "delta_vs_twin_se", kind="")
        row["pareto"] = "*" if r["pareto"] else ""
        rows.append(row)
    return pd.DataFrame(rows)


def target_table(rep: "pd.DataFrame", task: str = AVERAGE) -> "pd.DataFrame":
    """Settings that aimed at a mean k (`target_k`), by target: each beside the top-k run at exactly
    that k (no interpolation), with the paired difference; its rule named with its allocation."""
    t = rep[(rep["task"] == task) & rep["target_k"].notna() & compared(rep)]
    t = t.sort_values(["target_k", "value"], kind="stable")
    m = _metric_of(rep, task)
    rows = []
    for _, r in t.iterrows():
        row = _group_columns(t, r)
        row.update({
            "target k": _fmt(r["target_k"], 3), "setting": r["setting"], "rule": rule_name(r),
            "allocation": r["allocation"], "achieved k": _fmt(r["mean_k"], 3),
            f"{m}": _fmt(r["value"]) or "NaN", f"top-k {m} @ k = target": _fmt(r["topk_at_target"]),
            "Δ ± se": _fmt_delta(r, "delta_at_target", "delta_at_target_se", kind=""),
        })
        rows.append(row)
    return pd.DataFrame(rows)


def _summary_name(rep: "pd.DataFrame", task: str) -> str:
    return f"task average ({_metric_of(rep, task)})" if task == AVERAGE else f"{task} ({_metric_of(rep, task)} ↓)"


def _verdict(w: dict) -> tuple[str, bool]:
    """(which wins at this target, whether a rule does): the rules that beat top-k by more than WIN_SE
    SEs, else top-k where every rule loses to it by that much, else a tie."""
    if not w["rows"]["delta_at_target"].notna().any():
        return "no top-k run at this k", False
    z: dict[str, float] = {}  # each rule's largest gain over top-k, in SEs (NaN without an SE)
    for _, r in w["rows"].iterrows():
        z[rule_name(r)] = max(z.get(rule_name(r), math.nan), gain_z(r), key=lambda v: -math.inf if math.isnan(v) else v)
    beat = [name for name, v in sorted(z.items(), key=lambda x: -x[1]) if v > WIN_SE]
    if beat:
        return f"{', '.join(beat)} beat{'s' if len(beat) == 1 else ''} top-k", True
    if all(v < -WIN_SE for v in z.values()):
        return "top-k wins", False
    return f"no rule beats top-k by more than {WIN_SE:g} SE", False


def winner_table(rep: "pd.DataFrame") -> "pd.DataFrame":
    """Per summary and target k: the best setting aimed at that k, its Δ vs top-k at exactly k = target
    (paired SE), the runner-up rule's best setting and Δ, and which wins (`_verdict`)."""
    rows = []
    for w in winners(rep):
        best, runner = w["best"], w["runner_up"]
        row = _group_columns(rep[compared(rep)], best)
        row.update({
            "summary": _summary_name(rep, best["task"]), "target k": _fmt(w["target"], 3),
            "top-k @ k = target": _fmt(best["topk_at_target"]),
            "best": f"{best['setting']} ({rule_name(best)})", "value": _fmt(best["value"]),
            "Δ vs top-k ± se": _fmt_delta(best, "delta_at_target", "delta_at_target_se", kind=""),
            "runner-up rule": "" if runner is None else f"{rule_name(runner)}: {runner['setting']}",
            "its Δ ± se": "" if runner is None else _fmt_delta(runner, "delta_at_target", "delta_at_target_se", kind=""),
            "verdict": _verdict(w)[0],
        })
        rows.append(row)
    return pd.DataFrame(rows)


def winner_lines(rep: "pd.DataFrame") -> list[str]:
    """One plain sentence per summary: at which target k a rule beats top-k by more than WIN_SE SEs."""
    by_summary: dict[str, list[tuple[float, tuple[str, bool]]]] = {}
    for w in winners(rep):
        group = " ".join(str(v) for v in _group_columns(rep[compared(rep)], w["best"]).values() if v)
        name = f"{group}: {_summary_name(rep, w['best']['task'])}" if group else _summary_name(rep, w["best"]["task"])
        by_summary.setdefault(name, []).append((w["target"], _verdict(w)))
    lines = []
    for name, verdicts in by_summary.items():
        won = [f"{v} at k = {k:g}" for k, (v, wins) in verdicts if wins]
        rest = [f"{k:g}" for k, (_, wins) in verdicts if not wins]
        if not won:
            lines.append(f"- {name}: no rule beats top-k by more than {WIN_SE:g} SE at any target k.")
        else:
            tail = f"; no rule does at k = {', '.join(rest)}" if rest else ""
            lines.append(f"- {name}: {'; '.join(won)} (by more than {WIN_SE:g} SE){tail}.")
    return lines


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
                          "(the log of a ratio of sums, by the delta method over documents)")
    unpaired = rows[rows["delta_se_kind"] == "unpaired"]
    if unpaired["delta_se"].notna().any():
        notes.append("se: unpaired (no per-sample outputs for this row or its top-k references)")
    if len(unpaired) and unpaired["delta_se"].isna().any():
        notes.append("no se where lm-eval records none and there are no per-sample outputs")
    return "; ".join(notes)


PARETO = ("* = on the front of {what} for min mean experts per token; the stock top-k curve, interpolated "
          "between its runs, counts as part of the front: a setting worse than it at its own mean k is never starred")


def _no_delta_lines(rows: "pd.DataFrame") -> list[str]:
    return [f"- no Δ for {r['setting']}: {r['no_delta']}" for _, r in rows.iterrows() if r.get("no_delta")]


def render(rep: "pd.DataFrame", fmt: str = "md") -> str:
    if fmt == "csv":
        return rep.to_csv(index=False)
    if fmt == "json":
        return rep.to_json(orient="records", indent=2)
    if rep.empty:
        return "(no results)\n"
    parts = []
    if winners(rep):
        parts += ["## Winner at each target k\n",
                  "Per target k, the best setting aimed at it (`target_k`; max accuracy, min perplexity) against "
                  "the top-k run at exactly k = target (no interpolation): Δ with its paired SE (log ratio for a "
                  f"perplexity: negative is better), the best setting of the runner-up rule, and the verdict: a rule "
                  f"wins only where it beats top-k by more than {WIN_SE:g} SE.\n",
                  _to_markdown(winner_table(rep)), "", *winner_lines(rep), ""]
    for task in summary_tasks(rep):
        for avg_tasks, rows in rep[rep["task"] == task].groupby("avg_tasks", sort=True):
            part = rep[(rep["task"] != task) | (rep["avg_tasks"] == avg_tasks)]
            parts += _summary_section(part, rows, task, several=rep.loc[rep["task"] == task, "avg_tasks"].nunique() > 1)
    lower = "" if rep["higher_is_better"].astype(bool).all() else "; ↓: lower is better"
    if (rep["scale"] == "log").any():
        lower += "; Δ of a perplexity: log(value / top-k value)"
    parts += [f"## Per task (primary metric: acc_norm, else acc, else the task's first metric{lower})\n",
              _to_markdown(per_task_table(rep)), ""]
    return "\n".join(p for p in parts if p is not None)


def _summary_section(rep: "pd.DataFrame", rows: "pd.DataFrame", task: str, several: bool) -> list:
    note = _se_note(rows)
    has_delta = rows["delta_vs_topk"].notna().any()
    if task == AVERAGE:
        over = f" over {rows['avg_tasks'].iloc[0].replace(',', ', ')}" if several else ""
        parts = [f"## Task average{over} per setting (Pareto: {PARETO.format(what='max accuracy')})\n",
                 "Δ vs top-k: accuracy minus the stock top-k accuracy interpolated at the same mean k"
                 + (f"; {note}" if note else "") + ".\n" if has_delta else None]
    else:
        m = _metric_of(rep, task)
        log = (rows["scale"] == "log").all()
        parts = [f"## {task}: {m} per setting (lower is better; Pareto: {PARETO.format(what=f'min {m}')})\n",
                 (f"Δ vs top-k: log({m} / the stock top-k {m} interpolated in log {m} at the same mean k), what "
                  "mixing two k's over the tokens gives" if log else
                  f"Δ vs top-k: {m} minus the stock top-k {m} interpolated at the same mean k")
                 + "; negative is better" + (f"; {note}" if note else "") + ".\n" if has_delta else None]
    if (rows["twin"].fillna("") != "").any():
        parts.append("Layer-budget twin: a fixed top-k with the setting's own per-layer mean k; allocation = twin vs "
                     "top-k, adaptivity = setting vs twin (the same difference as Δ), each with its paired SE.\n")
    parts += [_to_markdown(summary_table(rep, task)), ""]
    no_delta = _no_delta_lines(rows)
    if no_delta:
        parts += no_delta + [""]
    if rows["target_k"].notna().any():
        parts += [f"### {'Task average' if task == AVERAGE else task} at matched target k (target_k), "
                  "against the stock top-k run at exactly k = target\n", _to_markdown(target_table(rows, task)), ""]
    return parts
