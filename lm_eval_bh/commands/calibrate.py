"""``lm-eval-bh calibrate``: fit per-layer null distributions of router logits for ``pvalue=calibrated``.

Runs a transformers MoE model over unlabeled text, captures every MoE layer's router logits with
forward hooks on the routers (``mlp.gate``, or ``mlp.router``; their forward returns
``(router_logits, weights, indices)`` in transformers >= 5.6, or the logits alone for a plain
``nn.Linear`` gate), keeps a bounded uniform sample of them per layer (or per expert, ``--per_expert``)
and writes a calibration file (see lm_eval_bh/calibration.py for the format):

    lm-eval-bh calibrate --model_args pretrained=allenai/OLMoE-1B-7B-0924,dtype=bfloat16 \\
        --device cuda:0 --tasks hellaswag,arc_easy --limit 200 --output olmoe.calib.json

``--under routing`` fits every layer's null while the layers above it route by the routing arguments of
``--model_args`` (e.g. ``alpha=0.05,pvalue=calibrated``), with their own fitted nulls: the null that
setting meets when it is evaluated (lm_eval_bh/autocal.py). ``--under stock`` (the default) runs the
stock routers.

Text comes from ``--text FILE`` (plain text, split into paragraphs at blank lines, or JSON lines
with a "text" field) and/or from the inputs of lm-eval tasks (``--tasks``, ``--include_path``,
``--limit``: the unique contexts of the task's requests, few-shot examples included). Padding
tokens are never counted; documents longer than ``--max_length`` tokens are cut into windows.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import tempfile

import torch

from ..autocal import UNDER, calibrate_model
from ..calibration import save_calibration
from ..corpus import read_texts, token_batches
from ..errors import UsageError
from ..model_args import ROUTING_ARGS, parse_model_args

__all__ = ["add_arguments", "run", "task_texts"]


# --- arguments ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model_args", required=True,
                        help="lm-eval style model arguments: pretrained=NAME_OR_PATH[,dtype=bfloat16][,revision=..]"
                             "[,trust_remote_code=true][,tokenizer=..]; routing arguments (alpha=..,pvalue=..) "
                             "are the setting of --under routing")
    parser.add_argument("--text", action="append", default=[], metavar="FILE",
                        help="unlabeled text: plain text (paragraphs split at blank lines) or .jsonl with a "
                             "'text' field; may be repeated")
    parser.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks whose request contexts to use")
    parser.add_argument("--include_path", default=None, help="extra folder of lm-eval task YAMLs")
    parser.add_argument("--limit", type=float, default=None,
                        help="documents per task (a number < 1 is a fraction of the task), as in lm_eval")
    parser.add_argument("--output", required=True, help="calibration file to write (.json, or .npz)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda:0 if available, else cpu)")
    parser.add_argument("--batch_size", type=int, default=8, help="sequences per forward pass (default 8)")
    parser.add_argument("--max_length", type=int, default=1024, help="tokens per sequence; longer text is cut "
                                                                     "into windows (default 1024)")
    parser.add_argument("--max_tokens", type=int, default=None, help="stop after this many tokens (default: all)")
    parser.add_argument("--per_expert", action="store_true", help="one null per expert instead of one per layer")
    parser.add_argument("--samples", type=int, default=None,
                        help="logits kept per null (default 65536 per layer, 4096 per expert); the fitted null "
                             "and the local fdr come from them, and pvalue=ecdf's p-values are multiples of "
                             "1/(samples+1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random subsample (default 0)")
    parser.add_argument("--under", choices=UNDER, default="stock",
                        help="what the layers above a layer run while its null is fitted: the stock routers "
                             "(default; one pass), or the routing of --model_args with their own fitted nulls "
                             "(one pass per layer, each stopped after that layer)")
    return parser


# --- text sources ------------------------------------------------------------------------------


def task_texts(tasks: str, include_path: str | None = None, limit: float | None = None) -> list[str]:
    """Unique request contexts (few-shot examples included) of lm-eval tasks, in request order."""
    import math

    from lm_eval.tasks import TaskManager

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    try:
        loaded = TaskManager(include_path=include_path).load(names)["tasks"]  # leaf tasks, groups expanded
    except Exception as e:  # lm-eval raises assorted errors for unknown tasks and broken YAMLs
        raise UsageError(f"--tasks {tasks}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    seen: dict[str, None] = {}
    for task in loaded.values():
        n = None
        if limit is not None:
            n = int(math.ceil(len(task.eval_docs) * limit)) if limit < 1.0 else int(limit)
        task.build_all_requests(limit=n, rank=0, world_size=1)
        for inst in task.instances:
            ctx = inst.args[0] if inst.args else None
            if isinstance(ctx, str) and ctx.strip():
                seen.setdefault(ctx, None)
    return list(seen)


# --- the command -------------------------------------------------------------------------------



def _parse_model_args(text: str) -> dict:
    args = parse_model_args(text)
    if not args.get("pretrained"):
        raise UsageError("--model_args must include pretrained=NAME_OR_PATH")
    return args


def _load(model_args: dict, device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = {k: v for k, v in model_args.items() if k not in ROUTING_ARGS}
    pretrained = str(args.pop("pretrained"))
    dtype = args.pop("dtype", args.pop("torch_dtype", "auto"))
    tok_name = args.pop("tokenizer", None) or pretrained
    for ignored in ("batch_size", "max_batch_size", "device", "parallelize", "max_length"):
        args.pop(ignored, None)
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise UsageError(f"dtype must be auto or a torch dtype such as bfloat16, float16, float32; got {dtype!r}")
        dtype = getattr(torch, dtype)
    common = {k: args[k] for k in ("revision", "trust_remote_code") if k in args}
    tokenizer = AutoTokenizer.from_pretrained(tok_name, **common)
    model = AutoModelForCausalLM.from_pretrained(pretrained, dtype=dtype, **args)
    return model.to(device).eval(), tokenizer, pretrained


def _check_output(path: str) -> None:
    """--output must be a file we can write: checked before any model loads or any text runs."""
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        raise UsageError(f"--output must name a calibration file (.json or .npz), not a folder: {path}")
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".lm-eval-bh-write-check-"):
            pass
    except OSError as e:
        raise UsageError(f"--output {path} cannot be written: {e.strerror or e}") from None


def _under(args: argparse.Namespace, model_args: dict):
    """The routing setting of --under routing (from --model_args), or None for the stock routers."""
    from ..config import RoutingConfig
    from ..routing import PVALUES, SELECTIONS

    if args.under == "stock":
        return None
    settings = {k: v for k, v in model_args.items() if k in ROUTING_ARGS and k != "calibration"}
    pvalue, selection = settings.get("pvalue", RoutingConfig.pvalue), settings.get("selection", RoutingConfig.selection)
    if any(getattr(table.get(name), "needs_null", False) for table, name in ((PVALUES, pvalue), (SELECTIONS, selection))):
        settings["calibration"] = "auto"  # the nulls fitted layer by layer stand in for a file
    return RoutingConfig(**settings)


def run(args: argparse.Namespace) -> int:
    _check_output(args.output)
    if not args.text and not args.tasks:
        raise UsageError("give text to calibrate on: --text FILE and/or --tasks TASKS")
    for name in ("batch_size", "max_length"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be an integer >= 1, got {getattr(args, name)}")
    if args.samples is not None and args.samples < 1:
        raise UsageError(f"--samples must be an integer >= 1, got {args.samples}")
    if args.limit is not None and args.limit <= 0:
        raise UsageError(f"--limit must be > 0, got {args.limit}")
    model_args = _parse_model_args(args.model_args)
    under = _under(args, model_args)
    texts = []
    for path in args.text:
        try:
            texts += read_texts(path)
        except UsageError as e:
            raise UsageError(f"--text: {e}") from None
    if args.tasks:
        texts += task_texts(args.tasks, args.include_path, args.limit)
    if not texts:
        raise UsageError("the given --text/--tasks hold no text")
    device = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    model, tokenizer, name = _load(model_args, device)
    batches = list(token_batches(tokenizer, texts, args.max_length, args.batch_size))
    source = {"text": list(args.text), "tasks": args.tasks, "include_path": args.include_path, "limit": args.limit,
              "documents": len(texts), "max_length": args.max_length}
    meta = {"model": name, "model_args": args.model_args, "source": source, "seed": args.seed,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    try:
        import transformers

        from .. import __version__ as version
    except ImportError:  # pragma: no cover
        version = None
    meta["versions"] = {"lm_eval_bh": version, "transformers": transformers.__version__, "torch": torch.__version__}
    cal = calibrate_model(model, batches, per_expert=args.per_expert, samples=args.samples, seed=args.seed,
                          max_tokens=args.max_tokens, meta=meta, under=under)
    save_calibration(args.output, cal)
    m = cal.meta
    print(f"wrote {args.output}: {m['num_layers']} MoE layers x {m['num_experts']} experts, "
          f"{'per-expert' if cal.per_expert else 'per-layer'} nulls (fitted under {args.under}) of {m['samples_per_null']} logits "
          f"from {m['tokens']} tokens; share of non-signal logits (pi0) per layer: "
          f"{', '.join(f'{v:.3f}' for v in cal.fit[..., 2].reshape(len(cal.fit), -1).mean(axis=1))}")
    return 0
