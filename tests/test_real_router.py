"""real-router (lm_eval_bh.real_router) on a reduced build with the same code path as the shipped one: the
first two layers of SmolLM2-135M-Instruct, ``real`` built on 512 calibration tokens, its routers fitted on
the same tokens, its down projections refitted sequentially on 2048.

Checked: fitting and building are deterministic; the model differs from ``real`` only in the router and the
down projections (routed and shared experts'); its held-out perplexity at all experts / top-8 / top-4 stays within the bounds
measured for this reduced build (the full build's are in docs/real-router.md); the refit's layer-by-layer
propagation (design matrices times down weights) is the model's own forward, block by block and chained; its
router is clearly non-uniform (median top-1 probability >= 2/E)
where ``real``'s is uniform, so a rule that reads probabilities (top-p) picks a variable k on it; the
fit's three steps solve planted problems exactly; the shipped parameters fit the current ``real`` build;
it loads through lm-eval as ``moe_bh``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import model_digest

real = pytest.importorskip("lm_eval_bh.real")
from lm_eval_bh import real_router  # noqa: E402

LAYERS, CAL, REFIT = 2, 512, 2048
# held-out perplexity / dense of the 2-layer build (down projections refitted on 2048 tokens): measured
# 1.17 / 1.28 / 1.44 at all experts / top-8 / top-4 (router-v5), plus 10 % (router-v4, penalty 0.01: 1.26 / 1.38 /
# 1.55; router-v3, shared expert kept, first chunks: 1.41 / 1.73 / 1.96; router-v1, scales only: 4.65 / 4.96 / 5.16)
BOUNDS = {16: 1.29, 8: 1.41, 4: 1.58}


@pytest.fixture(scope="module")
def dense():
    return real.load_dense(real.find_gguf())


@pytest.fixture(scope="module")
def real_dir(dense, tmp_path_factory):
    return real.build_real(tmp_path_factory.mktemp("real"), layers=LAYERS, cal_tokens=CAL, progress=False,
                           dense=dense)


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def params(dense, real_dir):
    return real_router.fit_routers(_load(real_dir), *dense, cal_tokens=CAL, progress=False)


@pytest.fixture(scope="module")
def built(dense, real_dir, params, tmp_path_factory):
    """real-router written twice from the same real build and parameters."""
    return [real_router.build_real_router(tmp_path_factory.mktemp(f"rr_{n}"), real_dir, params, progress=False,
                                          refit_tokens=REFIT) for n in "ab"]


def _heldout(tok, tokens=real.CHUNK):
    return real.calibration_chunks(tok, tokens, held_out=True)


def _ppl(model, chunks, k=None):
    if k is not None:
        for layer in model.model.layers:
            layer.mlp.gate.top_k = k
    return math.exp(real.heldout_nll(model, chunks))


def test_fit_and_build_are_deterministic(dense, real_dir, params, built):
    again = real_router.fit_routers(_load(real_dir), *dense, cal_tokens=CAL, progress=False)
    assert again["tau"] == params["tau"] and again["scales"] == params["scales"]

    a, b = built
    assert model_digest(a) == model_digest(b) and any(n.endswith(".safetensors") for n in model_digest(a))
    rec = json.loads((a / "lm_eval_bh_real.json").read_text())
    assert rec["build"].endswith(real_router.BUILD_VERSION) and rec["layers"] == LAYERS


def test_differs_from_real_only_in_router_and_down_projections(real_dir, built, params):
    base, rr = _load(real_dir).state_dict(), _load(built[0]).state_dict()
    assert base.keys() == rr.keys()
    changed = sorted(k for k in base if not torch.equal(base[k], rr[k]))
    assert changed == sorted(f"model.layers.{i}.mlp.{p}" for i in range(LAYERS)
                             for p in ("gate.weight", "experts.down_proj", "shared_expert.down_proj.weight"))
    for i in range(LAYERS):  # the router: real's direction at temperature tau
        g = f"model.layers.{i}.mlp.gate.weight"
        assert torch.allclose(rr[g], base[g] * params["tau"][i] / real.ROUTER_SCALE, rtol=1e-5)


def test_heldout_perplexity_within_bounds(dense, built):
    model, tok = dense
    chunks = _heldout(tok)
    layers = model.model.layers
    try:
        model.model.layers = layers[:LAYERS]
        dense_ppl = _ppl(model, chunks)
    finally:
        model.model.layers = layers
    rr = _load(built[0])
    ratios = {k: _ppl(rr, chunks, k) / dense_ppl for k in BOUNDS}
    assert all(ratios[k] <= BOUNDS[k] for k in BOUNDS), ratios
    assert ratios[4] > ratios[8] > ratios[16] > 1.0  # fewer experts, worse


def test_router_is_non_uniform_and_topp_varies(dense, real_dir, built):
    from lm_eval_bh.errors import RoutingError
    from lm_eval_bh.patch import BHRouting

    chunks = _heldout(dense[1])
    rr, base = _load(built[0]), _load(real_dir)
    for s in real_router.router_stats(rr, chunks):
        assert s["median_top1"] >= 2 / 16 and s["mean_entropy"] < math.log(16) - 0.1
    for s in real_router.router_stats(base, chunks):  # real: uniform by construction
        assert s["median_top1"] < 1 / 16 + 1e-4
    with pytest.raises(RoutingError, match="selection=topp reads the router's softmax probabilities"):
        BHRouting(selection="topp", top_p=0.5, min_k=1, max_k=16).patch(base)  # real: refused, not noise
    with BHRouting(selection="topp", top_p=0.5, min_k=1, max_k=16).patch(rr) as routing:
        with torch.no_grad():
            rr(input_ids=chunks[:, :128])
    ks = {int(k) for k in routing.summary()["k_histogram"]}
    assert len(ks) > 2 and min(ks) < 8


@pytest.mark.parametrize("shared", [False, True])
def test_refit_recovers_planted_down_projections(real_dir, dense, shared):
    """A target that some down projections produce exactly (through the stock top-k combination, all k's) is
    met by the refit: it finds those projections (the routed ones, and with ``shared`` the shared expert's too)
    from others, up to the tiny ridge; a huge ridge keeps the current ones."""
    model = _load(real_dir)
    block = model.model.layers[0].mlp
    x = real.mlp_inputs(dense[0], real.calibration_chunks(dense[1], 2 * REFIT), 1, progress=False)[0]  # > 2 x unknowns
    gen = torch.Generator().manual_seed(0)
    planted = torch.randn(block.experts.down_proj.shape, generator=gen) * 0.01
    planted_shared = torch.randn(block.shared_expert.down_proj.weight.shape, generator=gen) * 0.01
    E, _, I = block.experts.down_proj.shape
    with torch.no_grad():
        block.experts.down_proj.copy_(planted)
        if shared:
            block.shared_expert.down_proj.weight.copy_(planted_shared)
        block.gate.top_k = 16
        target = block(x.unsqueeze(0)).squeeze(0)
        block.experts.down_proj.zero_()
        if shared:
            block.shared_expert.down_proj.weight.zero_()
    f = real_router.design(real_router.router_probs(block, x), real_router.activations(block, x), 16, I)
    fit = f.shape[1] if shared else E * I
    y = target - f[:, fit:] @ real_router.down_weights(block)[fit:]
    problem = real_router.gram_matrix(f[:, :fit]), (f[:, :fit].T @ y).double()  # as the refit accumulates them
    before = real_router.down_weights(block)
    real_router.solve_down(block, *problem, ridge=1e6)
    assert float((real_router.down_weights(block) - before).norm()) < 1e-3 * float(planted.norm())
    real_router.solve_down(block, *problem, ridge=1e-10)
    with torch.no_grad():
        again = block(x.unsqueeze(0)).squeeze(0)
    assert float((again - target).norm() / target.norm()) < 1e-4  # the target is met (float32 activations)
    # and by the planted projections (up to the conditioning of co-activated neurons)
    for got, want in [(block.experts.down_proj, planted)] + [(block.shared_expert.down_proj.weight, planted_shared)] * shared:
        assert float((got.detach() - want).abs().max() / want.abs().max()) < 0.02


@pytest.mark.parametrize("k", [1, 4, 16])
def test_design_times_down_weights_is_the_blocks_forward(real_dir, dense, k):
    """The refit's linear model of a block, ``design(p, activations, k) @ down_weights``, is the stock
    Qwen2-MoE block's output at top-k (routed experts weighted by their probability, plus the gated shared
    expert), on a router that is not uniform."""
    model = _load(real_dir)
    block = model.model.layers[1].mlp
    x = real.mlp_inputs(dense[0], _heldout(dense[1]), 2, progress=False)[1]
    with torch.no_grad():
        block.gate.weight.mul_(1e5)  # real's logits are ~1e-5: make the softmax far from uniform
        block.shared_expert_gate.weight.normal_(generator=torch.Generator().manual_seed(0))
        block.gate.top_k = k
        want = block(x.unsqueeze(0)).squeeze(0)
    p = real_router.router_probs(block, x)
    assert float(p.max(-1).values.median()) > 0.15  # vs 1/E = 0.0625 uniform
    got = real_router.design(p, real_router.activations(block, x), k, block.experts.down_proj.shape[2]) \
        @ real_router.down_weights(block)
    assert torch.allclose(got, want, atol=1e-5 * float(want.abs().max()), rtol=0)


def test_spread_chunks_cover_the_whole_text(dense):
    """The refit's calibration chunks (and the check's held-out ones) are spread evenly from the first chunk to
    the last, not the first n; calibration and held-out chunks stay disjoint."""
    tok = dense[1]
    even = real.calibration_chunks(tok, 10**9)
    spread = real.calibration_chunks(tok, 12 * real.CHUNK, spread=True)
    at = [int((even == row).all(1).nonzero()) for row in spread]
    gaps = [b - a for a, b in zip(at, at[1:])]
    assert len(spread) == 12 and at[0] == 0 and at[-1] == len(even) - 1 and max(gaps) - min(gaps) <= 1
    held = real.calibration_chunks(tok, 12 * real.CHUNK, held_out=True, spread=True)
    assert not any((spread == row).all(1).any() for row in held)
    assert torch.equal(real.calibration_chunks(tok, 4 * real.CHUNK), even[:4])  # without spread: the first ones


def test_fit_steps_solve_planted_problems():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4096, 16, generator=gen)
    tau = real_router.temperature_for(base, 0.2)
    assert (tau * base).softmax(-1).max(-1).values.median() == pytest.approx(0.2, abs=1e-6)
    assert real_router.temperature_for(base, 0.3) > tau
    # probabilities fixed per expert: the all-experts sum is exact at s_e = 1 / p_e
    p = torch.rand(16, generator=gen).add(0.5).softmax(0).expand(64, 16)
    o = torch.randn(64, 16, 8, generator=gen)
    gram = torch.einsum("neh,nfh->nef", o, o)
    s = real_router.fit_scales(gram, p, ks=(16,))
    assert torch.allclose(s.float(), 1 / p[0], rtol=1e-4)
    assert real_router.relative_errors(gram, s.float(), p, (16,), 1.0)[16] < 1e-8


def test_shipped_parameters_fit_the_current_real_build():
    params = real_router.load_params()
    assert params["real_build"] == real.default_real_dir().name
    assert len(params["tau"]) == 30 and all(len(s) == 16 and min(s) > 0 for s in params["scales"])
    assert all(t > 0 for t in params["tau"]) and params["build"] == real_router.ROUTER_VERSION
    assert real_router.default_real_router_dir(params).name.startswith("real-router-")


def test_parameters_for_another_model_are_one_clear_error(real_dir, params, dense):
    from lm_eval_bh.errors import UsageError

    wrong = {**params, "tau": params["tau"] * 2, "scales": params["scales"] * 2}
    with pytest.raises(UsageError, match="parameters for 4 layers do not fit this 2-layer real model"):
        real_router.refit_sequentially(_load(real_dir), wrong, dense[1], REFIT, progress=False)


@pytest.mark.parametrize("k", [1, 4, 16])
def test_refit_propagation_is_the_models_own_forward(built, dense, k):
    """The hidden states the sequential refit fits each layer on are those the routed model computes at top-k:
    its layer pieces (decoder_inputs, attention_half, design @ down_weights) chained over all layers
    give the model's output."""
    model = _load(built[0])
    chunks = _heldout(dense[1], 2 * real.CHUNK)
    with torch.no_grad():
        ours = []
        hidden, kwargs = real_router.decoder_inputs(model, chunks, batch=1)
        for h, kw in zip(hidden.split(1), kwargs):
            for layer in model.model.layers:
                residual, x = real_router.attention_half(layer, h, kw)
                x, block = x.flatten(0, -2), layer.mlp
                f = real_router.design(real_router.router_probs(block, x), real_router.activations(block, x), k,
                                       block.experts.down_proj.shape[2])
                h = residual + (f @ real_router.down_weights(block)).view_as(residual)
            ours.append(model.model.norm(h))
        for layer in model.model.layers:  # the model's own forward at k
            layer.mlp.gate.top_k = k
        theirs = model.model(input_ids=chunks).last_hidden_state
    assert torch.allclose(torch.cat(ours), theirs, atol=1e-5 * float(theirs.abs().max()), rtol=0)


def test_models_lists_real_router(tmp_path, monkeypatch, capsys):
    from lm_eval_bh.cli import main

    monkeypatch.setenv("LM_EVAL_BH_CACHE", str(tmp_path))
    assert main(["models"]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("real-router ")]
    assert len(line) == 1 and "softmax router" in line[0] and "not built yet" in line[0]


def test_loads_in_lm_eval_as_moe_bh(built, task_manager):
    import lm_eval

    import lm_eval_bh.lm  # noqa: F401  (registers moe_bh)
    from lm_eval.api.registry import get_model

    lm = get_model("moe_bh").create_from_arg_string(
        f"pretrained={built[0]},dtype=float32,selection=topp,top_p=0.6,min_k=1,max_k=8", {"batch_size": "4",
                                                                                         "device": "cpu"})
    res = lm_eval.simple_evaluate(model=lm, tasks=["bigbench_strategyqa_offline"], limit=2, task_manager=task_manager,
                                  bootstrap_iters=0)
    routing = res["config"]["routing"]
    ks = {int(k) for k in routing["k_histogram"]}
    assert routing["tokens"] > 0 and ks <= set(range(1, 9)) and len(ks) > 1
