"""Every supported MoE family on a tiny random config: stock equivalence, variable k, padding."""

import pytest
import torch
import transformers

from lm_eval_bh import BHRouting, RoutingError, find_moe_layers, route
from lm_eval_bh.dispatch import compact_forward, grouped_forward
from lm_eval_bh.routing import RoutingConfig

COMMON = dict(
    vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=4,
)
FAMILIES = {
    "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM, dict(num_experts=16)),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM, dict(num_local_experts=16)),
    "qwen2_moe": (
        transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
        dict(num_experts=16, moe_intermediate_size=16, shared_expert_intermediate_size=24, norm_topk_prob=False),
    ),
    "qwen3_moe": (
        transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
        dict(num_experts=16, moe_intermediate_size=16, norm_topk_prob=True, head_dim=8),
    ),
    "gpt_oss": (
        transformers.GptOssConfig, transformers.GptOssForCausalLM,
        dict(num_local_experts=16, head_dim=8, sliding_window=16, layer_types=["sliding_attention", "full_attention"]),
    ),
}


def build(family, seed=0):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**COMMON, **extra)).eval()
    with torch.no_grad():  # spread the router logits so that BH selects a varying number of experts
        for layer in find_moe_layers(model):
            layer.router.weight.normal_(0, 0.5)
    return model


IDS = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("settings", [dict(min_k=4, max_k=4), dict(min_k=1, max_k=4, selection="topk")])
def test_full_k_reproduces_stock(family, settings):
    """Both the fixed-k fast path and the general variable-k path give the stock model back."""
    model = build(family)
    with torch.no_grad():
        stock = model(IDS).logits
        with BHRouting(**settings).patch(model) as routing:
            patched = model(IDS).logits
    torch.testing.assert_close(patched, stock, rtol=1e-5, atol=1e-5)
    assert routing.summary()["mean_experts_per_token"] == 4.0


@pytest.mark.parametrize("family", FAMILIES)
def test_variable_k_within_bounds_and_padding_is_free(family):
    model = build(family)
    layer = find_moe_layers(model)[0]
    hidden = torch.randn(30, 32)
    cfg = RoutingConfig(alpha=0.3, min_k=1, max_k=4).resolve(16, 4, layer.renormalizes)
    routed = route(layer.logits(hidden), cfg)
    assert 1 <= int(routed.k.min()) < int(routed.k.max()) <= 4
    weight = routed.weight.to(hidden.dtype)
    with torch.no_grad():
        # Reference: the stock experts module, one token at a time, given only that token's real slots.
        expected = torch.cat([
            layer.experts(hidden[t : t + 1], routed.index[t : t + 1, :k], weight[t : t + 1, :k])
            for t, k in enumerate(routed.k.tolist())
        ])
        for forward in (compact_forward, grouped_forward):
            torch.testing.assert_close(forward(layer.experts, hidden, routed.index, weight), expected,
                                       rtol=1e-5, atol=1e-5)
    with torch.no_grad(), BHRouting(alpha=0.3, min_k=1).patch(model) as routing:
        model(IDS)
    assert 1 < routing.summary()["mean_experts_per_token"] < 4


@pytest.mark.parametrize("family,renormalized", [("mixtral", True), ("gpt_oss", True), ("qwen2_moe", False)])
def test_weights_follow_the_family_convention(family, renormalized):
    model = build(family)
    with torch.no_grad(), BHRouting(alpha=0.3, min_k=1).patch(model):
        layer = find_moe_layers(model)[0]
        _, weight, index = layer.router(torch.randn(20, 32))
    sums = weight.float().sum(dim=-1)
    if renormalized:
        torch.testing.assert_close(sums, torch.ones_like(sums), rtol=1e-2, atol=1e-2)
    else:
        assert (sums < 0.999).all()


def test_deepseek_v3_is_refused_with_the_reason():
    config = transformers.DeepseekV3Config(
        vocab_size=128, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
        topk_group=2, first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=64,
    )
    model = transformers.DeepseekV3ForCausalLM(config)
    with pytest.raises(RoutingError, match="bias-corrected sigmoid scores within expert groups"):
        BHRouting().patch(model)
