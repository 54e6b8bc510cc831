"""Defined behaviour at the edges: calibrated routing end to end, non-finite router logits, empty input."""

import json

import pytest
import torch
from conftest import assert_unpatched, make_olmoe, module_state

from lm_eval_bh import BHRouting, RoutingConfig, RoutingError, route
from lm_eval_bh.commands.calibrate import calibrate_model
from lm_eval_bh.calibration import save_calibration
from lm_eval_bh.dispatch import compact_forward, grouped_forward

IDS = torch.randint(2, 256, (4, 24), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory):
    model = make_olmoe()
    batches = [torch.randint(2, 256, (4, 32), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    path = tmp_path_factory.mktemp("calib") / "tiny.calib.json"
    save_calibration(path, calibrate_model(model, batches, progress=False))
    return path


def test_calibrated_routing_end_to_end(calibration_file):
    model = make_olmoe()
    means = []
    for alpha in (0.01, 0.3):
        with torch.no_grad(), BHRouting(alpha=alpha, pvalue="calibrated", calibration=str(calibration_file)).patch(
            model
        ) as routing:
            assert torch.isfinite(model(IDS).logits).all()
        means.append(routing.summary()["mean_experts_per_token"])
    assert 1 <= means[0] < means[1] <= 4


def test_mismatched_calibration_is_one_line_error(calibration_file):
    model = make_olmoe(num_hidden_layers=3)
    before = module_state(model)
    with pytest.raises(RoutingError) as err:
        BHRouting(pvalue="calibrated", calibration=str(calibration_file)).patch(model)
    assert "layers" in str(err.value) and "\n" not in str(err.value)
    assert_unpatched(model, before)  # a failed patch leaves nothing behind


def test_missing_calibration_file():
    with pytest.raises(RoutingError, match="calibration"):
        BHRouting(pvalue="calibrated", calibration="/nonexistent.calib.json").patch(make_olmoe())
    with pytest.raises(RoutingError, match="calibration"):
        RoutingConfig(pvalue="calibrated")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("settings", [dict(alpha=0.2), dict(min_k=4, max_k=4)])
def test_nonfinite_router_logits(bad, settings):
    """No crash, no NaN in the outputs, and the event is counted."""
    model = make_olmoe()
    with torch.no_grad():
        model.model.layers[0].mlp.gate.weight[3] = bad  # expert 3's logit is non-finite for every token
        with BHRouting(**settings).patch(model) as routing:
            logits = model(IDS).logits
    assert torch.isfinite(logits).all()
    assert routing.summary()["nonfinite_router_tokens"] == IDS.numel()


def test_empty_input_routes_nothing():
    """Zero tokens through the router and every dispatch (the stock attention itself rejects length 0)."""
    model = make_olmoe()
    experts = model.model.layers[0].mlp.experts
    routed = route(torch.empty(0, 16), RoutingConfig(alpha=0.1).resolve(16, 4, False))
    assert routed.index.shape == (0, 4) and routed.k.shape == (0,)
    hidden = torch.empty(0, 64)
    for forward in (compact_forward, grouped_forward):
        assert forward(experts, hidden, routed.index, routed.weight).shape == (0, 64)
    with BHRouting(alpha=0.1).patch(model) as routing:
        assert model.model.layers[0].mlp(torch.empty(1, 0, 64)).shape == (1, 0, 64)
    assert routing.summary()["tokens"] == 0


def test_results_file_stays_valid_for_lm_eval_tools(tiny_model_dir, task_manager, tmp_path):
    """The routing block is strict JSON and lm-eval's own table renderer reads the file."""
    import lm_eval
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.utils import make_table

    tracker = EvaluationTracker(output_path=str(tmp_path))
    results = lm_eval.simple_evaluate(
        model="olmoe_bh", model_args=f"pretrained={tiny_model_dir},alpha=0.2", tasks=["mmlu_dev_offline"],
        task_manager=task_manager, limit=4, device="cpu",
    )
    tracker.save_results_aggregated(results=results, samples=None)
    (path,) = tmp_path.rglob("results_*.json")
    loaded = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert loaded["config"]["routing"]["tokens"] > 0
    assert "mmlu_dev_offline" in make_table(loaded)
