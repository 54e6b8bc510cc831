"""Every supported MoE family on a tiny random config built from its real transformers config class:
stock equivalence at full k (fixed path and variable-k path), k within bounds, padding-free experts
against a per-token reference, the cost accounting, and the README table against transformers."""

import functools
import importlib
import json
import re
import warnings

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from conftest import ROOT, run_concurrently
from lm_eval_bh import BHRouting, RoutingError, find_moe_layers, route
from lm_eval_bh.families import FAMILIES, REFUSED, config_param_split, config_shape
from lm_eval_bh.config import RoutingConfig

# Shrunk sizes, applied to whichever of these attributes a config class has.
SMALL = dict(
    vocab_size=128, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0,
    num_experts=16, num_local_experts=16, n_routed_experts=16, moe_num_experts=16,
    num_experts_per_tok=4, num_experts_per_token=4, moe_k=4, moe_topk=4,
    n_group=4, num_expert_group=4, topk_group=2, shared_expert_intermediate_size=16, n_shared_experts=1,
    # MoE on the second layer only
    first_k_dense_replace=1, num_dense_layers=1, mlp_only_layers=[0], mlp_layer_types=["dense", "sparse"],
    decoder_sparse_step=1, expert_layer_period=2, expert_layer_offset=1,
    q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
    linear_num_heads=2, linear_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=2,
    linear_key_head_dim=8, linear_value_head_dim=8, attn_layer_period=2, attn_layer_offset=0,
    mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_dt_rank=4, mamba_chunk_size=8, use_mamba_kernels=False,
)
VISION = dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=16, out_hidden_size=32, adapter_in_dim=16,
              adapter_out_dim=32)
AUDIO = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, adapter_input_size=16,
             adapter_out_dim=32, downsample_hidden_size=16)
# What a family needs beyond SMALL to build tiny and run a forward on CPU.
EXTRA = {
    "deepseek_v2": dict(topk_method="group_limited_greedy"),
    "deepseek_v32": dict(use_cache=False),  # DSA's indexer cache is not built by a plain forward
    "glm_moe_dsa": dict(use_cache=False),
    "axk2": dict(use_cache=False),
    "hy_v4": dict(use_cache=False),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention"]),
    "qwen4_exp_text": dict(indexer_budget=8, indexer_compress_ratio=2, indexer_n_heads=2, indexer_kv_heads=1,
                           indexer_head_dim=8),
    "qwen2_moe": dict(norm_topk_prob=False),
    "qwen3_moe": dict(norm_topk_prob=True),
    "gpt_oss": dict(sliding_window=16),
}


def tiny_config(model_type: str):
    config_cls = CONFIG_MAPPING[model_type]
    defaults = config_cls().to_dict()
    if "text_config" in defaults:  # a multimodal wrapper: shrink its text model, and its vision tower
        text = tiny_config(config_cls.sub_configs["text_config"].model_type).to_dict()
        others = {"audio_config": AUDIO} if "audio_config" in defaults else {}
        return config_cls(text_config=text, vision_config=VISION, **others)
    settings = {k: v for k, v in SMALL.items() if k in defaults}
    layer_types = defaults.get("layer_types")
    if isinstance(layer_types, list):  # one layer of each kind, full attention last (for the cache)
        kinds = [t for t in dict.fromkeys(layer_types) if t != "full_attention"]
        kinds = kinds[:1] + ["full_attention"] if "full_attention" in layer_types else kinds[-2:]
        settings["layer_types"] = (kinds * 2)[-2:]
    if "kv_lora_rank" in defaults:  # multi-head latent attention: as many KV heads as heads
        settings["num_key_value_heads"] = settings["num_attention_heads"]
    settings.update(EXTRA.get(model_type, {}))
    return config_cls(**settings)


def build(model_type: str, seed: int = 0):
    """A tiny random model of `model_type` whose routers select a varying number of experts under BH."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    with torch.no_grad():
        for layer in find_moe_layers(model):
            layer.weight.normal_(0, 0.5)  # spread the logits
            for module in (layer.router, layer.block):  # nonzero correction biases, so that they matter
                deep = module is layer.router
                for name, tensor in [*module.named_buffers(recurse=deep), *module.named_parameters(recurse=deep)]:
                    if "bias" in name and tensor.numel() == layer.num_experts:
                        tensor.normal_(0, 0.05)
    return model


SUPPORTED = sorted(FAMILIES)
IDS = torch.randint(1, 128, (3, 12), generator=torch.Generator().manual_seed(0))
MANY_IDS = torch.randint(1, 128, (4, 32), generator=torch.Generator().manual_seed(1))


def _top_k(model):
    return find_moe_layers(model)[0].top_k


@pytest.fixture(params=SUPPORTED)
def family(request):
    return request.param


def test_full_k_reproduces_stock(family, monkeypatch):
    """min_k = max_k = top_k gives the stock model back: through the stock routers (fixed path) and through
    the family's own scores, route() and the padding-aware experts dispatch (variable-k path)."""
    model = build(family)
    top_k = _top_k(model)
    with torch.no_grad():
        stock = model(IDS).logits
        for path in ("fixed", "variable"):
            if path == "variable":  # k is top_k for every token, but nothing takes the fixed-k shortcut
                monkeypatch.setattr(RoutingConfig, "fixed_k", property(lambda self: False))
            with BHRouting(min_k=top_k, max_k=top_k).patch(model) as routing:
                patched = model(IDS).logits
            assert routing.fixed == (path == "fixed")
            torch.testing.assert_close(patched, stock, rtol=1e-5, atol=1e-5, msg=path)
            assert routing.summary()["mean_experts_per_token"] == top_k


def test_scores_dtype_matches_the_scores(family):
    """MoELayer.scores_dtype (what the fused router kernel is compiled for ahead of the first forward) is the
    dtype the family's selection scores come in, for a bfloat16 model too."""
    model = build(family).to(torch.bfloat16)
    for layer in find_moe_layers(model)[:1]:
        hidden = torch.randn(3, layer.weight.shape[-1], dtype=torch.bfloat16)
        assert layer.scores(hidden)[1].dtype == layer.scores_dtype


def test_variable_k_padding_free_and_cost(family):
    """k stays in [min_k, max_k] and varies; the patched experts module gives, for each token, what the
    stock experts module gives on that token's real slots alone. The cost columns: one expert's
    parameters (the experts module's, over the number of experts) and the dense rest (shared experts and dense
    layers included) add up to the model; the config gives the model's shape before weights load."""
    model = build(family)
    layers = find_moe_layers(model)
    top_k = layers[0].top_k
    calls = []

    def capture(module, args, output):
        calls.append((module, *(a.detach().clone() for a in args[:3]), output.detach().clone()))

    handles = [layer.experts.register_forward_hook(capture) for layer in layers]
    try:
        with torch.no_grad(), BHRouting(alpha=0.5, min_k=1, max_k=top_k).patch(model) as routing:
            model(MANY_IDS)
    finally:
        for handle in handles:
            handle.remove()
    summary = routing.summary()
    hist = {int(k): n for k, n in summary["k_histogram"].items()}
    assert min(hist) >= 1 and max(hist) <= top_k and len(hist) > 1
    assert 1 < summary["mean_experts_per_token"] < top_k
    assert len(calls) == len(layers)
    for experts, hidden, index, weight, out in calls:
        k = (index < experts.num_experts).sum(dim=-1)
        assert (weight[index == experts.num_experts] == 0).all()
        expected = torch.zeros_like(out)
        with torch.no_grad():  # reference: the stock experts module given each token's real slots only
            for n in k.unique().tolist():  # (rows are independent: the tokens with n real slots together)
                rows = k == n
                expected[rows] = type(experts).forward(experts, hidden[rows], index[rows, :n], weight[rows, :n])
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    info = summary["model"]
    one_expert = sum(p.numel() for p in layers[0].experts.parameters()) / info["num_experts"]
    assert info["params_per_expert"] == one_expert
    assert info["dense_params"] + len(layers) * info["num_experts"] * one_expert == info["total_params"]
    assert info["num_layers"] == len(layers)
    assert config_shape(model.config) == (layers[0].num_experts, top_k, layers[0].renormalizes)
    assert config_param_split(model.config) == info  # what `report` uses for plain `--model hf` results


# --- the group-limited sigmoid + bias router (DeepSeek-V3 and its descendants) ---------------------

GROUPED = sorted(t for t, f in FAMILIES.items() if f.groups == "top2")


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe"])
def test_grouped_router_stays_in_the_chosen_groups(family):
    model = build(family)
    layer = find_moe_layers(model)[0]
    hidden = torch.randn(40, 32)
    logits, scores, allowed = layer.scores(hidden)
    assert allowed is not None and (allowed.sum(-1) == 8).all()  # 2 of 4 groups of 4 experts
    cfg = RoutingConfig(alpha=0.3, min_k=1, max_k=4).resolve(16, 4, layer.renormalizes)
    routed = route(scores, cfg, allowed=allowed)
    valid = routed.index < 16
    assert allowed.gather(-1, routed.index.clamp_max(15))[valid].all()
    assert routed.nonfinite.sum() == 0
    # the stock router at top_k: the same experts
    _, _, stock_index = type(layer.router).forward(layer.router, hidden)
    full = route(scores, RoutingConfig(min_k=4, max_k=4).resolve(16, 4, True), allowed=allowed)
    assert (full.index.sort(-1).values == stock_index.sort(-1).values).all()


def test_excluded_experts_get_p_one_and_come_last():
    scores = torch.tensor([[0.9, 0.8, 0.95, 0.1, 0.7, 0.2]])
    allowed = torch.tensor([[True, True, False, False, True, True]])
    cfg = RoutingConfig(min_k=6, max_k=6).resolve(6, 6, False)
    routed = route(scores, cfg, allowed=allowed)
    assert routed.index.tolist() == [[0, 1, 4, 5, 2, 3]]
    assert routed.pvalues[0, 4:].tolist() == [1.0, 1.0] and (routed.pvalues[0, :4] < 1).all()
    assert (routed.pvalues.diff(dim=-1) >= 0).all()  # the selection order is the p-value order
    assert not routed.nonfinite.any()


@pytest.mark.parametrize("family", ["deepseek_v3", "minimax_m2", "flint"])
def test_sigmoid_weights_follow_the_family_convention(family):
    """Unbiased sigmoid scores of the selected experts; renormalised (to the scaling factor) when asked."""
    model = build(family)
    layer = find_moe_layers(model)[0]
    scale = getattr(layer.router, layer.family.scale) if layer.family.scale else 1.0
    for renormalize in (True, False):
        captured = []
        hook = layer.experts.register_forward_hook(lambda m, a, o: captured.append((a[1], a[2])))
        with torch.no_grad(), BHRouting(alpha=0.3, min_k=1, renormalize=renormalize).patch(model):
            model(IDS)
        hook.remove()
        index, weight = captured[0]
        sums = weight.float().sum(-1)
        if renormalize:
            torch.testing.assert_close(sums, torch.full_like(sums, float(scale)), rtol=1e-4, atol=1e-4)
        else:
            assert (weight[index < 16] > 0).all() and (weight <= scale).all()


def test_sigmoid_families_refuse_meaningless_settings():
    model = build("deepseek_v3")
    with pytest.raises(RoutingError, match="selection=topp needs softmax router probabilities"):
        BHRouting(selection="topp").patch(model)


# --- refusals and the README table -----------------------------------------------------------------

_MOE_CLASS = re.compile(r"(Experts|TopKRouter|TopkRouter|Router|Gating|SparseMoeBlock|SparseMoEBlock|MoE|Moe)$")


@functools.lru_cache(maxsize=None)
def decoder_moe_model_types() -> tuple[str, ...]:
    """Every causal-LM model type of the installed transformers whose modeling defines an MoE router,
    experts or MoE block class."""
    found = []
    for model_type, class_name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        module = importlib.import_module(getattr(transformers, class_name).__module__)
        if any(isinstance(c, type) and c.__module__ == module.__name__ and _MOE_CLASS.search(n)
               for n, c in vars(module).items()):
            found.append(model_type)
    return tuple(sorted(found))


def _readme_family_table() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Other MoE families", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) >= 2:
            for model_type in re.findall(r"`([a-z0-9_\-]+)`", cells[0]):
                rows[model_type] = line
    return rows


def test_every_decoder_moe_model_type_is_supported_or_refused_with_a_reason():
    types = decoder_moe_model_types()
    assert len(types) >= 60  # transformers 5.24 ships 66
    assert not set(FAMILIES) & set(REFUSED)
    missing = [t for t in types if t not in FAMILIES and t not in REFUSED]
    assert not missing, f"decoder MoE model types with no record: {missing}"
    assert all(len(reason) > 30 for reason in REFUSED.values())
    assert len(FAMILIES) >= 15


def test_readme_table_covers_every_decoder_moe_model_type():
    rows = _readme_family_table()
    missing = [t for t in decoder_moe_model_types() if t not in rows]
    assert not missing, f"README family table misses: {missing}"
    for model_type, row in rows.items():
        status = row.strip().strip("|").split("|")[1].strip()
        assert status == ("supported" if model_type in FAMILIES else "refused"), row


@pytest.mark.parametrize("model_type", ["dbrx", "phimoe", "llama4"])
def test_refused_types_say_why(model_type, tmp_path):
    config = CONFIG_MAPPING[model_type]()
    with pytest.raises(RoutingError, match=f"'{model_type}' model, which is not supported: .{{30}}"):
        config_shape(config, "x")


# --- the real lm-eval -------------------------------------------------------------------------------


def _save(family, folder):
    from transformers import AutoTokenizer

    from lm_eval_bh.tiny import ASSETS_TOKENIZER

    tokenizer = AutoTokenizer.from_pretrained(ASSETS_TOKENIZER)
    model = build(family)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _check_routing(routing):
    info = routing["model"]
    assert info["num_experts"] == 16 and info["num_layers"] == 1  # MoE on the second layer only
    assert 1 <= routing["mean_experts_per_token"] <= 4 and routing["tokens"] > 0
    expected = info["dense_params"] + info["params_per_expert"] * routing["mean_experts_per_token"]
    assert routing["active_params_per_token"] == pytest.approx(expected)


def test_lm_eval_cli_runs_deepseek_v3_and_glm4_moe(tmp_path):
    """`lm_eval --model moe_bh` on tiny saved DeepSeek-V3 (= Kimi-K2's architecture) and GLM-4.5-MoE
    models, the two command lines at once (one core each)."""
    runs = {}
    for family in ("deepseek_v3", "glm4_moe"):
        folder = _save(family, tmp_path / family)
        runs[family] = ([
            "lm_eval", "--model", "moe_bh", "--model_args", f"pretrained={folder},alpha=0.3", "--device", "cpu",
            "--include_path", str(ROOT / "tasks"), "--tasks", "mmlu_dev_offline", "--limit", "2",
            "--output_path", str(tmp_path / "out" / family),
        ], {})
    for family, result in run_concurrently(runs).items():
        assert result.returncode == 0, result.stderr[-3000:]
        data = json.loads(next((tmp_path / "out" / family).rglob("results_*.json")).read_text())
        _check_routing(data["config"]["routing"])
