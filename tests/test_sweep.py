"""lm-eval-bh sweep on the tiny OLMoE with real lm-eval: kill it mid-way, restart, nothing lost or doubled."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
TASKS = "mmlu_dev_offline,bigbench_strategyqa_offline"


def tiny_model() -> Path:
    if os.environ.get("LM_EVAL_BH_TINY"):  # a prebuilt tiny model folder, if you have one
        return Path(os.environ["LM_EVAL_BH_TINY"])
    try:
        from lm_eval_bh.tiny import ensure_tiny_olmoe
    except ImportError:
        pytest.skip("lm_eval_bh.tiny is not available")
    return ensure_tiny_olmoe()


def _sweep_cmd(model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lm_eval_bh.cli", "sweep", "--model_args", f"pretrained={model},dtype=float32",
            "--tasks", TASKS, "--include_path", str(ROOT / "tasks"), "--limit", "3", "--device", "cpu",
            "--bootstrap_iters", "0", "--output_path", str(out), *extra]


def test_sweep_resume_after_kill(tmp_path):
    model = tiny_model()
    out = tmp_path / "sweep"
    cmd = _sweep_cmd(model, out, "--alphas", "0.01,0.05,0.2,0.5", "--topk", "1,2,4")
    expected = {"topk1", "topk2", "topk4"} | {f"bh-zscore_a{a}_k1-4" for a in ("0.01", "0.05", "0.2", "0.5")}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 150
    try:
        while time.time() < deadline and proc.poll() is None:
            if out.is_dir() and any(out.glob("*.json")):
                break
            time.sleep(0.02)
        assert proc.poll() is None or proc.returncode == 0, proc.stderr.read().decode()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stderr.close()
    first = {p.stem: p.stat().st_mtime_ns for p in out.glob("*.json")}
    assert first and set(first) <= expected
    # restart: finishes the rest, skips what is done, leaves no temp files
    p = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"{len(first)} already done" in p.stderr
    files = sorted(out.iterdir())
    assert {f.stem for f in files if f.suffix == ".json"} == expected
    assert [f.name for f in files if f.suffix != ".json"] == []  # no .tmp leftovers
    for sid, mtime in first.items():
        assert (out / f"{sid}.json").stat().st_mtime_ns == mtime  # not recomputed
    for f in files:
        data = json.loads(f.read_text())
        routing = data["config"]["routing"]
        assert set(data["results"]) >= set(TASKS.split(","))
        assert routing["settings"]["max_k"] == (4 if "bh" in f.stem else int(f.stem[4:]))
        if f.stem.startswith("topk"):
            assert routing["mean_experts_per_token"] == pytest.approx(int(f.stem[4:]))
        else:
            assert 1 <= routing["mean_experts_per_token"] <= 4
            assert routing["settings"]["alpha"] == float(f.stem.split("_a")[1].split("_")[0])
    # a third run has nothing to do and reports the table
    p = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "0 to run" in p.stderr and "bh/zscore alpha=0.05 k=1..4" in p.stdout


@pytest.mark.parametrize("extra, flag", [
    (["--alphas", "0.05,1.5"], "--alphas"),
    (["--pvalues", "bogus"], "--pvalues"),
    (["--topk", "0"], "--topk"),
    (["--model_args", "alpha=0.1"], "--model_args"),
])
def test_sweep_bad_input_is_one_line(tmp_path, extra, flag):
    model = tiny_model()
    cmd = _sweep_cmd(model, tmp_path / "o") + extra
    p = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.splitlines() if "error" in ln]
    assert len(lines) == 1 and flag in lines[0] and "Traceback" not in p.stderr
