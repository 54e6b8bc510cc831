"""The model patch on tiny real OLMoE models: equivalence, variable k, zero-cost padding, unpatch."""

import pytest
import torch
from conftest import assert_unpatched, make_olmoe, module_state
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


@pytest.mark.parametrize("settings", [dict(alpha=0.3), dict(min_k=4, max_k=4), dict(min_k=2, max_k=2),
                                      dict(alpha=0.3, mode="analyze"), dict(alpha=0.3, min_k=3, max_k=3, renormalize=True)])
def test_unpatch_restores_the_stock_model_bit_for_bit(settings):
    """Variable k, fixed k (stock top_k and another), analyze mode and the variable-k path at fixed k."""
    model = make_olmoe()
    before = module_state(model)
    ids = _ids()
    with torch.no_grad():
        stock = model(ids).logits
        routing = BHRouting(**settings).patch(model)
        assert module_state(model) != before
        model(ids)
        routing.unpatch()
        assert torch.equal(model(ids).logits, stock)
    assert_unpatched(model, before)


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
    hooked = module_state(model)
    ids = _ids()
    with torch.no_grad():
        stock = model(ids).logits
        with BHRouting(alpha=0.3).patch(model) as routing:
            assert not torch.equal(model(ids).logits, stock)
        assert 1 < routing.summary()["mean_experts_per_token"] < 4
        assert torch.equal(model(ids).logits, stock)
    assert_unpatched(model, hooked)


@pytest.mark.parametrize("settings", [dict(alpha=0.3), dict(min_k=4, max_k=4)])
def test_a_patched_model_refuses_copy_and_pickle_and_stays_patched(settings):
    """deepcopy / pickle / torch.save of a patched model (or of its BHRouting) is one clear error; the
    original keeps routing and counting, unpatches cleanly, and a copy made after unpatch() is an
    independent model with its own routing and statistics."""
    import copy
    import io
    import pickle

    model = make_olmoe()
    before = module_state(model)
    ids = _ids()
    routing = BHRouting(**settings).patch(model)
    with torch.no_grad():
        patched = model(ids).logits
    attempts = [copy.deepcopy, pickle.dumps, lambda m: torch.save(m, io.BytesIO())]
    if not routing.fixed:  # the variable-k path also patches modules inside the layers
        attempts.append(lambda m: copy.deepcopy(m.model.layers[1].mlp))
    for attempt in attempts:
        with pytest.raises(RuntimeError, match=r"^a model patched by lm-eval-bh cannot be copied or pickled .*"
                                               r"copy or save the model before patch\(\) or after unpatch\(\)"):
            attempt(model)
    for attempt in (copy.deepcopy, pickle.dumps):
        with pytest.raises(RuntimeError, match="cannot be copied or pickled"):
            attempt(routing)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, patched)
    assert routing.summary()["tokens"] == 2 * ids.numel()
    routing.unpatch()
    assert_unpatched(model, before)

    clone = copy.deepcopy(model)
    with torch.no_grad(), BHRouting(**settings).patch(clone) as clone_routing:
        assert torch.equal(clone(ids).logits, patched)
    assert clone_routing.summary()["tokens"] == ids.numel()
    assert routing.summary()["tokens"] == 2 * ids.numel()
    assert pickle.loads(pickle.dumps(routing)).summary() == routing.summary()  # unpatched: stats travel


@pytest.mark.parametrize("settings", [dict(alpha=0.3), dict(min_k=4, max_k=4)])
@pytest.mark.parametrize("on_disk", [[1], [0, 1]])
def test_offloaded_layers_route_and_count_where_they_run(tmp_path, settings, on_disk):
    """accelerate offload (device_map with "disk"; what parallelize=True does when memory runs out) keeps
    those layers' weights on the meta device between forwards: they are counted on the device their
    router runs on, with the same outputs and statistics as the model in memory."""
    from transformers import AutoModelForCausalLM

    make_olmoe().save_pretrained(tmp_path / "model")
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "disk" if i in on_disk else "cpu" for i in range(2)}}
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map=device_map,
                                                     offload_folder=str(tmp_path / "offload"))
    assert {i for i in range(2) if offloaded.model.layers[i].mlp.gate.weight.is_meta} == set(on_disk)
    in_memory = make_olmoe()
    ids = _ids()
    before = module_state(offloaded)
    with torch.no_grad():
        with BHRouting(**settings).patch(offloaded) as routing:
            got = offloaded(ids).logits
        with BHRouting(**settings).patch(in_memory) as reference:
            expected = in_memory(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # (the diagnostics differ at fixed k: offloaded weights cannot be checked for finiteness up front,
    # so the exact path runs instead of the stock router)
    counts = [{k: v for k, v in r.summary().items() if k != "diagnostics"} for r in (routing, reference)]
    assert counts[0] == counts[1] and counts[0]["tokens"] == ids.numel()
    assert_unpatched(offloaded, before)


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("stock_norm", [False, True])
def test_fixed_k_with_a_renormalize_override_matches_a_model_that_renormalizes(k, stock_norm):
    """min_k = max_k = k with `renormalize` overriding the model's norm_topk_prob must not take the
    fixed-k fast path (the stock router would keep the model's own normalisation): the outputs are those
    of the same weights with norm_topk_prob = renormalize and top_k = k."""
    model = make_olmoe(norm_topk_prob=stock_norm)
    reference = make_olmoe(norm_topk_prob=not stock_norm, num_experts_per_tok=k)
    ids = _ids()
    with torch.no_grad():
        expected = reference(ids).logits
        with BHRouting(min_k=k, max_k=k, renormalize=not stock_norm).patch(model) as routing:
            got = model(ids).logits
        assert not torch.allclose(make_olmoe(norm_topk_prob=stock_norm, num_experts_per_tok=k)(ids).logits,
                                  expected, atol=1e-4)  # the override matters
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert routing.summary()["mean_experts_per_token"] == k
