"""lm-eval-bh report on lm-eval-shaped results files with hand-made numbers (exact expectations)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from lm_eval_bh.commands import report as R

DENSE, PPE, LAYERS = 1000.0, 10.0, 2


def _task(acc, se=0.01, norm=None):
    d = {"alias": "x", "acc,none": acc, "acc_stderr,none": se}
    if norm is not None:
        d["acc_norm,none"] = norm
        d["acc_norm_stderr,none"] = se
    return d


def results_file(path: Path, tasks: dict, *, model="olmoe_bh", model_args="", routing=None, date=1.0, limit=None,
                 sweep=None):
    """Write a file shaped like lm-eval 0.4.13's results_<date>.json."""
    data = {
        "results": {"bh_offline": {"alias": "bh_offline"}, **{t: _task(*v) if isinstance(v, tuple) else _task(v)
                                                              for t, v in tasks.items()}},
        "group_subtasks": {"bh_offline": list(tasks)},
        "configs": {t: {"task": t} for t in tasks},
        "versions": {t: 1.0 for t in tasks},
        "n-shot": {t: 0 for t in tasks},
        "higher_is_better": {t: {"acc": True} for t in tasks},
        "n-samples": {t: {"original": 10, "effective": 10} for t in tasks},
        "config": {"model": model, "model_args": model_args, "batch_size": 1, "limit": limit},
        "date": date,
        "lm_eval_version": "0.4.13",
    }
    if routing is not None:
        data["config"]["routing"] = routing
    if sweep is not None:
        data["sweep"] = sweep
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


def routing_block(mean_k, *, min_k=1, max_k=8, alpha=0.05, pvalue="zscore", selection="bh", per_task=None,
                  mode="patch"):
    r = {
        "settings": {"alpha": alpha, "min_k": min_k, "max_k": max_k, "temperature": 1.0, "pvalue": pvalue,
                     "selection": selection, "renormalize": False, "mode": mode},
        "model": {"num_layers": LAYERS, "num_experts": 64, "top_k": 8, "dense_params": DENSE,
                  "params_per_expert": PPE, "total_params": DENSE + LAYERS * 64 * PPE},
        "mean_experts_per_token": mean_k,
        "per_layer_mean": [mean_k] * LAYERS,
        "k_histogram": {str(round(mean_k)): 100},
        "tokens": 400,
        "active_params_per_token": DENSE + LAYERS * PPE * mean_k,
    }
    if per_task is not None:
        r["per_task"] = per_task
    return r


def tiny_config_dir(path: Path, top_k=8) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"model_type": "olmoe", "hidden_size": 16, "intermediate_size": 8, "num_hidden_layers": 2,
           "num_attention_heads": 2, "num_key_value_heads": 2, "num_experts": 64,
           "num_experts_per_tok": top_k, "vocab_size": 100, "tie_word_embeddings": False}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture()
def folder(tmp_path):
    d = tmp_path / "results"
    cfgdir = tiny_config_dir(tmp_path / "tinycfg")
    for k, a, b in [(2, 0.50, 0.40), (4, 0.60, 0.50), (8, 0.70, 0.60)]:
        results_file(d / f"topk{k}" / "results_1.json", {"task_a": a, "task_b": b},
                     model_args=f"pretrained={cfgdir}", routing=routing_block(float(k), min_k=k, max_k=k))
    # plain hf runs (dict model_args like the 0.4.13 CLI stores them): config top-8 and an override to 1
    results_file(d / "hf8" / "m" / "results_2.json", {"task_a": 0.70, "task_b": 0.60}, model="hf",
                 model_args={"pretrained": str(cfgdir), "device": "cpu"})
    results_file(d / "hf1" / "m" / "results_2.json", {"task_a": 0.30, "task_b": 0.20}, model="hf",
                 model_args={"pretrained": str(cfgdir), "num_experts_per_tok": 1})
    # adaptive: per-task k known (token-weighted average 5.0), and one without per_task (k = 3.0)
    results_file(d / "bh05.json", {"task_a": 0.58, "task_b": 0.55}, model_args=f"pretrained={cfgdir}",
                 routing=routing_block(5.0, per_task={"task_a": {"mean_experts_per_token": 2.0, "tokens": 100},
                                                      "task_b": {"mean_experts_per_token": 6.0, "tokens": 300}}))
    results_file(d / "bh20.json", {"task_a": 0.62, "task_b": 0.52}, model_args=f"pretrained={cfgdir}",
                 routing=routing_block(3.0, alpha=0.2))
    results_file(d / "soft.json", {"task_a": 0.40, "task_b": 0.30}, model_args=f"pretrained={cfgdir}",
                 routing=routing_block(1.5, pvalue="softmax"))
    (d / "corrupt.json").write_text('{"results": {"task_a": ')
    (d / "other.json").write_text('{"hello": 1}')
    return d


def _avg(rep, setting):
    r = rep[(rep["task"] == R.AVERAGE) & (rep["setting"] == setting)]
    assert len(r) == 1, setting
    return r.iloc[0]


def _row(rep, setting, task):
    r = rep[(rep["task"] == task) & (rep["setting"] == setting)]
    assert len(r) == 1, (setting, task)
    return r.iloc[0]


def test_interpolation_and_pareto_exact(folder):
    files, _ = R.find_result_files([folder])
    df, skipped = R.load_results(files)
    names = {Path(f).name for f, _ in skipped}
    assert names == {"corrupt.json", "other.json"}
    rep = R.build_report(R.dedupe(df)[0])
    bh05 = "bh/zscore alpha=0.05 k=1..8"
    bh20 = "bh/zscore alpha=0.2 k=1..8"
    # per task: task_a at k=2 -> top-2 = 0.50; task_b at k=6 -> halfway 0.50..0.60
    assert _row(rep, bh05, "task_a")["topk_value_at_k"] == pytest.approx(0.50)
    assert _row(rep, bh05, "task_a")["delta_vs_topk"] == pytest.approx(0.08)
    assert _row(rep, bh05, "task_b")["topk_value_at_k"] == pytest.approx(0.55)
    assert _row(rep, bh05, "task_b")["delta_vs_topk"] == pytest.approx(0.0)
    # average: token-weighted mean k = (2*100 + 6*300)/400 = 5; top-k avg 0.55@4, 0.65@8 -> 0.575
    a = _avg(rep, bh05)
    assert a["mean_k"] == pytest.approx(5.0)
    assert a["value"] == pytest.approx(0.565)
    assert a["topk_value_at_k"] == pytest.approx(0.575)
    assert a["delta_vs_topk"] == pytest.approx(-0.01)
    assert a["expert_fraction"] == pytest.approx(5.0 / 8)
    assert a["active_params"] == pytest.approx(DENSE + LAYERS * PPE * 5.0)
    assert a["stderr"] == pytest.approx(math.sqrt(2 * 0.01 ** 2) / 2)
    assert _row(rep, bh05, "task_b")["active_params"] == pytest.approx(DENSE + LAYERS * PPE * 6.0)
    b = _avg(rep, bh20)
    assert b["mean_k"] == pytest.approx(3.0)
    assert b["topk_value_at_k"] == pytest.approx(0.50)  # 0.45@2 .. 0.55@4
    assert b["delta_vs_topk"] == pytest.approx(0.07)
    # hf runs: k from config (8) and from the num_experts_per_tok override (1)
    assert _avg(rep, "hf top-8")["mean_k"] == 8 and _avg(rep, "hf top-1")["mean_k"] == 1
    assert _avg(rep, "hf top-1")["expert_fraction"] == pytest.approx(1 / 8)
    assert math.isfinite(_avg(rep, "hf top-8")["active_params"])
    # softmax at k=1.5: between hf top-1 (0.25) and top-2 (0.45) -> 0.35 -> delta 0
    assert _avg(rep, "bh/softmax alpha=0.05 k=1..8")["topk_value_at_k"] == pytest.approx(0.35)
    # group rows are not tasks
    assert "bh_offline" not in set(rep["task"])
    avg = rep[rep["task"] == R.AVERAGE]
    on = set(avg.loc[avg["pareto"], "setting"])
    # hf top-8 and olmoe_bh top-8 tie exactly: one star
    assert on == {"hf top-1", "bh/softmax alpha=0.05 k=1..8", "olmoe_bh top-2", bh20, "hf top-8"}


def test_helpers_exact():
    assert R.interpolate_fixed([1, 2, 4, 8], [0.1, 0.3, 0.5, 0.9], 3.0) == pytest.approx(0.4)
    assert R.interpolate_fixed([8, 8], [0.6, 0.8], 8.0) == pytest.approx(0.7)
    assert math.isnan(R.interpolate_fixed([2, 4], [0.1, 0.2], 5.0))  # no extrapolation
    assert R.pareto_mask([0.5, 0.6, 0.55, 0.6], [1, 2, 3, 2]) == [True, True, False, False]  # a tie: starred once
    # within half a printed digit: a tie; the cheaper one dominates, whatever the 5th decimal says
    assert R.pareto_mask([0.30001, 0.30000], [1.8, 1.57]) == [False, True]
    assert R.pareto_mask([0.3000, 0.3002], [1.8, 1.57]) == [False, True]
    assert R.pareto_mask([0.3000, 0.3002], [1.57, 1.8]) == [True, True]
    assert R.pareto_mask([math.nan, 0.3], [1.0, 2.0]) == [False, True]
    assert R.primary_metric({"acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.6,
                             "acc_norm_stderr,none": 0.2}) == ("acc_norm", 0.6, 0.2)
    assert R.primary_metric({"exact_match,strict": 0.3, "exact_match_stderr,strict": "N/A"})[:2] == ("exact_match", 0.3)


def test_plot_one_curve_per_rule(folder, tmp_path):
    files, _ = R.find_result_files([folder])
    df, _ = R.load_results(files)
    rep = R.build_report(R.dedupe(df)[0])
    fig = R.make_plot(rep)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert sorted(labels) == ["bh/softmax", "bh/zscore", "top-k"]
    out = tmp_path / "p.png"
    fig.savefig(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dedupe_keeps_newest(tmp_path):
    d = tmp_path / "r"
    results_file(d / "old.json", {"t": 0.1}, routing=routing_block(2.0), date=1.0)
    results_file(d / "new.json", {"t": 0.2}, routing=routing_block(2.0), date=2.0)
    df, _ = R.load_results(R.find_result_files([d])[0])
    df, shadowed = R.dedupe(df)
    assert len(df) == 1 and df.iloc[0]["value"] == 0.2 and [Path(s).name for s in shadowed] == ["old.json"]


def test_cli_report_md_csv_plot_and_bad_files(folder, tmp_path):
    cfgless = tmp_path / "nocfg"
    results_file(folder / "hf_missing" / "results_3.json", {"task_a": 0.5, "task_b": 0.5}, model="hf",
                 model_args={"pretrained": str(cfgless)})
    png = tmp_path / "plot.png"
    p = subprocess.run([sys.executable, "-m", "lm_eval_bh.cli", "report", str(folder), "--plot", str(png)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "corrupt.json" in p.stderr and "other.json" in p.stderr and "Traceback" not in p.stderr
    assert "results_3.json" in p.stderr and "unreadable" in p.stderr  # hf run without config: cost unknown
    assert "bh/zscore alpha=0.05 k=1..8" in p.stdout and "| setting" in p.stdout
    assert png.read_bytes()[:4] == b"\x89PNG"
    out = tmp_path / "r.csv"
    p = subprocess.run([sys.executable, "-m", "lm_eval_bh.cli", "report", str(folder), "--format", "csv",
                        "--output", str(out)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout == ""
    import pandas as pd

    csv = pd.read_csv(out)
    assert {"model", "setting", "task", "value", "stderr", "mean_k", "expert_fraction", "active_params",
            "pareto", "topk_value_at_k", "delta_vs_topk"} <= set(csv.columns)
    # the hf run without a config keeps its accuracy
    assert (csv["value"] == 0.5).any()


def test_cli_errors_are_one_line(tmp_path):
    for argv, flag in [(["report", str(tmp_path), "--format", "xml"], "--format"),
                       (["report", str(tmp_path), "--plot", "a.jpg"], "--plot")]:
        p = subprocess.run([sys.executable, "-m", "lm_eval_bh.cli", *argv], capture_output=True, text=True)
        assert p.returncode == 2 and flag in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "lm_eval_bh.cli", "report", str(tmp_path / "nothing")],
                       capture_output=True, text=True)
    assert p.returncode == 1 and "nothing" in p.stderr and "Traceback" not in p.stderr


def _report(folder, fmt="md"):
    files, _ = R.find_result_files([folder])
    df, _ = R.load_results(files)
    return R.build_report(R.dedupe(df)[0])


def _md_table(text: str, heading: str) -> list[dict]:
    """The rows of the Markdown table under `heading`, as dicts of stripped cell strings."""
    block = text.split(heading, 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in block.splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return [dict(zip(cells[0], c)) for c in cells[2:]]


def test_markdown_per_task_values_and_stderr(folder):
    """Every md cell shows its own number: value = acc, stderr = its stderr (4 decimals)."""
    rep = _report(folder)
    text = R.render(rep, "md")
    rows = _md_table(text, "## Per task")
    assert len(rows) == len(rep[rep["task"] != R.AVERAGE])
    for row in rows:
        r = _row(rep, row["setting"], row["task"])
        assert row["value"] == f"{r['value']:.4f}" and row["stderr"] == f"{r['stderr']:.4f}"
        assert row["mean k"] == f"{r['mean_k']:.3f}"
    summary = {r["setting"]: r for r in _md_table(text, "## Task average per setting")}
    a = _avg(rep, "bh/zscore alpha=0.05 k=1..8")
    assert summary[a["setting"]]["acc ± se"] == f"{a['value']:.4f} ± {a['stderr']:.4f}"
    assert summary[a["setting"]]["Δ vs top-k ± se"].startswith(f"{a['delta_vs_topk']:+.4f} ± ")


def test_nan_metric_makes_the_average_undefined(tmp_path, capsys):
    d = tmp_path / "r"
    for k, acc in [(1, 0.3), (4, 0.6)]:
        results_file(d / f"topk{k}.json", {"task_a": acc, "task_b": acc}, routing=routing_block(k, min_k=k, max_k=k))
    results_file(d / "bh.json", {"task_a": 0.9, "task_b": math.nan}, routing=routing_block(2.0))
    text, rep = R.report([d], err=sys.stderr)
    a = _avg(rep, "bh/zscore alpha=0.05 k=1..8")
    assert math.isnan(a["value"]) and a["n_tasks"] == 2  # not 0.9 over one task
    assert not a["pareto"] and math.isnan(a["delta_vs_topk"]) and math.isnan(a["topk_value_at_k"])
    assert math.isnan(_row(rep, "bh/zscore alpha=0.05 k=1..8", "task_b")["delta_vs_topk"])
    assert _row(rep, "bh/zscore alpha=0.05 k=1..8", "task_a")["delta_vs_topk"] == pytest.approx(0.9 - 0.4)
    err = capsys.readouterr().err
    assert "undefined metric" in err and "bh/zscore alpha=0.05 k=1..8 (task_b)" in err
    assert set(_avg(rep, s)["pareto"] for s in ("olmoe_bh top-1", "olmoe_bh top-4")) == {True}


def test_analyze_runs_are_labelled_with_the_stock_cost(tmp_path):
    """mode=analyze routes the stock top-k: never a top-k point, never Pareto, never a reference."""
    d = tmp_path / "r"
    for k, acc in [(2, 0.4), (8, 0.6)]:
        results_file(d / f"topk{k}.json", {"t": acc}, routing=routing_block(k, min_k=k, max_k=k))
    results_file(d / "an1.json", {"t": 0.6}, routing=routing_block(1.0, min_k=1, max_k=1, mode="analyze"))
    results_file(d / "an_bh.json", {"t": 0.6}, routing=routing_block(3.0, mode="analyze"))
    results_file(d / "bh.json", {"t": 0.5}, routing=routing_block(5.0))
    rep = _report(d)
    avg = rep[rep["task"] == R.AVERAGE]
    an = avg[avg["rule"].str.startswith(R.ANALYZE_PREFIX)]
    assert len(an) == 2 and set(avg.loc[avg["rule"] == R.FIXED_RULE, "setting"]) == {"olmoe_bh top-2", "olmoe_bh top-8"}
    assert (an["mean_k"] == 8).all() and (an["active_params"] == DENSE + LAYERS * PPE * 8).all()
    assert not an["pareto"].any() and an["delta_vs_topk"].isna().all()
    assert any("the rule would use 3.000" in s for s in an["setting"])
    # the k = 1 analyze run is no anchor: bh at k = 5 interpolates top-2 and top-8 only
    assert _avg(rep, "bh/zscore alpha=0.05 k=1..8")["topk_value_at_k"] == pytest.approx(0.5)


def test_different_evaluations_are_never_mixed(tmp_path, capsys):
    d = tmp_path / "r"
    for lim in (20, 30):
        results_file(d / f"l{lim}" / "topk2.json", {"t": 0.4}, routing=routing_block(2, min_k=2, max_k=2), limit=lim)
        results_file(d / f"l{lim}" / "bh.json", {"t": 0.5 if lim == 20 else 0.7}, routing=routing_block(3.0),
                     limit=lim, date=lim)
    results_file(d / "l20" / "topk4.json", {"t": 0.6}, routing=routing_block(4, min_k=4, max_k=4), limit=20)
    text, rep = R.report([d], err=sys.stderr)
    avg = rep[rep["task"] == R.AVERAGE]
    assert sorted(avg["evaluation"].unique()) == ["limit=20", "limit=30"]
    bh = avg[avg["setting"] == "bh/zscore alpha=0.05 k=1..8"].set_index("evaluation")
    assert bh.loc["limit=20", "value"] == 0.5 and bh.loc["limit=30", "value"] == 0.7  # neither shadows the other
    assert bh.loc["limit=20", "topk_value_at_k"] == pytest.approx(0.5)
    assert math.isnan(bh.loc["limit=30", "topk_value_at_k"])  # limit 30 has no top-4: no Δ from limit 20's
    assert "2 different evaluations" in capsys.readouterr().err
    assert "| evaluation" in text and "limit=30" in text


def _samples_lines(task, values, metric="acc"):
    return "".join(json.dumps({"task": task, "doc_id": i, "filter": "none", metric: v}) + "\n"
                   for i, v in enumerate(values))


def test_paired_standard_error_of_the_matched_cost_delta(tmp_path, capsys):
    """Δ's SE is the SE of the per-item differences against the interpolated top-k (same items), read
    from sweep samples files and from lm-eval's samples_<task>_<date>.jsonl; without them, unpaired."""
    import numpy as np

    d = tmp_path / "r"
    M = "pretrained=m"  # one model
    items = {1: {"a": [0, 1, 0, 1, 0, 0], "b": [1, 0, 0, 0, 1, 1]},
             2: {"a": [1, 1, 0, 1, 0, 1], "b": [1, 1, 0, 0, 1, 1]},
             "bh": {"a": [1, 1, 1, 0, 0, 1], "b": [0, 1, 1, 0, 1, 1]}}
    acc = {k: {t: float(np.mean(v)) for t, v in tv.items()} for k, tv in items.items()}
    date = "2026-01-01T00-00-00.0"
    for k in (1, 2):  # plain lm_eval --log_samples runs
        run = d / f"top{k}" / "m"
        results_file(run / f"results_{date}.json", {t: (acc[k][t], 0.2) for t in "ab"},
                     routing=routing_block(k, min_k=k, max_k=k), model_args=M)
        for t in "ab":
            (run / f"samples_{t}_{date}.jsonl").write_text(_samples_lines(t, items[k][t]).replace('"task": "%s", ' % t, ""))
    bh = results_file(d / "bh.json", {t: (acc["bh"][t], 0.2) for t in "ab"}, routing=routing_block(1.25), model_args=M,
                      sweep={"setting_id": "bh", "identity": None})
    (d / "bh.samples.jsonl").write_text(_samples_lines("a", items["bh"]["a"]) + _samples_lines("b", items["bh"]["b"]))

    def expected(t):
        diff = np.array(items["bh"][t]) - (0.75 * np.array(items[1][t]) + 0.25 * np.array(items[2][t]))
        return diff.mean(), diff.std(ddof=1) / math.sqrt(len(diff))

    text, rep = R.report([d], err=sys.stderr)
    setting = "bh/zscore alpha=0.05 k=1..8"
    for t in "ab":
        r = _row(rep, setting, t)
        assert r["delta_vs_topk"] == pytest.approx(expected(t)[0]) and r["delta_se"] == pytest.approx(expected(t)[1])
        assert r["delta_se_kind"] == "paired"
    a = _avg(rep, setting)
    assert a["delta_se"] == pytest.approx(math.hypot(expected("a")[1], expected("b")[1]) / 2)
    assert a["delta_se_kind"] == "paired" and "se: paired" in text
    assert f"{a['delta_vs_topk']:+.4f} ± {a['delta_se']:.4f}" in text

    # a second top-2 run without per-sample outputs (a plain --model hf run, say) that scores the same:
    # still paired, on the items of the run that has them; scoring differently: unpaired
    hf = results_file(d / "hf2.json", {t: (acc[2][t], 0.2) for t in "ab"}, routing=routing_block(2, min_k=2, max_k=2),
                      model="hf", model_args=M)
    assert _row(R.report([d], err=sys.stderr)[1], setting, "a")["delta_se_kind"] == "paired"
    results_file(hf, {t: (acc[2][t] + 0.1, 0.2) for t in "ab"}, routing=routing_block(2, min_k=2, max_k=2), model="hf",
                 model_args=M)
    assert _row(R.report([d], err=sys.stderr)[1], setting, "a")["delta_se_kind"] == "unpaired"
    hf.unlink()

    bh.with_name("bh.samples.jsonl").unlink()  # no per-sample outputs: the unpaired SE, labelled as such
    text, rep = R.report([d], err=sys.stderr)
    r = _row(rep, setting, "a")
    assert r["delta_se_kind"] == "unpaired"
    assert r["delta_se"] == pytest.approx(math.sqrt(0.2 ** 2 + 0.75 ** 2 * 0.2 ** 2 + 0.25 ** 2 * 0.2 ** 2))
    assert "(unpaired)" in text and "se: unpaired" in text


def test_plot_labels_points_and_keeps_the_legend_off_the_data(folder):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = R.make_plot(_report(folder))
    ax = fig.axes[0]
    texts = {t.get_text() for t in ax.texts}
    assert {"α=0.05", "α=0.2", "k=1", "k=8"} <= texts
    FigureCanvasAgg(fig).draw()
    assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1  # beside the axes


def test_report_output_errors_and_written_files(folder, tmp_path):
    cli = [sys.executable, "-m", "lm_eval_bh.cli", "report", str(folder)]
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for flag, target in [("--output", tmp_path), ("--output", a_file / "r.md"), ("--plot", a_file / "p.png")]:
        p = subprocess.run([*cli, flag, str(target)], capture_output=True, text=True, timeout=120)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert len([ln for ln in lines if "error" in ln]) == 1 and flag in p.stderr and str(target) in p.stderr
    out, png = tmp_path / "sub" / "r.md", tmp_path / "p.png"
    p = subprocess.run([*cli, "--output", str(out), "--plot", str(png)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and f"wrote {out}" in p.stderr and f"wrote {png}" in p.stderr
    assert out.read_text().startswith("## Task average")
