"""bench/bench.py --tiny runs end to end on the CPU; dispatch strategies agree with each other."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_olmoe

from lm_eval_bh import RoutingConfig, dispatch, route

REPO = Path(__file__).resolve().parents[1]


def test_bench_tiny_smoke(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench.py"), "--tiny", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=env, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "bench.json").read_text())
    assert {"1x32", "2x16"} <= set(res["prefill"])
    for row in res["prefill"].values():
        assert {"stock8", "stock4", "bh8", "bh4", "bhvar", "bhforced"} <= set(row)
        assert all(v["tok_s"] > 0 for v in row.values())
        assert row["bh8"]["mean_k"] == 8 and row["bh4"]["mean_k"] == 4
        assert 3.0 < row["bhforced"]["mean_k"] < 5.0
        assert set(row["bhforced"]["k_histogram"]) <= {str(k) for k in range(1, 8)}
    assert set(res["decode"]) == {"b1", "b2"}
    assert "prefill 1x32" in res["ratios"] and "bh8/stock8" in res["ratios"]["prefill 1x32"]
    for row in res["dispatch"].values():
        for key, value in row.items():
            if key.endswith("_relerr"):
                assert value < 1e-4, (key, value)  # float32 on the CPU
    assert "| run |" in (tmp_path / "bench.md").read_text()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [3, 700])  # below and above EXACT_MIN_PAIRS (4 slots per token)
def test_dispatch_strategies_agree(dtype, tokens):
    model = make_olmoe(dtype=dtype)
    experts = model.model.layers[0].mlp.experts
    hidden = torch.randn(tokens, 64, dtype=dtype)
    logits = model.model.layers[0].mlp.gate(hidden)[0]
    routed = route(logits, RoutingConfig(alpha=0.3, min_k=1).resolve(16, 4, False))
    weight = routed.weight.to(dtype)
    with torch.no_grad():
        ref = dispatch.grouped_forward(experts, hidden.float(), routed.index, weight.float(), exact=True).float() \
            if dtype == torch.float32 else None
        outs = {
            "auto": dispatch.experts_forward(experts, hidden, routed.index, weight),
            "exact": dispatch.grouped_forward(experts, hidden, routed.index, weight, exact=True),
            "padded": dispatch.grouped_forward(experts, hidden, routed.index, weight, exact=False),
            "compact": dispatch.compact_forward(experts, hidden, routed.index, weight),
        }
    base = outs["compact"].float() if ref is None else ref
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for name, out in outs.items():
        assert out.dtype == dtype and out.shape == hidden.shape, name
        torch.testing.assert_close(out.float(), base, rtol=tol, atol=tol, msg=name)


def test_strategy_choice():
    model = make_olmoe()
    experts = model.model.layers[0].mlp.experts
    hidden = torch.randn(2, 64)
    model.set_experts_implementation("eager")
    assert dispatch.choose(experts, hidden) == "compact"
    model.set_experts_implementation("grouped_mm")
    assert dispatch.choose(experts, hidden) == "grouped"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_decoding_graphs_are_bit_identical(mode):
    """dispatch's CUDA graph of the padded path: the same output bit for bit as launching it, for calls
    before, at and after the capture, new inputs each time, inside and outside inference_mode; a
    generate() with graphs gives the same tokens and logits as one without."""
    model = make_olmoe(dtype=torch.bfloat16).cuda()
    model.set_experts_implementation("grouped_mm")
    experts = model.model.layers[0].mlp.experts
    cfg = RoutingConfig(alpha=0.3, min_k=1).resolve(16, 4, False)
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with context():
        for call in range(dispatch.GRAPH_AFTER_CALLS + 3):
            hidden = torch.randn(5, 64, dtype=torch.bfloat16, device="cuda")
            routed = route(model.model.layers[0].mlp.gate(hidden)[0].float().cpu(), cfg)
            index, weight = routed.index.cuda(), routed.weight.to(torch.bfloat16).cuda()
            got = dispatch.experts_forward(experts, hidden, index, weight)
            want = dispatch.grouped_forward(experts, hidden, index, weight, exact=False)
            assert torch.equal(got, want), call
        assert any(isinstance(g, dispatch._Graph) for g in dispatch._GRAPHS[experts].values())
        ids = torch.randint(2, 256, (3, 7), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        runs = []
        for graphs in (True, False):
            dispatch.USE_GRAPHS = graphs
            try:
                from lm_eval_bh.patch import BHRouting
                with BHRouting(alpha=0.3, min_k=1, kernel="torch").patch(model):
                    out = model.generate(input_ids=ids, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
            finally:
                dispatch.USE_GRAPHS = True
            runs.append(out)
        assert torch.equal(runs[0].sequences, runs[1].sequences)
        assert all(torch.equal(a, b) for a, b in zip(runs[0].logits, runs[1].logits))
