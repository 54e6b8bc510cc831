"""Statistics on the tidy frame: task averages, Pareto fronts, the stock top-k at a setting's cost
(interpolated at its mean k, or at exactly its target k), each setting against its layer-budget twin,
and the paired standard errors of those differences. Pure pandas/numpy.

A difference is `value - reference` for a linear metric (an accuracy) and `log(value / reference)` for a
metric lm-eval aggregates as a perplexity: there its paired SE is that of a log of a ratio of sums
(the delta method), where the ratio's own scale would understate |z| far from 1.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from .load import (ACC_TIE, ANALYZE_PREFIX, AVERAGE, COST_TIE, FIXED_RULE, GROUP, LAYER_RULE, REPORT_COLUMNS,
                   load_item_scores)

CELL = GROUP + ["task", "avg_tasks"]  # the rows one table, one front and one reference curve hold
TWIN_TOL = 0.02  # per-layer mean k within this of the setting's: its layer-budget twin


def add_average(df: "pd.DataFrame") -> "pd.DataFrame":
    """Append one AVERAGE row per setting: the mean over the higher-is-better tasks that every setting
    of its evaluation group has (so averages compare like with like; a perplexity is never averaged
    with accuracies). Where the settings share no task, each averages its own and column `avg_tasks`
    (the tasks of the average) keeps apart what cannot be compared. A NaN on any task makes the
    average NaN (the denominator never shrinks). Its stderr assumes independent tasks; its mean_k is
    token-weighted when per-task token counts exist."""
    if df.empty:
        return df
    df = df.assign(avg_tasks="")
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
                "avg_tasks": ",".join(sorted(use["task"])),
                "_tasks": tuple(sorted(use["task"])),
                "_samples": None,
            })
            out.append(pd.DataFrame([row]))
    return pd.concat(out, ignore_index=True)


def average_notes(rep: "pd.DataFrame") -> list[str]:
    """A line per evaluation group whose task average leaves out tasks some settings ran, or whose
    settings share no task (then no average is compared across settings)."""
    out = []
    for (model, evaluation), g in rep[rep["higher_is_better"].astype(bool)].groupby(GROUP, sort=False):
        avg = g[g["task"] == AVERAGE]
        ran = set(g.loc[g["task"] != AVERAGE, "task"])
        name = " ".join(x for x in (Path(model).name, evaluation) if x)
        if avg["avg_tasks"].nunique() > 1:
            out.append(f"{name}: its settings share no task: each task average covers its own tasks (column "
                       "'tasks'), and only averages over the same tasks are compared")
        elif len(avg):
            left = sorted(ran - set(avg["avg_tasks"].iloc[0].split(",")))
            if left:
                out.append(f"{name}: the task average covers {avg['avg_tasks'].iloc[0].replace(',', ', ')} (the "
                           f"tasks every setting ran); not in it: {', '.join(left)}")
    return out


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


def below_topk(row) -> bool:
    """Whether a point is worse than the stock top-k interpolated at its mean k, by more than a tie."""
    ref = row.get("topk_value_at_k", math.nan)
    if not (isinstance(ref, float) and math.isfinite(ref)) or not math.isfinite(row["value"]):
        return False
    return row["value"] < ref - ACC_TIE if row["higher_is_better"] else row["value"] > ref + ACC_TIE


def mark_pareto(df: "pd.DataFrame") -> "pd.DataFrame":
    """Column 'pareto': per group, on the best-quality / min-mean-k frontier of each summary (the task
    average: max accuracy; a lower-is-better task: min metric), where the stock top-k curve
    interpolated between its runs is part of the frontier: a point worse than it at its own mean k
    (Δ vs top-k worse than a tie) is never starred. Fixed top-k first among ties; analyze runs and
    undefined values never on it."""
    df = df.copy()
    df["pareto"] = False
    if "avg_tasks" not in df.columns:
        df["avg_tasks"] = ""
    cand = is_summary(df) & ~df["rule"].str.startswith(ANALYZE_PREFIX) & df["value"].notna()
    for _, g in df[cand].groupby(CELL, sort=False):
        g = g.assign(_adaptive=g["rule"] != FIXED_RULE).sort_values(["_adaptive", "mean_k", "setting"], kind="stable")
        mask = pareto_mask(g["value"].tolist(), g["mean_k"].tolist(),
                           higher_is_better=bool(g["higher_is_better"].iloc[0]))
        df.loc[g.index, "pareto"] = [m and not below_topk(r) for m, (_, r) in zip(mask, g.iterrows())]
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


def difference(value: float, ref: float, scale: str) -> float:
    """value - ref, or log(value / ref) for a log-scale metric (a perplexity)."""
    if scale == "log":
        return math.log(value / ref) if value > 0 and ref > 0 else math.nan
    return value - ref


def _paired_task(row, task: str, refs: dict, weights) -> tuple[float, float, int] | None:
    """(Δ, variance of Δ, n) of `row` on `task` against the weighted reference runs `refs` ({key: rows},
    `weights`: [(key, weight)]) on the same items, or None without matching per-sample outputs.

    Per-item scores (accuracies): Δ is the mean per-item difference, its variance that of a mean.
    Per-document (log-likelihood, words or bytes) pairs (perplexities, bits per byte): the metric is
    f(L) with L = sum(s_d) / sum(n_d), s_d a document's negative log-likelihood and n_d its words (or
    bytes); the reference is interpolated in L (what mixing two k's over the tokens gives): L_ref =
    sum(r_d) / sum(n_d), r_d the weighted reference s_d. For a perplexity (f = exp) Δ = log(f(L) /
    f(L_ref)) = L - L_ref, the log of a ratio of sums; for bits per byte (f(L) = c L) Δ = c (L - L_ref).
    Its variance by the delta method over documents is n / (n - 1) * sum(z_d^2) / sum(n_d)^2 with
    z_d = c ((s_d - L n_d) - (r_d - L_ref n_d)) (c = 1 for the log ratio)."""
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
        c = 1.0
    else:
        c = value / big_l if big_l else math.nan  # f(L) = c L (bits per byte: c = 1 / ln 2)
    z = c * ((s_d - big_l * sizes) - (r_d - l_ref * sizes))
    var = n / (n - 1) * float(np.sum(z ** 2)) / total ** 2 if n > 1 else math.nan
    return c * (big_l - l_ref), var, n


def _paired_se(df, row, refs_of) -> float | None:
    """The paired SE of `row`'s difference from a reference (for a task average: the per-task SEs
    combined as independent tasks); None unless every task pairs. `refs_of(task rows, row of the
    setting)` gives the task's ({key: reference rows}, [(key, weight)])."""
    tasks = row["_tasks"] if row["task"] == AVERAGE else (row["task"],)
    per_task = df[(df["model"] == row["model"]) & (df["evaluation"] == row["evaluation"]) & (df["task"] != AVERAGE)]
    variances = []
    for t in tasks:
        rows = per_task[per_task["task"] == t]
        mine = rows[rows["setting"] == row["setting"]]
        if len(mine) != 1:
            return None
        res = _paired_task(mine.iloc[0], t, *refs_of(rows, mine.iloc[0]))
        if res is None or not math.isfinite(res[1]):
            return None
        variances.append(res[1])
    return math.sqrt(sum(variances)) / len(variances) if variances else None


def _relative(row, se: float) -> float:
    """An SE in the units of the difference: relative to the value for a log-scale metric."""
    return se / row["value"] if row["scale"] == "log" else se


def _topk_refs(weights):
    def refs_of(rows, _mine):
        fixed = rows[rows["rule"] == FIXED_RULE]
        return {k: [r for _, r in fixed[fixed["fixed_k"].astype(float) == k].iterrows()] for k, _ in weights}, weights
    return refs_of


def _vs_topk(df, row, fixed, at: float) -> tuple[float, float, float, str] | None:
    """(stock top-k value at mean k `at`, Δ, its SE, "paired"/"unpaired"); None outside the runs' range."""
    ks = fixed["fixed_k"].astype(float).tolist()
    weights = interpolation_weights(ks, at)
    if not weights:
        return None
    ref = interpolate_fixed(ks, fixed["value"].tolist(), at, row["scale"])
    se = _paired_se(df, row, _topk_refs(weights))
    if se is not None:
        return ref, difference(row["value"], ref, row["scale"]), se, "paired"
    # unpaired: from the points' own SEs (relative ones in log scale)
    var = _relative(row, row["stderr"]) ** 2
    for k, w in weights:
        at_k = fixed[fixed["fixed_k"].astype(float) == k]
        se_k = at_k["stderr"].mean()
        var += (w * (se_k / at_k["value"].mean() if row["scale"] == "log" else se_k)) ** 2
    return ref, difference(row["value"], ref, row["scale"]), (math.sqrt(var) if math.isfinite(var) else math.nan), "unpaired"


def _why_no_reference(df, row) -> str:
    """Why `row` has no Δ vs top-k: no stock top-k run in its evaluation, or only over other tasks."""
    same = df[(df["model"] == row["model"]) & (df["task"] == row["task"]) & (df["rule"] == FIXED_RULE)
              & df["value"].notna()]
    here = same[same["evaluation"] == row["evaluation"]]
    if row["task"] == AVERAGE and len(here):
        return (f"its task average covers {row['avg_tasks'].replace(',', ', ')}, the stock top-k runs' "
                f"{'; '.join(sorted(set(here['avg_tasks'])))}: no task set in common")
    group = df[(df["model"] == row["model"]) & (df["evaluation"] == row["evaluation"])]
    what = "run" if row["task"] == AVERAGE else f"run of {row['task']}"
    why = f"no stock top-k {what} in its evaluation"
    others = sorted(set(same["evaluation"]) - {row["evaluation"]})
    if others:
        why += f" (there are in {'; '.join(e or '(unlabelled)' for e in others)}, which evaluated differently)"
    not_stock = group[group["_not_reference"].fillna("").astype(bool)].drop_duplicates("setting")
    if len(not_stock):
        why += "; not references: " + "; ".join(f"{r['setting']}: {r['_not_reference']}" for _, r in not_stock.iterrows())
    return why


def compared(df: "pd.DataFrame") -> "pd.Series":
    """The rows compared with the stock top-k: every setting but the references and analyze runs."""
    return (df["rule"] != FIXED_RULE) & ~df["rule"].str.startswith(ANALYZE_PREFIX) & df["value"].notna()


def add_matched_cost(df: "pd.DataFrame") -> "pd.DataFrame":
    """For every setting but the stock top-k references: 'topk_value_at_k' (the stock top-k runs of the
    same group, task and average task set, interpolated at the same mean k; in the logarithm for a
    perplexity), 'delta_vs_topk' (see `difference`; for a lower-is-better metric negative is better)
    and its standard error 'delta_se', paired ('delta_se_kind' = "paired") where per-sample outputs of
    the same items exist, else from the points' own SEs ("unpaired"; NaN where lm-eval gives none).
    Where there is no Δ, 'no_delta' says why.

    A setting with a target mean k (`target_k`) is also compared at exactly that k: 'delta_at_target'
    (and its SE) against the top-k run at k = target, where one exists (`at_target`); no interpolation."""
    df = df.copy()
    if "avg_tasks" not in df.columns:
        df["avg_tasks"] = ""
    for c in ("topk_value_at_k", "delta_vs_topk", "delta_se", "topk_at_target", "delta_at_target", "delta_at_target_se"):
        df[c] = math.nan
    df["delta_se_kind"] = ""
    df["no_delta"] = ""
    for _, g in df.groupby(CELL, sort=False):
        fixed = g[(g["rule"] == FIXED_RULE) & g["value"].notna()]
        for idx, row in g[compared(g)].iterrows():
            if fixed.empty:
                df.at[idx, "no_delta"] = _why_no_reference(df, row)
                continue
            res = _vs_topk(df, row, fixed, float(row["mean_k"]))
            if res is None:
                ks = fixed["fixed_k"].astype(float)
                df.at[idx, "no_delta"] = (f"mean k {row['mean_k']:.3g} is outside the stock top-k runs' "
                                          f"{ks.min():g}..{ks.max():g} (no extrapolation)")
            else:
                df.loc[idx, ["topk_value_at_k", "delta_vs_topk", "delta_se", "delta_se_kind"]] = res
            refs = at_target(fixed, float(row.get("target_k", math.nan)))
            if len(refs):
                at = _vs_topk(df, row, refs, float(refs["fixed_k"].iloc[0]))
                df.loc[idx, ["topk_at_target", "delta_at_target", "delta_at_target_se"]] = at[:3]
    return df


def at_target(fixed: "pd.DataFrame", target: float) -> "pd.DataFrame":
    """The top-k reference runs at exactly mean k = `target`: a top-k run at that target (`target_k`,
    K in every layer; its k is the mean it achieved), else the stock top-k runs at k = target."""
    if not math.isfinite(target):
        return fixed.iloc[:0]
    runs = fixed[fixed["target_k"] == target]
    runs = runs if len(runs) else fixed[fixed["fixed_k"].astype(float) == target]
    return runs[runs["fixed_k"].astype(float) == float(runs["fixed_k"].iloc[0])] if len(runs) else runs


def rule_name(row) -> str:
    """A rule as the target tables name it: with its allocation where that is not uniform, e.g.
    'layer-k (sensitivity)' (top-k on the fitted per-layer budget) or 'bh/zscore (sensitivity)'."""
    alloc = row.get("allocation") or ""
    return f"{row['rule']} ({alloc})" if alloc not in ("", "uniform") else str(row["rule"])


WIN_SE = 2.0  # a rule beats (or loses to) top-k when its Δ at the target is more than this many SEs


def gain_z(row) -> float:
    """Δ vs top-k at the target in SEs, signed so that positive is better (a lower perplexity, a higher
    accuracy); NaN without a top-k run at the target or without an SE (an SE of 0: 0 for Δ = 0, else ±inf)."""
    d, se = row.get("delta_at_target", math.nan), row.get("delta_at_target_se", math.nan)
    if not (math.isfinite(d) and math.isfinite(se)):
        return math.nan
    gain = d if row["higher_is_better"] else -d
    return gain / se if se > 0 else math.copysign(math.inf, gain) if gain else 0.0


def winners(rep: "pd.DataFrame") -> list[dict]:
    """Per group, summary (task average, each lower-is-better task) and target k: the settings aimed at
    that k (`target_k`), best first (max accuracy, min perplexity); {"cell": the group keys, "target",
    "best": its row, "runner_up": the best row of another rule (`rule_name`) or None, "rows": all}."""
    t = rep[is_summary(rep) & rep["target_k"].notna() & compared(rep)]
    out = []
    for keys, g in t.groupby(CELL + ["target_k"], sort=False):
        hib = bool(g["higher_is_better"].iloc[0])
        g = g.sort_values(["value", "setting"], ascending=[not hib, True], kind="stable")
        best = g.iloc[0]
        others = g[g.apply(rule_name, axis=1) != rule_name(best)]
        out.append({"cell": dict(zip(CELL, keys[:-1])), "target": float(keys[-1]), "best": best,
                    "runner_up": others.iloc[0] if len(others) else None, "rows": g})
    return sorted(out, key=lambda w: (tuple(str(w["cell"][c]) for c in CELL), w["target"]))


def _twin_of(row, twins: "pd.DataFrame"):
    """The layer-budget twin of an adaptive setting: a per-layer fixed-k run made from its results file
    (`layer_budget`), else one whose per-layer mean k is within TWIN_TOL of the setting's, layer by layer."""
    src = Path(str(row["_src"]))
    for _, t in twins.iterrows():
        budget = t["_layer_budget"]
        if budget and (Path(budget).name == src.name or Path(budget).stem == src.stem):
            return t
    mine = row["_per_layer"]
    for _, t in twins.iterrows():
        theirs = t["_per_layer"]
        if mine and len(theirs) == len(mine) and all(
                math.isfinite(a) and math.isfinite(b) and abs(a - b) <= TWIN_TOL for a, b in zip(mine, theirs)):
            return t
    return None


def add_twins(df: "pd.DataFrame") -> "pd.DataFrame":
    """Each adaptive setting beside its layer-budget twin (a fixed k per layer with the setting's own
    per-layer means): 'twin', 'delta_vs_twin' (setting vs twin: the per-token adaptivity) with its
    paired SE 'delta_vs_twin_se', and 'alloc_delta' / 'alloc_se' (twin vs the stock top-k at its mean
    k: the layer allocation), so that the gain over top-k splits into the two."""
    df = df.copy()
    df["twin"] = ""
    for c in ("delta_vs_twin", "delta_vs_twin_se", "alloc_delta", "alloc_se"):
        df[c] = math.nan
    for _, g in df.groupby(CELL, sort=False):
        twins = g[(g["rule"] == LAYER_RULE) & g["value"].notna()]
        if twins.empty:
            continue
        for idx, row in g[compared(g) & (g["rule"] != LAYER_RULE) & ~g["rule"].str.startswith(FIXED_RULE)].iterrows():
            t = _twin_of(row, twins)
            if t is None:
                continue
            name = t["setting"]
            se = _paired_se(df, row, lambda rows, _m: ({0: [r for _, r in rows[rows["setting"] == name].iterrows()]},
                                                         [(0, 1.0)]))
            if se is None:
                se = math.hypot(_relative(row, row["stderr"]), _relative(t, t["stderr"]))
            df.loc[idx, ["twin", "delta_vs_twin", "delta_vs_twin_se", "alloc_delta", "alloc_se"]] = [
                name, difference(row["value"], t["value"], row["scale"]), se,
                df.at[t.name, "delta_vs_topk"], df.at[t.name, "delta_se"]]
    return df


def build_report(df: "pd.DataFrame") -> "pd.DataFrame":
    """Tidy frame -> report frame: with averages, matched-cost columns, twins and Pareto marks."""
    if df.empty:
        return pd.DataFrame(columns=REPORT_COLUMNS)
    if "evaluation" not in df.columns:
        df = df.assign(evaluation="")
    df = df.assign(_src=df["file"])
    for name, default in (("target_k", math.nan), ("allocation", ""), ("_not_reference", None), ("_per_layer", ()),
                          ("_layer_budget", "")):
        if name not in df.columns:
            df[name] = [default] * len(df)
    df = add_average(df)
    df = add_matched_cost(df)
    df = add_twins(df)
    df = mark_pareto(df)
    df["_fixed_first"] = (df["rule"] != FIXED_RULE).astype(int)
    df = df.sort_values(["model", "evaluation", "task", "avg_tasks", "_fixed_first", "rule", "mean_k", "setting"],
                        kind="stable")
    df = df[[c for c in REPORT_COLUMNS if c in df.columns]]
    return df.reset_index(drop=True)
