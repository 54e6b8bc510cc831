"""``lm-eval-bh calibrate``: fit per-layer null distributions of router logits for ``pvalue=calibrated``.

Runs a transformers MoE model over unlabeled text, captures every MoE layer's router logits with
forward hooks on the routers (``mlp.gate``, or ``mlp.router``; their forward returns
``(router_logits, weights, indices)`` in transformers >= 5.6, or the logits alone for a plain
``nn.Linear`` gate), keeps a bounded uniform sample of them per layer (or per expert, ``--per_expert``)
and writes a calibration file (see lm_eval_bh/calibration.py for the format):

    lm-eval-bh calibrate --model_args pretrained=allenai/OLMoE-1B-7B-0924,dtype=bfloat16 \\
        --device cuda:0 --tasks hellaswag,arc_easy --limit 200 --output olmoe.calib.json

Text comes from ``--text FILE`` (plain text, split into paragraphs at blank lines, or JSON lines
with a "text" field) and/or from the inputs of lm-eval tasks (``--tasks``, ``--include_path``,
``--limit``: the unique contexts of the task's requests, few-shot examples included). Padding
tokens are never counted; documents longer than ``--max_length`` tokens are cut into windows.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
from typing import Iterable

import torch

from ..corpus import token_batches  # noqa: F401 (re-exported)
from ..errors import UsageError
from ..model_args import ROUTING_ARGS, parse_model_args
from ..calibration import Calibration, NullSampler, layers_fingerprint, save_calibration
from ..families import find_moe_layers
from ..errors import RoutingError

__all__ = ["add_arguments", "run", "calibrate_model", "find_routers", "read_texts", "task_texts", "token_batches"]


# --- arguments ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model_args", required=True,
                        help="lm-eval style model arguments: pretrained=NAME_OR_PATH[,dtype=bfloat16][,revision=..]"
                             "[,trust_remote_code=true][,tokenizer=..]; routing arguments are ignored")
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
    return parser


# --- text sources ------------------------------------------------------------------------------


def read_texts(path: str) -> list[str]:
    """Documents of a text file: JSON lines with a "text" field, or paragraphs of plain text."""
    if not os.path.isfile(path):
        raise UsageError(f"--text file not found: {path}")
    with open(path, encoding="utf-8") as f:
        content = f.read()
    first = next((line for line in content.splitlines() if line.strip()), "")
    if path.endswith(".jsonl") or first.lstrip().startswith("{"):
        texts = []
        for n, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"--text {path}: line {n} is not JSON ({e.msg})") from None
            if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
                raise UsageError(f"--text {path}: line {n} has no string field 'text'")
            texts.append(doc["text"])
        return [t for t in texts if t.strip()]
    return [p.strip() for p in content.replace("\r\n", "\n").split("\n\n") if p.strip()]


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


# --- collection --------------------------------------------------------------------------------


def find_routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The router of every MoE block the routing patch supports, in model order."""
    return [layer.router for layer in find_moe_layers(model)]


@torch.inference_mode()
def calibrate_model(
    model: torch.nn.Module,
    batches: Iterable,
    *,
    per_expert: bool = False,
    samples: int | None = None,
    seed: int = 0,
    max_tokens: int | None = None,
    progress: bool = True,
    total_tokens: int | None = None,
    meta: dict | None = None,
) -> Calibration:
    """Run `model` over `batches` (input_ids, or (input_ids, attention_mask) pairs) and return the
    calibration of its routers' logits. Padding positions (mask 0) are not counted."""
    from tqdm.auto import tqdm

    layers = find_moe_layers(model)  # a clear RoutingError when there is none
    routers = [layer.router for layer in layers]
    num_experts = routers[0].num_experts
    size = samples if samples is not None else (4096 if per_expert else 65536)
    sampler = NullSampler(len(routers), num_experts, size=size, per_expert=per_expert, seed=seed)
    state: dict = {"mask": None}

    def hook(i):
        def fn(module, args, output):
            logits = output[0] if isinstance(output, (tuple, list)) else output
            logits = logits.reshape(-1, logits.shape[-1])
            if logits.shape[-1] != num_experts:
                raise RoutingError(f"router {i} returned {logits.shape[-1]} logits per token, expected {num_experts}")
            mask = state["mask"]
            if mask is not None and mask.numel() == logits.shape[0]:
                logits = logits[mask.to(logits.device)]
            sampler.add(i, logits)

        return fn

    base = getattr(model, getattr(model, "base_model_prefix", ""), None) or model  # skip the LM head
    device = next(model.parameters()).device
    handles = [r.register_forward_hook(hook(i)) for i, r in enumerate(routers)]
    seen = 0
    bar = tqdm(total=max_tokens or total_tokens, unit="tok", desc="calibrate", disable=not progress)
    try:
        for batch in batches:
            ids, mask = batch if isinstance(batch, (tuple, list)) else (batch, None)
            if mask is None:
                mask = torch.ones_like(ids)
            if max_tokens is not None:
                left = max_tokens - seen
                if left <= 0:
                    break
                # keep whole rows of the batch until the token budget is spent
                cum = mask.sum(dim=1).cumsum(0)
                keep = int((cum - mask.sum(dim=1) < left).sum())
                ids, mask = ids[:keep], mask[:keep]
            state["mask"] = mask.reshape(-1).bool()
            base(input_ids=ids.to(device), attention_mask=mask.to(device))
            n = int(mask.sum())
            seen += n
            bar.update(n)
    finally:
        for h in handles:
            h.remove()
        bar.close()
    info = {"num_layers": len(routers), "num_experts": num_experts, "router_fingerprint": layers_fingerprint(layers)}
    top_k = getattr(routers[0], "top_k", None)
    if isinstance(top_k, int):
        info["top_k"] = top_k
    cfg = getattr(model, "config", None)
    if cfg is not None:
        info["model_type"] = getattr(cfg, "model_type", None)
        info.setdefault("model", getattr(cfg, "_name_or_path", None) or None)
    return sampler.calibration({**info, **(meta or {})})


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


def run(args: argparse.Namespace) -> int:
    if not args.text and not args.tasks:
        raise UsageError("give text to calibrate on: --text FILE and/or --tasks TASKS")
    for name in ("batch_size", "max_length"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be an integer >= 1, got {getattr(args, name)}")
    if args.samples is not None and args.samples < 1:
        raise UsageError(f"--samples must be an integer >= 1, got {args.samples}")
    if args.limit is not None and args.limit <= 0:
        raise UsageError(f"--limit must be > 0, got {args.limit}")
    texts = []
    for path in args.text:
        texts += read_texts(path)
    if args.tasks:
        texts += task_texts(args.tasks, args.include_path, args.limit)
    if not texts:
        raise UsageError("the given --text/--tasks hold no text")
    device = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    model_args = _parse_model_args(args.model_args)
    model, tokenizer, name = _load(model_args, device)
    batches = list(token_batches(tokenizer, texts, args.max_length, args.batch_size))
    total = sum(int(m.sum()) for _, m in batches)
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
                          max_tokens=args.max_tokens, total_tokens=total, meta=meta)
    save_calibration(args.output, cal)
    m = cal.meta
    print(f"wrote {args.output}: {m['num_layers']} MoE layers x {m['num_experts']} experts, "
          f"{'per-expert' if cal.per_expert else 'per-layer'} nulls of {m['samples_per_null']} logits "
          f"from {m['tokens']} tokens; share of non-signal logits (pi0) per layer: "
          f"{', '.join(f'{v:.3f}' for v in cal.fit[..., 2].reshape(len(cal.fit), -1).mean(axis=1))}")
    return 0
