"""The demo end to end (real lm_eval CLI subprocesses on the tiny model), then report on its folder
mixed with a corrupt file: the corrupt file is named on stderr, the olmoe_bh and hf runs are reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


def test_demo_then_report_mixed_folder(tmp_path):
    out = tmp_path / "demo"
    p = subprocess.run([sys.executable, "-m", "lm_eval_bh.cli", "demo", "--output_path", str(out),
                        "--alphas", "0.05", "--topk", "1,4", "--limit", "5"],
                       cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "bh/zscore alpha=0.05" in p.stdout and "hf top-4" in p.stdout and "olmoe_bh top-4" in p.stdout
    assert "stock hf top-4 agree" in p.stdout
    assert (out / "report.md").is_file()
    assert (out / "accuracy_vs_experts.png").read_bytes()[:4] == b"\x89PNG"
    # lm-eval's own file layout: <out>/<run>/<model_name_sanitized>/results_<date>.json
    files = sorted(out.rglob("results_*.json"))
    assert len(files) == 4
    assert sum("routing" in json.loads(f.read_text())["config"] for f in files) == 3

    (out / "broken" ).mkdir()
    (out / "broken" / "results_corrupt.json").write_text('{"results": {')
    p = subprocess.run([sys.executable, "-m", "lm_eval_bh.cli", "report", str(out), "--format", "json"],
                       cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "results_corrupt.json" in p.stderr and "Traceback" not in p.stderr
    rows = json.loads(p.stdout)
    settings = {r["setting"] for r in rows}
    assert settings == {"olmoe_bh top-1", "olmoe_bh top-4", "hf top-4", "bh/zscore alpha=0.05 k=1..4"}
    avg = {r["setting"]: r for r in rows if r["task"] == "(average)"}
    assert avg["hf top-4"]["acc"] == avg["olmoe_bh top-4"]["acc"]
    assert avg["hf top-4"]["mean_k"] == 4 and avg["olmoe_bh top-1"]["mean_k"] == 1
    bh = avg["bh/zscore alpha=0.05 k=1..4"]
    assert 1 <= bh["mean_k"] <= 4 and bh["topk_acc_at_k"] is not None
    assert bh["n_tasks"] >= 2
