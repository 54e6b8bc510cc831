"""Exact checks that a deliberate bug (named in each docstring) passed the rest of the suite unseen.

Each test here was seen to fail with its bug applied and to pass without it. (The fused kernel's
strided-logits case lives with the kernel's tests, tests/test_routing_kernel.py.)
"""

import json
import re

import numpy as np
import pytest

from lm_eval_bh import routing
from lm_eval_bh.calibration import Calibration, check_settings, load_calibration, save_calibration
from lm_eval_bh.config import RoutingConfig
from lm_eval_bh.errors import RoutingError


# --- higher criticism's critical value ----------------------------------------------------------------


@pytest.mark.parametrize("m, alpha", [(16, 0.05), (16, 0.2), (64, 0.1), (64, 0.2)])
def test_hc_critical_value_is_exactly_the_simulated_quantile(m, alpha):
    """The critical value c is the (1 - alpha) quantile of the simulated null maxima of HC+: at most
    alpha of them exceed c (the test fires on `> c`, so this is its level), and more than alpha reach c
    (no smaller simulated value would do). Its neighbours in the sorted simulation, the bug of reading
    one order statistic off, break one or the other: here they differ from c (c is no atom)."""
    maxima = routing._hc_null_maxima(m)
    c = routing._hc_critical(m, alpha)
    n = maxima.numel()
    assert (maxima == c).sum().item() == 1, "c is an atom of the simulation: its neighbours equal it here"
    assert (maxima > c).sum().item() <= alpha * n < (maxima >= c).sum().item()


# --- the calibration file's header: booleans are not integers -------------------------------------------


def _one_layer_file(tmp_path) -> str:
    """A valid calibration of one layer of 8 experts, where True == 1 would pass every count check."""
    null = np.sort(np.random.default_rng(0).normal(size=(1, 400)).astype(np.float32), axis=-1)
    return save_calibration(tmp_path / "good.json", Calibration(null, {"model": "olmoe-x", "num_experts": 8}))


@pytest.mark.parametrize("edit, pattern, experts", [
    (lambda d: d["meta"].__setitem__("num_layers", True), "'num_layers' must be an integer >= 1, got True", 8),
    (lambda d: d["meta"].__setitem__("num_experts", True), "'num_experts' must be an integer >= 1, got True", 1),
    (lambda d: d["arrays"]["null"].__setitem__("shape", [True, 400]),
     "array 'null': 'shape' must be a list of integers, got [True, 400]", 8),
    (lambda d: d.__setitem__("version", True), "'version' must be an integer, got True", 8),
], ids=["num_layers", "num_experts", "shape", "version"])
def test_calibration_header_refuses_booleans_as_integers(tmp_path, edit, pattern, experts):
    """JSON `true` is a Python bool, which is an int: a header check that forgets it takes `true` for 1
    and loads a one-layer file whose counts say `true` (the bug). Refused in one line naming the field."""
    good = _one_layer_file(tmp_path)
    doc = json.loads(open(good).read())
    edit(doc)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(doc))
    load_calibration(good, 1, 8)  # the unedited file loads as this one layer of 8 experts
    cfg = RoutingConfig(pvalue="calibrated", calibration=str(path))
    for check in (lambda: check_settings(cfg, experts), lambda: load_calibration(str(path), 1, experts)):
        with pytest.raises(RoutingError, match=re.escape(pattern)) as e:
            check()
        assert "\n" not in str(e.value)
