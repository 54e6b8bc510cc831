"""The plot: quality vs mean experts per token, one panel per summary, one curve per rule."""

from __future__ import annotations

import math

import pandas as pd

from .load import AVERAGE, FIXED_RULE, GROUP, _as_float
from .stats import rule_name
from .tables import _metric_of, _short_model, summary_tasks


def _point_label(r) -> str:
    if r["rule"] == FIXED_RULE:
        return f"k={r['mean_k']:.3g}" if math.isfinite(r["mean_k"]) else ""  # top-k at a target: its achieved k
    if math.isfinite(_as_float(r.get("alpha"))):
        return f"α={r['alpha']:g}"
    return r["setting"].split(" ")[1] if " " in r["setting"] else r["setting"]


def make_plot(rep: "pd.DataFrame"):
    """Quality vs mean experts per token, one panel per summary (the task average's accuracy, one per set
    of tasks where groups average different tasks, then each lower-is-better task, on a log axis for
    perplexities), one curve per rule (fixed top-k: dashed reference), each point labelled with its
    alpha (top_p, or k), labels placed so that none overlaps another; the legend sits outside the
    axes. Returns the matplotlib Figure (not saved)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(task, avg) for task in summary_tasks(rep) or [AVERAGE]
              for avg in (sorted(set(rep.loc[rep["task"] == task, "avg_tasks"])) or [""])]
    fig = Figure(figsize=(8.5, 4.5 * len(panels)))
    FigureCanvasAgg(fig)
    drawn = []
    for i, (task, avg) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, i + 1)
        drawn.append((ax, _plot_panel(ax, rep[(rep["task"] == task) & (rep["avg_tasks"] == avg)], task,
                                      avg if len(panels) > 1 and task == AVERAGE else "", _metric_of(rep, task))))
    fig.subplots_adjust(hspace=0.35)
    for ax, labels in drawn:  # once the layout is final
        place_labels(ax, labels)
    return fig


# label offsets (points) tried in turn: beside the point first, then further above and below
OFFSETS = [(4, 4), (4, -11), (-4, 4), (-4, -11)] + [(4, dy) for n in range(1, 8) for dy in (4 + 9 * n, -11 - 9 * n)]


def place_labels(ax, labels: list[tuple[str, float, float]]) -> None:
    """Annotate each (text, x, y) at the first offset of OFFSETS where its box overlaps no label placed
    before it (a crowded spot keeps the last offset)."""
    renderer = ax.figure.canvas.get_renderer()
    ax.get_xlim(), ax.get_ylim()  # settle the autoscaled limits the boxes are measured in
    placed = []
    for text, x, y in sorted(labels, key=lambda t: (t[1], t[2])):
        for dx, dy in OFFSETS:
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=7,
                              ha="left" if dx >= 0 else "right")
            box = ann.get_window_extent(renderer)
            if not any(box.overlaps(b) for b in placed) or (dx, dy) == OFFSETS[-1]:
                placed.append(box)
                break
            ann.remove()


def _plot_panel(ax, d: "pd.DataFrame", task: str, over: str, m: str) -> list[tuple[str, float, float]]:
    """Draw one panel's curves (one per rule and allocation, `rule_name`); returns the point labels to place."""
    multi = d.groupby(GROUP).ngroups > 1
    d = d.assign(rule=[rule_name(r) for _, r in d.iterrows()])
    labels = []
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
        labels += [(_point_label(r), float(r["mean_k"]), float(r["value"])) for _, r in g.iterrows()]
    ax.set_xlabel("mean experts per token")
    if task == AVERAGE:
        ax.set_ylabel("accuracy (task average)")
        ax.set_title(f"Accuracy{' (average over ' + over.replace(',', ', ') + ')' if over else ''} vs expert compute")
    else:
        if (d["scale"] == "log").all() and (d["value"].dropna() > 0).all():
            ax.set_yscale("log")
        ax.set_ylabel(f"{m} (lower is better)")
        ax.set_title(f"{task}: {m} vs expert compute")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[1]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8)
    return [t for t in labels if t[0]]
