"""The README's headline table: every rule at each target mean k, against top-k at exactly that k, on both
real-weight models (the report's matched-target rows, one column per target).

    PYTHONPATH=. python scripts/headline_table.py results/real_grid results/real_router_grid > results/headline.md

Each cell: the perplexity ratio to top-k at k = target, exp(Δ), with Δ ± its paired SE in log space (per
document, 20 held-out documents); bold where the rule beats top-k by more than 2 SE.
"""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path

from lm_eval_bh.commands.report import report
from lm_eval_bh.commands.report.stats import rule_name

TASK = "pydoc_perplexity_offline"
ORDER = ["layer-k (sensitivity)", "bh/zscore (sensitivity)", "bh/calibrated", "lfdr", "bh/zscore", "hc/zscore",
         "bh/softmax", "topp", "skip", "entropy", "twin of bh/calibrated", "twin of bh/zscore"]


def cells(folder: str) -> tuple[dict, list[float]]:
    _, rep = report([folder], err=io.StringIO())
    rows = rep[(rep["task"] == TASK) & rep["target_k"].notna() & rep["delta_at_target"].notna()]
    out: dict = {}
    for _, r in rows.iterrows():
        d, se = r["delta_at_target"], r["delta_at_target_se"]
        star = "**" if se == se and d < -2 * se else ""
        out[(rule_name(r), r["target_k"])] = f"{star}{math.exp(d):.2f}{star} ({d:+.2f} ± {se:.2f})"
    # the layer-budget twins of the uniform rules, at their own setting's target
    twins = rep[(rep["task"] == TASK) & rep["twin"].fillna("").astype(bool) & rep["target_k"].notna()]
    for _, r in twins.iterrows():
        if r["alloc_delta"] == r["alloc_delta"]:
            out[(f"twin of {rule_name(r)}", r["target_k"])] = f"{math.exp(r['alloc_delta']):.2f} ({r['alloc_delta']:+.2f} ± {r['alloc_se']:.2f})"
    return out, sorted({k for _, k in out})


def main(folders: list[str]) -> None:
    for folder in folders:
        got, targets = cells(folder)
        print(f"\n**{Path(folder).name}** (perplexity ratio to top-k at k = target; Δ log ± paired SE)\n")
        print("| rule | " + " | ".join(f"k = {k:g}" for k in targets) + " |")
        print("|---|" + "---|" * len(targets))
        for rule in ORDER + sorted({r for r, _ in got} - set(ORDER)):
            if any((rule, k) in got for k in targets):
                print(f"| {rule} | " + " | ".join(got.get((rule, k), "") for k in targets) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
