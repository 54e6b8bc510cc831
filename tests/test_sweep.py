"""lm-eval-bh sweep on tiny models with real lm-eval: kill and resume, identity of every results file,
two sweeps at once on one folder, I/O failures, calibrated settings, and the grid it builds."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import subprocess_env

from lm_eval_bh.commands import report as R
from lm_eval_bh.commands import identity as I
from lm_eval_bh.commands import sweep as S
from lm_eval_bh.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
TASKS = "mmlu_dev_offline,bigbench_strategyqa_offline"


def tiny_model() -> Path:
    if os.environ.get("LM_EVAL_BH_TINY"):  # a prebuilt tiny model folder, if you have one
        return Path(os.environ["LM_EVAL_BH_TINY"])
    from lm_eval_bh.tiny import ensure_tiny_olmoe

    return ensure_tiny_olmoe()


def _sweep_cmd(model: Path, out: Path, *extra: str, tasks=TASKS, limit="3") -> list[str]:
    return [sys.executable, "-m", "lm_eval_bh.cli", "sweep", "--model_args", f"pretrained={model},dtype=float32",
            "--tasks", tasks, "--include_path", str(ROOT / "tasks"), "--limit", limit, "--device", "cpu",
            "--bootstrap_iters", "0", "--output_path", str(out), *extra]


def _run(cmd, timeout=240, env=None, **kw):
    env = dict(subprocess_env(), OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kw)


def _leftovers(out: Path) -> list[str]:
    """Anything in a sweep folder besides results files and their per-sample files."""
    return sorted(f.name for f in out.iterdir() if not (f.name.endswith(".json") or f.name.endswith(".samples.jsonl")))


RESUME_GRID = ("--alphas", "0.01,0.05,0.2,0.5", "--topk", "1,2,4")
RESUME_IDS = {"topk1", "topk2", "topk4"} | {f"bh-zscore_a{a}_k1-4" for a in ("0.01", "0.05", "0.2", "0.5")}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """A sweep killed after its first results file, then restarted: (folder, {first files: mtime},
    the restart's CompletedProcess). Shared by the tests that read or extend a finished sweep."""
    out = tmp_path_factory.mktemp("resumed") / "sweep"
    cmd = _sweep_cmd(tiny_model(), out, *RESUME_GRID)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 150
    try:
        while time.time() < deadline and proc.poll() is None:
            if out.is_dir() and any(out.glob("*.json")):
                break
            time.sleep(0.02)
        assert proc.poll() is None or proc.returncode == 0, proc.stderr.read().decode()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stderr.close()
    first = {p.stem: p.stat().st_mtime_ns for p in out.glob("*.json")}
    return out, first, _run(cmd)  # restart: finishes the rest


def test_sweep_resume_after_kill(resumed):
    out, first, p = resumed
    assert first and set(first) <= RESUME_IDS
    # the restart finishes the rest, skips what is done, leaves no temp or lock files
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"{len(first)} already done" in p.stderr
    # lm-eval's custom-dataset warning: once per task, not once per setting
    assert all(p.stderr.count(f"{t}: Custom kwargs can be passed to `--metadata`") == 1 for t in TASKS.split(","))
    files = sorted(out.glob("*.json"))
    assert {f.stem for f in files} == RESUME_IDS
    assert _leftovers(out) == []  # no .tmp, no .lock
    for sid, mtime in first.items():
        assert (out / f"{sid}.json").stat().st_mtime_ns == mtime  # not recomputed
    for f in files:
        data = json.loads(f.read_text())
        routing = data["config"]["routing"]
        assert set(data["results"]) >= set(TASKS.split(","))
        assert data["config"]["use_cache"] is None and data["config"]["model"] == "olmoe_bh"
        assert routing["settings"]["max_k"] == (4 if "bh" in f.stem else int(f.stem[4:]))
        if f.stem.startswith("topk"):
            assert routing["mean_experts_per_token"] == pytest.approx(int(f.stem[4:]))
        else:
            assert 1 <= routing["mean_experts_per_token"] <= 4
            assert routing["settings"]["alpha"] == float(f.stem.split("_a")[1].split("_")[0])
        identity = data["sweep"]["identity"]
        assert identity["limit"] == 3 and identity["tasks"] == TASKS.split(",") and identity["num_fewshot"] is None
        assert len(identity["model"]["fingerprint"]) == 64 and identity["model"]["args"] == {}
        assert identity["dtype"] == "float32" and set(identity["task_sha256"]) == set(TASKS.split(","))
        assert set(identity["versions"]) == {"lm_eval_bh", "lm_eval", "transformers"}
        # the per-sample outputs: 3 items per task, with their per-item metric
        samples = [json.loads(x) for x in (out / f"{f.stem}.samples.jsonl").read_text().splitlines()]
        assert sorted((s["task"], s["doc_id"]) for s in samples) == sorted(
            (t, i) for t in TASKS.split(",") for i in range(3))
        assert all("acc" in s and "doc" not in s for s in samples)
    # a third run has nothing to do and reports the table, with paired standard errors
    done = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    p = _run(_sweep_cmd(tiny_model(), out, *RESUME_GRID), timeout=120)
    assert p.returncode == 0 and "0 to run" in p.stderr and "bh/zscore alpha=0.05 k=1..4" in p.stdout
    assert "se: paired" in p.stdout and "(unpaired)" not in p.stdout
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == done


def test_resume_identity_full_disk_and_overwrite(resumed, tmp_path):
    """Another --limit into the same folder is a one-line error naming what differs; a full disk is a
    one-line error naming the file, and leaves no partial results; --overwrite re-runs; the final table
    shows the grid asked for, not other files of the folder."""
    model = tiny_model()
    out = tmp_path / "sweep"
    shutil.copytree(resumed[0], out)  # limit 3
    base = ("--selections", "topk", "--topk", "1")
    old = (out / "topk1.json").read_bytes()
    p = _run(_sweep_cmd(model, out, *base, limit="2"))
    errors = [ln for ln in p.stderr.splitlines() if "error" in ln]
    assert p.returncode == 2 and len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "topk1.json" in errors[0] and "limit: 3 -> 2" in errors[0] and "--overwrite" in errors[0]

    # a full disk (file size limit: the first file written fails), with --overwrite
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000)); "
            "from lm_eval_bh.cli import main; sys.exit(main(sys.argv[1:]))")
    cmd = _sweep_cmd(model, out, *base, "--overwrite", limit="2")
    p = _run([sys.executable, "-c", code, *cmd[3:]])
    errors = [ln for ln in p.stderr.splitlines() if "error" in ln]
    assert p.returncode == 2 and len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "cannot write" in errors[0] and str(out / "topk1.") in errors[0]
    assert (out / "topk1.json").read_bytes() == old and _leftovers(out) == []

    p = _run(_sweep_cmd(model, out, *base, "--overwrite", limit="2"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((out / "topk1.json").read_text())["sweep"]["identity"]["limit"] == 2
    assert "olmoe_bh top-1" in p.stdout and "top-2" not in p.stdout  # topk2.json (limit 3) is not in this grid
    # report on the whole folder: two evaluations, never mixed
    r = _run([sys.executable, "-m", "lm_eval_bh.cli", "report", str(out)], timeout=120)
    assert r.returncode == 0 and "2 different evaluations" in r.stderr and "limit=2" in r.stdout and "limit=3" in r.stdout


def test_two_sweeps_at_once_run_each_setting_once(tmp_path):
    model = tiny_model()
    out = tmp_path / "sweep"
    cmd = _sweep_cmd(model, out, "--alphas", "0.05,0.5", "--topk", "1,2,4", tasks="mmlu_dev_offline", limit="2")
    env = dict(subprocess_env(), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (so, se) in zip(procs, outs):
        assert p.returncode == 0, se[-3000:]
    ran = [int(se.split(" setting(s) run here")[0].rsplit("sweep: ", 1)[1]) for _, se in outs]
    grid = {"topk1", "topk2", "topk4", "bh-zscore_a0.05_k1-4", "bh-zscore_a0.5_k1-4"}
    assert sum(ran) == len(grid)  # every setting computed exactly once, by one of the two
    assert {f.stem for f in out.glob("*.json")} == grid and _leftovers(out) == []
    for f in out.glob("*.json"):
        assert json.loads(f.read_text())["sweep"]["setting_id"] == f.stem
    for so, _ in outs:  # each prints the complete table, also of the settings the other one ran
        assert all(s in so for s in ("olmoe_bh top-4", "bh/zscore alpha=0.5 k=1..4"))


def test_write_atomic_never_leaves_a_partial_file(tmp_path):
    """A write that fails half-way (a real EFBIG from a file size limit) leaves the old file intact and
    no new or temporary file (a plain open().write() would leave a truncated results file)."""
    code = """
import resource, signal, sys
from pathlib import Path
from lm_eval_bh.commands.claims import write_atomic
from lm_eval_bh.errors import UsageError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
folder = Path(sys.argv[1])
for name in ("new.json", "old.json"):
    try:
        write_atomic(folder / name, '{"results": "' + "x" * 100000 + '"}')
    except UsageError as e:
        print(e)
"""
    (tmp_path / "old.json").write_text('{"results": {}}')
    p = _run([sys.executable, "-c", code, str(tmp_path)], timeout=60)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 2 and all(ln.startswith("cannot write ") for ln in lines)
    assert str(tmp_path / "new.json") in lines[0] and str(tmp_path / "old.json") in lines[1]
    assert sorted(f.name for f in tmp_path.iterdir()) == ["old.json"]
    assert (tmp_path / "old.json").read_text() == '{"results": {}}'


def _tiny_mixtral(folder: Path) -> Path:
    """A tiny Mixtral (not OLMoE) with the embedded tokenizer, saved for lm-eval."""
    import torch
    import transformers

    from lm_eval_bh.tiny import ASSETS_TOKENIZER, _tokenizer_vocab_size

    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=_tokenizer_vocab_size(), hidden_size=32, intermediate_size=16,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     max_position_embeddings=512, num_local_experts=16, num_experts_per_tok=4)
    transformers.MixtralForCausalLM(cfg).eval().save_pretrained(folder)
    for f in ASSETS_TOKENIZER.iterdir():
        shutil.copyfile(f, folder / f.name)
    return folder


def test_calibrated_settings_any_path_and_family_model_name(tmp_path):
    """--calibration takes a path with commas and serves every method that needs a null (calibrated and
    ecdf p-values); a non-OLMoE model runs as moe_bh and is labelled so."""
    import numpy as np

    from lm_eval_bh.calibration import Calibration, save_calibration

    model = _tiny_mixtral(tmp_path / "mixtral")
    cal_dir = tmp_path / "a,b=c"
    cal_dir.mkdir()
    null = np.sort(np.random.default_rng(0).normal(size=(2, 256)).astype(np.float32), axis=-1)
    cal = save_calibration(cal_dir / "cal,1.json", Calibration(null, {"model": "mixtral", "num_experts": 16}))
    out = tmp_path / "sweep"
    p = _run(_sweep_cmd(model, out, "--pvalues", "zscore,calibrated,ecdf", "--calibration", str(cal), "--alphas", "0.2",
                        "--topk", "1", tasks="mmlu_dev_offline", limit="2"))
    assert p.returncode == 0, p.stderr[-3000:]
    files = {f.stem: f for f in out.glob("*.json")}
    calibrated = next(sid for sid in files if sid.startswith("bh-calibrated_a0.2_k1-4_cal-cal_1-"))
    ecdf = next(sid for sid in files if sid.startswith("bh-ecdf_a0.2_k1-4_cal-cal_1-"))
    assert set(files) == {"topk1", "bh-zscore_a0.2_k1-4", calibrated, ecdf}
    assert json.loads(files[ecdf].read_text())["config"]["routing"]["settings"]["pvalue"] == "ecdf"
    data = json.loads(files[calibrated].read_text())
    assert data["config"]["model"] == "moe_bh" and data["config"]["routing"]["settings"]["calibration"] == str(cal)
    assert data["sweep"]["identity"]["routing"]["calibration_sha256"]
    zs = json.loads((out / "bh-zscore_a0.2_k1-4.json").read_text())["config"]["routing"]["settings"]
    assert zs["calibration"] is None and zs["pvalue"] == "zscore"
    assert "moe_bh top-1" in p.stdout and "olmoe_bh" not in p.stdout
    assert "bh/calibrated alpha=0.2 k=1..4 renorm cal=cal,1.json" in p.stdout  # Mixtral renormalizes


def _args(**kw):
    parser = argparse.ArgumentParser()
    S.add_arguments(parser)
    argv = ["--tasks", "t", "--output_path", "o"]
    for k, v in kw.items():
        argv += [f"--{k}", v]
    return parser.parse_args(argv)


def test_grid_has_distinct_settings_and_labels_name_only_what_applies():
    grid = S.build_grid(_args(selections="bh,topp,topk", pvalues="zscore,softmax", alphas="0.05,0.2",
                              top_ps="0.5", topk="2"), top_k=4, num_experts=16, base_routing={"temperature": "2"})
    ids = [sid for sid, _ in grid]
    assert ids == ["topk2",
                   "bh-zscore_a0.05_k1-4", "bh-zscore_a0.2_k1-4", "bh-softmax_a0.05_k1-4_T2", "bh-softmax_a0.2_k1-4_T2",
                   "topp_p0.5_k1-4"]  # top-p once: it reads neither alpha nor the p-values
    labels = {sid: R._setting_label({**r, "mode": "patch"})[0] for sid, r in grid}
    assert labels["topp_p0.5_k1-4"] == "topp top_p=0.5 k=1..4"
    assert labels["bh-zscore_a0.05_k1-4"] == "bh/zscore alpha=0.05 k=1..4"  # zscore ignores the temperature
    assert labels["bh-softmax_a0.2_k1-4_T2"] == "bh/softmax alpha=0.2 k=1..4 T=2"
    assert labels["topk2"] == "olmoe_bh top-2"
    # the same setting reached twice (min_k = max_k makes every rule top-k) is run once
    grid = S.build_grid(_args(min_k="4", topk="4", alphas="0.05,0.2"), top_k=4, num_experts=16, base_routing={})
    assert [sid for sid, _ in grid] == ["topk4"]


def test_lfdr_crossed_with_zscore_reads_the_calibration_and_ignores_the_pvalues():
    """lfdr reads the null: crossed with zscore it runs with the calibration (the p-values only order
    the experts, so with calibrated p-values it is another setting); BH with zscore takes none."""
    cal = __file__  # any existing file: the grid does not read it
    grid = dict(S.build_grid(_args(selections="bh,lfdr", pvalues="zscore,calibrated", alphas="0.2", topk="none",
                                   calibration=cal), top_k=4, num_experts=16, base_routing={}))
    lfdr = [sid for sid in grid if sid.startswith("lfdr")]
    assert [sid.split("_cal-")[0] for sid in lfdr] == ["lfdr_a0.2_k1-4", "lfdr-calibrated_a0.2_k1-4"]
    assert all(grid[sid]["calibration"] == cal for sid in lfdr)
    assert "calibration" not in grid["bh-zscore_a0.2_k1-4"]
    assert grid[next(s for s in grid if s.startswith("bh-calibrated"))]["calibration"] == cal


def test_analyze_mode_grid_has_no_fixed_baselines():
    grid = S.build_grid(_args(alphas="0.05"), top_k=4, num_experts=16, base_routing={"mode": "analyze"})
    assert [sid for sid, _ in grid] == ["analyze_bh-zscore_a0.05_k1-4"]
    with pytest.raises(UsageError, match="--topk: mode=analyze"):
        S.build_grid(_args(topk="1,2"), top_k=4, num_experts=16, base_routing={"mode": "analyze"})


@pytest.fixture
def lm_eval_logging():
    """Restore the lm-eval loggers that an in-process sweep quiets."""
    import logging

    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm_eval.api.task")]
    saved = [(lg.level, list(lg.filters)) for lg in loggers]
    yield
    for lg, (level, filters) in zip(loggers, saved):
        lg.setLevel(level)
        lg.filters[:] = filters


@pytest.mark.parametrize("extra, flag", [
    (["--alphas", "0.05,1.5"], "--alphas"),
    (["--pvalues", "bogus"], "--pvalues"),
    (["--pvalues", "calibrated"], "--calibration: --pvalues calibrated, --pvalues ecdf, --selections lfdr need"),
    (["--selections", "lfdr"], "--calibration: --pvalues calibrated"),
    (["--calibration", __file__], "--calibration is only used with --pvalues calibrated, --pvalues ecdf"),
    (["--calibration", "/no/such,file.json", "--pvalues", "calibrated"], "--calibration"),
    (["--topk", "0"], "--topk"),
    (["--model_args", "alpha=0.1"], "--model_args"),
    (["--model_args", "calibration=x.json"], "--calibration"),
    (["--tasks", "mmlu_dev_offline,no_such_task"], "--tasks: unknown task(s) no_such_task"),
])
def test_sweep_bad_input_is_one_line(tmp_path, capsys, lm_eval_logging, extra, flag):
    """Through the command's entry point, in this process (the subprocess path of the same one-line
    errors: test_resume_identity_full_disk_and_overwrite); nothing is written."""
    from lm_eval_bh.cli import main

    rc = main(_sweep_cmd(tiny_model(), tmp_path / "o")[3:] + extra)
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    lines = [ln for ln in err.splitlines() if "error" in ln]
    assert len(lines) == 1 and flag in lines[0] and lines[0].startswith("lm-eval-bh sweep: error: ")
    assert not (tmp_path / "o").exists()


def test_identity_of_a_local_model_is_its_files(tmp_path):
    """The same model files in another folder are the same model; one changed weight byte is not."""
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_model(), a)
    shutil.copytree(a, b)
    ident = lambda m, limit=3: I.evaluation_identity(str(m), {"dtype": "float32"}, ["t"], limit, None)  # noqa: E731
    assert I.identity_diff(ident(a), ident(b)) == []
    assert I.identity_diff(ident(a), ident(b, limit=4)) == ["limit: 3 -> 4"]
    weights = next(b.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert [d.split(":")[0] for d in I.identity_diff(ident(a), ident(b))] == ["model.fingerprint", "model.pretrained"]
    assert I.identity_diff(None, ident(a)) == ["no identity recorded (written by an older lm-eval-bh or another tool)"]


def test_stale_lock_files_of_finished_settings_are_removed(tmp_path):
    """A sweep killed between writing a setting's results and removing its lock file leaves the file; the
    next sweep removes it unless a live sweep holds it."""
    import fcntl

    from lm_eval_bh.commands.claims import remove_stale_claims

    (tmp_path / ".a.lock").touch()
    held = os.open(tmp_path / ".b.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        remove_stale_claims(tmp_path, ["a", "b", "c"])
        assert not (tmp_path / ".a.lock").exists() and (tmp_path / ".b.lock").exists()
    finally:
        os.close(held)


def _fifo(out: Path, name: str) -> None:
    out.mkdir()
    os.mkfifo(out / name)


def _deep_json(out: Path) -> None:
    out.mkdir()
    (out / "topk1.json").write_text("[" * 200_000 + "]" * 200_000)


def _read_only(out: Path) -> None:
    try:  # /sys refuses new files even to root (a chmod'ed folder would not)
        os.close(os.open("/sys/.lm_eval_bh_probe", os.O_RDWR | os.O_CREAT))
        os.unlink("/sys/.lm_eval_bh_probe")
        pytest.skip("/sys is writable here")
    except OSError:
        pass


@pytest.mark.parametrize("case, prepare, extra, named", [
    ("read-only folder", _read_only, ["--output_path", "/sys"], "--output_path: cannot write in /sys"),
    ("no such GPU", None, None, "--device: cuda:"),
    ("FIFO results file", lambda out: _fifo(out, "topk1.json"), [], "topk1.json is not a regular file"),
    ("FIFO samples file", lambda out: _fifo(out, "topk1.samples.jsonl"), [], "topk1.samples.jsonl is not a regular file"),
    ("deeply nested results file", _deep_json, [], "nested too deeply"),
    ("accelerate launch", None, [], "WORLD_SIZE=2"),
])
def test_unusable_folder_device_files_or_launcher_are_one_line(tmp_path, capsys, monkeypatch, lm_eval_logging,
                                                               case, prepare, extra, named):
    """No traceback and no hang (a FIFO read would block forever: an alarm turns a hang into a failure)."""
    import signal

    import torch

    from lm_eval_bh.cli import main

    out = tmp_path / "o"
    if prepare:
        prepare(out)
    if extra is None:
        extra = ["--device", f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}"]
    if case == "accelerate launch":
        monkeypatch.setenv("WORLD_SIZE", "2")
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the sweep hangs"))
    signal.alarm(120)
    try:
        rc = main(_sweep_cmd(tiny_model(), out, "--selections", "topk", "--topk", "1")[3:] + extra)
    finally:
        signal.alarm(0)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error" in ln]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert named in lines[0] and lines[0].startswith("lm-eval-bh sweep: error: ")


def test_calibration_auto_or_a_text_file_is_fitted_per_setting_and_recorded(tmp_path):
    """--calibration auto and a text file, as lm-eval's calibration= model_arg: each setting that needs a null
    takes it, fits it at load (a text file: a real sweep, its provenance in the results), and its identity
    records what the null is fitted on (the documents' hash), so an edited text is another evaluation."""
    from lm_eval_bh.corpus import CORPUS, builtin_texts, corpus_hash

    grid = dict(S.build_grid(_args(pvalues="zscore,calibrated", alphas="0.2", topk="none", calibration="auto"),
                             top_k=4, num_experts=16, base_routing={}))
    auto = next(sid for sid in grid if sid.startswith("bh-calibrated_a0.2_k1-4_cal-auto-"))
    assert grid[auto]["calibration"] == "auto" and "calibration" not in grid["bh-zscore_a0.2_k1-4"]
    routing = I.setting_identity({}, grid[auto])["routing"]
    assert routing["calibration_corpus"] == CORPUS["name"]
    assert routing["calibration_corpus_sha256"] == corpus_hash(builtin_texts())
    S.check_calibration("auto")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(UsageError, match="--calibration: .*empty.txt holds no text"):
        S.check_calibration(str(tmp_path / "empty.txt"))

    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the router picks a few experts for each token it sees, "
                                "and a null fitted on plain text says how large an unremarkable logit is." for i in range(6)))
    out = tmp_path / "sweep"
    env = {"LM_EVAL_BH_CACHE": str(tmp_path / "cache")}  # fitted here, not read from another run's cache
    p = _run(_sweep_cmd(tiny_model(), out, "--pvalues", "calibrated", "--calibration", str(text), "--alphas", "0.2",
                        "--topk", "none", tasks="mmlu_dev_offline", limit="1"), env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    (f,) = out.glob("*.json")
    assert f.stem.startswith("bh-calibrated_a0.2_k1-4_cal-notes-")
    data = json.loads(f.read_text())
    prov = data["config"]["routing"]["calibration"]
    assert prov["source"] == "text" and prov["status"] == "fitted" and prov["under"] == "routing"
    recorded = data["sweep"]["identity"]["routing"]
    assert recorded["calibration"] == str(text) and recorded["calibration_corpus"] == "notes.txt"
    assert recorded["calibration_corpus_sha256"] == prov["corpus_sha256"]
    text.write_text(text.read_text() + "\n\nOne more paragraph.")
    grid = S.build_grid(_args(pvalues="calibrated", alphas="0.2", topk="none", calibration=str(text)),
                        top_k=4, num_experts=16, base_routing={})
    assert [sid for sid, _ in grid] == [f.stem]  # the same setting, another evaluation of it
    assert I.identity_diff(recorded, I.setting_identity({}, grid[0][1])["routing"]) == [
        f"calibration_corpus_sha256: {recorded['calibration_corpus_sha256'][:12]}… -> "
        f"{I.setting_identity({}, grid[0][1])['routing']['calibration_corpus_sha256'][:12]}…"]
