"""``lm-eval-bh report``: quality (accuracy, perplexity, ...) per unit of expert compute, from lm-eval results files.

A small package, each part readable alone:

* `load`   -- files -> tidy DataFrame, one row per (file, task), grouped into evaluations;
* `stats`  -- averages, Pareto fronts, matched cost, paired standard errors (pure pandas/numpy);
* `tables` -- rendering (md/csv/json);
* `plot`   -- the matplotlib Figure;
* here     -- the command (`report`, `add_arguments`, `run`).

Inputs are lm-eval's own results JSON (``--output_path`` of ``lm_eval run`` or of
``lm-eval-bh sweep``). Runs of ``--model olmoe_bh``/``moe_bh`` carry ``config["routing"]`` (read as
`results_schema.RoutingBlock`); plain
``--model hf`` runs do not: their expert count is the fixed top-k from ``model_args``
(``num_experts_per_tok=K``) or from the model's config.json.

What the report only admits when it can label it truthfully:

* files of different evaluations are never mixed: each is its own group (column ``evaluation``, named
  by the fields that differ; stderr says so), with its own averages, Pareto front and references.
  What lm-eval records (limit, few-shot, dtype as loaded, chat template, system instruction,
  fewshot_as_multiturn, versions) is compared with its defaults made explicit, so a run without
  ``--limit`` is never the reference of a ``--limit 5`` run (`load.evaluation_key`);
* only stock-equivalent fixed-k runs are top-k references: not a per-layer k (``layer_k``,
  ``layer_budget``), not a per-expert (or unreadable) calibrated null, not a renormalization unlike
  the model's router; those are compared with the stock top-k like any setting;
* Δ and the task average use only tasks the setting shares with its references; a setting without
  a valid reference has no Δ, and a line says why (column ``no_delta``);
* labels carry a calibration's content hash; a routed run whose routing block is missing or damaged,
  or a file nested too deeply to parse, is skipped with a reason;
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

import os
import sys
from pathlib import Path

import pandas as pd

from ...errors import UsageError
from .load import (ACC_TIE, ANALYZE_PREFIX, AVERAGE, COLUMNS, COST_TIE, FIXED_RULE, GROUP, REPORT_COLUMNS,
                   _setting_label, assign_evaluations, dedupe, evaluation_key, find_result_files, higher_is_better,
                   load_item_scores, load_results, metric_scale, params_from_config, parse_model_args,
                   primary_metric, read_model_config, recorded_config, samples_source)
from .plot import make_plot
from .stats import (add_average, add_twins, average_notes, add_matched_cost, build_report, interpolate_fixed, interpolation_weights,
                    is_summary, mark_pareto, pareto_mask, undefined_settings)
from .tables import (_short_model, per_task_table, render, summary_table, summary_tasks, target_table,
                     winner_table)

__all__ = [  # the library API, as `from lm_eval_bh.commands import report as R; R.<name>`
    "ACC_TIE", "ANALYZE_PREFIX", "AVERAGE", "COLUMNS", "COST_TIE", "FIXED_RULE", "GROUP", "REPORT_COLUMNS",
    "_setting_label", "add_arguments", "add_average", "add_twins", "average_notes", "add_matched_cost", "assign_evaluations", "build_report",
    "dedupe", "evaluation_key", "find_result_files", "higher_is_better", "interpolate_fixed",
    "interpolation_weights", "is_summary", "load_item_scores", "load_results", "make_plot", "mark_pareto",
    "metric_scale", "pareto_mask", "params_from_config", "parse_model_args", "per_task_table", "primary_metric",
    "read_model_config", "recorded_config", "render", "report", "run", "samples_source", "summary_table",
    "summary_tasks", "target_table", "undefined_settings", "winner_table",
]

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
    for line in split_lines(df) + reference_lines(df):
        print(f"lm-eval-bh report: {line}", file=err)
    df, shadowed = dedupe(df)
    if shadowed:
        print(f"lm-eval-bh report: {len(shadowed)} older file(s) with the same setting ignored "
              f"(newest kept): {', '.join(shadowed)}", file=err)
    rep = build_report(df)
    for line in average_notes(rep) if not rep.empty else []:
        print(f"lm-eval-bh report: {line}", file=err)
    if not rep.empty:
        missing_delta = rep[rep["no_delta"].fillna("") != ""]
        for (evaluation, setting, why), g in missing_delta.groupby(["evaluation", "setting", "no_delta"], sort=False):
            where = "; ".join(x for x in (evaluation, ", ".join(g["task"])) if x)
            print(f"lm-eval-bh report: no Δ vs top-k for {setting} ({where}): {why}", file=err)
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


def split_lines(df: "pd.DataFrame") -> list[str]:
    """A line per model whose files are of several evaluations: which fields told them apart."""
    out = []
    if df.empty or not (df["evaluation"] != "").any():
        return out
    for model, g in df.groupby("model"):
        if g["evaluation"].nunique() > 1:
            out.append(f"{_short_model(model)}: files of {g['evaluation'].nunique()} different evaluations, told apart "
                       f"by what each recorded ({' | '.join(sorted(g['evaluation'].unique()))}); each is reported on "
                       "its own (column 'evaluation'), never mixed or compared")
    return out


def reference_lines(df: "pd.DataFrame") -> list[str]:
    """A line per fixed-k setting that is not used as a stock top-k reference, with why."""
    if df.empty or "_not_reference" not in df.columns:
        return []
    bad = df[df["_not_reference"].fillna("").astype(bool) & df["rule"].str.startswith(FIXED_RULE)]
    bad = bad.drop_duplicates(GROUP + ["setting"])  # (a layer-k run is not one k by design: no line)
    return [f"{r['setting']}: not a stock top-k reference ({r['_not_reference']})" for _, r in bad.iterrows()]


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
