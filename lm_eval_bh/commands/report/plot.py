"""The plot: quality vs mean experts per token, one panel per summary, one curve per rule."""

from __future__ import annotations

import math

import pandas as pd

from .load import AVERAGE, FIXED_RULE, GROUP, _as_float, _short
from .tables import _metric_of, _short_model, summary_tasks


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
