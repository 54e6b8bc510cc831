"""lm-eval-bh report compares only what is comparable: identical evaluations, stock-equivalent references,
shared tasks, distinct calibrations; it says why where it refuses; layer-budget twins and matched
targets; several folders as one grid. Hand-made results files with exact expectations."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from test_budget_sweep import _table
from test_report import results_file, routing_block

from lm_eval_bh.commands import report as R

BH = "bh/zscore alpha=0.05 k=1..8"


def _fixed(d: Path, ks=(1, 4), accs=(0.3, 0.6), **kw):
    for k, a in zip(ks, accs):
        results_file(d / f"topk{k}.json", {"t": a}, routing=routing_block(float(k), min_k=k, max_k=k), **kw)


def _report(*paths):
    err = io.StringIO()
    text, rep = R.report(list(paths), err=err)
    return text, rep, err.getvalue()


def _one(rep, setting, task=R.AVERAGE, **where):
    r = rep[(rep["setting"] == setting) & (rep["task"] == task)]
    for k, v in where.items():
        r = r[r[k] == v]
    assert len(r) == 1, (setting, task, where, list(rep["setting"]))
    return r.iloc[0]


def _edit(path: Path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


# --------------------------------------------------------------------------- identical evaluations only

@pytest.mark.parametrize("case", ["limit", "dtype", "chat_template", "system_instruction", "fewshot_as_multiturn"])
def test_a_field_recorded_by_one_file_only_splits_the_evaluation(tmp_path, case):
    """Top-k runs made without --limit / dtype= / a chat template are never the reference of a run made
    with one: lm-eval's defaults (no limit, the loaded dtype, no template) are values, not wildcards."""
    d = tmp_path / "r"
    _fixed(d)
    bh = results_file(d / "bh.json", {"t": 0.5}, routing=routing_block(2.5))
    change = {
        "limit": lambda data: data["config"].update(limit=5.0),
        "dtype": lambda data: data["config"].update(model_args="dtype=bfloat16"),
        "chat_template": lambda data: data.update(chat_template="{{ messages }}", chat_template_sha="ab" * 32),
        "system_instruction": lambda data: data.update(system_instruction="Be brief.", system_instruction_sha=None),
        "fewshot_as_multiturn": lambda data: data.update(fewshot_as_multiturn=True),
    }[case]
    _, rep, err = _report(d)
    assert _one(rep, BH)["delta_vs_topk"] == pytest.approx(0.5 - 0.45)  # the same evaluation: compared
    _edit(bh, change)
    _, rep, err = _report(d)
    r = _one(rep, BH)
    assert case in r["evaluation"] and math.isnan(r["delta_vs_topk"]) and math.isnan(r["topk_value_at_k"])
    assert "no stock top-k run in its evaluation" in r["no_delta"]
    assert f"no Δ vs top-k for {BH}" in err and "2 different evaluations" in err and case in err
    assert not _one(rep, "olmoe_bh top-1")["evaluation"] == r["evaluation"]


def test_the_loaded_dtype_and_explicit_defaults_keep_equal_runs_together(tmp_path):
    """lm-eval's model_dtype (as loaded) equals a `dtype=` argument naming it; fewshot_as_multiturn None and
    False are both off; limit 5 and 5.0 are one limit."""
    d = tmp_path / "r"
    _fixed(d, limit=5)
    bh = results_file(d / "bh.json", {"t": 0.5}, routing=routing_block(2.5), limit=5.0, model_args="dtype=float32")
    for f in d.glob("topk*.json"):
        _edit(f, lambda data: data["config"].update(model_dtype="torch.float32"))
    _edit(bh, lambda data: data.update(fewshot_as_multiturn=False))
    _, rep, err = _report(d)
    assert set(rep["evaluation"]) == {""} and _one(rep, BH)["delta_vs_topk"] == pytest.approx(0.05)


def test_sweep_identity_fields_split_and_a_plain_run_joins_only_one_group(tmp_path):
    """Fields only a sweep records (the model's fingerprint) tell sweeps apart; a plain lm_eval file,
    which records none, joins the one group it fits and never bridges two."""
    d = tmp_path / "r"
    ident = lambda fp: {"setting_id": "x", "identity": {"model": {"pretrained": "m", "fingerprint": fp * 64}}}  # noqa: E731
    for fp in ("a", "b"):
        results_file(d / fp / "topk1.json", {"t": 0.3}, routing=routing_block(1.0, min_k=1, max_k=1), sweep=ident(fp))
    results_file(d / "a" / "topk4.json", {"t": 0.6}, routing=routing_block(4.0, min_k=4, max_k=4), sweep=ident("a"))
    results_file(d / "a" / "bh.json", {"t": 0.5}, routing=routing_block(2.5), sweep=ident("a"))
    results_file(d / "plain" / "bh2.json", {"t": 0.5}, routing=routing_block(2.0, alpha=0.2))
    _, rep, err = _report(d)
    avg = rep[rep["task"] == R.AVERAGE]
    assert avg["evaluation"].nunique() == 3  # fingerprint a, fingerprint b, the plain run on its own
    assert "sweep:model.fingerprint=aaaaaaaaaa" in _one(rep, BH)["evaluation"]
    assert _one(rep, BH)["delta_vs_topk"] == pytest.approx(0.05)
    plain = _one(rep, "bh/zscore alpha=0.2 k=1..8")
    assert math.isnan(plain["delta_vs_topk"]) and "which evaluated differently" in plain["no_delta"]


# --------------------------------------------------------------------------- references

def test_only_stock_equivalent_fixed_runs_are_references(tmp_path):
    """A fixed k with a per-expert calibrated null (or one whose null cannot be read) selects other experts
    than the stock router: it is compared with the stock top-k, never used as one."""
    d = tmp_path / "r"
    _fixed(d)
    block = routing_block(2.0, min_k=2, max_k=2, pvalue="calibrated")
    block["settings"]["calibration"] = str(tmp_path / "gone" / "cal.json")
    block["calibration"] = {"sha256": "c" * 64, "per_expert": True}
    results_file(d / "cal2.json", {"t": 0.9}, routing=block)
    results_file(d / "bh.json", {"t": 0.5}, routing=routing_block(2.0))
    _, rep, err = _report(d)
    cal = rep[(rep["task"] == R.AVERAGE) & (rep["fixed_k"] == 2)].iloc[0]
    assert cal["rule"] == "top-k (not stock)" and cal["setting"].endswith("cal=cal.json@cccccccc")
    assert cal["topk_value_at_k"] == pytest.approx(0.4) and cal["delta_vs_topk"] == pytest.approx(0.5)
    assert _one(rep, BH)["topk_value_at_k"] == pytest.approx(0.4)  # not 0.9 from the calibrated top-2
    assert "not a stock top-k reference (pvalue=calibrated with a per-expert null" in err
    # a global null orders experts like the logits: that fixed k is a reference
    _edit(d / "cal2.json", lambda data: data["config"]["routing"]["calibration"].update(per_expert=False))
    _, rep, _ = _report(d)
    assert _one(rep, BH)["topk_value_at_k"] == pytest.approx(0.9)
    # nothing tells whether the null is per expert: not a reference, and the line says why
    _edit(d / "cal2.json", lambda data: data["config"]["routing"].pop("calibration"))
    _, rep, err = _report(d)
    assert _one(rep, BH)["topk_value_at_k"] == pytest.approx(0.4) and "cannot be read now" in err


def test_calibrations_with_one_file_name_get_distinct_labels(tmp_path):
    """Labels carry the calibration's content hash: two files named cal.json give two settings, none
    dropped; the same content at two paths is one setting (the newest file kept)."""
    d = tmp_path / "r"
    _fixed(d)
    for i, (sub, content) in enumerate([("a", b"one"), ("b", b"two"), ("c", b"one")]):
        cal = tmp_path / sub / "cal.json"
        cal.parent.mkdir()
        cal.write_bytes(content)
        block = routing_block(2.0 + i / 10, pvalue="calibrated")
        block["settings"]["calibration"] = str(cal)
        results_file(d / f"bh_{sub}.json", {"t": 0.5 + i / 100}, routing=block, date=float(i))
    _, rep, err = _report(d)
    labels = sorted(s for s in set(rep["setting"]) if "cal=" in s)
    import hashlib

    assert labels == sorted(f"bh/calibrated alpha=0.05 k=1..8 cal=cal.json@{hashlib.sha256(c).hexdigest()[:8]}"
                            for c in (b"one", b"two"))
    assert "1 older file(s)" in err and "bh_a.json" in err  # bh_c (same content, newer) shadows bh_a


# --------------------------------------------------------------------------- files the report skips

@pytest.mark.parametrize("damage", ["missing", "not_an_object", "no_model", "bad_selection", "no_mean_k"])
def test_a_routed_run_without_a_readable_routing_block_is_skipped_with_a_reason(tmp_path, damage):
    d = tmp_path / "r"
    _fixed(d)
    bad = results_file(d / "bh.json", {"t": 0.9}, routing=routing_block(2.0))

    def hurt(data):
        r = data["config"]
        if damage == "missing":
            r.pop("routing")
        elif damage == "not_an_object":
            r["routing"] = "bh"
        elif damage == "no_model":
            r["routing"].pop("model")
        elif damage == "bad_selection":
            r["routing"]["settings"]["selection"] = "nonsense"
        else:
            r["routing"]["mean_experts_per_token"] = None

    _edit(bad, hurt)
    _, rep, err = _report(d)
    assert set(rep["setting"]) == {"olmoe_bh top-1", "olmoe_bh top-4"}  # never reported as a top-k
    line = [ln for ln in err.splitlines() if "bh.json" in ln]
    assert len(line) == 1 and "skipped" in line[0] and "routing" in line[0]


def test_a_deeply_nested_results_file_is_skipped_in_one_line(tmp_path):
    d = tmp_path / "r"
    _fixed(d)
    (d / "deep.json").write_text("[" * 100000 + "]" * 100000)
    (d / "deep_results.json").write_text('{"results": ' + '{"a": ' * 50000 + "1" + "}" * 50000 + "}")
    _, rep, err = _report(d)
    assert "Traceback" not in err and "RecursionError" not in err
    lines = [ln for ln in err.splitlines() if "deep" in ln]
    assert len(lines) == 2 and all("skipped" in ln for ln in lines) and len(rep[rep["task"] == "t"]) == 2


# --------------------------------------------------------------------------- shared tasks

def test_delta_and_average_use_only_tasks_shared_with_the_reference(tmp_path):
    """Settings that share no task with the top-k runs get no Δ (a line says why); averages over other
    task sets are neither compared nor put on one front; two models' averages over different tasks
    get their own plot panels."""
    d = tmp_path / "r"
    for k, a in [(1, 0.3), (4, 0.6)]:
        results_file(d / f"topk{k}.json", {"a": a}, routing=routing_block(float(k), min_k=k, max_k=k))
    results_file(d / "bh.json", {"b": 0.9}, routing=routing_block(2.0))
    text, rep, err = _report(d)
    bh = _one(rep, BH)
    assert bh["avg_tasks"] == "b" and math.isnan(bh["delta_vs_topk"]) and "no task set in common" in bh["no_delta"]
    assert math.isnan(_one(rep, BH, "b")["delta_vs_topk"]) and "no stock top-k run of b" in _one(rep, BH, "b")["no_delta"]
    assert bh["pareto"] and _one(rep, "olmoe_bh top-4")["pareto"]  # separate fronts
    assert "share no task" in err and f"no Δ vs top-k for {BH}" in err
    assert "## Task average over a per setting" in text and "## Task average over b per setting" in text
    fig = R.make_plot(rep)
    assert len(fig.axes) == 2 and {ax.get_title() for ax in fig.axes} == {
        "Accuracy (average over a) vs expert compute", "Accuracy (average over b) vs expert compute"}

    # a task only some settings ran is left out of every average, and a line says so
    results_file(d / "bh.json", {"a": 0.5, "b": 0.9}, routing=routing_block(2.0))
    _, rep, err = _report(d)
    assert _one(rep, BH)["value"] == 0.5 and _one(rep, BH)["delta_vs_topk"] == pytest.approx(0.1)
    assert "the task average covers a (the tasks every setting ran); not in it: b" in err


# --------------------------------------------------------------------------- Pareto

def test_pareto_stars_respect_the_interpolated_topk_curve(tmp_path):
    """A point below the top-k curve interpolated at its mean k is not starred, even when no run
    dominates it: the star and the Δ column agree."""
    d = tmp_path / "r"
    _fixed(d)  # 0.3 at k 1, 0.6 at k 4: 0.45 at k 2.5
    results_file(d / "below.json", {"t": 0.44}, routing=routing_block(2.5))
    results_file(d / "above.json", {"t": 0.56}, routing=routing_block(3.5, alpha=0.2))
    results_file(d / "tie.json", {"t": 0.40002}, routing=routing_block(2.0, alpha=0.1))  # on the curve (0.4)
    _, rep, _ = _report(d)
    avg = rep[rep["task"] == R.AVERAGE].set_index("mean_k")
    assert avg.loc[2.5, "delta_vs_topk"] < 0 and not avg.loc[2.5, "pareto"]
    assert avg.loc[3.5, "delta_vs_topk"] > 0 and avg.loc[3.5, "pareto"]
    assert avg.loc[2.0, "pareto"]  # within a tie of the curve
    starred = avg[avg["pareto"] & (avg["rule"] != R.FIXED_RULE)]
    assert (starred["delta_vs_topk"] >= -R.ACC_TIE).all()


def test_pareto_ties_use_their_tolerances():
    """Each tolerance of a tie, probed on both sides of it (a tie is starred once, the first)."""
    a, c = R.ACC_TIE, R.COST_TIE
    assert R.pareto_mask([0.3, 0.3 + 0.9 * a], [2.0, 2.0 + 0.9 * c]) == [True, False]  # a tie on both: the first
    assert R.pareto_mask([0.3 + 0.9 * a, 0.3], [2.0 + 0.9 * c, 2.0]) == [True, False]
    assert R.pareto_mask([0.3, 0.3 + 2 * a], [2.0, 2.0 + 0.9 * c]) == [False, True]  # better beyond the tie
    assert R.pareto_mask([0.3, 0.3 - 0.9 * a], [2.0, 2.0 - 2 * c]) == [False, True]  # cheaper beyond, as good
    assert R.pareto_mask([0.3, 0.3 - 2 * a], [2.0, 2.0 - 2 * c]) == [True, True]  # a real trade-off
    assert R.pareto_mask([0.3, 0.3 + 0.9 * a], [2.0, 2.0 + 2 * c], higher_is_better=False) == [True, False]


def test_report_pareto_treats_near_equal_averages_as_a_tie(tmp_path):
    """Through the report: two settings within half a printed digit in accuracy and cost are one point
    of the front (the cheaper, then the first)."""
    d = tmp_path / "r"
    _fixed(d)
    results_file(d / "a.json", {"t": 0.56}, routing=routing_block(3.5))
    results_file(d / "b.json", {"t": 0.56003}, routing=routing_block(3.5002, alpha=0.2))
    _, rep, _ = _report(d)
    assert _one(rep, BH)["pareto"] and not _one(rep, "bh/zscore alpha=0.2 k=1..8")["pareto"]


# --------------------------------------------------------------------------- paired SEs

def _ppl_file(path: Path, ll, words, mean_k: float, fixed: bool = False, settings: dict | None = None,
              per_layer=None) -> Path:
    ppl = math.exp(-float(np.sum(ll)) / float(np.sum(words)))
    k = int(mean_k)
    block = routing_block(mean_k, min_k=k if fixed else 1, max_k=k if fixed else 8)
    block["settings"].update(settings or {})
    if per_layer is not None:
        block["per_layer_mean"] = per_layer
    data = {"results": {"p": {"alias": "p", "word_perplexity,none": ppl, "word_perplexity_stderr,none": "N/A"}},
            "higher_is_better": {"p": {"word_perplexity": False}}, "n-shot": {"p": 0},
            "configs": {"p": {"metric_list": [{"metric": "word_perplexity", "aggregation": "weighted_perplexity"}]}},
            "config": {"model": "olmoe_bh", "model_args": "", "limit": None, "routing": block},
            "sweep": {"setting_id": path.stem, "identity": None}, "date": 1.0, "lm_eval_version": "0.4.13"}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    path.with_name(path.stem + ".samples.jsonl").write_text("".join(
        json.dumps({"task": "p", "doc_id": i, "filter": "none", "word_perplexity": [float(a), int(n)]}) + "\n"
        for i, (a, n) in enumerate(zip(ll, words))))
    return path


def test_log_ratio_se_matches_a_bootstrap_near_ratio_0_3(tmp_path):
    """At a perplexity ratio near 0.3 the SE of log(ratio), by the delta method on the log of a ratio of
    sums, matches a bootstrap over documents; the SE of the ratio linearised in perplexity units gives a
    |z| about a third too small there."""
    rng = np.random.default_rng(3)
    n = 60
    words = rng.integers(20, 120, n)
    base = -words * rng.normal(5.0, 0.4, n)
    ll = {1: base * 1.25, 4: base * 1.0, "bh": base * 0.885 + rng.normal(0, 25, n)}
    d = tmp_path / "r"
    _ppl_file(d / "topk1.json", ll[1], words, 1.0, fixed=True)
    _ppl_file(d / "topk4.json", ll[4], words, 4.0, fixed=True)
    _ppl_file(d / "bh.json", ll["bh"], words, 2.5)
    _, rep, _ = _report(d)
    r = _one(rep, BH, "p")
    nll = lambda v, i: -v[i].sum() / words[i].sum()  # noqa: E731
    log_ratio = lambda i: nll(ll["bh"], i) - 0.5 * (nll(ll[1], i) + nll(ll[4], i))  # noqa: E731
    assert math.exp(r["delta_vs_topk"]) == pytest.approx(0.3, abs=0.05)
    assert r["delta_vs_topk"] == pytest.approx(log_ratio(np.arange(n)))
    boot = [log_ratio(rng.integers(0, n, n)) for _ in range(4000)]
    assert r["delta_se"] == pytest.approx(np.std(boot), rel=0.1)
    # the ratio's SE in perplexity units, linearised, understates |z| (what the log scale fixes)
    ppl_diff = lambda i: math.exp(nll(ll["bh"], i)) - math.exp(0.5 * (nll(ll[1], i) + nll(ll[4], i)))  # noqa: E731
    z_ppl = ppl_diff(np.arange(n)) / np.std([ppl_diff(rng.integers(0, n, n)) for _ in range(4000)])
    assert abs(r["delta_vs_topk"] / r["delta_se"]) > 1.2 * abs(z_ppl)


def test_paired_se_has_the_small_sample_factor(tmp_path):
    """With one word per document the log ratio is a mean difference: its SE is the sample SD (ddof 1)
    over sqrt(n) exactly, the n / (n - 1) factor included (n = 4: a 15 % difference without it)."""
    ll = {1: np.array([-2.0, -3.0, -1.0, -4.0]), 4: np.array([-1.0, -1.5, -0.5, -2.0]),
          "bh": np.array([-1.2, -2.5, -0.4, -2.2])}
    words = np.ones(4, dtype=int)
    d = tmp_path / "r"
    _ppl_file(d / "topk1.json", ll[1], words, 1.0, fixed=True)
    _ppl_file(d / "topk4.json", ll[4], words, 4.0, fixed=True)
    _ppl_file(d / "bh.json", ll["bh"], words, 2.0)
    r = _one(_report(d)[1], BH, "p")
    diff = -ll["bh"] + (2 / 3 * ll[1] + 1 / 3 * ll[4])
    assert r["delta_vs_topk"] == pytest.approx(diff.mean())
    assert r["delta_se"] == pytest.approx(diff.std(ddof=1) / 2, rel=1e-9)


# --------------------------------------------------------------------------- layer-budget twins, targets

def test_each_adaptive_setting_beside_its_layer_budget_twin(tmp_path):
    """The gain over top-k splits into layer allocation (twin vs top-k) and per-token adaptivity
    (setting vs twin), each with its paired SE; the twin is found by its `layer_budget` file, or by
    per-layer means within 0.02."""
    rng = np.random.default_rng(5)
    n = 50
    words = rng.integers(20, 80, n)
    base = -words * rng.normal(5.0, 0.4, n)
    ll = {1: base * 1.3, 4: base, "bh": base * 1.05 + rng.normal(0, 8, n), "twin": base * 1.12 + rng.normal(0, 8, n)}
    d = tmp_path / "r"
    _ppl_file(d / "topk1.json", ll[1], words, 1.0, fixed=True)
    _ppl_file(d / "topk4.json", ll[4], words, 4.0, fixed=True)
    _ppl_file(d / "bh.json", ll["bh"], words, 2.0, per_layer=[3.0, 1.0])
    twin = _ppl_file(d / "twin.json", ll["twin"], words, 2.0, fixed=True,
                     settings={"layer_budget": str(d / "bh.json"), "min_k": 1, "max_k": 8}, per_layer=[3.0, 1.0])
    text, rep, err = _report(d)
    r, t = _one(rep, BH, "p"), _one(rep, "olmoe_bh layer-k layer_budget=bh.json", "p")
    assert t["rule"] == "layer-k" and math.isfinite(t["delta_vs_topk"])  # the twin is no reference
    assert r["twin"] == t["setting"]
    assert r["alloc_delta"] == pytest.approx(t["delta_vs_topk"]) and r["alloc_se"] == pytest.approx(t["delta_se"])
    per_doc = (-ll["bh"] + ll["twin"])
    nll = lambda v, i: -v[i].sum() / words[i].sum()  # noqa: E731
    assert r["delta_vs_twin"] == pytest.approx(nll(ll["bh"], np.arange(n)) - nll(ll["twin"], np.arange(n)))
    # the parts add up to the setting's Δ (both at mean k 2, in log perplexity)
    assert r["delta_vs_twin"] + r["alloc_delta"] == pytest.approx(r["delta_vs_topk"])
    boot = [nll(ll["bh"], i) - nll(ll["twin"], i) for i in (rng.integers(0, n, n) for _ in range(3000))]
    assert r["delta_vs_twin_se"] == pytest.approx(np.std(boot), rel=0.12) and per_doc.size == n
    assert "layer-budget twin" in text and "adaptivity: setting vs twin" in text

    # a `layer_k` run whose per-layer means match within 0.02 is the twin too; one 0.05 off is not
    for off, found in ((0.015, True), (0.05, False)):
        _ppl_file(twin, ll["twin"], words, 2.0, fixed=True, settings={"layer_k": [3, 1], "min_k": 1, "max_k": 8},
                  per_layer=[3.0 + off, 1.0 - off])
        r = _one(_report(d)[1], BH, "p")
        assert (r["twin"] == "olmoe_bh layer-k layer_k=3,1") is found


def test_settings_with_a_target_k_are_compared_at_exactly_that_k(tmp_path):
    """target_k settings meet the stock top-k run at k = target (no interpolation), paired; a target with
    no top-k run there has none; the md has a table per summary by target."""
    d = tmp_path / "r"
    items = {1: [0, 1, 0, 0, 1, 0], 2: [1, 1, 0, 0, 1, 0], 4: [1, 1, 1, 0, 1, 1],
             "a": [1, 1, 1, 0, 1, 0], "b": [1, 0, 1, 1, 1, 0], "c": [1, 1, 1, 1, 1, 0]}
    def write(name, mean_k, fixed=False, **settings):
        k = int(mean_k)
        block = routing_block(mean_k, min_k=k if fixed else 1, max_k=k if fixed else 8, **settings.pop("kw", {}))
        block["settings"].update(settings)
        path = results_file(d / f"{name}.json", {"t": (float(np.mean(items[name])), 0.2)}, routing=block,
                            sweep={"setting_id": name, "identity": None})
        path.with_name(f"{name}.samples.jsonl").write_text("".join(
            json.dumps({"task": "t", "doc_id": i, "filter": "none", "acc": v}) + "\n" for i, v in enumerate(items[name])))
    for k in (1, 2, 4):
        write(k, float(k), fixed=True)
    write("a", 2.1, target_k=2.0, kw={"alpha": 0.031})
    write("b", 1.95, target_k=2.0, kw={"selection": "hc", "alpha": 0.12})
    write("c", 3.05, target_k=3.0, kw={"alpha": 0.2})
    text, rep, _ = _report(d)
    a = _one(rep, "bh/zscore target_k=2 k=1..8")
    diff = np.array(items["a"]) - np.array(items[2])
    assert a["topk_at_target"] == pytest.approx(np.mean(items[2]))
    assert a["delta_at_target"] == pytest.approx(diff.mean())
    assert a["delta_at_target_se"] == pytest.approx(diff.std(ddof=1) / math.sqrt(6))
    assert a["topk_value_at_k"] != pytest.approx(np.mean(items[2]))  # the interpolated Δ is at k 2.1
    b = _one(rep, "hc/zscore target_k=2 k=1..8")
    assert b["delta_at_target"] == pytest.approx(np.mean(items["b"]) - np.mean(items[2]))
    c = _one(rep, "bh/zscore target_k=3 k=1..8")
    assert math.isnan(c["delta_at_target"]) and math.isfinite(c["delta_vs_topk"])
    assert "at matched target k (target_k)" in text


def _target_grid(d: Path, ll: dict, words) -> dict:
    """A --target_ks 1.5,2 --allocations uniform,sensitivity --selections bh,topk grid's files: {name: setting}."""
    _ppl_file(d / "topk1.json", ll["top1"], words, 1.0, fixed=True)
    _ppl_file(d / "topk2.json", ll["top2"], words, 2.0, fixed=True)
    topk = {"selection": "topk", "min_k": 1, "max_k": 4}
    sens = {"allocation": "sensitivity"}
    for name, mean_k, settings in (
            ("topk_K1.5", 1.497, {**topk, "target_k": 1.5}),
            ("topk_K1.5_sensitivity", 1.5, {**topk, **sens, "target_k": 1.5, "layer_k": [1.0, 2.0], "fitted_k": 1.5}),
            ("topk_K2_sensitivity", 2.0, {**topk, **sens, "target_k": 2.0, "layer_k": [1.0, 3.0], "fitted_k": 2.0}),
            ("bh_K1.5", 1.45, {"target_k": 1.5, "alpha": 0.3}),
            ("bh_K1.5_sensitivity", 1.52, {**sens, "target_k": 1.5, "layer_k": [1.0, 2.0], "layer_knob": [0.01, 0.4]}),
            ("bh_K2", 2.05, {"target_k": 2.0, "alpha": 0.5})):
        _ppl_file(d / f"{name}.json", ll[name], words, mean_k, settings=settings)
    return {"uniform": "olmoe_bh topk target_k=1.5", "layer15": "olmoe_bh layer-k target_k=1.5 layer_k=1,2 alloc=sensitivity",
            "layer2": "olmoe_bh layer-k target_k=2 layer_k=1,3 alloc=sensitivity",
            "bh15": "bh/zscore target_k=1.5 k=1..8", "bh15s": "bh/zscore target_k=1.5 alloc=sensitivity k=1..8 layer_k=1,2",
            "bh2": "bh/zscore target_k=2 k=1..8"}


def test_top_k_at_a_target_is_its_exact_reference_and_the_winner_table_names_who_wins(tmp_path):
    """Top-k at target 1.5 (uniform) is a top-k reference at the k it achieved: the exact reference of the
    settings aimed at 1.5, and a point of the curve others interpolate on; the fitted per-layer budget
    (topk, allocation=sensitivity) is `layer-k (sensitivity)`; the winner table picks the lowest perplexity
    at each target, its runner-up of another rule, and says which wins at 2 SE."""
    rng = np.random.default_rng(11)
    n = 40
    words = rng.integers(20, 80, n)
    base = -words * rng.normal(5.0, 0.4, n)
    noise = lambda sd: rng.normal(0, sd, n)  # noqa: E731
    ll = {"top1": base * 1.3, "top2": base * 0.9, "topk_K1.5": base, "topk_K1.5_sensitivity": base * 0.9 + noise(2),
          "bh_K1.5": base * 1.1 + noise(2), "bh_K1.5_sensitivity": base * 0.99 + noise(40),
          "topk_K2_sensitivity": base * 0.97 + noise(2), "bh_K2": base * 1.0 + noise(2)}
    d = tmp_path / "r"
    names = _target_grid(d, ll, words)
    text, rep, _ = _report(d)
    nll = lambda key: -ll[key].sum() / words.sum()  # noqa: E731

    ref = _one(rep, names["uniform"], "p")
    assert ref["rule"] == R.FIXED_RULE and ref["fixed_k"] == 1.497 and math.isnan(ref["delta_vs_topk"])
    bh = _one(rep, names["bh15"], "p")  # interpolated on the curve top-1, top-k at 1.497, top-2
    w = (1.45 - 1.0) / (1.497 - 1.0)
    assert bh["topk_value_at_k"] == pytest.approx(math.exp((1 - w) * nll("top1") + w * nll("topk_K1.5")))
    layer = _one(rep, names["layer15"], "p")
    assert layer["rule"] == "layer-k" and layer["allocation"] == "sensitivity"
    assert layer["topk_at_target"] == pytest.approx(ref["value"])  # exactly top-k at 1.5, no interpolation
    assert layer["delta_at_target"] == pytest.approx(nll("topk_K1.5_sensitivity") - nll("topk_K1.5"))
    assert _one(rep, names["bh15s"], "p")["rule"] == "bh/zscore"  # a per-layer knob: an adaptive rule
    assert _one(rep, names["layer2"], "p")["topk_at_target"] == pytest.approx(_one(rep, "olmoe_bh top-2", "p")["value"])

    target = {(r["target k"], r["setting"]): r for r in _table(text, "### p at matched target k")}
    assert ("1.500", names["uniform"]) not in target  # the reference is no row of its own
    assert target[("1.500", names["layer15"])]["rule"] == "layer-k (sensitivity)"
    assert target[("1.500", names["bh15s"])]["rule"] == "bh/zscore (sensitivity)"
    assert target[("1.500", names["bh15"])]["allocation"] == "uniform"

    win = {r["target k"]: r for r in _table(text, "## Winner at each target k")}
    assert win["1.500"]["best"] == f"{names['layer15']} (layer-k (sensitivity))"  # the lowest perplexity at 1.5
    assert win["1.500"]["Δ vs top-k ± se"] == f"{layer['delta_at_target']:+.4f} ± {layer['delta_at_target_se']:.4f}"
    assert win["1.500"]["runner-up rule"] == f"bh/zscore (sensitivity): {names['bh15s']}"
    assert win["1.500"]["verdict"] == "layer-k (sensitivity) beats top-k"
    assert win["2.000"]["best"] == f"{names['layer2']} (layer-k (sensitivity))"
    assert win["2.000"]["runner-up rule"] == f"bh/zscore: {names['bh2']}" and win["2.000"]["verdict"] == "top-k wins"
    assert ("- p (word_perplexity ↓): layer-k (sensitivity) beats top-k at k = 1.5 (by more than 2 SE); "
            "no rule does at k = 2.") in text


def test_winner_table_on_accuracy_takes_the_highest_and_says_when_none_beats_top_k(tmp_path):
    """For an accuracy the best is the highest; where no rule is more than 2 SE better than top-k at the
    target, a sentence says so plainly."""
    d = tmp_path / "r"
    items = {2: [1, 0, 1, 0, 1, 0, 1, 0], "a": [1, 1, 1, 0, 1, 0, 1, 0], "b": [1, 0, 0, 0, 1, 0, 1, 0],
             "c": [0, 0, 1, 0, 1, 0, 0, 0]}
    for name, mean_k, settings in ((2, 2.0, {"min_k": 2, "max_k": 2}), ("a", 2.1, {"target_k": 2.0, "alpha": 0.2}),
                                   ("b", 1.9, {"target_k": 2.0, "selection": "hc", "alpha": 0.1}),
                                   ("c", 2.0, {"target_k": 2.0, "selection": "topp", "top_p": 0.4})):
        block = routing_block(mean_k)
        block["settings"].update(settings)
        path = results_file(d / f"{name}.json", {"t": (float(np.mean(items[name])), 0.2)}, routing=block,
                            sweep={"setting_id": str(name), "identity": None})
        path.with_name(f"{name}.samples.jsonl").write_text("".join(
            json.dumps({"task": "t", "doc_id": i, "filter": "none", "acc": v}) + "\n" for i, v in enumerate(items[name])))
    text, _, _ = _report(d)
    (win,) = _table(text, "## Winner at each target k")
    assert win["best"] == "bh/zscore target_k=2 k=1..8 (bh/zscore)" and win["summary"] == "task average (acc)"
    assert win["Δ vs top-k ± se"] == "+0.1250 ± 0.1250"  # one item better of 8, paired
    assert win["runner-up rule"] == "hc/zscore: hc/zscore target_k=2 k=1..8" and win["its Δ ± se"] == "-0.1250 ± 0.1250"
    assert win["verdict"] == "no rule beats top-k by more than 2 SE"
    assert "- task average (acc): no rule beats top-k by more than 2 SE at any target k." in text


# --------------------------------------------------------------------------- several folders

def test_several_folders_are_reported_as_one_grid(tmp_path):
    """Shards written to separate folders: their union is the grid of one folder, setting for setting."""
    whole, shards = tmp_path / "whole", [tmp_path / "s0", tmp_path / "s1"]
    files = [("topk1", 1.0, 0.3, True), ("topk4", 4.0, 0.6, True), ("bh", 2.5, 0.5, False), ("bh2", 3.0, 0.55, False)]
    for i, (name, k, acc, fixed) in enumerate(files):
        block = routing_block(k, min_k=int(k) if fixed else 1, max_k=int(k) if fixed else 8, alpha=0.05 + i / 100)
        for folder in (whole, shards[i % 2]):
            results_file(folder / f"{name}.json", {"t": acc}, routing=block)
    cols = ["setting", "task", "value", "mean_k", "topk_value_at_k", "delta_vs_topk", "pareto"]
    one = _report(whole)[1][cols].sort_values(["setting", "task"]).reset_index(drop=True)
    union = _report(*shards)[1][cols].sort_values(["setting", "task"]).reset_index(drop=True)
    assert len(one) == 8 and one.equals(union)


# --------------------------------------------------------------------------- plot labels

def test_plot_point_labels_do_not_overlap(tmp_path):
    d = tmp_path / "r"
    _fixed(d, ks=(1, 2, 4, 8), accs=(0.3, 0.4, 0.6, 0.7))
    for i in range(8):  # eight BH points crowded around k 2
        results_file(d / f"bh{i}.json", {"t": 0.45 + i / 1000}, routing=routing_block(2.0 + i / 100, alpha=0.01 * (i + 1)))
    fig = R.make_plot(_report(d)[1])
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in fig.axes[0].texts]
    assert len(boxes) == 12
    assert not [(i, j) for i in range(len(boxes)) for j in range(i) if boxes[i].overlaps(boxes[j])]


def test_report_output_says_what_it_wrote(tmp_path):
    d = tmp_path / "r"
    _fixed(d)
    err = io.StringIO()
    R.report([d], output=tmp_path / "out.md", plot=tmp_path / "p.png", err=err)
    assert f"wrote {tmp_path / 'out.md'}" in err.getvalue() and f"wrote {tmp_path / 'p.png'}" in err.getvalue()


def test_two_models_averaging_other_tasks_get_their_own_tables_and_panels(tmp_path):
    d = tmp_path / "r"
    for model, tasks in (("m1", {"a": 0.5, "b": 0.6}), ("m2", {"a": 0.4})):
        for k in (1, 4):
            results_file(d / model / f"topk{k}.json", {t: v + k / 100 for t, v in tasks.items()},
                         routing=routing_block(float(k), min_k=k, max_k=k), model_args=f"pretrained={model}")
    text, rep, _ = _report(d)
    assert set(rep.loc[rep["task"] == R.AVERAGE, "avg_tasks"]) == {"a,b", "a"}
    assert "## Task average over a per setting" in text and "## Task average over a, b per setting" in text
    assert len(R.make_plot(rep).axes) == 2
