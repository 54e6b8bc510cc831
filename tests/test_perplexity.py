"""Perplexity through the stock path: the offline task `pydoc_perplexity_offline` through `lm_eval --model
olmoe_bh` and `lm-eval-bh sweep`, and `lm-eval-bh report` on lower-is-better metrics (direction from the
results file, Pareto front, matched cost interpolated in log perplexity, paired per-document SE)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_concurrently

from lm_eval_bh.commands import report as R

REPO = Path(__file__).resolve().parents[1]
TASKS = str(REPO / "tasks")
PPL = "pydoc_perplexity_offline"
BH = "bh/zscore alpha=0.05 k=1..8"


# --------------------------------------------------------------------------- hand-made results files

def _file(path: Path, mean_k: float, tasks: dict, fixed: bool = False, samples: dict | None = None,
          alpha: float = 0.05) -> Path:
    """An lm-eval-shaped sweep results file: `tasks` maps task -> acc (a float) or word perplexity
    (a dict {"ppl": value}); `samples` maps task -> per-sample records."""
    k = int(mean_k)
    results, hib, configs = {}, {}, {}
    for t, v in tasks.items():
        if isinstance(v, dict):
            results[t] = {"alias": t, "word_perplexity,none": v["ppl"], "word_perplexity_stderr,none": "N/A",
                          "bits_per_byte,none": math.log2(v["ppl"]) / 5, "bits_per_byte_stderr,none": "N/A"}
            hib[t] = {"word_perplexity": False, "bits_per_byte": False}
            configs[t] = {"task": t, "output_type": "loglikelihood_rolling",
                          "metric_list": [{"metric": "word_perplexity", "aggregation": "weighted_perplexity",
                                           "higher_is_better": False}]}
        else:
            results[t] = {"alias": t, "acc,none": v, "acc_stderr,none": 0.05}
            hib[t] = {"acc": True}
            configs[t] = {"task": t}
    data = {
        "results": results, "higher_is_better": hib, "configs": configs, "n-shot": {t: 0 for t in tasks},
        "config": {"model": "moe_bh", "model_args": "pretrained=m", "limit": None,
                   "routing": {"settings": {"alpha": alpha, "min_k": k if fixed else 1, "max_k": k if fixed else 8,
                                            "pvalue": "zscore", "selection": "bh", "mode": "patch"},
                               "model": {"num_layers": 2, "num_experts": 8, "top_k": 8, "dense_params": 100.0,
                                         "params_per_expert": 1.0, "total_params": 116.0},
                               "mean_experts_per_token": mean_k, "tokens": 10}},
        "sweep": {"setting_id": path.stem, "identity": None}, "date": 1.0, "lm_eval_version": "0.4.13",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    if samples:
        path.with_name(path.stem + ".samples.jsonl").write_text(
            "".join(json.dumps({"task": t, "filter": "none", **s}) + "\n" for t, ss in samples.items() for s in ss))
    return path


def _row(rep, setting, task):
    r = rep[(rep["setting"] == setting) & (rep["task"] == task)]
    assert len(r) == 1, (setting, task)
    return r.iloc[0]


def test_pareto_and_matched_cost_of_a_lower_is_better_metric(tmp_path, capsys):
    """Lower perplexity is better: a cheaper point with lower perplexity is on the front, a costlier
    point with higher perplexity is not; accuracies are averaged without the perplexity task; the
    top-k reference is interpolated in log perplexity; a NaN perplexity enters no table's ranking."""
    d = tmp_path / "r"
    _file(d / "topk1.json", 1, {"mc": 0.30, PPL: {"ppl": 100.0}}, fixed=True)
    _file(d / "topk4.json", 4, {"mc": 0.50, PPL: {"ppl": 20.0}}, fixed=True)
    _file(d / "good.json", 2, {"mc": 0.40, PPL: {"ppl": 40.0}})                   # better than top-k at k = 2
    _file(d / "bad.json", 3, {"mc": 0.45, PPL: {"ppl": 90.0}}, alpha=0.2)         # dominated by the point above
    text, rep = R.report([d], err=sys.stderr)
    front = set(rep[(rep["task"] == PPL) & rep["pareto"]]["mean_k"])
    assert front == {1.0, 2.0, 4.0}  # the k = 3 point (90 > 40 at more cost) is not on it
    ppl = rep[rep["task"] == PPL].set_index("mean_k")
    assert not ppl.loc[3.0, "higher_is_better"] and ppl.loc[3.0, "scale"] == "log"
    ref2 = math.exp(math.log(100) + (math.log(20) - math.log(100)) / 3)  # log-interpolated top-k at k = 2
    assert ppl.loc[2.0, "topk_value_at_k"] == pytest.approx(ref2)
    assert ppl.loc[2.0, "delta_vs_topk"] == pytest.approx(math.log(40 / ref2)) and ppl.loc[2.0, "delta_vs_topk"] < 0
    assert math.isnan(ppl.loc[2.0, "delta_se"])  # lm-eval records no stderr, no samples: no SE, none invented
    # the accuracy average holds the accuracy task only, and its front goes by max accuracy
    avg = rep[rep["task"] == R.AVERAGE].set_index("mean_k")
    assert (avg["n_tasks"] == 1).all() and avg.loc[2.0, "value"] == 0.40
    assert set(avg[avg["pareto"]].index) == {1.0, 2.0, 3.0, 4.0}
    # rendered: the accuracy table, then the perplexity table with its own direction and front
    head = f"## {PPL}: word_perplexity per setting (lower is better; Pareto: * = on the front of min word_perplexity"
    assert "## Task average per setting" in text and head in text
    table = text[text.index(head):text.index("## Per task")]
    rows = {c[0]: c for c in ([x.strip() for x in ln.strip("|").split("|")] for ln in table.splitlines()
                               if ln.startswith("| ") and "setting" not in ln)}
    assert rows["moe_bh top-1"][-1] == "*" and rows["moe_bh top-4"][-1] == "*"
    assert rows["bh/zscore alpha=0.05 k=1..8"][-1] == "*" and rows["bh/zscore alpha=0.2 k=1..8"][-1] == ""
    assert f"{math.log(40 / ref2):+.4f}" in table and f"{40 / ref2 - 1:+.1%}" in table
    assert "Δ vs top-k: log(word_perplexity / the stock top-k word_perplexity" in table
    assert "word_perplexity ↓" in text

    # a NaN perplexity: no Pareto mark, no Δ, named on stderr; the accuracy average is unaffected
    _file(d / "bad.json", 3, {"mc": 0.45, PPL: {"ppl": float("nan")}}, alpha=0.2)
    text, rep = R.report([d], err=sys.stderr)
    nan_row = rep[(rep["task"] == PPL) & (rep["mean_k"] == 3.0)].iloc[0]
    assert not nan_row["pareto"] and math.isnan(nan_row["delta_vs_topk"])
    assert rep[(rep["task"] == R.AVERAGE) & (rep["mean_k"] == 3.0)].iloc[0]["value"] == 0.45
    assert f"({PPL})" in capsys.readouterr().err
    assert R.pareto_mask([100.0, 40.0, 90.0, 20.0], [1, 2, 3, 4], higher_is_better=False) == [True, True, False, True]
    assert R.pareto_mask([100.0, 40.0, 90.0, 20.0], [1, 2, 3, 4]) == [True, False, False, False]


def _ppl_samples(ll, words):
    return [{"doc_id": i, "word_perplexity": [float(a), int(n)]} for i, (a, n) in enumerate(zip(ll, words))]


def test_paired_se_of_a_perplexity_delta_matches_a_bootstrap_over_documents(tmp_path):
    """The per-document (log-likelihood, words) pairs give Δ = log(perplexity / top-k perplexity), the log of a
    ratio of sums, and its SE by the delta method, checked against a direct bootstrap over documents of the
    same Δ (log-interpolated reference)."""
    rng = np.random.default_rng(0)
    n = 40
    words = rng.integers(20, 120, n)
    base = -words * rng.normal(4.5, 0.5, n)  # per-document log-likelihoods: 4.5 nats a word, spread 0.5
    ll = {1: base * 1.3, 4: base * 1.0, "bh": base * 1.1 + rng.normal(0, 10, n)}
    ppl = {k: math.exp(-v.sum() / words.sum()) for k, v in ll.items()}
    d = tmp_path / "r"
    for k in (1, 4):
        _file(d / f"topk{k}.json", k, {PPL: {"ppl": ppl[k]}}, fixed=True, samples={PPL: _ppl_samples(ll[k], words)})
    _file(d / "bh.json", 2.5, {PPL: {"ppl": ppl["bh"]}}, samples={PPL: _ppl_samples(ll["bh"], words)})
    _, rep = R.report([d], err=sys.stderr)
    r = _row(rep, BH, PPL)
    assert r["delta_se_kind"] == "paired"

    def delta(idx):
        nll = {k: -v[idx].sum() / words[idx].sum() for k, v in ll.items()}
        return nll["bh"] - (0.5 * nll[1] + 0.5 * nll[4])

    assert r["delta_vs_topk"] == pytest.approx(delta(np.arange(n)))
    boot = np.std([delta(rng.integers(0, n, n)) for _ in range(4000)])
    assert r["delta_se"] == pytest.approx(boot, rel=0.12)
    assert r["delta_se"] > 0

    # per-sample pairs that do not give the row's value (another run) are not paired
    _file(d / "bh.json", 2.5, {PPL: {"ppl": ppl["bh"] * 1.01}}, samples={PPL: _ppl_samples(ll["bh"], words)})
    assert _row(R.report([d], err=sys.stderr)[1], BH, PPL)["delta_se_kind"] == "unpaired"


def test_per_item_perplexity_is_paired_in_log_and_unpaired_se_scales_with_the_reference(tmp_path):
    """lm-eval's `perplexity` (one log-likelihood per item, aggregated as exp(-mean)): the direction and the
    log scale come from lm-eval's registry, Δ pairs items like a per-document ratio with n_d = 1; without
    samples, the SE of the log ratio is from each point's relative SE."""
    rng = np.random.default_rng(1)
    n = 60
    base = -rng.gamma(4.0, 0.5, n)  # per-item log-likelihoods
    ll = {1: base * 1.5, 4: base, "bh": base * 1.2 + rng.normal(0, 0.3, n)}
    ppl = {k: math.exp(-v.mean()) for k, v in ll.items()}
    d = tmp_path / "r"
    for key, mean_k in ((1, 1.0), (4, 4.0), ("bh", 2.5)):
        path = _file(d / f"{key}.json", mean_k, {"lambada_like": 0.0}, fixed=key != "bh")
        data = json.loads(path.read_text())
        data["results"]["lambada_like"] = {"alias": "l", "perplexity,none": ppl[key], "perplexity_stderr,none": 0.1 * ppl[key]}
        del data["higher_is_better"]  # an older file: lm-eval's metric registry gives the direction
        path.write_text(json.dumps(data))
        path.with_name(path.stem + ".samples.jsonl").write_text("".join(
            json.dumps({"task": "lambada_like", "doc_id": i, "filter": "none", "perplexity": float(v)}) + "\n"
            for i, v in enumerate(ll[key])))
    r = _row(R.report([d], err=sys.stderr)[1], BH, "lambada_like")
    assert not r["higher_is_better"] and r["scale"] == "log" and r["delta_se_kind"] == "paired"
    ref = math.exp(-(0.5 * ll[1] + 0.5 * ll[4]).mean())
    assert r["topk_value_at_k"] == pytest.approx(ref) and r["delta_vs_topk"] == pytest.approx(math.log(ppl["bh"] / ref))
    boot = np.std([-ll["bh"][i].mean() + (0.5 * ll[1][i] + 0.5 * ll[4][i]).mean()
                   for i in (rng.integers(0, n, n) for _ in range(4000))])
    assert r["delta_se"] == pytest.approx(boot, rel=0.12)

    (d / "bh.samples.jsonl").unlink()
    r = _row(R.report([d], err=sys.stderr)[1], BH, "lambada_like")
    # each point's SE is 10 % of its value: in log units, 0.1 each
    expected = math.sqrt(0.1 ** 2 + 2 * (0.5 * 0.1) ** 2)
    assert r["delta_se_kind"] == "unpaired" and r["delta_se"] == pytest.approx(expected)


# --------------------------------------------------------------------------- the real lm-eval path

def test_perplexity_task_through_lm_eval_cli_sweep_and_report(tiny_model_dir, tmp_path):
    """`lm_eval --model olmoe_bh --log_samples` and `lm-eval-bh sweep` run the perplexity task; the report
    joins them: its perplexity table is ranked lower-is-better, the BH rows are compared with the
    log-interpolated top-k, paired by document."""
    out = tmp_path / "out"
    runs = run_concurrently({  # two independent command lines: one core each
        "cli": (["lm_eval", "--model", "olmoe_bh", "--model_args", f"pretrained={tiny_model_dir},alpha=0.5",
                 "--device", "cpu", "--include_path", TASKS, "--tasks", f"{PPL},mmlu_dev_offline", "--limit", "3",
                 "--log_samples", "--output_path", str(out / "cli")], {"cwd": REPO}),
        "sweep": ([sys.executable, "-m", "lm_eval_bh.cli", "sweep", "--model_args", f"pretrained={tiny_model_dir}",
                   "--device", "cpu", "--batch_size", "4", "--include_path", TASKS, "--tasks",
                   f"{PPL},mmlu_dev_offline", "--limit", "3", "--topk", "1,4", "--alphas", "0.05", "--output_path",
                   str(out / "sweep")], {"cwd": REPO}),
    })
    cli, sweep = runs["cli"], runs["sweep"]
    assert cli.returncode == 0, cli.stderr[-3000:]
    (res_file,) = (out / "cli").rglob("results_*.json")
    res = json.loads(res_file.read_text())
    assert res["higher_is_better"][PPL] == {"word_perplexity": False, "byte_perplexity": False, "bits_per_byte": False}
    assert 1 < res["results"][PPL]["word_perplexity,none"] < math.inf
    assert res["config"]["routing"]["per_task"][PPL]["tokens"] > 0
    # what the report compares to keep evaluations apart, under the names lm-eval records them
    assert {"chat_template", "chat_template_sha", "system_instruction", "fewshot_as_multiturn"} <= set(res)
    assert res["config"]["model_dtype"] == "torch.float32" and res["config"]["limit"] == 3
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    assert f"## {PPL}: word_perplexity per setting (lower is better" in sweep.stdout

    text, rep = R.report([out], err=sys.stderr)
    p = rep[rep["task"] == PPL]
    assert set(p["setting"]) >= {"olmoe_bh top-1", "olmoe_bh top-4", "bh/zscore alpha=0.05 k=1..4",
                                 "bh/zscore alpha=0.5 k=1..4"}
    assert (~p["higher_is_better"]).all() and (p["scale"] == "log").all() and (p["value"] > 1).all()
    fixed = p[p["rule"] == R.FIXED_RULE].set_index("fixed_k")["value"]
    for _, r in p[p["rule"] != R.FIXED_RULE].iterrows():
        w = (r["mean_k"] - 1) / 3
        assert r["topk_value_at_k"] == pytest.approx(math.exp((1 - w) * math.log(fixed[1]) + w * math.log(fixed[4])))
        assert r["delta_se_kind"] == "paired" and r["delta_se"] > 0
    # the front, checked point by point: on it exactly when no other point is as good and as cheap
    pts = list(zip(p["value"], p["mean_k"], p["pareto"]))
    for v, k, on in pts:
        beaten = any(v2 <= v and k2 <= k and (v2, k2) != (v, k) for v2, k2, _ in pts)
        assert on == (not beaten), (v, k)
    assert (rep[rep["task"] == R.AVERAGE]["n_tasks"] == 1).all()  # the accuracy average is mmlu alone
