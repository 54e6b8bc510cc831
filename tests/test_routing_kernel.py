"""The fused Triton router (lm_eval_bh/routing_kernel.py) against the reference `routing.route`.

On a CPU machine the kernel runs under Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py
before anything imports triton): the same kernel code, with a portable erfc/log1p in place of CUDA's, so
p-values agree to ~1e-6 here and everything else (ranks, quartiles, BH counts, selection, padding,
weights, non-finite rows) exactly. bench/bench.py checks bit-equality on the GPU.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

pytest.importorskip("triton")  # .ci/run installs it; torch's CUDA wheels bring it
from lm_eval_bh import routing, routing_kernel  # noqa: E402
from lm_eval_bh.config import RoutingConfig  # noqa: E402
from lm_eval_bh.errors import RoutingError  # noqa: E402
from lm_eval_bh.patch import BHRouting, check_kernel  # noqa: E402

from conftest import make_olmoe  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _quiet_interpreter():
    with warnings.catch_warnings():  # numpy warns about masked-out lanes (e.g. 0/0 in a discarded branch)
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _logits(tokens: int, experts: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, experts, generator=g)
    x[: tokens // 3, : max(1, experts // 8)] += 6.0  # a few experts that stand out
    x[tokens // 3: tokens // 2] = x[tokens // 3: tokens // 2].round()  # ties
    return x


def _edge_rows(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[0, 1] = float("nan")
    x[1, :] = float("-inf")  # no finite logit
    x[2, 0] = float("inf")
    x[3, :] = 1.5  # all equal
    x[4, :-1] = float("nan")  # one finite logit
    return x


def _assert_same(got: routing.Routed, want: routing.Routed, renormalized: bool = False) -> None:
    """Selections exactly; on a GPU p-values and weights bit for bit too (but a renormalising sum), in the
    interpreter to its portable erfc's accuracy."""
    assert torch.equal(got.index, want.index)
    assert torch.equal(got.k, want.k)
    assert torch.equal(got.discoveries, want.discoveries)
    assert torch.equal(got.nonfinite, want.nonfinite)
    if DEVICE == "cuda":
        assert torch.equal(got.pvalues, want.pvalues)
        if not renormalized:
            assert torch.equal(got.weight, want.weight)
    torch.testing.assert_close(got.weight, want.weight, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(got.pvalues, want.pvalues, rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize(
    "experts, settings",
    [
        (64, dict(alpha=0.05, min_k=1, max_k=8)),  # OLMoE's shape
        (16, dict(alpha=0.3, min_k=1, max_k=4, renormalize=True)),
        (60, dict(alpha=0.5, min_k=2, max_k=6)),  # not a power of two
        (2, dict(alpha=0.2, min_k=1, max_k=2)),
        (7, dict(alpha=0.9, min_k=3, max_k=3)),  # fixed k: a dead row gets max_k
        (160, dict(alpha=0.1, min_k=1, max_k=8)),  # the rank loop runs over several blocks
    ],
)
def test_kernel_equals_reference(experts, settings):
    cfg = RoutingConfig(**settings).resolve(experts, settings["max_k"], False)
    x = _edge_rows(_logits(24, experts, seed=experts)).to(DEVICE)
    assert routing_kernel.supports(cfg, x)
    _assert_same(routing_kernel.route(x, cfg), routing.route(x, cfg), renormalized=cfg.renormalize)


def _calibrated(experts: int, per_expert: bool, **settings):
    """A resolved `pvalue=calibrated` config and a fitted null, no file (as routing.route takes them)."""
    from lm_eval_bh.calibration import Calibration

    g = torch.Generator().manual_seed(experts)
    samples = torch.randn((1, experts, 4000) if per_expert else (1, 4000), generator=g) * 1.5 + 0.3
    null = Calibration(samples.numpy(), {"num_experts": experts}).layer_nulls()[0].to(DEVICE)
    cfg = RoutingConfig(**settings).resolve(experts, settings["max_k"], False)
    object.__setattr__(cfg, "pvalue", "calibrated")
    return cfg, null


@pytest.mark.parametrize("experts", [64, 60])
def test_kernel_equals_reference_with_a_calibrated_null(experts):
    cfg, null = _calibrated(experts, False, alpha=0.1, min_k=1, max_k=8)
    x = _edge_rows(_logits(24, experts, seed=experts + 1)).to(DEVICE)
    assert routing_kernel.supports(cfg, x, null)
    _assert_same(routing_kernel.route(x, cfg, null), routing.route(x, cfg, null=null))
    per_expert_cfg, per_expert = _calibrated(experts, True, alpha=0.1, min_k=1, max_k=8)
    assert not routing_kernel.supports(per_expert_cfg, x, per_expert)  # each expert's own null: the reference
    assert not routing_kernel.supports(cfg, x, None)


def test_kernel_reads_half_precision_and_strided_logits():
    cfg = RoutingConfig(alpha=0.1, min_k=1, max_k=8).resolve(64, 8, False)
    wide = _logits(16, 128, seed=3).to(DEVICE)
    x = wide[:, ::2]  # non-contiguous rows
    _assert_same(routing_kernel.route(x, cfg), routing.route(x, cfg))
    sliced = wide[:, 32:96]  # column-sliced: contiguous rows 128 apart, not 64 (e.g. a fused projection's slice)
    assert sliced.stride() == (128, 1)
    _assert_same(routing_kernel.route(sliced, cfg), routing.route(sliced, cfg))
    half = _logits(16, 64, seed=4).to(DEVICE, torch.bfloat16)
    _assert_same(routing_kernel.route(half, cfg), routing.route(half, cfg))


def test_kernel_is_scale_invariant():
    cfg = RoutingConfig(alpha=0.2, min_k=1, max_k=8).resolve(64, 8, False)
    x = _logits(16, 64, seed=5).to(DEVICE)
    a, b = routing_kernel.route(x, cfg), routing_kernel.route(x * 1e-5, cfg)
    assert torch.equal(a.index, b.index) and torch.equal(a.k, b.k)


def test_kernel_with_no_tokens():
    cfg = RoutingConfig(alpha=0.1).resolve(16, 4, False)
    out = routing_kernel.route(torch.empty(0, 16, device=DEVICE), cfg)
    assert out.index.shape == (0, 4) and out.pvalues.shape == (0, 16)


def test_supports_only_what_it_computes():
    x = torch.zeros(4, 16, device=DEVICE)
    assert not routing_kernel.supports(RoutingConfig(selection="hc").resolve(16, 4, False), x)
    assert not routing_kernel.supports(RoutingConfig(pvalue="softmax").resolve(16, 4, False), x)
    assert not routing_kernel.supports_config(RoutingConfig(pvalue="softmax"))
    cfg = RoutingConfig().resolve(16, 4, False)
    assert not routing_kernel.supports(cfg, x, allowed=torch.ones(4, 16, dtype=torch.bool, device=DEVICE))
    assert routing_kernel.supports(cfg, x)


def test_patched_model_with_the_kernel_matches_the_reference():
    model = make_olmoe().to(DEVICE)
    ids = torch.randint(2, 256, (2, 6), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    out, summaries = {}, {}
    for kernel in ("torch", "triton"):
        with BHRouting(alpha=0.2, min_k=1, max_k=8, kernel=kernel).patch(model) as r:
            out[kernel] = model(ids).logits
            summaries[kernel] = r.summary()
    torch.testing.assert_close(out["triton"], out["torch"], rtol=1e-5, atol=1e-5)
    for key in ("mean_experts_per_token", "per_layer_mean", "k_histogram", "tokens"):
        assert summaries["triton"][key] == summaries["torch"][key], key
    got, want = (summaries[k]["diagnostics"]["per_layer"] for k in ("triton", "torch"))
    assert len(got) == len(want)
    for layer, (g, w) in enumerate(zip(got, want)):  # pytest.approx takes no nested data (pytest 9)
        assert g.keys() == w.keys()
        for key in w:
            assert g[key] == pytest.approx(w[key]), (layer, key)


def test_router_kernel_argument_errors():
    cfg = RoutingConfig()
    assert check_kernel(None, None, cfg) == "auto" and check_kernel(None, "true", cfg) == "compile"
    with pytest.raises(RoutingError, match="router_kernel must be one of auto, triton, torch, compile; got 'fast'"):
        check_kernel("fast", None, cfg)
    with pytest.raises(RoutingError, match="contradicts"):
        check_kernel("triton", True, cfg)
    with pytest.raises(RoutingError, match="router_kernel=triton computes pvalue=zscore or calibrated"):
        check_kernel("triton", None, RoutingConfig(selection="hc"))


def test_triton_kernel_where_it_cannot_run_is_an_error_not_the_reference(monkeypatch, tiny_model_dir):
    """router_kernel=triton insists: routers on a CPU (without Triton's interpreter) are one line at patch
    time, and through lm-eval before the weights load; router inputs the kernel does not take, at the forward."""
    from lm_eval.api.registry import get_model

    import lm_eval_bh.lm  # noqa: F401  (registers olmoe_bh)

    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    grouped = DeepseekV3ForCausalLM(DeepseekV3Config(  # a router that limits each token to 2 of 4 expert groups
        vocab_size=128, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
        topk_group=2, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=64, pad_token_id=0,
    )).eval().to(DEVICE)
    with BHRouting(alpha=0.2, min_k=1, max_k=4, kernel="triton").patch(grouped):
        with pytest.raises(RoutingError, match=r"^router_kernel=triton cannot route a group-limited router's "
                                               r"expert mask; use router_kernel=auto$"):
            grouped(torch.tensor([[5, 6, 7]], device=DEVICE))
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU as a user has it
    cpu = "router_kernel=triton runs on CUDA GPUs; the routers run on cpu (use router_kernel=auto or torch)"
    with pytest.raises(RoutingError, match=f"^{re.escape(cpu)}$"):
        BHRouting(alpha=0.2, min_k=1, max_k=8, kernel="triton").patch(make_olmoe())
    with pytest.raises(RoutingError, match=f"^{re.escape(cpu)}$"):
        get_model("olmoe_bh").create_from_arg_string(f"pretrained={tiny_model_dir},router_kernel=triton,alpha=0.2",
                                                     {"device": "cpu"})


def test_warm_up_compiles_in_the_background_and_route_waits_for_it():
    cfg = RoutingConfig(alpha=0.1, min_k=1, max_k=4).resolve(16, 4, False)
    device = torch.device(DEVICE, 0) if DEVICE == "cuda" else torch.device(DEVICE)  # as route() looks it up
    routing_kernel.warm_up(cfg, 16, torch.float32, torch.device(DEVICE))
    thread = routing_kernel._WARMING[routing_kernel._key(cfg, 16, torch.float32, device)]
    x = _logits(8, 16, seed=9).to(DEVICE)
    _assert_same(routing_kernel.route(x, cfg), routing.route(x, cfg))
    assert not thread.is_alive()
    routing_kernel.warm_up(cfg, 16, torch.float32, device)  # once per setting: no second thread
    assert routing_kernel._WARMING[routing_kernel._key(cfg, 16, torch.float32, device)] is thread


def test_explicit_triton_kernel_errors_are_not_swallowed(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no backend")

    monkeypatch.setattr(routing_kernel, "route", broken)
    model = make_olmoe().to(DEVICE)
    with BHRouting(alpha=0.2, min_k=1, max_k=8, kernel="triton").patch(model):
        with pytest.raises(RuntimeError, match="no backend"):
            model(torch.tensor([[5, 6, 7]], device=DEVICE))


def test_router_kernel_model_arg_through_lm_eval(tiny_model_dir):
    """router_kernel reaches olmoe_bh through lm-eval's own model construction; a bad value is one line,
    before the weights load."""
    from lm_eval.api.registry import get_model

    import lm_eval_bh.lm  # noqa: F401  (registers olmoe_bh)

    with pytest.raises(RoutingError, match="router_kernel must be one of auto, triton, torch, compile; got 'fast'"):
        get_model("olmoe_bh").create_from_arg_string(f"pretrained={tiny_model_dir},router_kernel=fast", {"device": "cpu"})
    lm = get_model("olmoe_bh").create_from_arg_string(f"pretrained={tiny_model_dir},router_kernel=torch,alpha=0.2",
                                                      {"device": "cpu"})
    assert lm.routing.kernel == "torch"
