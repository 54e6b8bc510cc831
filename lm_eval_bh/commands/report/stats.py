"""Statistics on the tidy frame: task averages, Pareto fronts, the stock top-k interpolated at a setting's
mean k (matched cost) and the paired standard error of the difference. Pure pandas/numpy."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .load import (ACC_TIE, ANALYZE_PREFIX, AVERAGE, COST_TIE, FIXED_RULE, GROUP, REPORT_COLUMNS,
                   load_item_scores)


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
