"""olmoe_bh through the real lm-eval: discovery, statistics in results files, batch-size invariance, errors."""

import json
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest
from conftest import run_concurrently, subprocess_env

REPO = Path(__file__).resolve().parents[1]
TASKS = str(REPO / "tasks")
LIMIT = 24


def _evaluate(model, model_args, task_manager, tasks=("mmlu_dev_offline", "bigbench_strategyqa_offline"),
              limit=LIMIT, **kw):
    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=list(tasks), task_manager=task_manager,
        limit=limit, device="cpu", **kw,
    )


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=600, **kw)


LOAD_TIMED = """
import sys, time
from lm_eval.api.registry import get_model
from lm_eval_bh import RoutingError
t = time.monotonic()
try:
    get_model("olmoe_bh").create_from_arg_string(sys.argv[1], {"device": "cpu"})
except RoutingError as e:
    print(round(time.monotonic() - t, 2)); print(e)
"""
UNLOADABLE = [
    ("nobody/no-such-model", "1", "couldn't connect"),          # offline mode
    ("nobody/no-such-model", "0", "cannot be reached"),         # online mode, hub unreachable
    ("/no/such/folder", "0", "no such folder"),
]


@pytest.fixture(scope="module")
def lm_eval_cli(tiny_model_dir, task_manager, tmp_path_factory):
    """The command lines of this file, each run once, two at a time: {name: CompletedProcess}, plus
    "root" (their folder) and "cache_rows" (lm-eval's request cache as the stock model filled it,
    read before the routed run that must refuse it)."""
    import sqlite3

    root = tmp_path_factory.mktemp("lm_eval_cli")
    tiny = f"pretrained={tiny_model_dir}"
    common = ["--device", "cpu", "--include_path", TASKS, "--tasks", "mmlu_dev_offline"]
    cache = root / "cache"  # filled by the stock model, as `lm_eval --model hf ... --use_cache` does
    _evaluate("hf", tiny, task_manager, tasks=["mmlu_dev_offline"], limit=4, use_cache=str(cache))
    with sqlite3.connect(root / "cache_rank0.db") as con:
        cache_rows = con.execute('SELECT key, value FROM "unnamed" ORDER BY key').fetchall()
    runs = run_concurrently({
        # with --output_path: the results file, and the routing table after lm-eval's
        "stock": (["lm_eval", "--model", "olmoe_bh", "--model_args", f"{tiny},alpha=0.2,min_k=1", *common,
                   "--limit", "8", "--output_path", str(root / "out")], {}),
        # `python -m lm_eval run` in another folder, without --output_path
        "python_m": ([sys.executable, "-m", "lm_eval", "run", "--model", "olmoe_bh", "--model_args",
                      f"{tiny},alpha=0.01", *common, "--limit", "4"], {"cwd": root}),
        "use_cache": (["lm_eval", "--model", "olmoe_bh", "--model_args", f"{tiny},alpha=0.01", *common,
                       "--limit", "4", "--use_cache", str(cache)], {"cwd": root}),
        "bad_alpha": (["lm_eval", "--model", "olmoe_bh", "--model_args", f"{tiny},alpha=2", *common], {}),
        "typo": (["lm_eval", "--model", "olmoe_bh", "--model_args", f"{tiny},alpah=0.1", *common], {}),
        # HF_HUB_OFFLINE=1, and OLMoE-1B-7B (the default pretrained) is not in the cache
        "default_model_offline": (["lm_eval", "--model", "olmoe_bh", "--model_args", "alpha=0.1", *common],
                                  {"cwd": root}),
        # lm-eval's registry outside any checkout: ours and lm-eval's own models
        "registry": ([sys.executable, "-c", "from lm_eval.api.registry import get_model; "
                      "print(get_model('olmoe_bh').__name__, get_model('hf').__name__)"], {"cwd": "/"}),
        **{f"unloadable {pretrained} {offline}": (
            [sys.executable, "-c", LOAD_TIMED, f"pretrained={pretrained}"],
            {"env": dict(subprocess_env(), OMP_NUM_THREADS="1", HF_HUB_OFFLINE=offline,
                         HF_ENDPOINT="http://127.0.0.1:9")})  # port 9: closed
           for pretrained, offline, _ in UNLOADABLE},
    })
    return {**runs, "root": root, "cache_rows": cache_rows}


def test_stock_cli_finds_olmoe_bh_and_writes_routing_stats(lm_eval_cli):
    proc = lm_eval_cli["stock"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = (lm_eval_cli["root"] / "out").rglob("results_*.json")
    routing = json.loads(results_file.read_text())["config"]["routing"]
    assert routing["settings"]["alpha"] == 0.2
    assert 1 <= routing["mean_experts_per_token"] <= routing["settings"]["max_k"]
    assert routing["per_task"]["mmlu_dev_offline"]["tokens"] == routing["tokens"] > 0
    assert sum(routing["k_histogram"].values()) == routing["tokens"] * routing["model"]["num_layers"]
    assert len(routing["per_layer_mean"]) == routing["model"]["num_layers"]
    # the terminal: lm-eval's table, then the routing table with the same numbers
    table = proc.stdout[proc.stdout.index("Metric"):]
    assert_routing_table(table[table.index("\nrouting "):], routing)


def test_diagnostics_in_a_real_lm_eval_results_file(lm_eval_cli):
    """The per-layer diagnostics of the same results file, through the typed schema (results_schema)."""
    from test_diagnostics import KEYS

    from lm_eval_bh.results_schema import routing_block

    (results_file,) = (lm_eval_cli["root"] / "out").rglob("results_*.json")
    results = json.loads(results_file.read_text())
    block = routing_block(results)
    assert block.to_dict() == results["config"]["routing"]
    per_layer = results["config"]["routing"]["diagnostics"]["per_layer"]
    assert len(per_layer) == block.model.num_layers
    for d in per_layer:
        assert set(d) == KEYS and len(d["pvalue_histogram"]) == 20
        assert sum(d["pvalue_histogram"]) == block.tokens * block.model.num_experts
        assert 0 <= d["frac_raised_to_min_k"] <= 1 and 0 <= d["frac_cut_to_max_k"] <= 1 and 0 < d["pi0"] <= 1


def assert_routing_table(text: str, routing: dict) -> None:
    """`text` (stdout after lm-eval's own table) is the routing table of the `config.routing` block."""
    lines = text.strip().splitlines()
    assert lines[0].startswith("routing bh/zscore alpha=") and "top_k 4 of 16 experts" in lines[0], lines[0]
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[3:])}
    model = routing["model"]
    expected = {"all tasks": routing, **routing["per_task"]}
    assert set(rows) == set(expected)
    for name, block in expected.items():
        tokens, mean, fraction, active = rows[name]
        assert int(tokens) == block["tokens"]
        assert float(mean) == pytest.approx(block["mean_experts_per_token"], abs=1e-4)
        assert float(fraction) == pytest.approx(block["mean_experts_per_token"] / model["top_k"], abs=1e-4)
        per_layer = block["mean_experts_per_token"] * model["num_layers"]
        assert int(active) == round(model["dense_params"] + model["params_per_expert"] * per_layer)
    assert int(rows["all tasks"][3]) == round(routing["active_params_per_token"])


def test_python_m_lm_eval_and_builtin_models_still_registered(lm_eval_cli):
    proc = lm_eval_cli["registry"]
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["OlmoeBHLM", "HFLM"]


def test_python_m_lm_eval_finds_olmoe_bh_and_prints_routing_without_output_path(lm_eval_cli):
    """`python -m lm_eval run --model olmoe_bh` from another folder, without --output_path: the routing
    table still follows lm-eval's."""
    proc = lm_eval_cli["python_m"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout[proc.stdout.index("Metric"):]
    assert "mmlu_dev_offline" in text
    lines = text[text.index("\nrouting "):].strip().splitlines()
    assert lines[0].startswith("routing bh/zscore alpha=0.01 k=1..4: top_k 4 of 16 experts"), lines[0]
    assert [line.split("|")[1].strip() for line in lines[3:]] == ["all tasks", "mmlu_dev_offline"]


def test_stats_are_batch_size_invariant(tiny_model_dir, task_manager):
    args = f"pretrained={tiny_model_dir},alpha=0.2"
    stats = [  # 12 questions per task: several batches of 8, with padding
        _evaluate("olmoe_bh", args, task_manager, limit=12, batch_size=bs)["config"]["routing"]
        for bs in (1, 8, "auto")
    ]
    for other in stats[1:]:
        assert other["tokens"] == stats[0]["tokens"]
        assert other["k_histogram"] == stats[0]["k_histogram"]
        assert other["per_task"] == stats[0]["per_task"]
        assert other["mean_experts_per_token"] == pytest.approx(stats[0]["mean_experts_per_token"], abs=1e-12)


def test_fixed_top_k_matches_hf(tiny_model_dir, task_manager):
    hf = _evaluate("hf", f"pretrained={tiny_model_dir}", task_manager, batch_size=4)
    bh = _evaluate("olmoe_bh", f"pretrained={tiny_model_dir},min_k=4,max_k=4", task_manager, batch_size=4)
    for task, metrics in hf["results"].items():
        assert bh["results"][task]["acc,none"] == metrics["acc,none"]
    assert bh["config"]["routing"]["mean_experts_per_token"] == 4.0


def test_analyze_mode_matches_hf_and_reports_bh_counts(tiny_model_dir, task_manager):
    hf = _evaluate("hf", f"pretrained={tiny_model_dir}", task_manager)
    analyzed = _evaluate("olmoe_bh", f"pretrained={tiny_model_dir},alpha=0.2,mode=analyze", task_manager)
    assert analyzed["results"] == hf["results"]
    assert 1 <= analyzed["config"]["routing"]["mean_experts_per_token"] < 4


def test_generation_stats_are_batch_size_invariant(tiny_model_dir):
    """Rows that finished early in a batch keep decoding; those tokens must not be counted."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    prompts = ["Question: what is 2+2?", "The capital of France is", "Once upon a time there", "A"]
    totals, texts = [], []
    for batch_size in (1, 4):
        lm = get_model("olmoe_bh").create_from_arg_string(
            f"pretrained={tiny_model_dir},alpha=0.2,batch_size={batch_size}", {"device": "cpu"}
        )
        requests = [
            Instance("generate_until", None, (p, {"until": ["e"], "max_gen_toks": 8, "do_sample": False}), i,
                     metadata=("gen_task", i, 1))
            for i, p in enumerate(prompts)
        ]
        texts.append(lm.generate_until(requests))
        totals.append(lm.get_model_info()["routing"]["per_task"]["gen_task"])
    assert texts[0] == texts[1]
    assert totals[0] == totals[1]
    assert totals[0]["tokens"] > 0


BAD_ARGS = [
    ("alpha=1.5", "alpha must be in (0, 1)"),
    ("alpha=0", "alpha must be in (0, 1)"),
    ("min_k=0", "min_k must be an integer >= 1"),
    ("min_k=-1", "min_k must be an integer >= 1"),
    ("min_k=2.5", "min_k must be an integer"),
    ("min_k=4,max_k=2", "max_k must be an integer >= min_k"),
    ("temperature=0", "temperature must be a finite number > 0"),
    ("alpha=1e-320", "alpha must be at least 1.18e-38"),
    ("temperature=1e-45", "temperature must be between 1.18e-38 and 3.4e+38"),
    ("pvalue=bogus", "pvalue must be one of"),
    ("mode=bogus", "mode must be one of"),
    ("selection=bogus", "selection must be one of"),
    ("top_p=1.5", "top_p must be in (0, 1]"),
    ("pvalue=calibrated", "calibration must be set to a file"),
    ("pvalue=calibrated,calibration=/nonexistent.json", "calibration file not found"),
    ("renormalize=maybe", "renormalize must be true or false"),
]


@pytest.mark.parametrize("args,message", BAD_ARGS)
def test_bad_routing_args_fail_before_loading(args, message):
    from lm_eval.api.registry import get_model

    from lm_eval_bh import RoutingError

    with pytest.raises(RoutingError) as err:  # the path does not exist: validation must come first
        get_model("olmoe_bh").create_from_arg_string(f"pretrained=/nonexistent/model,{args}", {"device": "cpu"})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_bounds_against_the_model_fail_before_weights_load(tiny_model_dir, monkeypatch):
    from lm_eval.api.registry import get_model
    from lm_eval.models.huggingface import HFLM

    from lm_eval_bh import RoutingError

    monkeypatch.setattr(HFLM, "_create_model", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(RoutingError, match="max_k must be between min_k and the number of experts"):
        get_model("olmoe_bh").create_from_arg_string(f"pretrained={tiny_model_dir},max_k=17", {"device": "cpu"})


def test_cli_error_is_one_line(lm_eval_cli):
    proc = lm_eval_cli["bad_alpha"]
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: alpha must be in (0, 1), got 2.0"


def test_non_moe_model_is_a_clear_error(tmp_path):
    from lm_eval.api.registry import get_model
    from transformers import LlamaConfig

    from lm_eval_bh import RoutingError

    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(tmp_path)
    with pytest.raises(RoutingError, match="'llama' model, which has no supported MoE router"):
        get_model("olmoe_bh").create_from_arg_string(f"pretrained={tmp_path}", {"device": "cpu"})


def test_moe_bh_evaluates_another_family(tmp_path, task_manager):
    """The generic `moe_bh` name on a tiny Qwen2-MoE (shared expert) saved with the shipped tokenizer."""
    from test_families import build
    from transformers import AutoTokenizer

    from lm_eval_bh.tiny import ASSETS_TOKENIZER

    tokenizer = AutoTokenizer.from_pretrained(ASSETS_TOKENIZER)
    model = build("qwen2_moe")
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    out = _evaluate("moe_bh", f"pretrained={tmp_path},alpha=0.3", task_manager, tasks=["mmlu_dev_offline"])
    routing = out["config"]["routing"]
    assert routing["model"]["num_experts"] == 16
    assert 1 < routing["mean_experts_per_token"] < 4


def test_moe_bh_needs_pretrained():
    from lm_eval.api.registry import get_model

    from lm_eval_bh import RoutingError

    with pytest.raises(RoutingError, match="moe_bh needs pretrained"):
        get_model("moe_bh").create_from_arg_string("alpha=0.1", {"device": "cpu"})


def test_olmoe_bh_defaults_to_olmoe_1b_7b(monkeypatch):
    """`lm_eval --model olmoe_bh --model_args alpha=0.05` loads OLMoE-1B-7B-0924 (stopped at its config:
    the hub cannot be reached here)."""
    from lm_eval.api.registry import get_model
    from lm_eval.models.huggingface import HFLM

    class Loaded(Exception):
        pass

    def fake_get_config(self, pretrained, **kwargs):
        raise Loaded(pretrained)

    monkeypatch.setattr(HFLM, "_get_config", fake_get_config)
    with pytest.raises(Loaded, match="^allenai/OLMoE-1B-7B-0924$"):
        get_model("olmoe_bh").create_from_arg_string("alpha=0.05", {"device": "cpu"})


# --- lm-eval's request cache, and the routing table without --output_path ---------------------

def test_use_cache_is_refused_before_any_request(lm_eval_cli):
    """lm-eval's cache keys a request on the request alone: after a run that filled it (here the stock
    model), a routed run with the same cache would get the stock answers and count no tokens."""
    import sqlite3

    before = lm_eval_cli["cache_rows"]
    assert len(before) == 4 * 4  # 4 questions x 4 choices
    refused = lm_eval_cli["use_cache"]
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith("error: --use_cache cannot be used with adaptive routing")
    assert "Cached requests" not in refused.stderr
    with sqlite3.connect(lm_eval_cli["root"] / "cache_rank0.db") as con:
        assert con.execute('SELECT key, value FROM "unnamed" ORDER BY key').fetchall() == before
    # the same command line without --use_cache runs: test_python_m_lm_eval_finds_olmoe_bh_and_prints_...


def test_use_cache_is_refused_from_python(tiny_model_dir, task_manager, tmp_path):
    from lm_eval_bh import RoutingError

    with pytest.raises(RoutingError, match="^--use_cache cannot be used"):
        _evaluate("olmoe_bh", f"pretrained={tiny_model_dir},alpha=0.5", task_manager, use_cache=str(tmp_path / "c"))


# --- first contact: typos and unreachable models are one line, before any weights load --------

def test_cli_typo_of_a_routing_argument_names_the_closest_one(lm_eval_cli):
    proc = lm_eval_cli["typo"]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown model_arg 'alpah': did you mean 'alpha'?")


@pytest.mark.parametrize("typo, meant", [("min-k", "min_k"), ("maxk", "max_k"), ("temprature", "temperature"),
                                         ("selction", "selection")])
def test_routing_argument_typos_fail_before_weights_load(tiny_model_dir, monkeypatch, typo, meant):
    from lm_eval.api.registry import get_model
    from lm_eval.models.huggingface import HFLM

    from lm_eval_bh import RoutingError

    monkeypatch.setattr(HFLM, "_create_model", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(RoutingError, match=f"^unknown model_arg '{typo}': did you mean '{meant}'\\?") as err:
        get_model("olmoe_bh").create_from_arg_string(f"pretrained={tiny_model_dir},{typo}=2", {"device": "cpu"})
    assert "\n" not in str(err.value)


def test_genuine_downstream_model_args_pass_through(tiny_model_dir):
    """HFLM (dtype), from_pretrained (trust_remote_code, revision) and config-field (num_experts_per_tok)
    arguments reach the model: the config override changes the top_k that routing resolves against."""
    import torch
    from lm_eval.api.registry import get_model

    lm = get_model("olmoe_bh").create_from_arg_string(
        f"pretrained={tiny_model_dir},dtype=bfloat16,trust_remote_code=False,revision=main,num_experts_per_tok=2",
        {"device": "cpu"},
    )
    assert lm.model.dtype == torch.bfloat16
    assert lm.model.config.num_experts_per_tok == 2
    assert lm.routing.config.max_k == 2


def test_cli_unknown_model_offline_is_one_line_with_the_ways_forward(lm_eval_cli):
    proc = lm_eval_cli["default_model_offline"]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not load the model 'allenai/OLMoE-1B-7B-0924'")
    assert "pretrained=<a local folder" in last and "lm-eval-bh demo" in last


@pytest.mark.parametrize("pretrained, offline, reason", UNLOADABLE)
def test_unloadable_pretrained_fails_fast(lm_eval_cli, pretrained, offline, reason):
    proc = lm_eval_cli[f"unloadable {pretrained} {offline}"]
    seconds, message = proc.stdout.strip().splitlines()
    assert message.startswith(f"could not load the model '{pretrained}'") and reason in message, message
    assert float(seconds) < 30, seconds  # transformers' own retries against an unreachable hub: over a minute


# --- one model_args parser, one default model -------------------------------------------------

def test_model_args_constants_match_the_code_and_are_defined_once():
    import dataclasses

    from lm_eval_bh import model_args
    from lm_eval_bh.config import RoutingConfig

    assert model_args.ROUTING_ARGS == tuple(f.name for f in dataclasses.fields(RoutingConfig))
    package = REPO / "lm_eval_bh"
    for pattern, where in ((f'"{model_args.DEFAULT_PRETRAINED}"', ["model_args.py"]),
                           ("split_top_level(", ["model_args.py"]), ("simple_parse_args_string(", [])):
        users = sorted(str(p.relative_to(package)) for p in package.rglob("*.py") if pattern in p.read_text())
        assert users == where, (pattern, users)


@pytest.mark.parametrize("text", [
    "pretrained=/tmp/m,alpha=0.05,min_k=1,max_k=-1,renormalize=true,revision=None",
    'pretrained=x,layers=[1, 2],stop=["a,b"]',
    '{"pretrained": "x", "alpha": 0.1}',
    "",
])
def test_parse_model_args_reads_model_args_as_the_lm_eval_cli_does(text):
    from lm_eval._cli.run import Run

    from lm_eval_bh.model_args import parse_model_args

    import argparse
    parser = argparse.ArgumentParser()
    Run(parser.add_subparsers())  # lm-eval's own `run` parser
    cli = parser.parse_args(["run", "--model_args", text]).model_args if text else {}
    assert parse_model_args(text) == cli


def test_model_args_module_needs_no_torch():
    proc = _run([sys.executable, "-c", "import sys, lm_eval_bh.model_args as m; m.parse_model_args('a=1'); "
                 "print(sorted({'torch', 'transformers'} & set(sys.modules)))"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_tiny_tokenizer_length_limit_is_the_models(tiny_model_dir):
    """A text longer than the asset tokenizer's old 512 but within the model's positions tokenizes
    without transformers' "indexing errors" warning, and lm-eval uses the model's length."""
    import logging

    from lm_eval.api.registry import get_model
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    positions = AutoConfig.from_pretrained(tiny_model_dir).max_position_embeddings
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.model_max_length == positions == 1024
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    hf_logging.get_logger("transformers").addHandler(handler)
    try:
        ids = tokenizer("ab " * 900)["input_ids"]
    finally:
        hf_logging.get_logger("transformers").removeHandler(handler)
    assert 512 < len(ids) <= positions
    assert not [r for r in records if "indexing errors" in r.getMessage()]
    assert get_model("olmoe_bh").create_from_arg_string(f"pretrained={tiny_model_dir}", {"device": "cpu"}).max_length == positions


def loglikelihood_requests(pairs, task="t"):
    """lm-eval Instances for (context, continuation) pairs, as a task would build them."""
    from lm_eval.api.instance import Instance

    return [Instance("loglikelihood", {}, pair, i, (task, i, 1)) for i, pair in enumerate(pairs)]


def test_real_input_ending_in_token_0_is_counted(tiny_model_dir):
    """lm-eval right-pads with token 0, which is also a real token (here <|endoftext|>): model inputs
    ending in it, in a padded batch, count every real token."""
    from lm_eval.api.registry import get_model

    lm = get_model("olmoe_bh").create_from_arg_string(f"pretrained={tiny_model_dir}", {"device": "cpu", "batch_size": 4})
    pairs = [("The answer is", " foo<|endoftext|>x"), ("Q", " <|endoftext|><|endoftext|>y"),
             ("A much longer context, so that the short rows of the batch are padded", " bar")]
    encoded = [lm._encode_pair(*pair) for pair in pairs]
    assert [(ctx + cont)[-2] for ctx, cont in encoded][:2] == [0, 0]  # the model inputs end in token 0
    lm.loglikelihood(loglikelihood_requests(pairs))
    assert lm.routing.summary()["tokens"] == sum(len(ctx) + len(cont) - 1 for ctx, cont in encoded)


def test_which_counts_are_batch_size_invariant(tiny_model_dir):
    """loglikelihood: lm-eval runs each distinct model input of a call once (requests with the same
    context and continuation[:-1] share a forward), whatever the batch size, so counts are invariant.
    loglikelihood_rolling: lm-eval merges identical windows only within one batch, so two identical
    documents count twice at batch size 1 and once when their windows share a batch."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    pairs = [("Same context", " x"), ("Same context", " x"), ("Same context", " y"), ("Other context", " z w")]
    docs = ["the same document, twice", "the same document, twice", "and a different one"]
    rolling = [Instance("loglikelihood_rolling", {}, (d,), i, ("r", i, 1)) for i, d in enumerate(docs)]
    counts = {}
    for batch_size in (1, 4):
        lm = get_model("olmoe_bh").create_from_arg_string(f"pretrained={tiny_model_dir}",
                                                          {"device": "cpu", "batch_size": batch_size})
        lm.loglikelihood(loglikelihood_requests(pairs, task="ll"))
        lm.loglikelihood_rolling(rolling)
        counts[batch_size] = {task: v["tokens"] for task, v in lm.routing.summary()["per_task"].items()}
    inputs = {tuple((ctx + cont)[:-1]) for ctx, cont in (lm._encode_pair(*pair) for pair in pairs)}
    assert len(inputs) == 2
    assert counts[1]["ll"] == counts[4]["ll"] == sum(len(i) for i in inputs)
    same, other = (len(lm.tok_encode(d)) for d in docs[1:])  # one window each: prefix + tokens[:-1]
    assert counts[1]["r"] == 2 * same + other
    assert counts[4]["r"] == same + other
