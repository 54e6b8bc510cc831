"""Calibration: the fitted empirical null and local fdr, the empirical-CDF p-value, the streaming
sampler, the file format and its validation, a calibration round trip on a tiny OLMoE, and the
`lm-eval-bh calibrate` command."""

import argparse
import json
import math
import os
import random
import subprocess
import sys
import textwrap
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats

from conftest import make_olmoe
from lm_eval_bh import BHRouting, routing
from lm_eval_bh.autocal import calibrate_model
from lm_eval_bh.commands import calibrate
from lm_eval_bh.families import find_moe_layers
from lm_eval_bh.calibration import (
    Calibration,
    LayerNull,
    NullSampler,
    check_settings,
    fit_null,
    layers_fingerprint,
    load_calibration,
    read_calibration,
    read_header,
    router_fingerprint,
    save_calibration,
)
from lm_eval_bh.routing import RoutingConfig, RoutingError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- the fitted two-group model ---------------------------------------------------------------------


def _mixture(rng, shape, share, shift):
    """N(0, 1) null values with a `share` of signals at N(shift, 1) (the high-logit alternative)."""
    return rng.normal(size=shape) + shift * (rng.random(shape) < share)


def test_fit_null_recovers_the_null_under_signal_and_is_scale_equivariant():
    rng = np.random.default_rng(0)
    pure = rng.normal(size=(8, 16384))
    loc, scale, pi0 = fit_null(pure).transpose(-1, 0)
    assert np.abs(loc).max() < 0.12 and np.abs(scale - 1).max() < 0.1 and (pi0 > 0.9).all()  # sd 0.02 per row
    # 12.5 % signals at +2.5: the pooled median/IQR is pulled up (scale ~1.18); the fitted null is not
    mixed = _mixture(rng, (8, 16384), 0.125, 2.5)
    loc, scale, pi0 = fit_null(mixed).transpose(-1, 0)
    robust = (np.quantile(mixed, 0.75, -1) - np.quantile(mixed, 0.25, -1)) / 1.349
    assert (robust > 1.15).all() and np.abs(scale - 1).max() < 0.06 and np.abs(loc).max() < 0.1
    assert np.abs(pi0 - 0.875).max() < 0.06
    # no absolute epsilons: a*x + b gives a*loc + b, a*scale, the same pi0, at any scale of the logits
    for a, b in ((1e-3, 5.0), (1e3, -2e3), (7.0, 0.0)):
        np.testing.assert_allclose(fit_null(a * mixed + b), fit_null(mixed) * [a, a, 1] + [b, 0, 0], rtol=1e-6,
                                   atol=1e-9 * abs(b))
    with pytest.raises(RoutingError, match="no spread"):
        fit_null(np.ones((1, 100)))


def test_lfdr_matches_the_two_group_model_and_is_monotone():
    rng = np.random.default_rng(1)
    cal = Calibration.from_samples(_mixture(rng, (1, 65536), 0.1, 3.0), {"num_experts": 8})
    null = cal.layer_nulls()[0]
    x = torch.linspace(-3, 7, 201)
    lfdr = null.lfdr(x)
    assert (lfdr[x <= float(null.fit[0])] == 1).all() and (lfdr.diff() <= 0).all()
    assert ((lfdr >= 0) & (lfdr <= 1)).all()
    f0 = 0.9 * stats.norm.pdf(x.numpy())
    truth = f0 / (f0 + 0.1 * stats.norm.pdf(x.numpy() - 3.0))
    for point in (2.5, 3.0, 3.5):  # where the decision is made (lfdr from ~0.3 to ~0.02)
        i = int(torch.argmin((x - point).abs()))
        assert lfdr[i].item() == pytest.approx(truth[i], rel=0.3, abs=0.01), point
    # beyond the data the grid's end value holds; the same table at any logit scale
    assert null.lfdr(torch.tensor([1e6])).item() == lfdr[-1].item()
    scaled = Calibration.from_samples(cal.null * 1e-3, {"num_experts": 8}).layer_nulls()[0]
    torch.testing.assert_close(scaled.lfdr(x * 1e-3), lfdr, atol=1e-4, rtol=1e-3)


def test_fitted_pvalue_is_the_upper_tail_of_the_fitted_null():
    rng = np.random.default_rng(2)
    null = LayerNull(torch.from_numpy(np.sort(_mixture(rng, 65536, 0.1, 3.0))).float())
    loc, scale, _ = null.fit.tolist()
    x = torch.tensor([-1.0, 0.0, 2.0, 4.0])
    expected = stats.norm.sf(x.numpy(), loc, scale)
    np.testing.assert_allclose(null.pvalue(x).numpy(), expected, rtol=1e-4)
    # per expert: each expert's own fitted null
    samples = np.sort(rng.normal(size=(3, 20000)) * [[1.0], [2.0], [0.5]] + [[0.0], [3.0], [-1.0]], axis=1)
    null = LayerNull(torch.from_numpy(samples).float())
    np.testing.assert_allclose(null.fit[:, 1].numpy(), [1.0, 2.0, 0.5], rtol=0.06)
    p = null.pvalue(torch.tensor([[1.0, 5.0, -0.5]])).numpy()[0]
    np.testing.assert_allclose(p, stats.norm.sf([1.0, 1.0, 1.0]), rtol=0.25)


# --- the p-value of a logit against a null sample -------------------------------------------------


def test_pvalue_is_plus_one_ecdf_upper_tail():
    rng = np.random.default_rng(0)
    sample = np.sort(rng.normal(size=501).astype(np.float32))
    null = LayerNull(torch.from_numpy(sample))
    # test points: fresh values, the sample's own values (ties: >= counts them), and beyond both ends
    x = np.concatenate([rng.normal(size=300), sample[::7], [-10, 10]]).astype(np.float32)
    p = null.ecdf_pvalue(torch.from_numpy(x)).numpy()
    direct = (1 + (sample[None, :] >= x[:, None]).sum(1)) / (len(sample) + 1)
    np.testing.assert_allclose(p, direct, rtol=1e-6)
    # scipy's ECDF: sf(x) = fraction of the sample > x, equal to >= away from the sample points
    sf = stats.ecdf(sample).sf.evaluate(x[:300])
    np.testing.assert_allclose(p[:300], (1 + len(sample) * sf) / (len(sample) + 1), rtol=1e-5)
    assert p[-2] == 1.0 and p[-1] == pytest.approx(1 / 502)
    assert np.all(np.diff(null.ecdf_pvalue(torch.linspace(-4, 4, 1000)).numpy()) <= 0)  # non-increasing


def test_per_expert_pvalue_uses_each_experts_sample():
    rng = np.random.default_rng(1)
    samples = np.sort(rng.normal(size=(3, 200)) + np.array([[0.0], [5.0], [-5.0]]), axis=1).astype(np.float32)
    null = LayerNull(torch.from_numpy(samples))
    x = rng.normal(size=(7, 3)).astype(np.float32)
    p = null.ecdf_pvalue(torch.from_numpy(x)).numpy()
    for e in range(3):
        direct = (1 + (samples[e][None, :] >= x[:, e, None]).sum(1)) / 201
        np.testing.assert_allclose(p[:, e], direct, rtol=1e-6)
    # batched leading dims work too
    assert null.ecdf_pvalue(torch.from_numpy(x).reshape(7, 1, 3)).shape == (7, 1, 3)


# --- the streaming sampler --------------------------------------------------------------------


def test_sampler_is_bounded_uniform_and_exact_in_its_statistics():
    s = NullSampler(num_layers=2, num_experts=4, size=500, per_expert=False, seed=0)
    stream = torch.arange(40_000, dtype=torch.float32).reshape(-1, 4)  # 10,000 tokens, values 0..39999
    for chunk in stream.split(777):
        s.add(0, chunk)
        s.add(1, -chunk)
    cal = s.calibration({"model": "m"})
    assert cal.null.shape == (2, 500) and cal.meta["tokens"] == 10_000
    # a uniform sample without replacement of the 40,000 values seen
    assert len(np.unique(cal.null[0])) == 500
    assert stats.kstest(cal.null[0] / 40_000, "uniform").pvalue > 0.01
    st = cal.meta["layer_stats"][0]
    assert st["mean"] == pytest.approx(19_999.5) and st["min"] == 0 and st["max"] == 39_999
    assert st["std"] == pytest.approx(np.arange(40_000).std(), rel=1e-4)
    # per expert: every expert keeps the same tokens, its own values
    s = NullSampler(1, 4, size=300, per_expert=True, seed=0)
    for chunk in stream.split(1000):
        s.add(0, chunk)
    cal = s.calibration()
    assert cal.null.shape == (1, 4, 300)
    np.testing.assert_array_equal(cal.null[0, 1] - cal.null[0, 0], np.ones(300))
    # rows with a non-finite logit are not counted
    s = NullSampler(1, 4, size=10)
    s.add(0, torch.tensor([[1.0, 2.0, float("nan"), 3.0], [1.0, 2.0, 3.0, 4.0]]))
    assert s.calibration().meta["tokens"] == 1
    with pytest.raises(RoutingError, match="saw no tokens"):
        NullSampler(1, 4).calibration()


# --- files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", ["json", "npz"])
@pytest.mark.parametrize("per_expert", [False, True])
def test_save_load_round_trip(tmp_path, ext, per_expert):
    rng = np.random.default_rng(2)
    shape = (3, 5, 64) if per_expert else (3, 64)
    null = np.sort(rng.normal(size=shape).astype(np.float32), axis=-1)
    path = save_calibration(tmp_path / f"c.{ext}", Calibration(null, {"model": "tiny", "num_experts": 5}))
    cal = read_calibration(path)
    np.testing.assert_array_equal(cal.null, null)
    assert cal.meta["model"] == "tiny" and cal.meta["per_expert"] is per_expert
    assert read_header(path)["num_layers"] == 3
    nulls = load_calibration(path, num_layers=3, num_experts=5)
    assert len(nulls) == 3 and nulls[0].per_expert is per_expert and nulls[0].device.type == "cpu"
    torch.testing.assert_close(nulls[2].samples, torch.from_numpy(null[2]))
    cfg = RoutingConfig(pvalue="calibrated", calibration=path)
    assert routing.is_monotone(cfg, nulls[0]) is (not per_expert)


def test_load_errors_are_one_line(tmp_path):
    null = np.sort(np.random.default_rng(0).normal(size=(2, 16)).astype(np.float32), axis=-1)
    good = save_calibration(tmp_path / "c.json", Calibration(null, {"model": "olmoe-x", "num_experts": 8}))
    cases = {
        "missing": (str(tmp_path / "nope.json"), "calibration file not found"),
        "mismatch_layers": (good, r"made for a model with 2 MoE layers and 8 experts \(olmoe-x\); this model has 3"),
    }
    (tmp_path / "trunc.json").write_text(open(good).read()[:100])
    (tmp_path / "other.json").write_text(json.dumps({"format": "something-else"}))
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not really a zip")
    doc = json.load(open(good))
    doc["arrays"]["null"]["shape"] = [2, 17]
    (tmp_path / "shape.json").write_text(json.dumps(doc))
    for name in ("trunc.json", "other.json", "bad.npz", "shape.json"):
        cases[name] = (str(tmp_path / name), "not a valid lm-eval-bh calibration file")
    for key, (path, pattern) in cases.items():
        with pytest.raises(RoutingError, match=pattern) as e:
            load_calibration(path, 3 if key == "mismatch_layers" else 2, 8)
        assert "\n" not in str(e.value), key
    with pytest.raises(RoutingError, match="this model has 2 MoE layers and 16 experts"):
        load_calibration(good, 2, 16)


def _good_file(tmp_path, **meta):
    null = np.sort(np.random.default_rng(0).normal(size=(2, 400)).astype(np.float32), axis=-1)
    return save_calibration(tmp_path / "good.json", Calibration(null, {"model": "olmoe-x", "num_experts": 8, **meta}))


def _edited(tmp_path, name, edit):
    doc = json.load(open(tmp_path / "good.json"))
    edit(doc)
    path = tmp_path / name
    path.write_text(json.dumps(doc))  # json writes float("nan") as NaN, which json.load reads back
    return str(path)


@pytest.mark.parametrize("name, edit, pattern", [
    ("null5", lambda d: d["arrays"].__setitem__("null", 5), "array 'null' must be an object"),
    ("version_str", lambda d: d.__setitem__("version", "one"), "'version' must be an integer, got 'one'"),
    ("layers_str", lambda d: d["meta"].__setitem__("num_layers", "two"), "'num_layers' must be an integer >= 1, got 'two'"),
    ("layers_nan", lambda d: d["meta"].__setitem__("num_layers", float("nan")), "'num_layers' must be an integer >= 1, got nan"),
    ("experts_float", lambda d: d["meta"].__setitem__("num_experts", 8.0), "'num_experts' must be an integer >= 1, got 8.0"),
    ("per_expert_str", lambda d: d["meta"].__setitem__("per_expert", "no"), "'per_expert' must be true or false"),
    ("fingerprint", lambda d: d["meta"].__setitem__("router_fingerprint", 123), "'router_fingerprint' must be a sha256"),
    ("meta_list", lambda d: d.__setitem__("meta", []), "'meta' must be an object"),
    ("shape_str", lambda d: d["arrays"]["fit"].__setitem__("shape", "2x3"), "array 'fit': 'shape' must be a list"),
    ("shape_wrong", lambda d: d["arrays"]["fit"].__setitem__("shape", [3, 2]), "array 'fit' has shape \\[3, 2\\]"),
    ("missing", lambda d: d["arrays"].pop("lfdr"), "array 'lfdr' is missing"),
    ("format", lambda d: d.__setitem__("format", "other"), "'format' must be 'lm-eval-bh-calibration'"),
    ("two_fields", lambda d: d["meta"].update(num_layers="two", samples_per_null=None),
     "'num_layers' must be an integer >= 1, got 'two'; 'samples_per_null' must be an integer >= 1, got None"),
])
def test_malformed_header_is_one_line_naming_the_field(tmp_path, name, edit, pattern):
    """Valid JSON with wrong types, NaN or missing parts: a one-line RoutingError naming the file and
    every malformed field, from the header check that runs before any weights load."""
    _good_file(tmp_path)
    path = _edited(tmp_path, f"{name}.json", edit)
    cfg = RoutingConfig(pvalue="calibrated", calibration=path)
    for check in (lambda: check_settings(cfg, 8), lambda: load_calibration(path, 2, 8)):
        with pytest.raises(RoutingError, match=pattern) as e:
            check()
        assert "\n" not in str(e.value) and path in str(e.value)


def test_nonfinite_arrays_and_old_versions_are_refused(tmp_path):
    good = _good_file(tmp_path)
    cal = read_calibration(good)
    cal.fit[1, 1] = np.nan
    np.savez(tmp_path / "nan.npz", meta=np.array(json.dumps(cal.meta)), **cal.arrays)
    with pytest.raises(RoutingError, match="array 'fit' contains NaN or infinity"):
        read_calibration(tmp_path / "nan.npz")
    # format version 1 (pooled samples only): a clear line saying to calibrate again
    old = tmp_path / "v1.json"
    old.write_text(json.dumps({"format": "lm-eval-bh-calibration", "version": 1, "meta": {"version": 1},
                               "null": {"dtype": "float32", "shape": [2, 1], "encoding": "base64", "data": "AAAAAAAAAAA="}}))
    with pytest.raises(RoutingError, match="format version 1, which this lm-eval-bh no longer reads.*calibrate` again"):
        read_header(old)


def test_ecdf_alpha_the_file_cannot_resolve_is_refused(tmp_path):
    path = _good_file(tmp_path)  # n = 400 values per null, 8 experts: alpha/8 must be >= 1/401
    with pytest.raises(RoutingError, match=r"alpha=0.01 is finer than calibration file .* can resolve") as e:
        check_settings(SimpleNamespace(calibration=path, pvalue="ecdf", selection="bh", alpha=0.01), 8)
    assert "--samples >= 800" in str(e.value) and "\n" not in str(e.value)
    with pytest.warns(UserWarning, match="only 4 of the 400 values"):  # (1 + 4) / 401 <= 0.1 / 8 < (1 + 5) / 401
        check_settings(SimpleNamespace(calibration=path, pvalue="ecdf", selection="bh", alpha=0.1), 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_settings(SimpleNamespace(calibration=path, pvalue="calibrated", selection="bh", alpha=0.01), 8)
    with pytest.raises(RoutingError, match="made for a model with 2 MoE layers and 8 experts"):
        check_settings(SimpleNamespace(calibration=path, pvalue="calibrated", selection="bh", alpha=0.1), 16)


def test_foreign_router_weights_are_refused(tmp_path):
    a, b = make_olmoe(seed=0), make_olmoe(seed=1)  # the same shape, other weights
    fp = lambda m: layers_fingerprint(find_moe_layers(m))  # noqa: E731
    assert fp(a) == fp(make_olmoe(seed=0)) == fp(make_olmoe(seed=0).to(torch.bfloat16)) != fp(b)
    assert len(fp(a)) == 64 and router_fingerprint([torch.ones(2)]) != router_fingerprint([torch.ones(1, 2)])
    path = _good_file(tmp_path, router_fingerprint=fp(a))
    assert len(load_calibration(path, 2, 8, fingerprint=fp(a))) == 2
    with pytest.raises(RoutingError, match=f"calibration file {path} was made for other router weights") as e:
        load_calibration(path, 2, 8, fingerprint=fp(b))
    assert "\n" not in str(e.value)
    # through the patch: a calibration of model a refused for model b, accepted for a
    cal = calibrate_model(a, _token_batches(0, 4, vocab=256), samples=512, progress=False)
    path = save_calibration(tmp_path / "a.json", cal)
    with pytest.raises(RoutingError, match=f"calibration file {path} was made for other router weights"):
        BHRouting(pvalue="calibrated", calibration=path).patch(b)
    assert not any("forward" in m.__dict__ for m in b.modules())
    BHRouting(pvalue="calibrated", calibration=path).patch(a).unpatch()


# --- round trip on a tiny OLMoE ----------------------------------------------------------------


def _token_batches(seed, n_seq, length=64, vocab=1000, batch=8):
    """Synthetic 'text': Zipf-distributed token ids, the same source for calibration and held-out data."""
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    ids = torch.multinomial(weights, n_seq * length, replacement=True, generator=g).reshape(n_seq, length)
    return [(b, torch.ones_like(b)) for b in ids.split(batch)]


@pytest.fixture(scope="module")
def tiny_olmoe():
    return make_olmoe(seed=0, vocab_size=1000)


def _held_out_logits(model, batches):
    captured = {i: [] for i in range(len([layer.router for layer in find_moe_layers(model)]))}
    hooks = [r.register_forward_hook(lambda m, a, out, i=i: captured[i].append(out[0].detach()))
             for i, r in enumerate([layer.router for layer in find_moe_layers(model)])]
    with torch.inference_mode():
        for ids, mask in batches:
            model.model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    return [torch.cat(v) for v in captured.values()]


def test_calibration_round_trip_tiny_olmoe(tiny_olmoe, tmp_path):
    """Calibrate on synthetic text, then on held-out text from the same source the calibrated p-values
    are close to uniform. Tokens of a sequence are dependent (attention), so the KS statistic is used as
    a distance (small), not as a test with a p-value."""
    model = tiny_olmoe
    held = _held_out_logits(model, _token_batches(1, 24))
    for per_expert in (False, True):
        cal = calibrate_model(model, _token_batches(0, 48), per_expert=per_expert, samples=4096,
                                        progress=False, meta={"model": "tiny"})
        assert cal.meta["num_layers"] == 2 and cal.meta["num_experts"] == 16 and cal.meta["tokens"] == 48 * 64
        assert cal.meta["top_k"] == 4 and cal.meta["model_type"] == "olmoe"
        path = save_calibration(tmp_path / f"c{per_expert}.json", cal)
        nulls = load_calibration(path, 2, 16)
        for layer, null in enumerate(nulls):
            p = null.ecdf_pvalue(held[layer])
            if not per_expert:
                assert stats.kstest(p.ravel().numpy(), "uniform").statistic < 0.05
            else:
                ks = [stats.kstest(p[:, e].numpy(), "uniform").statistic for e in range(16)]
                assert np.median(ks) < 0.06 and np.mean(np.array(ks) < 0.1) >= 0.75, ks
        # the calibration routes the tiny model
        cfg = RoutingConfig(pvalue="calibrated", calibration=path, alpha=0.1).resolve(16, 4, False)
        r = routing.route(held[0], cfg, null=nulls[0])
        assert ((r.k >= 1) & (r.k <= 4)).all() and torch.isfinite(r.weight).all()
    assert nulls[0].samples.shape == (16, 48 * 64)  # fewer tokens than --samples: all of them are kept


# --- the command -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tiny_olmoe):
    """The tiny OLMoE saved with a word-level tokenizer trained on synthetic text (built offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("calib")
    rng = random.Random(0)
    words = [f"w{i}" for i in range(300)]
    zipf = [1 / (i + 1) for i in range(300)]
    paras = [" ".join(rng.choices(words, weights=zipf, k=rng.randint(20, 80))) for _ in range(40)]
    (root / "train.txt").write_text("\n\n".join(paras))
    with open(root / "train.jsonl", "w") as f:
        for p in paras[:10]:
            f.write(json.dumps({"text": p}) + "\n")
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(paras, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    tiny_olmoe.save_pretrained(root / "model")
    fast.save_pretrained(root / "model")
    return root


def test_calibrate_cli_text(saved_model, tmp_path):
    out = tmp_path / "olmoe.calib.json"
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval_bh.cli", "calibrate", "--model_args",
         f"pretrained={saved_model / 'model'},dtype=float32,alpha=0.05", "--text", str(saved_model / "train.txt"),
         "--text", str(saved_model / "train.jsonl"), "--output", str(out), "--device", "cpu", "--max_length", "32",
         "--batch_size", "4", "--samples", "2000"],
        capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wrote" in proc.stdout and "pi0" in proc.stdout
    meta = read_header(out)
    assert meta["num_layers"] == 2 and meta["num_experts"] == 16 and meta["samples_per_null"] == 2000
    assert meta["source"]["documents"] == 50 and meta["model"] == str(saved_model / "model")
    assert len(load_calibration(out, 2, 16)) == 2
    # a usage error is one line and exit code 2
    proc = subprocess.run([sys.executable, "-m", "lm_eval_bh.cli", "calibrate", "--model_args", "pretrained=x",
                           "--output", str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "--text" in proc.stderr


def test_calibrate_run_tasks(saved_model, tmp_path):
    """The --tasks path: contexts of a local lm-eval task (via --include_path), --limit, npz output."""
    data = tmp_path / "data.jsonl"
    with open(data, "w") as f:
        for i in range(6):
            f.write(json.dumps({"q": f"w{i} w{i + 1} w{i + 2} w3 w4", "choices": ["w1", "w2"], "label": i % 2}) + "\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny.yaml").write_text(textwrap.dedent(f"""\
        task: tiny_calib_task
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{q}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: label
        metric_list:
          - metric: acc
        """))
    parser = calibrate.add_arguments(argparse.ArgumentParser())
    out = tmp_path / "c.npz"
    args = parser.parse_args(["--model_args", f"pretrained={saved_model / 'model'}", "--tasks", "tiny_calib_task",
                              "--include_path", str(tmp_path / "tasks"), "--limit", "4", "--output", str(out),
                              "--device", "cpu", "--per_expert", "--samples", "16"])
    assert calibrate.run(args) == 0
    cal = read_calibration(out)
    assert cal.meta["source"]["documents"] == 4 and cal.meta["tokens"] == 20 and cal.per_expert
    assert cal.null.shape == (2, 16, 16)


# --- before any weights load ---------------------------------------------------------------------


def test_calibration_file_is_checked_before_weights_load(tiny_model_dir, tmp_path, monkeypatch):
    """lm-eval's model construction reads the config, then the weights: a malformed header, a file for
    another expert count and an alpha pvalue=ecdf cannot resolve all fail in between."""
    from lm_eval.api.registry import get_model
    from lm_eval.models.huggingface import HFLM

    monkeypatch.setattr(HFLM, "_create_model", lambda *a, **k: pytest.fail("weights were loaded"))
    _good_file(tmp_path)  # 8 experts; the tiny model has 16
    malformed = _edited(tmp_path, "bad.json", lambda d: d["meta"].__setitem__("num_layers", "two"))
    null = np.sort(np.random.default_rng(0).normal(size=(2, 400)).astype(np.float32), axis=-1)
    small = save_calibration(tmp_path / "small.json", Calibration(null, {"num_experts": 16}))
    cases = [
        (f"pvalue=calibrated,calibration={malformed}", "'num_layers' must be an integer >= 1, got 'two'"),
        (f"pvalue=calibrated,calibration={tmp_path / 'good.json'}", "made for a model with 2 MoE layers and 8 experts"),
        (f"pvalue=ecdf,calibration={small},alpha=0.01", "alpha=0.01 is finer than calibration file"),
    ]
    for args, message in cases:
        with pytest.raises(RoutingError, match=message) as err:
            get_model("olmoe_bh").create_from_arg_string(f"pretrained={tiny_model_dir},{args}", {"device": "cpu"})
        assert "\n" not in str(err.value)


# --- what each method promises, through route (planted-signal simulations) -----------------------

from calibration_sim import SCENARIOS, calibration_file, measure  # noqa: E402


@pytest.fixture(scope="module")
def sim_files(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sim"))
    return {(s, shift): calibration_file(folder, s, shift, samples=32768) for _, s, shift in SCENARIOS}


@pytest.mark.parametrize("name, signals, shift", SCENARIOS)
def test_fdr_and_power_through_route(sim_files, name, signals, shift):
    """m = 64 N(0, 1) experts, `signals` of them shifted; the calibration sample pools every expert
    (signals included), as on real text. Measured on the rule's own set, before the min_k clamp.

    - bh/calibrated (fitted empirical null): FDR <= alpha (BH's bound alpha m0/m, plus the fit's error);
    - lfdr/calibrated: FDR <= alpha (the mean lfdr of the kept set is the Bayes FDR);
    - bh/ecdf (pooled sample): P(any expert) <= alpha: every p is about uniform, signals included, so
      it finds almost nothing (power <= 2 alpha) even where bh/calibrated finds most signals.
    """
    alpha, tokens = 0.05, 3000
    path = sim_files[(signals, shift)]
    res = {(pv, sel): measure(pv, sel, alpha, path, signals, shift, tokens=tokens)
           for pv, sel in (("calibrated", "bh"), ("calibrated", "lfdr"), ("ecdf", "bh"))}
    slack = 3 * math.sqrt(alpha / tokens)  # Monte Carlo error of an FDR near alpha
    assert res["calibrated", "bh"]["fdr"] <= alpha + slack, res
    assert res["calibrated", "lfdr"]["fdr"] <= alpha + slack, res
    assert res["ecdf", "bh"]["any"] <= alpha + slack, res
    if signals:
        assert res["ecdf", "bh"]["power"] <= 2 * alpha
        strong = shift >= 4
        assert res["calibrated", "bh"]["power"] >= (0.75 if strong else 0.25), res
        assert res["calibrated", "lfdr"]["power"] >= (0.5 if strong else 0.15), res
    else:  # the global null: BH's FDR is P(any discovery) there, lfdr is conservative
        assert res["calibrated", "bh"]["any"] >= alpha / 4  # the level is used, not collapsed to 0
        assert res["calibrated", "lfdr"]["any"] <= alpha


@pytest.mark.parametrize("per_expert", [False, True])
def test_lfdr_rule_keeps_the_longest_prefix_with_mean_lfdr_at_most_alpha(tmp_path, per_expert):
    rng = np.random.default_rng(3)
    shape = (1, 8, 20000) if per_expert else (1, 8 * 20000)
    sample = _mixture(rng, shape, 0.1, 3.0) * (np.arange(1, 9)[:, None] if per_expert else 1.0)
    path = save_calibration(tmp_path / "c.json", Calibration(sample, {"num_experts": 8}))
    (null,) = load_calibration(path, 1, 8)
    x = torch.from_numpy(_mixture(rng, (500, 8), 0.2, 3.0) * (np.arange(1, 9) if per_expert else 1.0)).float()
    for alpha in (0.05, 0.3):
        cfg = RoutingConfig(selection="lfdr", pvalue="calibrated", alpha=alpha, calibration=path, max_k=8)
        r = routing.select_count(x, cfg.resolve(8, 8, False), null=null)
        lfdr = null.lfdr(x).gather(1, r.order)  # each expert's own lfdr, in routing order
        mean = lfdr.cumsum(1) / torch.arange(1, 9)
        expected = (mean <= alpha).long().cumprod(1).sum(1)
        assert torch.equal(r.discoveries, expected)
        assert (r.discoveries > 0).any() and (r.discoveries < 8).any()
    with pytest.raises(RoutingError, match="calibration must be set to a file from `lm-eval-bh calibrate` when selection=lfdr"):
        RoutingConfig(selection="lfdr")


def test_calibrated_routing_on_a_model_with_offloaded_routers(tmp_path):
    """accelerate's offloading keeps router weights on the meta device between forwards: the calibration's
    fingerprint check reads them in through accelerate's hooks, and routing matches the model in memory."""
    from accelerate import cpu_offload

    model = make_olmoe(seed=0)
    cal = calibrate_model(model, _token_batches(0, 4, vocab=256), samples=512, progress=False)
    path = save_calibration(tmp_path / "a.json", cal)
    ids = torch.tensor([[5, 9, 23, 41, 7, 3]])
    with torch.no_grad():
        with BHRouting(pvalue="calibrated", calibration=path, alpha=0.2).patch(model) as r:
            want, want_k = model(ids).logits, r.summary()["k_histogram"]
        offloaded = make_olmoe(seed=0)
        cpu_offload(offloaded, execution_device=torch.device("cpu"))
        assert find_moe_layers(offloaded)[0].weight.device.type == "meta"
        with BHRouting(pvalue="calibrated", calibration=path, alpha=0.2).patch(offloaded) as r:
            got, got_k = offloaded(ids).logits, r.summary()["k_histogram"]
    torch.testing.assert_close(got, want)
    assert got_k == want_k
