"""``lm-eval-bh``: console entry point (subcommands demo, sweep, report, calibrate).

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args)``.
Only the chosen module is imported (lazily, after parsing), so ``lm-eval-bh --help`` stays fast:
the parsers of the other subcommands are built from their modules only when that subcommand is
the one being run.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import RoutingError, UsageError

PROG = "lm-eval-bh"

SUBCOMMANDS = {
    "demo": ("lm_eval_bh.commands.demo", "top-k curve and BH on the embedded real-weight MoE (CPU, offline, a few minutes)"),
    "sweep": ("lm_eval_bh.commands.sweep", "evaluate a grid of routing settings, loading the model once (resumable)"),
    "report": ("lm_eval_bh.commands.report", "accuracy vs mean experts per token from lm-eval results files"),
    "calibrate": ("lm_eval_bh.commands.calibrate", "fit calibrated router p-values (pvalue=calibrated)"),
    "models": ("lm_eval_bh.commands.models", "list the embedded models; --path NAME prints one's folder (built on first use)"),
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (exit code 2, no usage dump)."""

    def error(self, message):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message}\n")


def _import(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            return None
        raise


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _Parser(prog=PROG, description="Benjamini-Hochberg adaptive expert routing for MoE models, "
                                          "evaluated with lm-evaluation-harness.")
    sub = top.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (_, help_) in SUBCOMMANDS.items():
        # placeholders: the real arguments are added below for the chosen subcommand only
        sub.add_parser(name, help=help_, add_help=False)
    # find the subcommand without building every module's parser
    cmd = next((a for a in argv if not a.startswith("-")), None)
    if cmd is None or cmd not in SUBCOMMANDS:
        if cmd is not None:
            top.error(f"unknown command '{cmd}'; allowed: {', '.join(SUBCOMMANDS)}")
        args = top.parse_args(argv)  # handles --help / no command
        top.print_help()
        return 2
    module_name, help_ = SUBCOMMANDS[cmd]
    module = _import(module_name)
    if module is None:
        print(f"{PROG} {cmd}: error: module {module_name} is not available in this installation", file=sys.stderr)
        return 2
    parser = _Parser(prog=f"{PROG} {cmd}", description=help_)
    module.add_arguments(parser)
    idx = argv.index(cmd)
    args = parser.parse_args(argv[:idx] + argv[idx + 1:])
    try:
        rc = module.run(args)
    except UsageError as e:
        print(f"{PROG} {cmd}: error: {e}", file=sys.stderr)
        return 2
    except RoutingError as e:
        print(f"{PROG} {cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {cmd}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    # run the importable module's main so that UsageError is the same class everywhere
    from lm_eval_bh.cli import main as _main

    sys.exit(_main())
