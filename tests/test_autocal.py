"""calibration=auto: the built-in corpus, fitting under the evaluated routing, the cache and its keys,
provenance in results files, and the calibrate command's early checks."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_olmoe

from lm_eval_bh import BHRouting, autocal
from lm_eval_bh.calibration import Calibration, read_calibration
from lm_eval_bh.config import RoutingConfig
from lm_eval_bh.corpus import CORPUS, builtin_texts, corpus_hash
from lm_eval_bh.errors import RoutingError
from lm_eval_bh.families import find_moe_layers

ROOT = Path(__file__).resolve().parents[1]
CFG = RoutingConfig(alpha=0.05, max_k=16, pvalue="calibrated", calibration="auto")


def _batches(seed: int, n: int = 4, rows: int = 8, length: int = 32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 256, (rows, length), generator=g) for _ in range(n)]


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def test_builtin_corpus_holds_no_text_of_the_offline_tasks():
    corpus = "\n\n".join(builtin_texts())
    assert len(corpus) > 50_000 and CORPUS["licence"] == "PSF-2.0" and CORPUS["name"]
    checked = 0
    for path in sorted((ROOT / "tasks" / "offline").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            for text in _strings(json.loads(line)):
                for paragraph in (p.strip() for p in text.split("\n\n")):
                    if len(paragraph) >= 40:
                        checked += 1
                        assert paragraph not in corpus, f"{path.name}: {paragraph[:60]!r} is in the corpus"
    assert checked > 1000
    heldout = [json.loads(line)["text"] for line in (ROOT / "tasks/offline/pydoc_heldout.jsonl").open()]
    assert not any(doc in corpus for doc in heldout)
    assert corpus_hash(builtin_texts()) == corpus_hash(builtin_texts())


def _reference_under_routing(model, batches, cfg, samples):
    """One full forward per layer with the layers above routed (the definition, without the shortcut)."""
    layers = find_moe_layers(model)
    stock = autocal.calibrate_model(model, batches, samples=samples, progress=False)
    rows = [stock.null[0]]
    for layer in range(1, len(layers)):
        cal = Calibration(np.stack(rows + list(stock.null[layer:])), dict(stock.meta))
        seen = []
        handle = layers[layer].router.register_forward_hook(lambda m, a, out: seen.append(out[0].reshape(-1, 16)))
        with torch.no_grad(), BHRouting(cfg, fitted=cal).patch(model):
            for ids in batches:
                model(input_ids=ids)
        handle.remove()
        rows.append(np.sort(torch.cat(seen).flatten().numpy()))
    return stock, np.stack(rows)


def test_fit_under_routing_differs_from_stock_after_layer_0_and_matches_its_definition():
    model = make_olmoe(num_hidden_layers=3)
    batches = _batches(0)
    samples = 4 * 8 * 32 * 16  # every logit kept: the samples are the full sets, whatever the order
    routed = autocal.calibrate_model(model, batches, samples=samples, progress=False, under=CFG)
    stock, reference = _reference_under_routing(model, batches, CFG, samples)
    assert np.array_equal(routed.null[0], stock.null[0])
    for layer in (1, 2):
        assert not np.allclose(routed.null[layer], stock.null[layer], atol=1e-4)
    np.testing.assert_allclose(routed.null, reference, atol=2e-5)
    assert routed.meta["under"]["routing"]["alpha"] == 0.05 and stock.meta["under"] == "stock"


def _tail_rates(model, cfg, cal, batches):
    """Share of each layer's p-values below 0.05 (the diagnostics' first bin) when `cfg` routes with `cal`."""
    with torch.no_grad(), BHRouting(cfg, fitted=cal).patch(model) as routing:
        for ids in batches:
            model(input_ids=ids)
    layers = routing.summary()["diagnostics"]["per_layer"]
    return [x["pvalue_histogram"][0] / sum(x["pvalue_histogram"]) for x in layers]


def test_routing_fitted_null_brings_the_downstream_tail_rate_to_alpha():
    """Layer 0's experts all compute one function and write it along one direction, which every expert of
    layer 1 reads with its own gain: the fewer experts layer 0 routes to (BH at alpha 0.001: about 1.5
    against the stock 4), the weaker that direction after the norm, and the narrower layer 1's logits.
    The stock-fitted null is then too wide there: too few p-values below 0.05 (about 2.8 %, the deficit
    seen on real models); the null fitted under the routing gives about 5 %."""
    cfg = replace(CFG, alpha=0.001)
    model = make_olmoe(num_hidden_layers=2)
    with torch.no_grad():
        experts = model.model.layers[0].mlp.experts
        experts.gate_up_proj[:] = experts.gate_up_proj[0:1].clone()
        experts.down_proj.zero_()
        experts.down_proj[:, 0, :] = 3.0
        gate = model.model.layers[1].mlp.gate.weight
        gate.normal_(0, 1.0)
        gate[:, 0] = torch.linspace(-8, 8, gate.shape[0])
    calibration_text, heldout = _batches(0, length=64), _batches(1, length=64)
    stock = autocal.calibrate_model(model, calibration_text, samples=32768, progress=False)
    routed = autocal.calibrate_model(model, calibration_text, samples=32768, progress=False, under=cfg)
    stock_rate = _tail_rates(model, cfg, stock, heldout)[1]
    routed_rate = _tail_rates(model, cfg, routed, heldout)[1]
    assert abs(routed_rate - 0.05) < 0.01 < 0.015 < abs(stock_rate - 0.05)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def test_auto_calibration_cache_and_what_refits(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    monkeypatch.setenv("LM_EVAL_BH_CACHE", str(tmp_path / "cache"))

    def resolve(cfg, tokens=256):
        cal = autocal.resolve(model, tokenizer, cfg, tokens=tokens, progress=False)
        return cal, cal.meta["provenance"]

    first, prov = resolve(CFG)
    assert prov["status"] == "fitted" and prov["source"] == "auto" and prov["under"] == "routing"
    assert prov["corpus"] == CORPUS["name"] and prov["corpus_sha256"] == corpus_hash(builtin_texts())
    assert 200 <= prov["tokens"] <= 256 and Path(prov["path"]).is_file()
    again, prov = resolve(CFG)
    assert prov["status"] == "cached" and np.array_equal(again.null, first.null)
    assert resolve(CFG, tokens=128)[1]["status"] == "fitted"  # another token count
    assert resolve(CFG, tokens=128)[1]["status"] == "cached"
    assert resolve(replace(CFG, alpha=0.2))[1]["status"] == "fitted"  # another routing setting
    assert resolve(replace(CFG, mode="analyze"))[1]["under"] == "stock"  # analyze runs the stock routers
    text = tmp_path / "mine.txt"
    text.write_text("Some unlabeled prose about routers.\n\nAnother paragraph of it, a little longer than that.\n")
    mine = replace(CFG, calibration=str(text))
    assert resolve(mine)[1]["status"] == "fitted" and resolve(mine)[1]["status"] == "cached"
    text.write_text("Other prose entirely.\n")  # another text file's content
    assert resolve(mine)[1]["status"] == "fitted"
    monkeypatch.setattr(autocal, "builtin_texts", lambda: ["A different built-in corpus. " * 40])
    assert resolve(CFG)[1]["status"] == "fitted"  # another corpus
    monkeypatch.undo()
    monkeypatch.setenv("LM_EVAL_BH_CACHE", str(tmp_path / "cache"))
    assert resolve(CFG)[1]["status"] == "cached"
    router = find_moe_layers(model)[1].router
    with torch.no_grad():
        router.weight[0, 0] += 1.0  # another model: other router weights
        try:
            assert resolve(CFG)[1]["status"] == "fitted"
        finally:
            router.weight[0, 0] -= 1.0
    damaged = Path(resolve(CFG)[1]["path"])
    damaged.write_text("{")
    assert resolve(CFG)[1]["status"] == "fitted"  # a damaged cache entry is fitted again


def test_auto_through_lm_eval_records_provenance(tiny_model_dir, task_manager, tmp_path, monkeypatch):
    import lm_eval

    monkeypatch.setenv("LM_EVAL_BH_CACHE", str(tmp_path))
    statuses = []
    for _ in range(2):
        out = lm_eval.simple_evaluate(
            model="moe_bh", model_args=f"pretrained={tiny_model_dir},dtype=float32,alpha=0.05,pvalue=calibrated,"
                                       "calibration=auto", tasks=["mmlu_dev_offline"], task_manager=task_manager,
            limit=4, device="cpu")
        routing = out["config"]["routing"]
        assert routing["settings"]["calibration"] == "auto"
        prov = routing["calibration"]
        assert prov["corpus"] == CORPUS["name"] and prov["under"] == "routing" and prov["tokens"] > 0
        statuses.append(prov["status"])
    assert statuses == ["fitted", "cached"]


def test_a_calibration_file_records_its_hash(tmp_path):
    model = make_olmoe()
    path = tmp_path / "c.json"
    from lm_eval_bh.calibration import save_calibration

    save_calibration(path, autocal.calibrate_model(model, _batches(0, n=1), samples=512, progress=False))
    with BHRouting(alpha=0.05, pvalue="calibrated", calibration=str(path)).patch(model) as routing:
        model(input_ids=_batches(1, n=1)[0])
    prov = routing.summary()["calibration"]
    assert prov["source"] == "file" and prov["under"] == "stock" and len(prov["sha256"]) == 64
    save_calibration(path, autocal.calibrate_model(model, _batches(0, n=1), samples=512, progress=False, under=CFG))
    with BHRouting(alpha=0.05, max_k=16, pvalue="calibrated", calibration=str(path)).patch(model) as routing:
        model(input_ids=_batches(1, n=1)[0])
    prov = routing.summary()["calibration"]
    assert prov["under"] == "routing" and prov["under_settings"]["alpha"] == 0.05
    with pytest.raises(RoutingError, match="tokenizer"):
        BHRouting(CFG).patch(model)


def test_deeply_nested_json_is_a_one_line_error(tmp_path):
    path = tmp_path / "deep.calib.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(RoutingError, match="nested too deeply") as err:
        read_calibration(path)
    assert "\n" not in str(err.value)


def test_calibrate_output_is_checked_before_anything_runs(tmp_path, capsys):
    """A folder, or a path that cannot be created, is one line before the model loads (the model here
    does not even exist); so is a --text file of deeply nested JSON."""
    from lm_eval_bh.cli import main

    text = tmp_path / "t.txt"
    text.write_text("some text\n")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    nested = tmp_path / "deep.jsonl"
    nested.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    cases = [(text, str(tmp_path) + "/", "not a folder"), (text, str(tmp_path), "not a folder"),
             (text, str(blocker / "c.json"), "cannot be written"),
             (nested, str(tmp_path / "c.json"), "nested too deeply")]
    for source, output, message in cases:
        argv = ["calibrate", "--model_args", "pretrained=/no/such/model", "--text", str(source), "--output", output]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.strip().count("\n") == 0, err
    assert not (tmp_path / "c.json").exists()


def test_set_routing_fits_auto_under_the_new_setting(tiny_model_dir, tmp_path, monkeypatch):
    from lm_eval.api.registry import get_model

    monkeypatch.setenv("LM_EVAL_BH_CACHE", str(tmp_path))
    lm = get_model("moe_bh").create_from_arg_string(f"pretrained={tiny_model_dir},dtype=float32,alpha=0.05",
                                                    {"device": "cpu"})
    assert lm.routing.provenance is None  # z-scores need no null
    lm.set_routing(alpha=0.2, pvalue="calibrated", calibration="auto")
    first = lm.routing.provenance
    assert first["status"] == "fitted" and first["under"] == "routing"
    assert lm.routing.nulls[0] is not None and lm.routing_config.alpha == 0.2
    lm.set_routing(alpha=0.05, pvalue="calibrated", calibration="auto")
    assert lm.routing.provenance["status"] == "fitted" and lm.routing.provenance["path"] != first["path"]


def test_a_budget_target_with_auto_fits_the_null_at_the_rules_own_knob_first(tiny_model_dir, tmp_path, monkeypatch):
    """target_k with calibration=auto: the null is fitted under the rule at its own alpha (the fit's starting
    point; the target cannot route before the null exists), then the target is met with that null; each
    rule that needs a null (bh/calibrated, lfdr) gets there, and the results name both."""
    from lm_eval.api.registry import get_model

    from lm_eval_bh.autocal import routed_before_fit

    monkeypatch.setenv("LM_EVAL_BH_CACHE", str(tmp_path))
    lm = get_model("moe_bh").create_from_arg_string(f"pretrained={tiny_model_dir},dtype=float32,fit_tokens=512",
                                                    {"device": "cpu"})
    for selection in ("bh", "lfdr"):
        lm.set_routing(selection=selection, pvalue="calibrated", calibration="auto", target_k=2.0, max_k=4)
        prov, budget = lm.routing.provenance, lm.routing.budget
        assert prov["status"] == "fitted" and prov["under"] == "routing"
        assert budget["target_k"] == 2.0 and abs(budget["calibration_k"] - 2.0) <= 0.02 * 2.0
        assert lm.routing_config.fitted_k == budget["calibration_k"]
    cfg = RoutingConfig(selection="bh", pvalue="calibrated", calibration="auto", target_k=2.0, allocation="sensitivity")
    start = routed_before_fit(cfg)
    assert not start.needs_fit and start.alpha == cfg.alpha and start.target_k is None
    assert start.allocation == "uniform" and routed_before_fit(start) is start
