"""Budgets: target_k bisection, the per-layer allocation, per-layer budgets and the layer-budget twin."""

import json
import math

import lm_eval
import pytest
import torch

from lm_eval_bh import budget, routing
from lm_eval_bh.config import RoutingConfig
from lm_eval_bh.corpus import CORPUS
from lm_eval_bh.errors import RoutingError
from lm_eval_bh.patch import BHRouting
from lm_eval_bh.routing import Knob

ALPHA = Knob("alpha", 1e-8, 1 - 1e-6)


def _one_line(info):
    assert "\n" not in str(info.value)
    return str(info.value)


# --- the pure bisection ------------------------------------------------------------------------------


def test_bisection_meets_the_target_within_two_percent_on_every_knob_scale():
    curves = {
        Knob("alpha", 1e-8, 1 - 1e-6): lambda a: 1 + 7 * a ** 0.3,  # logit scale
        Knob("beta", 1e-6, 1.0, increasing=False, scale="log"): lambda b: 1 + 15 * (1 - b) ** 4,  # decreasing
        Knob("top_p", 1e-6, 1.0, scale="linear"): lambda p: 1 + 7 * p * p,
        Knob("entropy_scale", 1e-3, 1e3, scale="log"): lambda c: min(16.0, 1 + c),
    }
    for knob, curve in curves.items():
        for target in (1.2, 2, 3.3, 6):
            calls = []
            value, k = budget.bisect_knob(lambda v: calls.append(v) or curve(v), knob, target)
            assert abs(k - target) <= 0.02 * target and k == curve(value), (knob.param, target)
            assert knob.lo <= value <= knob.hi and len(calls) <= 30
    # the ends themselves when they meet the target
    assert budget.bisect_knob(lambda a: 1 + a, ALPHA, 1.0)[0] == pytest.approx(1e-8)


def test_bisection_names_the_reachable_range_of_an_unreachable_target():
    curve = lambda a: 1.5 + 2 * a  # noqa: E731  (1.5 .. 3.5)
    for target in (1.2, 4.0):
        with pytest.raises(RoutingError) as info:
            budget.bisect_knob(curve, ALPHA, target, what="selection=bh")
        message = _one_line(info)
        assert f"target_k={target:g} is out of reach of selection=bh" in message
        assert "mean k 1.5 to 3.5" in message and "alpha from 1e-08 to 0.999999" in message
    # within 2 % of an end is reachable
    assert budget.bisect_knob(curve, ALPHA, 3.55)[1] == pytest.approx(3.5, abs=1e-5)


def test_bisection_refuses_a_target_inside_a_jump():
    step = lambda a: 1.0 if a < 0.3 else 3.0  # noqa: E731
    with pytest.raises(RoutingError, match=r"falls in a jump of the rule's mean k, from 1 to 3 at alpha=0\.3") as info:
        budget.bisect_knob(step, ALPHA, 2.0)
    _one_line(info)


def test_per_layer_bisection_with_layers_that_move_each_other():
    """Layer 1's mean also grows with layer 0's knob (as a routed layer changes the next one's input)."""
    def mean_ks(values):
        k0 = 1 + 7 * values[0] ** 0.5
        return [k0, 1 + 5 * values[1] ** 0.5 + 0.1 * k0]

    values, ks = budget.bisect_layers(mean_ks, ALPHA, [3.0, 2.0])
    assert ks == mean_ks(values) and all(abs(k - t) <= 0.02 * t for k, t in zip(ks, [3.0, 2.0]))
    with pytest.raises(RoutingError, match="layer 1's budget 7 is out of reach") as info:
        budget.bisect_layers(mean_ks, ALPHA, [3.0, 7.0])
    _one_line(info)


# --- the allocation ----------------------------------------------------------------------------------


def _brute_force(losses, total, min_k):
    import itertools

    best = None
    for ks in itertools.product(range(len(losses[0])), repeat=len(losses)):
        if sum(ks) + min_k * len(losses) == total:
            loss = sum(row[j] for row, j in zip(losses, ks))
            if best is None or loss < best[0]:
                best = (loss, ks)
    return best


def test_allocation_is_the_least_total_loss_and_meets_the_budget():
    # hand-made: layer 0 loses a lot below 4 experts, layer 1 almost nothing
    losses = [[9.0, 5.0, 3.0, 1.0], [1.2, 1.1, 1.05, 1.0]]
    assert budget.allocate(losses, 5, 1) == (4.0, 1.0)
    assert budget.allocate(losses, 4, 1) == (3.0, 1.0)
    # fractional budget: the remainder goes to the layer whose next expert gains the most
    assert budget.allocate(losses, 4.5, 1) == (3.5, 1.0)
    assert budget.allocate([[3.0, 2.0, 1.0], [3.0, 1.0, 0.9]], 3.25, 1) == (1.25, 2.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        losses = torch.rand(3, 4, generator=g).sort(dim=1, descending=True).values.tolist()
        for total in range(3, 13):
            ks = budget.allocate(losses, total, 1)
            assert sum(ks) == total
            assert sum(row[int(k) - 1] for row, k in zip(losses, ks)) == pytest.approx(_brute_force(losses, total, 1)[0])
    with pytest.raises(RoutingError, match="outside min_k..max_k"):
        budget.allocate(losses, 13, 1)


# --- per-layer budgets and the twin, on a patched model -----------------------------------------------


def _ids(n_seq=16, length=256, seed=0):
    return torch.randint(2, 256, (n_seq, length), generator=torch.Generator().manual_seed(seed))


def _per_layer(model, cfg, ids):
    with BHRouting(cfg).patch(model) as r, torch.no_grad():
        model(input_ids=ids)
        return r.summary()


def test_split_counts_have_the_fractional_mean():
    """Sequences of assorted lengths, each from position 0 (as lm-eval's requests): every layer's mean
    within 0.01 of its budget on ~4000 tokens; a count depends on the position alone."""
    lengths = torch.randint(40, 400, (16,), generator=torch.Generator().manual_seed(1)).tolist()
    positions = torch.cat([torch.arange(n) for n in lengths])
    for mean in (1.0, 1.05, 2.25, 3.5, 7.9):
        for layer in range(4):
            k = routing.split_counts(mean, positions, layer)
            assert set(k.tolist()) <= {math.floor(mean), math.ceil(mean)}
            assert abs(k.double().mean().item() - mean) < 0.01, (mean, layer)
    assert torch.equal(routing.split_counts(2.5, positions[:7]), routing.split_counts(2.5, positions)[:7])


def test_layer_k_routes_a_fixed_profile_per_layer(olmoe):
    out = _per_layer(olmoe, RoutingConfig(selection="topk", layer_k="3;1.5", max_k=4), _ids())
    assert out["per_layer_mean"][0] == 3.0 and abs(out["per_layer_mean"][1] - 1.5) < 0.02
    assert out["settings"]["layer_k"] == (3.0, 1.5)
    with pytest.raises(RoutingError, match="layer_k has 3 per-layer values; this model has 2 MoE layers") as info:
        BHRouting(selection="topk", layer_k="3;1;2").patch(olmoe)
    _one_line(info)


def test_layer_budget_twin_matches_a_runs_per_layer_means(olmoe, tmp_path):
    """The twin of an adaptive run: fixed top-k per layer with that run's per-layer means (within 0.02),
    from its results file, on other text too."""
    adaptive = _per_layer(olmoe, RoutingConfig(alpha=0.3, max_k=8), _ids(seed=0))
    path = tmp_path / "results_bh.json"
    path.write_text(json.dumps({"results": {}, "config": {"model": "moe_bh", "routing": adaptive}}))
    cfg = RoutingConfig(selection="topk", layer_budget=str(path))
    for seed in (0, 5):
        twin = _per_layer(olmoe, cfg, _ids(seed=seed))
        for mine, theirs in zip(twin["per_layer_mean"], adaptive["per_layer_mean"]):
            assert abs(mine - theirs) <= 0.02, (twin["per_layer_mean"], adaptive["per_layer_mean"])
    assert cfg.label() == "topk twin=results_bh.json" and cfg.setting_id().startswith("topk_twin-results_bh-")


def test_layer_budget_file_errors_are_one_line(tmp_path):
    bad = {"missing.json": None, "notjson.json": "{oops", "nomeans.json": json.dumps({"config": {"routing": {}}}),
           "nan.json": '{"config": {"routing": {"per_layer_mean": [2.0, NaN]}}}'}
    for name, text in bad.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(RoutingError, match=f"layer_budget {tmp_path / name}") as info:
            RoutingConfig(selection="topk", layer_budget=str(tmp_path / name))
        _one_line(info)
    (tmp_path / "ok.json").write_text(json.dumps({"config": {"routing": {"per_layer_mean": [2.0, 1.5]}}}))
    with pytest.raises(RoutingError, match="use it with selection=topk"):
        RoutingConfig(layer_budget=str(tmp_path / "ok.json"))


def test_budget_arguments_are_checked_in_one_line():
    cases = [
        (dict(target_k=0), "target_k must be a finite number > 0"),
        (dict(target_k=9, max_k=8), "target_k must lie within min_k..max_k"),
        (dict(target_k=2, layer_k="2;2"), "give target_k or layer_k, not both"),
        (dict(allocation="sensitivity"), "give target_k too"),
        (dict(allocation="dp", target_k=2), "allocation must be one of uniform, sensitivity"),
        (dict(selection="topk", layer_k="8,2"), None),  # a comma list from Python is fine
        (dict(selection="topk", layer_k="2;x"), "layer_k must be per-layer numbers separated by ';'"),
        (dict(selection="topk", layer_k="2;0"), "layer_k entries must be finite numbers > 0"),
        (dict(target_k=2, min_k=2, max_k=2), "min_k = max_k = 2 fixes k"),
        (dict(selection="skip", beta=0), "beta must be in \\(0, 1\\]"),
        (dict(selection="entropy", entropy_scale=-1), "entropy_scale must be a finite number > 0"),
        (dict(selection="topk", layer_k="2;2", layer_knob="0.1;0.2"), "layer_knob is the per-layer knob"),
    ]
    for kw, message in cases:
        if message is None:
            RoutingConfig(**kw)
            continue
        with pytest.raises(RoutingError, match=message) as info:
            RoutingConfig(**kw)
        _one_line(info)


def test_an_adaptive_budget_must_be_fitted_before_routing(olmoe):
    with pytest.raises(RoutingError, match="must first be fitted on calibration text") as info:
        BHRouting(target_k=2).patch(olmoe)
    _one_line(info)
    # topk at a fractional uniform target needs no fit: every layer gets K by the token split
    out = _per_layer(olmoe, RoutingConfig(selection="topk", target_k=2.5), _ids())
    assert all(abs(m - 2.5) < 0.02 for m in out["per_layer_mean"])


# --- fits on the tiny model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("selection,target", [("bh", 2.0), ("skip", 2.5)])
def test_fit_budget_meets_target_k_on_the_calibration_text(tiny, selection, target):
    model, tokenizer = tiny
    cfg = RoutingConfig(selection=selection, target_k=target)
    fitted, info = budget.fit_budget(model, tokenizer, cfg, tokens=256)
    knob = routing.SELECTIONS[selection].knob.param
    assert abs(fitted.fitted_k - target) <= 0.02 * target and info["calibration_k"] == fitted.fitted_k
    assert info["knob"] == knob and info["value"] == getattr(fitted, knob) and info["tokens"] == 256
    assert fitted.label() == cfg.label() and fitted.setting_id() == cfg.setting_id()  # named by the target
    batches, _ = budget.calibration_batches(tokenizer, 256)
    assert budget.measure(model, fitted, batches)["mean_experts_per_token"] == fitted.fitted_k  # reproducible
    assert budget.fit_budget(model, tokenizer, cfg, tokens=256)[0] is fitted  # cached in-process


def test_unreachable_target_k_names_the_reachable_range(tiny):
    """Higher criticism keeps at most the ranks up to m/2 where HC+ peaks: on the tiny model it never
    averages 6 experts, even with max_k = 16."""
    model, tokenizer = tiny
    with pytest.raises(RoutingError, match=r"target_k=6 is out of reach of selection=hc \(pvalue=zscore, k=1..16\): "
                                           r"it reaches mean k 1 to [34](\.\d+)? on the calibration text") as err:
        budget.fit_budget(model, tokenizer, RoutingConfig(selection="hc", target_k=6, max_k=16), tokens=256)
    _one_line(err)


def test_sensitivity_allocation_for_topk_and_bh(tiny):
    model, tokenizer = tiny
    topk, info = budget.fit_budget(model, tokenizer, RoutingConfig(selection="topk", target_k=2.5,
                                                                   allocation="sensitivity"),
                                   tokens=256, sensitivity_tokens=256)
    assert sum(topk.layer_k) == 5.0 and info["layer_k"] == list(topk.layer_k)
    losses = info["layer_loss"]
    assert budget.allocate(losses, 5.0, 1) == topk.layer_k
    assert topk.label() == "topk target_k=2.5 alloc=sensitivity"
    bh, info = budget.fit_budget(model, tokenizer, RoutingConfig(target_k=2.5, allocation="sensitivity"),
                                 tokens=256, sensitivity_tokens=256)
    assert bh.layer_k == topk.layer_k and len(bh.layer_knob) == 2
    for mine, target in zip(info["calibration_per_layer"], bh.layer_k):
        assert abs(mine - target) <= 0.02 * target
    # one sensitivity table serves every rule and target of the process (measured once: layers x k runs)
    assert info["layer_loss"] is losses
    other, again = budget.fit_budget(model, tokenizer, RoutingConfig(selection="topk", target_k=1.5,
                                                                     allocation="sensitivity", temperature=2.0),
                                     tokens=256, sensitivity_tokens=256)
    assert again["layer_loss"] is not losses  # another weighting (temperature) is measured anew


def test_target_k_and_its_twin_through_lm_eval(tiny_model_dir, task_manager, tmp_path):
    """`--model moe_bh --model_args pretrained=...,target_k=2`: no calibration step; the results record the
    found alpha, the calibration-text k and the evaluation's achieved k. Its results file then sets the
    budget of its fixed top-k twin (`selection=topk,layer_budget=FILE`), per layer within 0.02."""
    out = lm_eval.simple_evaluate(model="moe_bh", model_args=f"pretrained={tiny_model_dir},target_k=2,fit_tokens=256,"
                                                             "allocation=uniform",
                                  tasks=["mmlu_dev_offline"], task_manager=task_manager, limit=4, device="cpu")
    block = out["config"]["routing"]
    fit = block["budget"]
    assert block["settings"]["target_k"] == 2.0 and fit["knob"] == "alpha"
    assert block["settings"]["alpha"] == fit["value"] != 0.05
    assert abs(fit["calibration_k"] - 2.0) <= 0.04 and block["settings"]["fitted_k"] == fit["calibration_k"]
    assert fit["achieved_k"] == block["mean_experts_per_token"] and fit["corpus"] == CORPUS["name"]
    from lm_eval_bh.results_schema import RoutingBlock

    assert RoutingBlock.from_dict(block).to_dict() == block
    path = tmp_path / "results_target.json"
    path.write_text(json.dumps({"config": out["config"]}, default=str))
    twin = lm_eval.simple_evaluate(model="moe_bh", model_args=f"pretrained={tiny_model_dir},selection=topk,"
                                                              f"layer_budget={path}",
                                   tasks=["mmlu_dev_offline"], task_manager=task_manager, limit=4, device="cpu")
    twin_block = twin["config"]["routing"]
    assert twin_block["tokens"] == block["tokens"] and twin_block["settings"]["layer_budget"] == str(path)
    for mine, theirs in zip(twin_block["per_layer_mean"], block["per_layer_mean"]):
        assert abs(mine - theirs) <= 0.02, (twin_block["per_layer_mean"], block["per_layer_mean"])


def test_rules_that_read_probabilities_refuse_a_uniform_router(olmoe):
    """A router storing its logits at scale 1e-5 (the embedded `real` model, real.ROUTER_SCALE) has uniform
    probabilities: top-p, skipping and entropy refuse it in one line; BH (scale-free) routes it."""
    with torch.no_grad():
        for layer in olmoe.model.layers:
            layer.mlp.gate.weight.mul_(1e-5 / layer.mlp.gate.weight.std())
    for selection in ("topp", "skip", "entropy"):
        assert routing.SELECTIONS[selection].reads_probs
        with pytest.raises(RoutingError, match=f"selection={selection} reads the router's softmax probabilities") as info:
            BHRouting(selection=selection, max_k=8).patch(olmoe)
        _one_line(info)
    out = _per_layer(olmoe, RoutingConfig(alpha=0.2, max_k=8), _ids(2, 32))
    assert out["mean_experts_per_token"] > 1
    # the stock (fixed top-k) model is left as it was by the refused patches
    assert not any("forward" in layer.mlp.gate.__dict__ for layer in olmoe.model.layers)


def test_a_target_without_an_allocation_gets_the_fitted_per_layer_budget(tiny_model_dir, task_manager):
    """`target_k=K` alone in model_args: allocation=sensitivity (the README's headline evidence), recorded in
    the results, for the static top-k budget and for BH within it; the per-layer profile holds K x layers."""
    for selection in ("topk", "bh"):
        out = lm_eval.simple_evaluate(model="moe_bh", model_args=f"pretrained={tiny_model_dir},selection={selection},"
                                                                 "target_k=1.5,fit_tokens=256",
                                      tasks=["mmlu_dev_offline"], task_manager=task_manager, limit=2, device="cpu")
        block = out["config"]["routing"]
        assert block["settings"]["allocation"] == "sensitivity" and block["budget"]["allocation"] == "sensitivity"
        assert sum(block["budget"]["layer_k"]) == 1.5 * len(block["per_layer_mean"]) and block["budget"]["layer_loss"]
