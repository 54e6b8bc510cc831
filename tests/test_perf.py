"""The fast paths stay exact: the real-token mask computed on the device, the dispatch registered with
transformers' experts interface, the eager router by default; bench/harness.py runs end to end."""

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import make_olmoe, subprocess_env
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from lm_eval_bh import dispatch
from lm_eval_bh.lm import MoEBHLM
from lm_eval_bh.patch import BHRouting

REPO = Path(__file__).resolve().parents[1]


def _mask(inputs: list[tuple], rows: torch.Tensor, zero_tail: bool) -> torch.Tensor:
    lm = types.SimpleNamespace(_real_inputs={hash(t) for t in inputs}, _zero_tail=zero_tail)
    return MoEBHLM._real_token_mask(lm, rows)


def _pad(inputs: list[tuple]) -> torch.Tensor:
    width = max(len(t) for t in inputs) + 2
    return torch.tensor([list(t) + [0] * (width - len(t)) for t in inputs])


@pytest.mark.parametrize("seed", range(5))
def test_device_real_token_mask_equals_the_exact_host_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    inputs = []
    for _ in range(9):  # zeros inside rows, one-token and empty inputs; no input ends in 0
        t = torch.randint(0, 3, (int(torch.randint(0, 12, (1,), generator=gen)),), generator=gen).tolist()
        while t and t[-1] == 0:
            t[-1] = int(torch.randint(1, 3, (1,), generator=gen))
        inputs.append(tuple(t))
    rows = _pad(inputs)
    fast, loop = _mask(inputs, rows, zero_tail=False), _mask(inputs, rows, zero_tail=True)
    assert torch.equal(fast, loop)
    assert fast.sum(dim=1).tolist() == [len(t) for t in inputs]


def test_inputs_ending_in_token_zero_need_the_host_loop():
    """Where an input ends in token 0 (the padding id) only the loop is exact: lm.py then takes it."""
    inputs = [(5, 0, 0), (7, 3)]
    rows = _pad(inputs)
    assert _mask(inputs, rows, zero_tail=True).sum(dim=1).tolist() == [3, 2]
    assert _mask(inputs, rows, zero_tail=False).sum(dim=1).tolist() == [1, 2]


@pytest.mark.parametrize("stock", ["grouped_mm", "eager"])
def test_variable_k_runs_through_transformers_experts_interface(stock):
    model = make_olmoe()
    model.set_experts_implementation(stock)
    ids = torch.randint(2, 256, (3, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(ids).logits
        with BHRouting(alpha=0.3).patch(model) as routing:
            name = model.config._experts_implementation
            assert name == dispatch.BACKEND_PREFIX + stock and name in ALL_EXPERTS_FUNCTIONS
            assert all("forward" not in layer.mlp.experts.__dict__ for layer in model.model.layers)
            routed = model(ids).logits
            assert 1 < routing.summary()["mean_experts_per_token"] < 4
        assert model.config._experts_implementation == stock
        assert torch.equal(model(ids).logits, before)
    assert not torch.equal(routed, before)


def test_grouped_and_stock_backends_give_the_same_variable_k_logits():
    ids = torch.randint(2, 256, (2, 16), generator=torch.Generator().manual_seed(4))
    out = {}
    for stock in ("grouped_mm", "eager"):
        model = make_olmoe()
        model.set_experts_implementation(stock)
        with torch.no_grad(), BHRouting(alpha=0.3).patch(model):
            out[stock] = model(ids).logits
    torch.testing.assert_close(out["grouped_mm"], out["eager"], rtol=1e-5, atol=1e-5)


def test_fixed_k_leaves_the_experts_backend_alone():
    model = make_olmoe()
    stock = model.config._experts_implementation
    with BHRouting(min_k=2, max_k=2).patch(model):
        assert model.config._experts_implementation == stock


def test_router_kernel_default_and_compile_spelling():
    assert BHRouting().kernel == "auto"  # fused on CUDA where supported, the reference elsewhere: never compiled
    assert BHRouting(compile=True).kernel == "compile"
    assert BHRouting(kernel="torch", compile=False).kernel == "torch"


def test_harness_tiny_end_to_end(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "harness.py"), "--tiny", "--settings", "hf4,bhvar4", "--workloads",
         "a32,b,c", "--limit", "1", "--profile", "bhvar4", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env={**subprocess_env(), "CUDA_VISIBLE_DEVICES": ""}, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "harness.json").read_text())
    assert {(r["workload"], r["setting"]) for r in res["runs"]} == {
        (w, s) for w in ("a32", "b", "c") for s in ("hf4", "bhvar4")}
    assert all(r["s"] > 0 for r in res["runs"])
    assert all(1.0 <= r["mean_k"] <= 8.0 for r in res["runs"] if r["setting"] == "bhvar4")
    assert res["summary"]["ratios"]["a32"]["bhvar4/hf4"] > 0
    assert res["first_call"]["bhvar4"]["first_s"] > 0
    prof = res["profile"]["bhvar4 a32"]
    assert prof["forwards"] > 0 and prof["calls"]["router_launch"] == 2 * prof["forwards"]  # 2 MoE layers
    assert "| (b) rolling" in (tmp_path / "harness.md").read_text()


def test_batch_size_auto_probes_once_per_evaluation_not_once_per_task(tiny_model_dir, task_manager, monkeypatch):
    """olmoe_bh runs lm-eval once per task; with batch_size=auto the probe (5 forwards at the largest
    batch) found for the longest inputs is reused for the other tasks, like one `hf` call probes once."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    probes = []
    original = HFLM._detect_batch_size
    monkeypatch.setattr(HFLM, "_detect_batch_size", lambda self, *a, **kw: probes.append(a) or original(self, *a, **kw))
    runs = {}
    for batch in ("auto", 4):
        probes.clear()
        out = lm_eval.simple_evaluate(
            model="olmoe_bh", model_args=f"pretrained={tiny_model_dir},alpha=0.3,max_batch_size=8", device="cpu",
            tasks=["mmlu_dev_offline", "bigbench_strategyqa_offline"], task_manager=task_manager, limit=3, batch_size=batch)
        runs[batch] = (len(probes), out["config"]["routing"]["per_task"])
    assert runs["auto"][0] == 1 and runs[4][0] == 0
    assert {t: v["tokens"] for t, v in runs["auto"][1].items()} == {t: v["tokens"] for t, v in runs[4][1].items()}


def test_sweep_collects_lm_evals_environment_info_once(monkeypatch):
    """lm-eval's add_env_info (torch's collect_env: about a second of subprocesses) runs for a sweep's first
    setting; the others get a copy of what it added, and lm-eval's own function is back afterwards."""
    import lm_eval.evaluator as evaluator

    from lm_eval_bh.commands.sweep import env_info_once

    calls = []

    def fake(storage):
        calls.append(1)
        storage.update(pretty_env_info=f"env {len(calls)}", lm_eval_version="x")

    monkeypatch.setattr(evaluator, "add_env_info", fake)
    results = [{"results": {}} for _ in range(3)]
    with env_info_once():
        for r in results:
            evaluator.add_env_info(r)
    assert len(calls) == 1
    assert all(r == {"results": {}, "pretty_env_info": "env 1", "lm_eval_version": "x"} for r in results)
    assert evaluator.add_env_info is fake
