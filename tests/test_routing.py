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
def test_padding_convention(selection, pvalue, tmp_path):
    x = logits(200, seed=1)
    kw, null = {}, None
    if routing.SELECTIONS[selection].needs_null:
        cal = Calibration(logits(2000, seed=9).reshape(1, -1).numpy(), {"num_experts": E})
        kw, null = {"calibration": save_calibration(tmp_path / "c.json", cal)}, cal.layer_nulls()[0]
    c = cfg(selection=selection, pvalue=pvalue, min_k=2, max_k=6, alpha=0.2, top_p=0.6, **kw)
    r = route(x, c, null=null)
    assert r.index.shape == r.weight.shape == (200, 6)
    assert ((r.k >= 2) & (r.k <= 6)).all()
    valid = torch.arange(6) < r.k[:, None]
    assert torch.equal(r.index == E, ~valid)
    assert (r.weight[~valid] == 0).all() and (r.weight[valid] > 0).all()
    # the selected experts are distinct and are the first k of the p-value order
    sel = routing.select_count(x, c, null=null)
    assert torch.equal(sel.k, r.k) and torch.equal(sel.discoveries, r.discoveries)
    assert torch.equal(torch.where(valid, sel.order[:, :6], E), r.index)


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
    assert not routing.is_monotone(c)  # unknown without the null: the safe answer
    assert routing.is_monotone(c, LayerNull(torch.linspace(-3, 3, 99)))
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
    object.__setattr__(c, "pvalue", "ecdf")  # skip the file check: the null is given directly
    x = torch.tensor([[8.0, 2.0, 5.0, 5.0]])
    r = route(x, c, null=null)
    # p: expert 0 -> high; experts 2, 3 tie at the smallest p (both above all their samples) and are
    # ordered by logit (equal: stable, lower index first); expert 1 next
    p = routing.pvalues(x, "ecdf", null=null)[0]
    assert p[2] == p[3] == 1 / 100 and p[1] < p[0]
    assert r.index[0].tolist() == [2, 3, 1, 0]
    x = torch.tensor([[8.0, 4.0, 5.0, 9.0]])  # 1, 2, 3 tie at p = 1/100: larger logit first
    assert route(x, c, null=null).index[0].tolist() == [3, 2, 1, 0]
    assert not routing.is_monotone(c, null)
    # a shared null takes the single-sort path and orders like the logits
    shared = LayerNull(torch.linspace(-3, 3, 99))
    assert route(x, c, null=shared).index[0].tolist() == [3, 0, 2, 1]
    assert routing.is_monotone(c, shared)


def test_temperature_divides_logits_and_null_alike():
    """Calibration-based p-values and the local fdr compare a logit with the null: dividing both by the
    temperature changes nothing (a null fitted on logits / T is the null of logits / T)."""
    raw = torch.randn(1, 4000, generator=torch.Generator().manual_seed(0)) * 3 + 1
    x = torch.tensor([[9.0, 4.0, 1.0, -1.0]])
    null = Calibration(raw.numpy(), {"num_experts": 4}).layer_nulls()[0]
    scaled = Calibration(raw.numpy() / 2, {"num_experts": 4}).layer_nulls()[0]
    for method in ("calibrated", "ecdf"):
        torch.testing.assert_close(routing.pvalues(x, method, 2.0, null), routing.pvalues(x / 2, method, 1.0, scaled),
                                   rtol=2e-3, atol=1e-6)
        torch.testing.assert_close(routing.pvalues(x, method, 2.0, null), routing.pvalues(x, method, 1.0, null))
    torch.testing.assert_close(null.lfdr(x), scaled.lfdr(x / 2), rtol=2e-3, atol=1e-4)


# --- the spec registries, labels and the public functions' argument checks ---------------------------

_CAL_NULL = Calibration(torch.linspace(-3, 3, 99)[None].numpy(), {"num_experts": E}).layer_nulls()[0]
_OTHER = {"alpha": 0.2, "top_p": 0.9, "temperature": 2.0, "pvalue": "softmax", "beta": 0.1, "entropy_scale": 0.3}


def _configs(tmp_path):
    """One resolved config per (selection, p-value method), with a real calibration file where needed."""
    path = save_calibration(tmp_path / "c.json", Calibration(torch.randn(1, 100).sort().values.numpy(), {"num_experts": E}))
    for sel, rule in routing.SELECTIONS.items():
        for pv, spec in routing.PVALUES.items():
            kw = {"calibration": path} if spec.needs_null or rule.needs_null else {}
            yield RoutingConfig(selection=sel, pvalue=pv, min_k=1, max_k=6, **kw)


def test_label_shows_exactly_the_parameters_that_change_routing(tmp_path):
    """Change one field: the label and the id change iff the routing of some logits changes."""
    x = logits(400, seed=4)
    ids = set()
    for c in _configs(tmp_path):
        null = _CAL_NULL if c.calibration is not None else None
        base = route(x, c.resolve(E, 4, False), null=null)
        for field, value in _OTHER.items():
            if field == "pvalue" and routing.PVALUES[c.pvalue].needs_null:
                continue  # another method would refuse the calibration file
            other = RoutingConfig(**{**c.as_dict(), field: value})
            r = route(x, other.resolve(E, 4, False), null=null)
            changed = not (torch.equal(r.index, base.index) and torch.equal(r.weight, base.weight))
            shown = other.label() != c.label()
            assert shown == (other.setting_id() != c.setting_id()), (c.label(), field)
            if changed:
                assert shown, (c.label(), field)
            if field != "pvalue" and field not in routing.SELECTIONS[c.selection].params \
                    and field not in routing.PVALUES[c.pvalue].params:
                assert not shown, (c.label(), field)  # a parameter the rule and method never read
        ids.add(c.setting_id())
        assert "/" not in c.setting_id() and " " not in c.setting_id()
    # the rules that ignore p-values: zscore and softmax order experts alike, so they are one setting each
    assert len(ids) == len(routing.SELECTIONS) * len(routing.PVALUES) - sum(
        not rule.uses_pvalues for rule in routing.SELECTIONS.values())


def test_label_examples():
    assert RoutingConfig(alpha=0.05, max_k=8).label() == "bh/zscore alpha=0.05 k=1..8"
    assert RoutingConfig(alpha=0.05, max_k=8).setting_id() == "bh-zscore_a0.05_k1-8"
    assert RoutingConfig(selection="topp", pvalue="softmax", top_p=0.7, alpha=0.3, max_k=8).label() == "topp top_p=0.7 k=1..8"
    assert RoutingConfig(min_k=4, max_k=4, alpha=0.3, selection="hc").label() == "top-4"
    assert RoutingConfig(selection="topk", max_k=4).setting_id() == "topk4"
    assert RoutingConfig(pvalue="softmax", temperature=2, max_k=8).label() == "bh/softmax alpha=0.05 k=1..8 T=2"
    assert RoutingConfig(temperature=2, max_k=8).label() == "bh/zscore alpha=0.05 k=1..8"  # zscore ignores T
    assert RoutingConfig(mode="analyze", renormalize=True, max_k=8).setting_id() == "analyze_bh-zscore_a0.05_k1-8_renorm"
    # the new rules and the budgets: a budget names the setting instead of the knob it fits
    assert RoutingConfig(selection="skip", beta=0.3, max_k=8).setting_id() == "skip_b0.3_k1-8"
    assert RoutingConfig(selection="entropy", entropy_scale=0.5, max_k=8).label() == "entropy entropy_scale=0.5 k=1..8"
    assert RoutingConfig(target_k=3, max_k=8, alpha=0.2).label() == "bh/zscore target_k=3 k=1..8"
    assert RoutingConfig(target_k=3, max_k=8).setting_id() == "bh-zscore_K3_k1-8"
    assert RoutingConfig(target_k=2.5, allocation="sensitivity", max_k=8).setting_id() == "bh-zscore_K2.5_sensitivity_k1-8"
    assert RoutingConfig(selection="topk", target_k=2.5).label() == "topk target_k=2.5"
    assert RoutingConfig(selection="topk", layer_k="8;2;2.5;3").label() == "topk layer_k=8;2;2.5;3"
    assert RoutingConfig(selection="topk", layer_k="8;2;2.5;3").setting_id() == "topk_lk8-2-2.5-3"
    assert RoutingConfig(selection="topk", layer_k=(2, 3)).fixed_k is False
    # distinct values give distinct ids (shortest round-trip text, not 6 significant digits)
    assert RoutingConfig(alpha=0.05).setting_id() != RoutingConfig(alpha=0.0500001).setting_id()


def test_registry_specs_are_consistent():
    for name, spec in routing.PVALUES.items():
        assert spec.name == name and callable(spec.fn)
        assert set(spec.params) <= set(RoutingConfig.__dataclass_fields__)
    for name, spec in routing.SELECTIONS.items():
        assert spec.name == name and callable(spec.fn)
        assert set(spec.params) <= set(RoutingConfig.__dataclass_fields__)


def test_routing_is_pure_maths():
    """routing.py imports torch and the error types only: no calibration, no files, no config cycle."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(routing))
    top_level = {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    top_level |= {n.module or "" for n in tree.body if isinstance(n, ast.ImportFrom)}
    assert top_level <= {"__future__", "functools", "math", "dataclasses", "typing", "torch", "errors", "checks"}, top_level
    src = inspect.getsource(routing)
    assert "from .calibration" not in src and "os.path" not in src and "open(" not in src


def test_routed_reports_discoveries_and_pvalues():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(300, E, generator=g) * 2.0
    x[:100, :3] += 12.0  # three strong signals: BH finds more than max_k = 2
    c = cfg(alpha=0.2, min_k=1, max_k=2)
    r = route(x, c)
    mask = routing.benjamini_hochberg(routing.pvalues(x, "zscore"), 0.2)
    assert torch.equal(r.discoveries, mask.sum(-1))
    assert torch.equal(r.k, r.discoveries.clamp(1, 2))
    assert (r.discoveries > 2).any() and (r.discoveries < 1).any()  # both clamps happen
    assert torch.equal(r.pvalues, routing.pvalues(x, "zscore").sort(dim=-1).values)
    # the p-values come in the order of the selected experts
    assert torch.equal(r.pvalues[:, :2].gather(-1, torch.zeros(300, 1, dtype=torch.long)),
                       routing.pvalues(x, "zscore").gather(-1, r.index[:, :1]))


def test_public_functions_reject_bad_arguments_in_one_line():
    x = logits(8)
    cases = [
        (lambda: route(x[0], cfg()), "logits must be a floating-point tensor of shape \\(tokens, experts\\)"),
        (lambda: route(x, RoutingConfig()), "cfg must be resolved"),
        (lambda: route(x, {"alpha": 0.05}), "cfg must be a RoutingConfig"),
        (lambda: route(x, RoutingConfig(max_k=E + 1).resolve(E + 1, 4, False)), "max_k must be between"),
        (lambda: routing.benjamini_hochberg(torch.rand(3, 5), 2), "alpha must be in \\(0, 1\\)"),
        (lambda: routing.benjamini_hochberg(torch.rand(3, 5), math.nan), "alpha must be in \\(0, 1\\)"),
        (lambda: routing.benjamini_hochberg(torch.rand(3, 5), 1e-320), "alpha must be at least"),
        (lambda: routing.pvalues(x, "softmax", temperature=-1), "temperature must be a finite number > 0"),
        (lambda: routing.pvalues(x, "softmax", temperature=1e-45), "temperature must be between"),
        (lambda: routing.pvalues(x, "nope"), "method must be one of zscore, softmax, calibrated"),
        (lambda: RoutingConfig(alpha=1e-320), "alpha must be at least"),
        (lambda: RoutingConfig(temperature=1e-45), "temperature must be between"),
        (lambda: RoutingConfig(temperature="1e300"), "temperature must be between"),
    ]
    for call, message in cases:
        with pytest.raises(RoutingError, match=message) as info:
            call()
        assert "\n" not in str(info.value)


def test_extreme_temperatures_give_defined_pvalues():
    """The smallest and largest temperatures allowed: softmax p-values stay in [0, 1], never NaN."""
    x = logits(50, seed=9)
    x[0] = math.nan  # a dead row too
    for t in (torch.finfo(torch.float32).tiny, 1e-30, 1e30, torch.finfo(torch.float32).max):
        p = routing.pvalues(x, "softmax", temperature=t)
        assert torch.isfinite(p).all() and ((p >= 0) & (p <= 1)).all(), t
        r = route(x, cfg(pvalue="softmax", temperature=t, alpha=0.5))
        assert not r.nonfinite[1:].any() and torch.isfinite(r.weight).all()
    # the limit of a tiny temperature: the largest logit gets p = 0, the rest p = 1
    p = routing.pvalues(x[1:], "softmax", temperature=1e-30)
    assert torch.equal(p.min(-1).values, torch.zeros(49)) and (p.sort(-1).values[:, 1:] == 1).all()


def test_nan_pvalues_are_counted_and_never_selected():
    class NaNNull:  # a broken null (duck-typed) whose p-values are NaN for large logits
        per_expert = False

        def pvalue(self, x):
            return torch.where(x > 3.0, math.nan, 0.9)

    c = RoutingConfig(min_k=1, max_k=4, alpha=0.5).resolve(E, 4, False)
    object.__setattr__(c, "pvalue", "calibrated")
    x = logits(20, seed=3)
    r = route(x, c, null=NaNNull())
    has_nan = (x > 3.0).any(-1)
    assert 0 < has_nan.sum() < 20
    assert torch.equal(r.nonfinite, has_nan) and (r.k == 1).all() and not r.pvalues.isnan().any()


def test_topp_counts_a_mass_exactly_on_top_p():
    """Equal logits give softmax masses j/m exactly (powers of two): top_p = j/m needs exactly j experts
    ("reaches top_p" is >=, so a mass equal to top_p stops the count)."""
    for m in (4, 8, 16):
        x = torch.zeros(1, m)
        for j in range(1, m + 1):
            c = RoutingConfig(selection="topp", top_p=j / m, min_k=1, max_k=m).resolve(m, m, False)
            assert route(x, c).discoveries.item() == j, (m, j)
    # and an unequal row: masses 0.5, 0.25, 0.125, 0.125 (exact: logits differ by ln 2 in float64)
    x = torch.tensor([[0.0, -math.log(2), -2 * math.log(2), -2 * math.log(2)]], dtype=torch.float64)
    probs = torch.softmax(x.float(), -1)
    if torch.equal(probs, torch.tensor([[0.5, 0.25, 0.125, 0.125]])):
        k = lambda top_p: route(x, RoutingConfig(selection="topp", top_p=top_p, max_k=4).resolve(4, 4, False)).k.item()  # noqa: E731
        assert (k(0.5), k(0.75), k(0.875), k(1.0)) == (1, 2, 3, 4)


def test_softmax_pvalues_honour_temperature():
    """softmax p-values are 1 - softmax(logits / temperature): against a float64 reference, and the
    count BH gets from them changes with the temperature."""
    x = logits(300, seed=11)
    for t in (0.25, 1.0, 3.0):
        ref = 1.0 - torch.softmax(x.double() / t, dim=-1)
        torch.testing.assert_close(routing.pvalues(x, "softmax", temperature=t).double(), ref, rtol=1e-5, atol=1e-6)
    found = [route(x, cfg(pvalue="softmax", temperature=t, alpha=0.2, max_k=E)).discoveries.float().mean().item()
             for t in (0.1, 1.0)]
    assert found[0] > found[1]  # a sharper softmax gives the top experts smaller p-values
