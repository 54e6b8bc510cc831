"""Per-layer routing diagnostics in `config.routing.diagnostics` and the typed schema of the block:
values against a direct computation, real tokens only, fixed k stated, a real lm_eval results file."""

import json

import numpy as np
import pytest
import torch
from conftest import make_olmoe

from lm_eval_bh import BHRouting, route
from lm_eval_bh.families import find_moe_layers
from lm_eval_bh.results_schema import RoutingBlock, routing_block

KEYS = {"mean_discoveries", "frac_raised_to_min_k", "frac_cut_to_max_k", "pvalue_histogram", "pi0"}
IDS = torch.randint(2, 256, (3, 20), generator=torch.Generator().manual_seed(7))
MASK = torch.ones_like(IDS)
MASK[1, 12:] = 0  # padding: never counted
MASK[2, 5:] = 0


def _run(model, settings):
    """Route a padded batch through the patched model: (its diagnostics, the diagnostics computed
    directly from the logits its routers saw, with route() and numpy, over the real tokens)."""
    logits = {}
    with torch.no_grad(), BHRouting(**settings).patch(model) as routing:
        hooks = [layer.router.register_forward_hook(lambda m, a, out, i=i: logits.__setitem__(i, out[0].detach()))
                 for i, layer in enumerate(find_moe_layers(model))]
        model(IDS, attention_mask=MASK)
        for h in hooks:
            h.remove()
    real = MASK.reshape(-1).bool()
    expected = []
    for i in sorted(logits):
        r = route(logits[i], routing.config)
        found, k, p = r.discoveries[real], r.k[real], r.pvalues[real]
        hist, _ = np.histogram(p.double().numpy(), bins=20, range=(0.0, 1.0))  # p = 1 falls in the last bin
        expected.append({
            "mean_discoveries": found.double().mean().item(),
            "frac_raised_to_min_k": (k > found).double().mean().item(),
            "frac_cut_to_max_k": (k < found).double().mean().item(),
            "pvalue_histogram": [int(c) for c in hist],
            "pi0": min(1.0, (p >= 0.5).sum().item() / (0.5 * p.numel())),
        })
    return routing.summary()["diagnostics"], expected


@pytest.mark.parametrize("settings", [dict(alpha=0.2, min_k=2, max_k=3), dict(alpha=0.05, pvalue="softmax"),
                                      dict(selection="hc", max_k=4)])
def test_diagnostics_match_a_direct_computation(settings):
    diagnostics, expected = _run(make_olmoe(), settings)
    per_layer = diagnostics["per_layer"]
    assert len(per_layer) == 2 and all(set(d) == KEYS for d in per_layer)
    for got, want in zip(per_layer, expected):
        assert got["pvalue_histogram"] == want["pvalue_histogram"]
        assert sum(got["pvalue_histogram"]) == int(MASK.sum()) * 16  # all experts of the real tokens
        for key in KEYS - {"pvalue_histogram"}:
            assert got[key] == pytest.approx(want[key], abs=1e-12), key
    if settings.get("min_k") == 2:  # the clamp acts in both directions on these logits
        assert per_layer[0]["frac_raised_to_min_k"] > 0 and per_layer[0]["frac_cut_to_max_k"] > 0


def test_fixed_k_says_no_pvalues_were_computed():
    model = make_olmoe()
    with torch.no_grad(), BHRouting(min_k=4, max_k=4).patch(model) as routing:
        model(IDS)
    diag = routing.summary()["diagnostics"]
    assert diag["per_layer"] is None and "no p-values" in diag["note"]


def test_schema_round_trip_and_old_files():
    model = make_olmoe()
    with torch.no_grad(), BHRouting(alpha=0.2).patch(model) as routing:
        with routing.group("task-a"):
            model(IDS, attention_mask=MASK)
    block = json.loads(json.dumps(routing.summary()))
    parsed = RoutingBlock.from_dict(block)
    assert parsed.to_dict() == block
    assert parsed.per_task["task-a"].tokens == int(MASK.sum()) and parsed.model.num_experts == 16
    assert len(parsed.diagnostics.per_layer) == 2
    # a block of an older release (no diagnostics) and an unknown key survive a round trip
    old = {k: v for k, v in block.items() if k != "diagnostics"} | {"future_key": 1}
    again = RoutingBlock.from_dict(old)
    assert again.diagnostics is None and again.to_dict()["future_key"] == 1
    assert routing_block({"config": {"model": "hf"}}) is None


# the same block in a real lm_eval results file: test_lm.py::test_diagnostics_in_a_real_lm_eval_results_file
