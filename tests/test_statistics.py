"""Statistical validity of the routing maths: BH against scipy, uniform null p-values, FDR control,
monotonicity and bounds (hypothesis), and the HC / top-p selection rules on hand-made cases."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from lm_eval_bh import routing
from lm_eval_bh.calibration import Calibration, LayerNull
from lm_eval_bh.routing import RoutingConfig, benjamini_hochberg, route

ALPHAS = (0.01, 0.05, 0.1, 0.2)


# --- Benjamini-Hochberg against scipy --------------------------------------------------------------


def _random_pvalue_cases(rng, n, m):
    """n cases of m p-values mixing uniform nulls, tiny signals, exact 0 / 1 / 1e-300 and duplicates."""
    p = rng.uniform(size=(n, m))
    signal = rng.uniform(size=(n, m)) < 0.3
    p = np.where(signal, p * 10.0 ** -rng.integers(1, 8, size=(n, m)), p)
    special = rng.choice(np.array([0.0, 1.0, 1e-300, 5e-324, 0.05, 0.5]), size=(n, m))
    p = np.where(rng.uniform(size=(n, m)) < 0.05, special, p)
    dup = rng.uniform(size=(n, m)) < 0.2  # duplicates of another p in the same row
    p = np.where(dup, np.take_along_axis(p, rng.integers(0, m, size=(n, m)), axis=1), p)
    return p


def test_bh_matches_scipy_on_10000_cases():
    rng = np.random.default_rng(0)
    total = 0
    for m in (1, 2, 3, 8, 16, 64, 100):
        for alpha in (0.01, 0.05, 0.1, 0.25, 0.5):
            p = _random_pvalue_cases(rng, 300, m)
            # alpha itself and exact multiples i*alpha/m sit on the rejection boundary
            p[:20] = np.minimum(1.0, rng.integers(1, m + 1, size=(20, m)) * alpha / m)
            ours = benjamini_hochberg(torch.from_numpy(p), alpha).numpy()
            ref = stats.false_discovery_control(p, axis=-1, method="bh") <= alpha
            assert np.array_equal(ours, ref), (m, alpha)
            total += p.shape[0]
    assert total >= 10_000


def _boundary_cases(rng, m, alpha, dtype, rows=8):
    """rows x m p-values in `dtype` sitting on the BH thresholds i*alpha/m or one ulp either side.

    The thresholds are computed two ways (alpha*i/m and alpha/(m/i), in `dtype`), so some give
    p*(m/i) exactly alpha and some one rounding off; ties come from drawing the same value twice. Row 0
    is the staircase p_(i) = i*alpha/m, row 2 one threshold repeated m times.
    """
    i = np.arange(1, m + 1).astype(dtype)
    a = dtype(alpha)
    thr = np.stack([a * i / dtype(m), a / (dtype(m) / i)])
    cand = np.concatenate([thr, np.nextafter(thr, dtype(1)), np.nextafter(thr, dtype(0))]).astype(dtype)
    pick = cand[rng.integers(0, 6, (rows, m)), rng.integers(0, m, (rows, m))]
    p = np.where(rng.uniform(size=(rows, m)) < 0.7, pick, rng.uniform(size=(rows, m)).astype(dtype))
    p[0] = cand[0]
    p[1] = cand[rng.integers(0, 6)]
    p[2] = cand[rng.integers(0, 6), rng.integers(0, m)]
    return np.clip(p, 0, 1).astype(dtype)


class _PValuesAsLogits:
    """A duck-typed shared null whose p-value of logit x is -x: route() then sees given p-values."""

    per_expert = False

    def pvalue(self, x):
        return -x


def test_bh_exact_at_the_thresholds_for_every_m():
    """benjamini_hochberg and the router's count equal scipy's ``false_discovery_control(p) <= alpha``
    for every m in 2..512, float32 and float64, with p-values on the thresholds, one ulp either side,
    and ties (the cases where m * (1/i) instead of m / i flips a decision)."""
    rng = np.random.default_rng(0)
    alphas = (0.05, 0.1, 0.01, 0.2, 0.001, 0.3, 0.0137)
    rows = 0
    for m in range(2, 513):
        alpha = alphas[m % len(alphas)]
        for dtype in (np.float32, np.float64):
            p = _boundary_cases(rng, m, alpha, dtype)
            ref = stats.false_discovery_control(p, axis=-1) <= dtype(alpha)
            assert np.array_equal(benjamini_hochberg(torch.from_numpy(p), alpha).numpy(), ref), (m, dtype)
            rows += len(p)
        # the router computes in float32: its count before clamping is scipy's on float32 p-values
        cfg = RoutingConfig(alpha=alpha, min_k=1, max_k=m).resolve(m, m, False)
        object.__setattr__(cfg, "pvalue", "calibrated")  # the null is given directly, no file
        r = route(-torch.from_numpy(p.astype(np.float32)), cfg, null=_PValuesAsLogits())
        ref32 = stats.false_discovery_control(p.astype(np.float32), axis=-1) <= np.float32(alpha)
        assert np.array_equal(r.discoveries.numpy(), ref32.sum(-1)), m
    assert rows == 511 * 2 * 8


def test_bh_factor_is_a_true_division():
    """m / i rounded once to float32 (what scipy computes for float32 p-values) at every rank, m <= 8192."""
    for m in range(1, 8193):
        ours = routing._bh_factor(m, torch.float32, "cpu").numpy()
        assert np.array_equal(ours, np.float32(m) / np.arange(1, m + 1, dtype=np.float32)), m


def test_bh_handles_nan_and_float32():
    p = torch.tensor([[0.001, math.nan, 0.02, 0.9]])
    assert benjamini_hochberg(p, 0.05).tolist() == [[True, False, True, False]]
    p32 = torch.tensor([[0.01, 0.02, 0.03, 0.5]], dtype=torch.float32)
    ref = stats.false_discovery_control(p32.numpy(), axis=-1) <= 0.05
    assert np.array_equal(benjamini_hochberg(p32, 0.05).numpy(), ref)


def test_route_bh_count_equals_bh_rejections():
    """Before clamping, route(selection=bh) keeps exactly the BH rejections of its own p-values."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(500, 64, generator=g) + (torch.rand(500, 64, generator=g) < 0.05) * 4.0
    for pvalue in ("zscore", "softmax"):
        cfg = RoutingConfig(pvalue=pvalue, min_k=1, max_k=64, alpha=0.1).resolve(64, 8, False)
        r = route(x, cfg)
        mask = benjamini_hochberg(routing.pvalues(x, pvalue), 0.1)
        rejected = mask.sum(-1)
        assert torch.equal(r.k, rejected.clamp_min(1))
        has = rejected > 0
        chosen = torch.zeros(500, 65, dtype=torch.bool).scatter_(1, r.index, True)[:, :64]  # 64 = padding
        assert torch.equal(chosen[has], mask[has])


# --- null p-values are uniform ---------------------------------------------------------------------


def test_ecdf_pvalues_uniform_under_null():
    """Logits drawn from the calibration distribution: p = (1 + #null >= x)/(n + 1) is uniform.

    A shared null (a skewed mixture, like real router logits) and per-expert nulls (each expert its own
    location and scale); the test points are fresh draws, independent of the null sample, so the KS
    test's i.i.d. assumption holds. With n = 20000 the discreteness (steps of 1/(n+1)) and the
    conditional-on-sample error (about 1/sqrt(n)) are far below what 5000 test points can detect.
    """
    rng = np.random.default_rng(1)

    def draw(size):
        return np.where(rng.uniform(size=size) < 0.8, rng.normal(0, 1, size), rng.gumbel(1.5, 1.2, size))

    null = LayerNull(torch.from_numpy(np.sort(draw(20000))).float())
    p = null.ecdf_pvalue(torch.from_numpy(draw((5000, 1))).float()).numpy().ravel()
    assert stats.kstest(p, "uniform").pvalue > 0.01
    assert p.min() >= 1 / 20001 and p.max() <= 1

    loc, scale = rng.normal(0, 2, 16), rng.uniform(0.5, 2, 16)
    samples = np.sort(rng.normal(loc[:, None], scale[:, None], (16, 20000)), axis=1)
    null = LayerNull(torch.from_numpy(samples).float())
    x = rng.normal(loc, scale, (400, 16))  # 400 tokens x 16 experts, all independent
    p = null.ecdf_pvalue(torch.from_numpy(x).float()).numpy()
    assert stats.kstest(p.ravel(), "uniform").pvalue > 0.01
    # each expert's own p-values too (the point of per-expert nulls)
    assert min(stats.kstest(p[:, e], "uniform").pvalue for e in range(16)) > 0.01 / 16


def test_zscore_pvalues_approximately_uniform_under_iid_normal_null():
    """zscore with 64 i.i.d. N(0,1) logits per token.

    What is tested: the p-value of one fixed expert (expert 0) across 5000 independent tokens. By
    exchangeability of the experts it has the same law as a randomly chosen expert's p-value, and the
    tokens are independent, so the KS test's i.i.d. assumption holds exactly (pooling all 64 experts of a
    token would not be: the per-token median/IQR tie them together and make KS conservative). This is
    the marginal null law each BH hypothesis needs. It is a fair test: a z off by 10 % in scale or by 0.05
    in location is rejected at this size (negative controls below).

    What is not uniform: the far tail. The plug-in median/IQR from 64 values make z heavier-tailed than
    N(0,1) (a t-like effect), so P(p <= t) is about 2.4t at t = 0.001 and 1.4t at t = 0.01 (measured
    on 20000 tokens). The second half checks these bounds, so a change that makes the tail worse fails.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 64, generator=g)
    p = routing.pvalues(x, "zscore")
    assert stats.kstest(p[:, 0].numpy(), "uniform").pvalue > 0.01
    # negative controls: a 10 % scale error or a 0.05 sigma shift in z is detected by the same test
    z = stats.norm.isf(p[:, 0].double().numpy())
    assert stats.kstest(stats.norm.sf(z * 1.1), "uniform").pvalue < 0.01
    assert stats.kstest(stats.norm.sf(z + 0.05), "uniform").pvalue < 0.01


@pytest.mark.parametrize("m", [8, 9, 10, 16, 64, 256])
def test_zscore_tail_rate_two_sided(m):
    """P(p <= t) / t in [0.8, 1.25] for t = 1e-4 .. 0.05 under i.i.d. N(0, 1) logits (4M p-values:
    about 400 expected below 1e-4, so the bounds are 4-5 standard errors wide). The normal tail this
    replaced gave 4.9 (m = 64) and 79 (m = 8) at 1e-4. m = 9 and 10 are the hardest cases (median and
    quartiles single order statistics, or nearly)."""
    g = torch.Generator().manual_seed(m)
    p = routing.pvalues(torch.randn(4_000_000 // m, m, generator=g), "zscore")
    for t in (1e-4, 1e-3, 1e-2, 0.05):
        rate = (p <= t).double().mean().item() / t
        assert 0.8 <= rate <= 1.25, (m, t, rate)


def test_zscore_tail_rate_every_m():
    """Every m from 8 to 64 (and a few up to 256), at t = 2e-3: 400 p-values expected below t."""
    g = torch.Generator().manual_seed(1)
    for m in list(range(8, 65)) + [96, 127, 128, 129, 130, 200, 255]:
        p = routing.pvalues(torch.randn(200_000 // m + 1, m, generator=g), "zscore")
        rate = (p <= 2e-3).double().mean().item() / 2e-3
        assert 0.75 <= rate <= 1.3, (m, rate)


def test_student_t_tail_against_scipy():
    z = torch.linspace(-20, 60, 4001, dtype=torch.float64)
    for nu, tol in ((4.0, 0.011), (6.0, 1e-3), (10.0, 1e-5), (40.0, 1e-5), (1000.0, 1e-5)):
        ref = torch.from_numpy(stats.t.sf(z.numpy(), nu))
        p = routing._student_t_sf(z, torch.tensor(nu, dtype=torch.float64))
        keep = ref > 1e-6
        assert ((p[keep] / ref[keep]) - 1).abs().max().item() < tol, nu


def test_zscore_is_scale_invariant():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2000, 64, generator=g) * 3 + 1
    x[:50, :3] += 8.0
    p = routing.pvalues(x, "zscore")
    for c in (2.0 ** -10, 2.0 ** 10):  # exact in floating point: the p-values are identical
        assert torch.equal(routing.pvalues(x * c, "zscore"), p)
    for c in (1e-3, 1e3):  # rounding of the scaled logits only
        torch.testing.assert_close(routing.pvalues(x * c, "zscore"), p, rtol=1e-4, atol=1e-6)
    assert torch.equal(routing.pvalues(x, "zscore", temperature=7.0), p)


def test_zscore_uses_finite_logits_only():
    """A token's non-finite logits take no part in its median and IQR: the finite experts' p-values are
    those of the finite logits alone (the effective m is the finite count). Before, 24 NaNs of 64
    pushed the best p-value from 2e-12 to 0.5."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 64, generator=g)
    x[0, 0] += 8.0
    idx = torch.randperm(63, generator=g)[:24] + 1
    y = x.clone()
    y[0, idx] = math.nan
    y[0, idx[:4]] = math.inf
    y[0, idx[4:8]] = -math.inf
    p = routing.pvalues(y, "zscore")[0]
    finite = torch.isfinite(y[0])
    assert torch.equal(p[~finite], torch.ones(int((~finite).sum())))
    torch.testing.assert_close(p[finite], routing.pvalues(y[:, finite], "zscore")[0], rtol=1e-6, atol=0)
    assert p[0] < 1e-6


def test_zscore_matches_reference_formula_on_rows_with_outliers():
    """p-values against numpy: median and IQR (linear interpolation) of the row, the t tail with the
    documented nu, on rows with large outliers, where a mean or a standard deviation would differ."""
    rng = np.random.default_rng(6)
    x = rng.normal(size=(200, 32)).astype(np.float32)
    x[:, :3] += rng.uniform(5, 50, size=(200, 3)).astype(np.float32)  # outliers up
    x[:, 3] -= 30  # and one down
    med = np.median(x.astype(np.float64), axis=1, keepdims=True)
    q75, q25 = np.percentile(x.astype(np.float64), [75, 25], axis=1, keepdims=True)
    z = (x - med) / ((q75 - q25) / 1.3489795003921634)
    nu = float(routing._zscore_nu(torch.tensor(32.0)))
    ref = stats.t.sf(z, nu)
    ours = routing.pvalues(torch.from_numpy(x), "zscore").double().numpy()
    np.testing.assert_allclose(ours, ref, rtol=2e-3, atol=1e-7)


# --- FDR control with planted signals --------------------------------------------------------------


@pytest.mark.parametrize("alpha", ALPHAS)
def test_bh_fdr_controlled_with_planted_signals(alpha):
    """Benjamini & Hochberg (1995), Theorem 1: FDR <= alpha * m0 / m for independent null p-values.

    64 experts, 8 signal experts with logits shifted by +3.5, nulls N(0, 1). p-values are calibrated
    against a shared null sample of 20000 N(0, 1) logits: given the sample they are independent and
    (nearly) uniform; marginally they are conformal p-values, PRDS (Bates et al. 2023), for which BH keeps
    the same bound. FDR is measured on the benjamini_hochberg mask, i.e. before min_k clamping.
    """
    m, m1, n_tok = 64, 8, 4000
    g = torch.Generator().manual_seed(int(alpha * 1000))
    null = LayerNull(torch.randn(20000, generator=g).sort().values)
    x = torch.randn(n_tok, m, generator=g)
    x[:, :m1] += 3.5
    mask = benjamini_hochberg(null.ecdf_pvalue(x), alpha)
    false = mask[:, m1:].sum(-1).double()
    fdp = false / mask.sum(-1).clamp_min(1).double()
    fdr, se = fdp.mean().item(), fdp.std().item() / math.sqrt(n_tok)
    bound = alpha * (m - m1) / m
    assert fdr <= bound + 3 * se, (fdr, bound, se)
    assert fdr >= 0.5 * bound  # BH is not trivially conservative here: the bound is nearly attained
    assert mask[:, :m1].double().mean() > 0.3  # and it has power


def _route_fdr_power(signals, delta, alpha, tokens=10_000, m=64, seed=0):
    """FDR, power and share of tokens with a discovery of route(pvalue=zscore, selection=bh) on m i.i.d.
    N(0, 1) logits whose first `signals` experts are shifted by +delta (see scripts/routing_simulations.py).
    max_k = m, so the rule's discoveries (before the min_k clamp) are the first experts of the index."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, m, generator=g)
    x[:, :signals] += delta
    r = route(x, RoutingConfig(alpha=alpha, min_k=1, max_k=m).resolve(m, 8, False))
    found = torch.arange(m) < r.discoveries.unsqueeze(-1)
    false = (found & (r.index >= signals) & (r.index < m)).sum(-1).double()
    fdp = false / r.discoveries.clamp_min(1).double()
    power = (found & (r.index < signals)).sum(-1).double().mean().item() / max(signals, 1)
    return fdp.mean().item(), fdp.std().item() / math.sqrt(tokens), power, (r.discoveries > 0).double().mean().item()


@pytest.mark.parametrize("alpha", [0.05, 0.2])
def test_zscore_bh_through_route_controls_fdr(alpha):
    """What zscore + BH promises, checked through `route`: under the global null (nothing stands out) BH
    finds an expert for at most alpha of the tokens, and not far fewer (the p-values are calibrated,
    not conservative); with planted signals, sparse (1, 2) or dense (8), weak to strong, the share of
    null experts among the discoveries stays <= alpha * m0 / m; strong signals are found. The normal
    tail this replaced found an expert for 2.3 alpha of the null tokens at alpha = 0.05."""
    fdr, se, _, any_found = _route_fdr_power(0, 0.0, alpha)
    n_se = math.sqrt(alpha * (1 - alpha) / 10_000)
    assert 0.8 * alpha <= any_found <= alpha + 3 * n_se, any_found
    for signals in (1, 2, 8):
        for delta in (3.0, 4.0, 6.0):
            fdr, se, power, _ = _route_fdr_power(signals, delta, alpha, seed=signals)
            assert fdr <= alpha * (64 - signals) / 64 + 3 * se, (signals, delta, fdr)
            if delta == 6.0:
                assert power >= 0.93, (signals, power)
    # power grows with the strength of the signal and with alpha
    assert _route_fdr_power(2, 3.0, alpha)[2] < _route_fdr_power(2, 4.0, alpha)[2] < _route_fdr_power(2, 6.0, alpha)[2]


# --- properties (hypothesis) -----------------------------------------------------------------------

_E = 16
_shared = Calibration(torch.randn(1, 4000, generator=torch.Generator().manual_seed(5)).numpy() * 2,
                      {"num_experts": _E}).layer_nulls()[0]
_per_expert = Calibration(
    (torch.randn(1, _E, 4000, generator=torch.Generator().manual_seed(6)) * 2 + torch.linspace(-2, 2, _E)[:, None]).numpy(),
    {}).layer_nulls()[0]
_METHODS = [("zscore", None), ("softmax", None), ("calibrated", _shared), ("calibrated", _per_expert),
            ("ecdf", _shared), ("ecdf", _per_expert)]


def _cfg(null, **kw):
    """A resolved config whose method and rule are set directly: the null is passed to route, no file."""
    pvalue, selection = kw.pop("pvalue"), kw.pop("selection", "bh")
    c = RoutingConfig(**kw).resolve(_E, 8, False)
    object.__setattr__(c, "pvalue", pvalue)
    object.__setattr__(c, "selection", selection)
    return c


logit_rows = st.lists(
    st.lists(st.floats(-40, 40, allow_nan=False, width=32), min_size=_E, max_size=_E), min_size=1, max_size=8
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=logit_rows, a1=st.floats(0.001, 0.99), a2=st.floats(0.001, 0.99), method=st.integers(0, len(_METHODS) - 1),
       min_k=st.integers(1, 4), extra=st.integers(0, 12))
def test_bh_count_nondecreasing_in_alpha(rows, a1, a2, method, min_k, extra):
    pvalue, null = _METHODS[method]
    lo, hi = sorted((a1, a2))
    x = torch.tensor(rows)
    k = [route(x, _cfg(null, pvalue=pvalue, alpha=a, min_k=min_k, max_k=min_k + extra), null=null).k for a in (lo, hi)]
    assert (k[1] >= k[0]).all()  # per token, hence also the mean


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=logit_rows, alpha=st.floats(0.001, 0.99), method=st.integers(0, len(_METHODS) - 1),
       selection=st.sampled_from(list(routing.SELECTIONS)), min_k=st.integers(1, 6), extra=st.integers(0, 10),
       renormalize=st.booleans(), top_p=st.floats(0.01, 1.0))
def test_route_invariants(rows, alpha, method, selection, min_k, extra, renormalize, top_p):
    pvalue, null = _METHODS[method]
    if null is None and routing.SELECTIONS[selection].needs_null:
        null = _shared  # the rule reads the calibration (selection=lfdr)
    max_k = min(min_k + extra, _E)
    cfg = _cfg(null, pvalue=pvalue, alpha=alpha, selection=selection, min_k=min_k, max_k=max_k,
               renormalize=renormalize, top_p=top_p)
    x = torch.tensor(rows)
    r = route(x, cfg, null=null)
    assert r.index.shape == r.weight.shape == (len(rows), max_k) and r.weight.dtype == torch.float32
    assert ((r.k >= min_k) & (r.k <= max_k)).all()
    valid = torch.arange(max_k) < r.k[:, None]
    assert torch.isfinite(r.weight).all()
    assert torch.equal(r.weight == 0, ~valid)  # logits within 80 of each other: no probability underflows
    assert torch.equal(r.index == _E, ~valid)
    for row, k in zip(r.index.tolist(), r.k.tolist()):
        assert len(set(row[:k])) == k and all(0 <= i < _E for i in row[:k])
    if renormalize:
        torch.testing.assert_close(r.weight.sum(-1), torch.ones(len(rows)))
    if selection == "topk":
        assert (r.k == max_k).all()


# --- higher criticism and top-p ----------------------------------------------------------------------


def _hc_discoveries(p, alpha=0.05):
    p = torch.tensor(p, dtype=torch.float32).sort(dim=-1).values
    if p.dim() == 1:
        p = p[None]
    m = p.shape[-1]
    cfg = RoutingConfig(selection="hc", alpha=alpha, min_k=1, max_k=m).resolve(m, m, False)
    return routing.SELECTIONS["hc"].fn(routing.Ranked(p, -p, torch.arange(m).expand_as(p), True), cfg)


def test_higher_criticism_hand_made():
    # eight p-values far below 1/m among 64: they are scored at p = 1/m, HC+ rises up to rank 8
    # ((i - 1)/sqrt(1 - 1/m) = 7.06 there) and drops after it
    rest = np.linspace(0.03, 0.99, 56)
    assert _hc_discoveries(np.r_[[1e-9] * 8, rest]).item() == 8
    assert routing._hc_plus(torch.tensor([[1e-9] * 8 + list(rest)]))[0, 7].item() == pytest.approx(7 / math.sqrt(63 / 64))
    # below the critical value nothing is kept (the clamp then gives min_k); uniform quantiles are the
    # least remarkable p-values there are
    assert _hc_discoveries((np.arange(64) + 0.5) / 64).item() == 0
    # a weak excess of moderately small p-values is what HC is built for: 12 at 0.01 among 64
    assert _hc_discoveries(np.r_[[0.01] * 12, np.linspace(0.2, 1.0, 52)]).item() == 12
    # p = 1 never attracts the cut and p = 0 gives no NaN
    assert _hc_discoveries([0.0, 0.0, 1.0, 1.0]).item() in (0, 1, 2)
    assert not torch.isnan(routing._hc_plus(torch.tensor([[0.0, 0.0, 1.0, 1.0]]))).any()


def test_higher_criticism_is_a_level_alpha_test():
    """The critical value is the simulated (1 - alpha) quantile of max HC+ under m uniform p-values:
    on fresh uniform draws the test fires at most alpha of the time (a little less: max HC+ has atoms
    where several p-values sit below 1/m), and not far below."""
    g = torch.Generator().manual_seed(123)
    for m in (16, 64):
        u = torch.rand(40000, m, generator=g).sort(dim=-1).values
        for alpha in (0.05, 0.2):
            fired = (routing._hc_plus(u).amax(-1) > routing._hc_critical(m, alpha)).double().mean().item()
            se = math.sqrt(alpha * (1 - alpha) * (1 / 40000 + 1 / 100_000))  # this sample and the simulation
            assert 0.75 * alpha <= fired <= alpha + 4 * se, (m, alpha, fired)


def test_higher_criticism_on_noise_and_on_planted_signals():
    """Pure-noise logits (m = 64, min_k = 1, max_k = 8): mean k <= min_k + 0.5 (the old argmax-only rule
    gave 3.8). Eight strong signals (+5 sigma): the test fires on nearly every token and keeps them."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(20000, 64, generator=g)
    cfg = RoutingConfig(selection="hc", alpha=0.05, min_k=1, max_k=8).resolve(64, 8, False)
    r = route(x, cfg)
    assert r.k.double().mean().item() <= 1.5
    assert (r.discoveries > 0).double().mean().item() <= 0.08  # zscore p-values: close to the level
    y = x[:4000].clone()
    y[:, :8] += 5.0
    r = route(y, cfg)
    assert (r.discoveries > 0).double().mean().item() >= 0.99
    found = ((r.index < 8) & (r.index < 64)).sum(-1).double() / 8
    assert found.mean().item() >= 0.95


def _topp_reference(logits, top_p):
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = []
    for row in probs:
        mass, k = 0.0, 0
        for q in sorted(row, reverse=True):
            mass, k = mass + q, k + 1
            if mass >= top_p:
                break
        out.append(k)
    return np.array(out)


def test_topp_hand_made_and_against_numpy():
    x = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5], [0.25, 0.25, 0.25, 0.25]]))
    k = lambda top_p: route(x, RoutingConfig(selection="topp", top_p=top_p, max_k=4).resolve(4, 4, False)).k.tolist()  # noqa: E731
    assert k(0.4) == [1, 1, 2]
    assert k(0.7) == [2, 2, 3]
    assert k(0.9) == [3, 3, 4]
    assert k(1.0) == [4, 4, 4]
    r = route(x, RoutingConfig(selection="topp", top_p=0.7, max_k=4).resolve(4, 4, False))
    assert r.index[1, :2].tolist() == [3, 2]
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (2000, 64)).astype(np.float32)
    for top_p in (0.1, 0.35, 0.5, 0.8, 0.95):
        cfg = RoutingConfig(selection="topp", top_p=top_p, max_k=64).resolve(64, 8, False)
        ours = route(torch.from_numpy(logits), cfg).k.numpy()
        ref = _topp_reference(logits.astype(np.float64), top_p)
        # float32 vs float64 cumulative sums may disagree only where the mass is within 1e-5 of top_p
        assert (ours != ref).mean() < 1e-3, top_p
    # per-expert p-value order: the count still comes from the softmax order
    null = LayerNull(torch.randn(4, 1000, generator=torch.Generator().manual_seed(0)).sort(dim=1).values)
    c = RoutingConfig(selection="topp", top_p=0.7, max_k=4).resolve(4, 4, False)
    object.__setattr__(c, "pvalue", "calibrated")
    assert route(x, c, null=null).k.tolist() == [2, 2, 3]


# --- dynamic skipping and entropy-based adaptive k ----------------------------------------------------


_HAND = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5], [0.25, 0.25, 0.25, 0.25]],
                               dtype=torch.float64)).float()


def _k(selection, **kw):
    m = _HAND.shape[-1]
    return route(_HAND, RoutingConfig(selection=selection, max_k=m, **kw).resolve(m, m, False)).k.tolist()


def test_skip_hand_made():
    """Keep an expert whose weight is >= beta x the top weight (Lu et al. 2024): weights 0.5, 0.3, 0.15,
    0.05 keep 0.5 and 0.3 at beta = 0.5 (cut at 0.25), add 0.15 at beta = 0.25 (cut 0.125), all at 0.05."""
    assert _k("skip", beta=1.0) == [1, 1, 4]  # only the top one, or its exact ties
    assert _k("skip", beta=0.5) == [2, 2, 4]
    assert _k("skip", beta=0.25) == [3, 3, 4]
    assert _k("skip", beta=0.05) == [4, 4, 4]
    r = route(_HAND, RoutingConfig(selection="skip", beta=0.5, max_k=4).resolve(4, 4, False))
    assert r.index[1, :2].tolist() == [3, 2]  # the kept experts are the heaviest ones


def test_entropy_hand_made():
    """k = ceil(c exp(H)): for weights 0.5, 0.3, 0.15, 0.05, H = 1.14212 nats and exp(H) = 3.1334, so
    c = 1 -> 4, 0.9 -> 3 (2.82), 0.5 -> 2 (1.567), 0.3 -> 1 (0.94); a uniform row has exp(H) = 4 exactly."""
    p = np.array([0.5, 0.3, 0.15, 0.05])
    assert math.exp(-(p * np.log(p)).sum()) == pytest.approx(3.1334, abs=1e-4)
    assert _k("entropy", entropy_scale=1.0) == [4, 4, 4]
    assert _k("entropy", entropy_scale=0.9) == [3, 3, 4]
    assert _k("entropy", entropy_scale=0.5) == [2, 2, 2]
    assert _k("entropy", entropy_scale=0.3) == [1, 1, 2]
    assert _k("entropy", entropy_scale=0.2) == [1, 1, 1]
    # against numpy on random routers
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2, (3000, 64)).astype(np.float32)
    probs = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    effective = np.exp(-(probs * np.log(probs)).sum(-1))
    for c in (0.05, 0.2, 0.5):
        ours = route(torch.from_numpy(logits),
                     RoutingConfig(selection="entropy", entropy_scale=c, max_k=64).resolve(64, 8, False)).k.numpy()
        ref = np.clip(np.ceil(c * effective), 1, 64)
        assert (ours != ref).mean() < 1e-3, c  # float32 entropy vs float64: only at a threshold


@pytest.mark.parametrize("selection", [n for n, rule in routing.SELECTIONS.items() if rule.knob is not None])
def test_every_budget_knob_moves_k_the_way_its_spec_says(selection):
    """target_k bisects each rule's knob (`SelectionRule.knob`): every token's k must be monotone in it,
    in the declared direction, over the declared range."""
    knob = routing.SELECTIONS[selection].knob
    x = torch.randn(2000, _E, generator=torch.Generator().manual_seed(4)) * 2
    x[:500, :3] += 6.0
    grid = np.exp(np.linspace(math.log(knob.lo), math.log(knob.hi), 25)) if knob.scale != "linear" \
        else np.linspace(knob.lo, knob.hi, 25)
    if knob.scale == "logit":
        grid = 1 / (1 + np.exp(-np.linspace(math.log(knob.lo / (1 - knob.lo)), math.log(knob.hi / (1 - knob.hi)), 25)))
    null = _shared if routing.SELECTIONS[selection].needs_null else None
    ks = []
    for v in grid:
        cfg = _cfg(null, pvalue="zscore", selection=selection, min_k=1, max_k=_E, **{knob.param: float(v)})
        ks.append(route(x, cfg, null=null).k)
    ks = torch.stack(ks)
    steps = ks[1:] - ks[:-1]
    assert ((steps >= 0) if knob.increasing else (steps <= 0)).all(), selection
    assert ks[-1].double().mean() != ks[0].double().mean()  # the knob does something
