"""The model patch on tiny real OLMoE models: equivalence, variable k, zero-cost padding, unpatch."""

import pytest
import torch
from conftest import make_olmoe
from torch.utils.flop_counter import FlopCounterMode

from lm_eval_bh import BHRouting, RoutingConfig, RoutingError, route
from lm_eval_bh.dispatch import compact_forward, grouped_forward

BACKENDS = ["eager", "grouped_mm", "batched_mm"]


def _ids(batch=4, length=24, seed=1):
    return torch.randint(2, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def _reference_experts(experts, hidden, index, weight):
    """Loop over tokens and their real slots, computing each selected expert by hand."""
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for e, w in zip(index[t].tolist(), weight[t].tolist()):
            if e == experts.num_experts:
                continue
            gate, up = torch.nn.functional.linear(hidden[t], experts.gate_up_proj[e].float()).chunk(2, dim=-1)
            out[t] += w * torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[e].float())
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_top_k_reproduces_stock(backend):
    model = make_olmoe()
    model.set_experts_implementation(backend)
    ids = _ids()
    with torch.no_grad():
        stock = model(ids).logits
        with BHRouting(alpha=0.05, min_k=4, max_k=4).patch(model) as routing:
            patched = model(ids).logits
    torch.testing.assert_close(patched, stock, rtol=1e-5, atol=1e-5)
    assert routing.summary()["mean_experts_per_token"] == 4.0


def test_bh_route_at_full_k_matches_stock_router():
    model = make_olmoe()
    router = model.model.layers[0].mlp.gate
    hidden = torch.randn(50, 64)
    logits, weights, index = router(hidden)
    cfg = RoutingConfig(min_k=4, max_k=4).resolve(16, 4, False)
    routed = route(logits, cfg)
    assert torch.equal(routed.index, index)
    torch.testing.assert_close(routed.weight, weights.float(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padding_changes_nothing(backend, dtype):
    model = make_olmoe(dtype=dtype)
    model.set_experts_implementation(backend)
    experts = model.model.layers[0].mlp.experts
    hidden = torch.randn(40, 64, dtype=dtype)
    logits = model.model.layers[0].mlp.gate(hidden)[0]
    routed = route(logits, RoutingConfig(alpha=0.3, min_k=1).resolve(16, 4, False))
    assert routed.k.min() < routed.k.max(), "k should vary"
    weight = routed.weight.to(dtype)
    with torch.no_grad():
        expected = _reference_experts(experts, hidden.float(), routed.index, weight.float())
        for forward in (compact_forward, grouped_forward):
            got = forward(experts, hidden, routed.index, weight)
            assert torch.isfinite(got).all()
            tol = 1e-5 if dtype == torch.float32 else 3e-2
            torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_costs_nothing(backend, monkeypatch):
    """Expert GEMM work equals (real pairs) x (FLOPs of one expert), never max_k per token."""
    model = make_olmoe()
    model.set_experts_implementation(backend)
    grouped_rows = []  # torch's FLOP counter has no formula for grouped GEMMs: count their rows
    real_grouped_mm = torch.nn.functional.grouped_mm

    def counting_grouped_mm(x, w, offs=None, **kw):
        grouped_rows.append((int(offs[-1]), w.shape[-2], w.shape[-1]))
        return real_grouped_mm(x, w, offs=offs, **kw)

    monkeypatch.setattr(torch.nn.functional, "grouped_mm", counting_grouped_mm)
    flops = FlopCounterMode(display=False)
    with torch.no_grad(), BHRouting(alpha=0.2, min_k=1).patch(model) as routing, flops:
        model(_ids())
    stats = routing.summary()
    pairs = sum(int(k) * n for k, n in stats["k_histogram"].items())
    assert pairs < 4 * stats["tokens"] * 2, "some tokens should use fewer than max_k experts"
    per_module = flops.get_flop_counts()
    expert_flops = sum(sum(v.values()) for name, v in per_module.items() if name.endswith("mlp.experts"))
    expert_flops += sum(2 * n * i * o for n, i, o in grouped_rows)
    hidden, inter = 64, 32
    assert expert_flops == pairs * 2 * (2 * inter * hidden + inter * hidden)


def test_variable_k_respects_bounds_and_grows_with_alpha():
    model = make_olmoe()
    ids = _ids(8, 32)
    means = []
    for alpha in (0.01, 0.1, 0.5):
        with torch.no_grad(), BHRouting(alpha=alpha, min_k=2, max_k=3).patch(model) as routing:
            model(ids)
        stats = routing.summary()
        assert set(stats["k_histogram"]) <= {"2", "3"}
        means.append(stats["mean_experts_per_token"])
    assert means == sorted(means) and means[0] < means[-1]


def test_attention_mask_padding_is_not_counted():
    model = make_olmoe()
    ids = _ids(2, 10)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding of a generate()-style batch
    with torch.no_grad(), BHRouting(alpha=0.1).patch(model) as routing:
        model(ids, attention_mask=mask)
    assert routing.summary()["tokens"] == 16


def test_analyze_mode_leaves_outputs_untouched():
    model = make_olmoe()
    ids = _ids()
    with torch.no_grad():
        stock = model(ids).logits
        with BHRouting(alpha=0.5, mode="analyze").patch(model) as routing:
            analyzed = model(ids).logits
    assert torch.equal(analyzed, stock)
    stats = routing.summary()
    assert stats["tokens"] == ids.numel() and stats["mean_experts_per_token"] < 4


def test_unpatch_restores_the_stock_model_bit_for_bit():
    model = make_olmoe()
    before = {n: m.__dict__.copy() for n, m in model.named_modules()}
    ids = _ids()
    with torch.no_grad():
        stock = model(ids).logits
        routing = BHRouting(alpha=0.3).patch(model)
        assert not torch.equal(model(ids).logits, stock)
        routing.unpatch()
        assert torch.equal(model(ids).logits, stock)
    after = {n: m.__dict__.copy() for n, m in model.named_modules()}
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].keys() == after[name].keys(), name
        assert not model.get_submodule(name)._forward_pre_hooks


def test_generate_with_variable_k():
    model = make_olmoe()
    ids = _ids(2, 8)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad(), BHRouting(alpha=0.2).patch(model) as routing:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 13)
    # prompt: 16 - 3 real tokens; then 4 decode steps of 2 tokens (the last new token is never fed back)
    assert routing.summary()["tokens"] == 13 + 4 * 2


def test_patch_errors():
    model = make_olmoe()
    with pytest.raises(RoutingError, match="max_k must be between min_k and the number of experts"):
        BHRouting(max_k=17).patch(model)
    routing = BHRouting().patch(model)
    with pytest.raises(RuntimeError, match="already patched"):
        BHRouting().patch(model)
    with pytest.raises(RuntimeError, match="already patched"):
        routing.patch(model)
    routing.unpatch()
    with pytest.raises(RuntimeError, match="not patched"):
        routing.unpatch()
    with pytest.raises(RoutingError, match="no supported MoE router"):
        BHRouting().patch(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_patch_cooperates_with_accelerate_device_hooks():
    """device_map / parallelize=True put accelerate hooks on modules (an instance `forward` that calls
    `_old_forward`): the patch must route through them and unpatch must leave the hooks as they were."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = make_olmoe()
    for layer in model.model.layers:
        add_hook_to_module(layer.mlp.gate, AlignDevicesHook(execution_device="cpu"))
        add_hook_to_module(layer.mlp.experts, AlignDevicesHook(execution_device="cpu"))
    hooked = {n: m.__dict__.get("forward") for n, m in model.named_modules()}
    ids = _ids()
    with torch.no_grad():
        stock = model(ids).logits
        with BHRouting(alpha=0.3).patch(model) as routing:
            assert not torch.equal(model(ids).logits, stock)
        assert 1 < routing.summary()["mean_experts_per_token"] < 4
        assert torch.equal(model(ids).logits, stock)
    assert {n: m.__dict__.get("forward") for n, m in model.named_modules()} == hooked
