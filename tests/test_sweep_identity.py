"""The identity of a sweep's evaluation: each field that changes a number, changed alone on resume, is a
one-line refusal naming it; the same evaluation from copies elsewhere is resumed; sweeps of different
evaluations refuse each other on one folder. In this process through the command's entry point (a
finished sweep is resumed before anything loads), with real lm-eval and transformers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

from lm_eval_bh.cli import main
from lm_eval_bh.commands import identity as I
from lm_eval_bh.commands.claims import evaluation_lock

ROOT = Path(__file__).resolve().parents[1]
TASK = "mmlu_dev_offline"
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"


def _argv(model: Path, tasks: Path, out: Path, *extra: str, model_args: str = "", limit: str | None = "2") -> list[str]:
    return ["sweep", "--model_args", f"pretrained={model}{model_args}", "--tasks", TASK, "--include_path", str(tasks),
            *(["--limit", limit] if limit else []), "--device", "cpu", "--bootstrap_iters", "0",
            "--selections", "topk", "--topk", "1", "--output_path", str(out),
            "--apply_chat_template", "--system_instruction", "Answer briefly.", *extra]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir):
    """A finished sweep (one setting, a chat template applied) and the model and tasks it ran on."""
    import logging

    root = tmp_path_factory.mktemp("identity")
    model, tasks, out = root / "model", root / "tasks", root / "sweep"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").write_text(TEMPLATE)
    shutil.copytree(ROOT / "tasks", tasks)
    level = logging.getLogger("lm_eval").level
    try:
        assert main(_argv(model, tasks, out, model_args=",dtype=float32")) == 0
    finally:
        logging.getLogger("lm_eval").setLevel(level)
    identity = json.loads((out / "topk1.json").read_text())["sweep"]["identity"]
    assert identity["apply_chat_template"] is True and identity["fewshot_as_multiturn"] is True
    assert identity["chat_template_sha256"] and identity["system_instruction"] == "Answer briefly."
    assert identity["dtype"] == "float32" and identity["model"]["args"] == {}
    assert set(identity["task_sha256"]) == {TASK} and identity["num_fewshot"] is None and identity["limit"] == 2
    return model, tasks, out


@pytest.fixture
def copies(finished, tmp_path):
    """Copies of the finished sweep's model, tasks and folder, to change one thing in."""
    model, tasks, out = finished
    copied = tmp_path / "model", tmp_path / "tasks", tmp_path / "sweep"
    for src, dst in zip((model, tasks, out), copied):
        shutil.copytree(src, dst)
    return copied


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def test_the_same_evaluation_from_copies_resumes_and_removes_stale_locks(copies, capsys):
    """Copies of the model and tasks in other folders, dtype=auto (the config's float32): nothing to run.
    A lock file left by a sweep killed after finishing its setting is removed."""
    model, tasks, out = copies
    (out / ".topk1.lock").touch()
    assert main(_argv(model, tasks, out, model_args=",dtype=auto")) == 0
    captured = capsys.readouterr()
    assert "1 already done, 0 to run" in captured.err and "olmoe_bh top-1" in captured.out
    assert sorted(f.name for f in out.iterdir()) == ["topk1.json", "topk1.samples.jsonl"]


CHANGES = {  # name: (change the copies (model, tasks) and return extra argv / model_args, what the error names)
    "task prompt": (lambda m, t: _edit(t / "offline/_offline_template_yaml", "Question:", "Q:"),
                    f"task_sha256.{TASK}"),
    "task data file": (lambda m, t: _edit(t / "offline/mmlu_dev.jsonl", '"question": "', '"question": "Say: '),
                       f"task_sha256.{TASK}"),
    "task loader": (lambda m, t: _edit(t / "offline/loader.py", "import json", "import json  # edited"),
                    f"task_sha256.{TASK}"),
    "another --include_path": (lambda m, t: _edit(t / "offline/mmlu_dev_offline.yaml", "mmlu_dev_offline\n",
                                                  "mmlu_dev_offline\nnum_fewshot: 1\n"), f"task_sha256.{TASK}"),
    "tasks": (lambda m, t: ["--tasks", f"{TASK},bigbench_strategyqa_offline"], "tasks: ["),
    "tokenizer file": (lambda m, t: _edit(m / "tokenizer_config.json", "{", '{"model_max_length": 77,'),
                       "model.tokenizer_sha256"),
    "generation_config.json": (lambda m, t: _edit(m / "generation_config.json", '"use_cache": true', '"use_cache": false'),
                               "model.generation_config_sha256"),
    "chat template": (lambda m, t: _edit(m / "chat_template.jinja", "assistant:", "Assistant:"), "chat_template_sha256"),
    "weights": (lambda m, t: _flip_last_byte(next(m.glob("*.safetensors"))), "model.fingerprint"),
    "--apply_chat_template off": (lambda m, t: "no chat", "apply_chat_template: True -> False"),
    "--fewshot_as_multiturn": (lambda m, t: ["--fewshot_as_multiturn", "false"], "fewshot_as_multiturn: True -> False"),
    "--system_instruction": (lambda m, t: ["--system_instruction", "Think."], "system_instruction: Answer briefly. -> Think."),
    "dtype": (lambda m, t: ",dtype=bfloat16", "dtype: float32 -> bfloat16"),
    "--limit": (lambda m, t: ["--limit", "3"], "limit: 2 -> 3"),
    "no --limit": (lambda m, t: "no limit", "limit: 2 -> (none)"),
    "--num_fewshot": (lambda m, t: ["--num_fewshot", "1"], "num_fewshot: (none) -> 1"),
    "other model_args": (lambda m, t: ",max_length=64", "model.args.max_length: (none) -> 64"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_each_identity_field_changed_alone_is_refused_on_resume(copies, capsys, change):
    model, tasks, out = copies
    mutate, named = CHANGES[change]
    extra = mutate(model, tasks)
    argv = _argv(model, tasks, out, model_args=extra if isinstance(extra, str) and extra.startswith(",") else "",
                 limit=None if extra == "no limit" else "2")
    if extra == "no chat":
        argv = argv[:argv.index("--apply_chat_template")]
    if isinstance(extra, list):
        argv += extra
    before = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert "topk1.json comes from another evaluation" in lines[0] and named in lines[0] and "--overwrite" in lines[0]
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == before  # nothing written, no lock left


def test_another_version_is_refused(copies, capsys, monkeypatch):
    import lm_eval_bh

    model, tasks, out = copies
    monkeypatch.setattr(lm_eval_bh, "__version__", "9.9.9")
    assert main(_argv(model, tasks, out)) == 2
    assert "versions.lm_eval_bh: " in capsys.readouterr().err


def test_hub_ids_are_compared_by_name_and_revision():
    """Two hub ids at the same (here unresolved) revision are different models; the same local files in
    two folders are one."""
    a = I.evaluation_identity("org/model-a", {}, ["t"], 2, None)
    b = I.evaluation_identity("org/model-b", {}, ["t"], 2, None)
    assert a["model"]["revision"] == b["model"]["revision"] == "unresolved"
    assert I.identity_diff(a, b) == ["model.pretrained: org/model-a -> org/model-b"]
    assert I.identity_diff(a, I.evaluation_identity("org/model-a", {}, ["t"], 2, None)) == []


def test_a_sweep_of_another_evaluation_on_a_busy_folder_is_refused(copies, capsys):
    """While a sweep runs on a folder (its evaluation lock held here), a sweep of another evaluation is
    refused in one line naming the difference, and one of the same evaluation shares the folder."""
    model, tasks, out = copies
    running = json.loads((out / "topk1.json").read_text())["sweep"]["identity"]
    running.pop("routing")
    with evaluation_lock(out, {**running, "limit": 5}):
        assert main(_argv(model, tasks, out, "--overwrite")) == 2
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if "error" in ln]
        assert len(lines) == 1 and "another sweep of a different evaluation is running" in lines[0]
        assert "limit: 5 -> 2" in lines[0]
    with evaluation_lock(out, running):
        assert main(_argv(model, tasks, out)) == 0
        assert "0 to run" in capsys.readouterr().err
    assert sorted(f.name for f in out.iterdir()) == ["topk1.json", "topk1.samples.jsonl"]


def test_two_sweeps_of_different_limits_started_at_once_one_is_refused(tiny_model_dir, tmp_path):
    """Started together on one empty folder: one runs, the other is refused in one line (by the running
    one's lock, or by its finished file), and never overwrites the other's settings."""
    out = tmp_path / "sweep"
    cmds = [[sys.executable, "-m", "lm_eval_bh.cli",
             *_argv(tiny_model_dir, ROOT / "tasks", out, limit=limit)[:-3]] for limit in ("1", "2")]
    env = dict(subprocess_env(), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    outs = [p.communicate(timeout=400) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [e[-2000:] for _, e in outs]
    refused = next(e for p, (_, e) in zip(procs, outs) if p.returncode == 2)
    lines = [ln for ln in refused.splitlines() if "error" in ln]
    assert len(lines) == 1 and "Traceback" not in refused and "limit: " in lines[0]
    winner = [limit for p, limit in zip(procs, (1, 2)) if p.returncode == 0][0]
    assert json.loads((out / "topk1.json").read_text())["sweep"]["identity"]["limit"] == winner
    assert sorted(f.name for f in out.iterdir()) == ["topk1.json", "topk1.samples.jsonl"]
