"""The embedded tiny OLMoE model and the offline lm-eval tasks (real model, real data, no mocks)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from lm_eval_bh import benjamini_hochberg, pvalues, tiny  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "tasks"
OFFLINE = TASKS / "offline"
OFFLINE_TASKS = [
    "mmlu_dev_offline",
    "bigbench_strategyqa_offline",
    "bigbench_social_iqa_offline",
    "bigbench_physical_intuition_offline",
]


@pytest.fixture(scope="module", autouse=True)
def _hf_home(tmp_path_factory):
    old = os.environ.get("HF_HOME")
    os.environ["HF_HOME"] = str(tmp_path_factory.mktemp("hf_home"))
    yield
    if old is None:
        os.environ.pop("HF_HOME", None)
    else:
        os.environ["HF_HOME"] = old


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.build_tiny_olmoe(tmp_path_factory.mktemp("tiny") / "m", seed=0)


def _load_records(name):
    sys.path.insert(0, str(OFFLINE))
    try:
        import loader
    finally:
        sys.path.remove(str(OFFLINE))
    return loader.read_records(name)


# ------------------------------------------------------------------------------ model
def test_build_loads_offline_and_is_deterministic(model_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    again = tiny.build_tiny_olmoe(tmp_path / "again", seed=0)
    a, b = load_file(model_dir / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = tiny.make_tiny_olmoe(seed=1).state_dict()
    assert not torch.equal(other["model.embed_tokens.weight"], a["model.embed_tokens.weight"])

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert type(model).__name__ == "OlmoeForCausalLM"
    cfg = model.config
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob) == (16, 4, False)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.is_fast and tok.eos_token_id is not None and tok.pad_token_id is not None
    assert len(tok) == cfg.vocab_size
    ids = tok("Question: Is it common to see frost?\nAnswer: Yes", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size) and torch.isfinite(logits).all()
    assert torch.equal(logits, tiny.make_tiny_olmoe(seed=0)(ids).logits.detach())


def test_overrides_and_config():
    cfg = tiny.tiny_olmoe_config(num_experts=64, num_experts_per_tok=8)
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.hidden_size) == (64, 8, 64)
    assert tiny.default_tiny_model_dir(0) != tiny.default_tiny_model_dir(0, num_experts=64)
    assert tiny.default_tiny_model_dir(0) != tiny.default_tiny_model_dir(1)


def test_ensure_builds_once_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("LM_EVAL_BH_CACHE", str(tmp_path / "cache"))
    p = tiny.ensure_tiny_olmoe(seed=0)
    assert p.parent == tmp_path / "cache" and p.name.startswith("tiny-olmoe-0-")
    mtime = (p / "model.safetensors").stat().st_mtime_ns
    assert tiny.ensure_tiny_olmoe(seed=0) == p
    assert (p / "model.safetensors").stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert sorted(x.name for x in p.parent.iterdir()) == [p.name]  # no temp folders left


def test_router_logits_have_a_right_tail():
    """BH on robust z-scores of the router logits selects >= 1 expert (median) and more as alpha grows."""
    from transformers import AutoTokenizer

    model = tiny.make_tiny_olmoe(seed=0)
    tok = AutoTokenizer.from_pretrained(tiny.ASSETS_TOKENIZER)
    recs = _load_records("mmlu_dev.jsonl")[:12] + _load_records("bigbench_social_iqa.jsonl")[:12]
    texts = [f"Question: {r['question']}\nAnswer: {r['choices'][r['label']]}" for r in recs]
    for rl in tiny.router_logits_on_text(model, tok, texts):
        assert rl.shape[-1] == 16 and rl.shape[0] > 300
        counts = {a: benjamini_hochberg(pvalues(rl, "zscore"), a).sum(-1).double() for a in (0.01, 0.05, 0.1, 0.3)}
        medians = [float(c.median()) for c in counts.values()]
        means = [float(c.mean()) for c in counts.values()]
        assert medians[1] >= 1
        assert medians == sorted(medians) and medians[-1] > medians[0]
        assert all(x < y for x, y in zip(means, means[1:]))
        assert 0.25 <= means[0] and means[-1] <= 8  # calibrated zscore: about 0.4 at alpha = 0.01


# ------------------------------------------------------------------------------ tasks
def test_data_files_match_sources():
    sources = json.loads((OFFLINE / "sources.json").read_text())
    assert set(sources) == {p.name for p in OFFLINE.glob("*.jsonl")}
    total = 0
    for name, s in sources.items():
        path = OFFLINE / name
        total += path.stat().st_size
        assert hashlib.sha256(path.read_bytes()).hexdigest() == s["sha256"]
        if s["source_package"] == "python":  # documents for the perplexity task
            docs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
            assert len(docs) == s["examples"] > 50 and s["license"] == "PSF-2.0"
            assert all(len(d["text"]) >= 200 and d["text"] == d["text"].rstrip() and d["topic"] for d in docs)
            continue
        recs = _load_records(name)
        assert len(recs) == s["examples"] > 50
        assert all(0 <= r["label"] < len(r["choices"]) and all(c and c == c.strip() for c in r["choices"])
                   for r in recs)
        first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
        if s["source_package"] == "bigbench":
            assert s["license"] == "Apache-2.0"
            assert "canary GUID" in first["_meta"]["canary"]
        else:
            assert (s["source_package"], s["license"]) == ("lm-eval", "MIT")
    assert total < 2_000_000


def test_task_manager_lists_offline_and_paper_suite(task_manager):
    for name in OFFLINE_TASKS + ["bh_offline", "olmoe_paper_suite", "pydoc_perplexity_offline"]:
        assert name in task_manager.all_tasks, name  # TaskManager(include_path=tasks/), conftest


def test_simple_evaluate_offline_tasks(model_dir, task_manager, tmp_path, monkeypatch):
    """The hf model on the bh_offline group (all four tasks), from an unrelated current directory."""
    import lm_eval

    monkeypatch.chdir(tmp_path)
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},device=cpu",
        tasks=["bh_offline"],
        task_manager=task_manager,
        limit=6,
        batch_size=8,
    )
    res = out["results"]
    for name in OFFLINE_TASKS:
        assert 0.0 <= res[name]["acc,none"] <= 1.0, name
        assert "acc_norm,none" in res[name]
        assert out["n-samples"][name]["effective"] == 6
    assert 0.0 <= out["groups"]["bh_offline"]["acc,none"] <= 1.0
