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


def results_file(path: Path, tasks: dict, *, model="olmoe_bh", model_args="", routing=None, date=1.0):
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
        "config": {"model": model, "model_args": model_args, "batch_size": 1, "limit": None},
        "date": date,
        "lm_eval_version": "0.4.13",
    }
    if routing is not None:
        data["config"]["routing"] = routing
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


def routing_block(mean_k, *, min_k=1, max_k=8, alpha=0.05, pvalue="zscore", selection="bh", per_task=None):
    r = {
        "settings": {"alpha": alpha, "min_k": min_k, "max_k": max_k, "temperature": 1.0, "pvalue": pvalue,
                     "selection": selection, "renormalize": False, "mode": "patch"},
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
    assert _row(rep, bh05, "task_a")["topk_acc_at_k"] == pytest.approx(0.50)
    assert _row(rep, bh05, "task_a")["delta_vs_topk"] == pytest.approx(0.08)
    assert _row(rep, bh05, "task_b")["topk_acc_at_k"] == pytest.approx(0.55)
    assert _row(rep, bh05, "task_b")["delta_vs_topk"] == pytest.approx(0.0)
    # average: token-weighted mean k = (2*100 + 6*300)/400 = 5; top-k avg 0.55@4, 0.65@8 -> 0.575
    a = _avg(rep, bh05)
    assert a["mean_k"] == pytest.approx(5.0)
    assert a["acc"] == pytest.approx(0.565)
    assert a["topk_acc_at_k"] == pytest.approx(0.575)
    assert a["delta_vs_topk"] == pytest.approx(-0.01)
    assert a["expert_fraction"] == pytest.approx(5.0 / 8)
    assert a["active_params"] == pytest.approx(DENSE + LAYERS * PPE * 5.0)
    assert a["stderr"] == pytest.approx(math.sqrt(2 * 0.01 ** 2) / 2)
    assert _row(rep, bh05, "task_b")["active_params"] == pytest.approx(DENSE + LAYERS * PPE * 6.0)
    b = _avg(rep, bh20)
    assert b["mean_k"] == pytest.approx(3.0)
    assert b["topk_acc_at_k"] == pytest.approx(0.50)  # 0.45@2 .. 0.55@4
    assert b["delta_vs_topk"] == pytest.approx(0.07)
    # hf runs: k from config (8) and from the num_experts_per_tok override (1)
    assert _avg(rep, "hf top-8")["mean_k"] == 8 and _avg(rep, "hf top-1")["mean_k"] == 1
    assert _avg(rep, "hf top-1")["expert_fraction"] == pytest.approx(1 / 8)
    assert math.isfinite(_avg(rep, "hf top-8")["active_params"])
    # softmax at k=1.5: between hf top-1 (0.25) and top-2 (0.45) -> 0.35 -> delta 0
    assert _avg(rep, "bh/softmax alpha=0.05 k=1..8")["topk_acc_at_k"] == pytest.approx(0.35)
    # group rows are not tasks
    assert "bh_offline" not in set(rep["task"])
    avg = rep[rep["task"] == R.AVERAGE]
    on = set(avg.loc[avg["pareto"], "setting"])
    assert on == {"hf top-1", "bh/softmax alpha=0.05 k=1..8", "olmoe_bh top-2", bh20, "olmoe_bh top-8", "hf top-8"}


def test_helpers_exact():
    assert R.interpolate_fixed([1, 2, 4, 8], [0.1, 0.3, 0.5, 0.9], 3.0) == pytest.approx(0.4)
    assert R.interpolate_fixed([8, 8], [0.6, 0.8], 8.0) == pytest.approx(0.7)
    assert math.isnan(R.interpolate_fixed([2, 4], [0.1, 0.2], 5.0))  # no extrapolation
    assert R.pareto_mask([0.5, 0.6, 0.55, 0.6], [1, 2, 3, 2]) == [True, True, False, True]
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
    assert len(df) == 1 and df.iloc[0]["acc"] == 0.2 and [Path(s).name for s in shadowed] == ["old.json"]


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
    assert {"model", "setting", "task", "acc", "stderr", "mean_k", "expert_fraction", "active_params",
            "pareto", "topk_acc_at_k", "delta_vs_topk"} <= set(csv.columns)
    # the hf run without a config keeps its accuracy
    assert (csv["acc"] == 0.5).any()


def test_cli_errors_are_one_line(tmp_path):
    for argv, flag in [(["report", str(tmp_path), "--format", "xml"], "--format"),
                       (["report", str(tmp_path), "--plot", "a.jpg"], "--plot")]:
        p = subprocess.run([sys.executable, "-m", "lm_eval_bh.cli", *argv], capture_output=True, text=True)
        assert p.returncode == 2 and flag in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "lm_eval_bh.cli", "report", str(tmp_path / "nothing")],
                       capture_output=True, text=True)
    assert p.returncode == 1 and "nothing" in p.stderr and "Traceback" not in p.stderr
