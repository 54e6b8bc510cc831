"""Unit tests of routing.route(): stock equivalence, padding, config errors, non-finite logits, ordering."""

import math

import pytest
import torch

from lm_eval_bh import routing
from lm_eval_bh.calibration import Calibration, LayerNull, save_calibration
from lm_eval_bh.routing import RoutingConfig, RoutingError, route

E = 16


def cfg(**kw):
    return RoutingConfig(**kw).resolve(E, 4, False)


def logits(t=64, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, E, generator=g) * scale


@pytest.mark.parametrize("renormalize", [False, True])
def test_fixed_k_matches_stock_topk_router(renormalize):
    x = logits()
    probs = torch.softmax(x, dim=-1)
    top_w, top_i = probs.topk(4, dim=-1)
    if renormalize:
        top_w = top_w / top_w.sum(-1, keepdim=True)
    for c in (cfg(min_k=4, max_k=4, renormalize=renormalize), cfg(selection="topk", renormalize=renormalize)):
        r = route(x, c)
        assert torch.equal(r.index, top_i) and torch.equal(r.k, torch.full((64,), 4))
        torch.testing.assert_close(r.weight, top_w)
        assert r.weight.dtype == torch.float32 and not r.nonfinite.any()


@pytest.mark.parametrize("selection", list(routing.SELECTIONS))
@pytest.mark.parametrize("pvalue", ["zscore", "softmax"])
def test_padding_convention(selection, pvalue):
    x = logits(200, seed=1)
    c = cfg(selection=selection, pvalue=pvalue, min_k=2, max_k=6, alpha=0.2, top_p=0.6)
    r = route(x, c)
    assert r.index.shape == r.weight.shape == (200, 6)
    assert ((r.k >= 2) & (r.k <= 6)).all()
    valid = torch.arange(6) < r.k[:, None]
    assert torch.equal(r.index == E, ~valid)
    assert (r.weight[~valid] == 0).all() and (r.weight[valid] > 0).all()
    # the selected experts are distinct and are the first k of the p-value order
    sorted_logits, order, k = routing.select_count(x, c)
    assert torch.equal(k, r.k)
    assert torch.equal(torch.where(valid, order[:, :6], E), r.index)


def test_config_errors(tmp_path):
    with pytest.raises(RoutingError, match="calibration must be set"):
        RoutingConfig(pvalue="calibrated")
    with pytest.raises(RoutingError, match="only used with pvalue=calibrated"):
        RoutingConfig(calibration="x.json")
    with pytest.raises(RoutingError, match="calibration file not found"):
        RoutingConfig(pvalue="calibrated", calibration=str(tmp_path / "missing.json"))
    for bad in (0, 1.5, -0.1, "x"):
        with pytest.raises(RoutingError, match="top_p"):
            RoutingConfig(top_p=bad)
    assert RoutingConfig(top_p=1).top_p == 1.0
    with pytest.raises(RoutingError, match="selection must be one of bh, hc, topp, topk"):
        RoutingConfig(selection="nope")
    with pytest.raises(RoutingError, match="pvalue must be one of zscore, softmax, calibrated"):
        RoutingConfig(pvalue="nope")
    for err in (RoutingError("x"),):
        assert "\n" not in str(err)


def test_calibrated_needs_null(tmp_path):
    path = save_calibration(tmp_path / "c.json", Calibration(torch.randn(1, 100).sort().values.numpy(),
                                                             {"num_experts": E}))
    c = RoutingConfig(pvalue="calibrated", calibration=path).resolve(E, 4, False)
    with pytest.raises(RoutingError, match="null="):
        route(logits(), c)
    assert routing.is_monotone(c)
    assert routing.is_monotone(cfg())


def test_nonfinite_logits():
    x = logits(6, seed=2)
    x[0, 3] = math.nan
    x[1, :] = math.nan
    x[2, :] = math.inf
    x[3, 5] = math.inf
    x[3, 6] = -math.inf
    x[4, : E - 1] = math.nan  # a single finite logit, min_k = 2 forces one non-finite expert in
    for c in (cfg(min_k=2, max_k=4), cfg(min_k=2, max_k=4, renormalize=True), cfg(min_k=2, max_k=4, pvalue="softmax"),
              cfg(min_k=2, max_k=4, selection="hc"), cfg(min_k=2, max_k=4, selection="topp")):
        r = route(x, c)
        assert r.nonfinite.tolist() == [True, True, True, True, True, False]
        assert torch.isfinite(r.weight).all()
        valid = torch.arange(4) < r.k[:, None]
        assert torch.equal(r.index == E, ~valid)
        assert 3 not in r.index[0, : r.k[0]].tolist()
        assert not ({5, 6} & set(r.index[3, : r.k[3]].tolist()))
        for row in (1, 2):  # no finite logit: experts 0..min_k-1, uniform weights
            assert r.k[row] == 2 and r.index[row].tolist() == [0, 1, E, E]
            assert r.weight[row].tolist() == [0.5, 0.5, 0.0, 0.0]
        assert r.index[4, 0] == E - 1 and r.k[4] == 2 and r.weight[4, 1] == 0
    assert routing.nonfinite_rows(x).tolist() == [True] * 5 + [False]
    # with a fixed k (topk) a dead row gets max_k experts, so no padding appears
    r = route(x, cfg(min_k=1, max_k=4, selection="topk"))
    assert (r.k == 4).all() and (r.index < E).all() and r.weight[1].tolist() == [0.25] * 4


def test_per_expert_null_orders_by_pvalue_then_logit():
    # expert 0's null sits far above the others: its large logit is unremarkable for it
    samples = torch.stack([torch.linspace(-3, 3, 99) + (10.0 if e == 0 else 0.0) for e in range(4)])
    null = LayerNull(samples)
    c = RoutingConfig(min_k=1, max_k=4, selection="topk").resolve(4, 4, False)
    object.__setattr__(c, "pvalue", "calibrated")  # skip the file check: the null is given directly
    x = torch.tensor([[8.0, 2.0, 5.0, 5.0]])
    r = route(x, c, null=null)
    # p: expert 0 -> high; experts 2, 3 tie at the smallest p (both above all their samples) and are
    # ordered by logit (equal: stable, lower index first); expert 1 next
    p = routing.pvalues(x, "calibrated", null=null)[0]
    assert p[2] == p[3] == 1 / 100 and p[1] < p[0]
    assert r.index[0].tolist() == [2, 3, 1, 0]
    x = torch.tensor([[8.0, 4.0, 5.0, 9.0]])  # 1, 2, 3 tie at p = 1/100: larger logit first
    assert route(x, c, null=null).index[0].tolist() == [3, 2, 1, 0]
    assert not routing.is_monotone(c, null)
    # a shared null takes the single-sort path and orders like the logits
    shared = LayerNull(torch.linspace(-3, 3, 99))
    assert route(x, c, null=shared).index[0].tolist() == [3, 0, 2, 1]
    assert routing.is_monotone(c, shared)


def test_temperature_scales_calibrated_logits():
    null = LayerNull(torch.linspace(-3, 3, 999))
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    p1 = routing.pvalues(x, "calibrated", 1.0, null)
    p2 = routing.pvalues(x, "calibrated", 2.0, null)
    torch.testing.assert_close(p2, routing.pvalues(x / 2, "calibrated", 1.0, null))
    assert (p2[0, :2] > p1[0, :2]).all()
