"""Fitting a calibration from a model, under the stock routers or under the routing being evaluated, and the
cache of ``calibration=auto`` (and of ``calibration=<text file>``).

Under the stock routers one pass over the text samples every layer's router logits (today's
``lm-eval-bh calibrate``). Under routing, layer l's null is fitted with layers < l already routed by the
setting, each with its own freshly fitted null: routed layers change the hidden states that the layers
after them see, so a null fitted under the stock routers no longer fits there (docs/calibration.md).
A stock pass records each batch's input to the first decoder layer and every decoder layer's other
arguments; then, decoder layer by decoder layer, its router is sampled on the stored inputs (the layer
stopped right after its router by a private exception from a forward hook), its null is fitted, and the
layer runs routed with it to give the next layer's inputs: about three forward passes in all, not one
per layer. Layer 0 sees no routed layer, so its null is the stock one.

`resolve` fits ``calibration=auto`` (the built-in corpus, lm_eval_bh/corpus.py) or a text file at model
load under the setting's own routing, and caches the file under ``$LM_EVAL_BH_CACHE/calibration`` (else
``~/.cache/lm_eval_bh/calibration``), keyed on everything that changes it: the routers' fingerprint, the
text's hash, its token ids, the token count and the routing setting.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import replace
from typing import Iterable

import torch

from .calibration import (ARRAYS, VERSION, Calibration, NullSampler, layers_fingerprint, read_calibration,
                          save_calibration, source_kind)
from .config import RoutingConfig
from .corpus import CORPUS, builtin_texts, corpus_hash, read_texts, token_batches, token_ids_hash
from .errors import RoutingError, UsageError
from .families import find_moe_layers
from .patch import BHRouting

__all__ = ["AUTO_TOKENS", "UNDER", "calibrate_model", "resolve", "cache_path"]

UNDER = ("stock", "routing")  # what the layers above a layer run while its null is fitted
AUTO_TOKENS = 8192  # tokens of the built-in corpus that calibration=auto fits on
MAX_LENGTH = 512  # tokens per sequence at load (documents are cut into windows)
BATCH_SIZE = 8
SAMPLES = 65536  # logits kept per layer's null


class _Stop(Exception):
    """Raised by the router hook of the layer being sampled: the rest of the decoder layer is not needed."""


def _take(batches: Iterable, max_tokens: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) batches (right-padded) holding the first `max_tokens` real tokens: the
    last row taken is cut short."""
    out, seen = [], 0
    for batch in batches:
        ids, mask = batch if isinstance(batch, (tuple, list)) else (batch, None)
        mask = torch.ones_like(ids) if mask is None else mask
        if max_tokens is not None:
            left = max_tokens - seen
            if left <= 0:
                break
            before = mask.sum(dim=1).cumsum(0) - mask.sum(dim=1)  # real tokens in the rows above
            keep = int((before < left).sum())
            ids, mask = ids[:keep], mask[:keep].clone()
            mask[keep - 1, max(0, left - int(before[keep - 1])):] = 0
            width = int(mask.sum(dim=1).max())
            ids, mask = ids[:, :width], mask[:, :width]
        seen += int(mask.sum())
        out.append((ids, mask))
    return out


def _sampling(layers, sampler: NullSampler, sample: list[int], state: dict, stop: bool = False) -> list:
    """Forward hooks on the routers of layers `sample`: their logits at real tokens (``state["mask"]``) go
    to `sampler`; with `stop`, the forward ends there (_Stop). Returns the handles."""
    num_experts = layers[0].router.num_experts

    def hook(i):
        def fn(module, args, output):
            logits = output[0] if isinstance(output, (tuple, list)) else output
            logits = logits.reshape(-1, logits.shape[-1])
            if logits.shape[-1] != num_experts:
                raise RoutingError(f"router {i} returned {logits.shape[-1]} logits per token, expected {num_experts}")
            mask = state["mask"]
            if mask.numel() == logits.shape[0]:
                logits = logits[mask.to(logits.device)]
            sampler.add(i, logits)
            if stop:
                raise _Stop

        return fn

    return [layers[i].router.register_forward_hook(hook(i)) for i in sample]


def _decoder_layers(model, layers) -> tuple[list[torch.nn.Module], list[int | None]]:
    """The model's decoder layers (the module list that holds the MoE blocks, in forward order) and, for
    each, the index of the MoE layer inside it (None for a dense layer)."""
    index = {id(layer.router): i for i, layer in enumerate(layers)}
    for modules in model.modules():
        if isinstance(modules, torch.nn.ModuleList):
            owners = [[index[id(m)] for m in block.modules() if id(m) in index] for block in modules]
            if sorted(i for o in owners for i in o) == list(range(len(layers))) and all(len(o) <= 1 for o in owners):
                return list(modules), [o[0] if o else None for o in owners]
    raise RoutingError(f"{type(model).__name__}: no module list holds its MoE blocks one per layer, which fitting "
                       "under routing needs; calibrate under the stock routers")


def _stock_pass(model, batches, layers, sampler, decoders, bar) -> list[tuple]:
    """Sample every layer's router logits under the stock routers and record, per batch, the first decoder
    layer's input, every decoder layer's other arguments (masks, position embeddings: they do not depend on
    the routing) and the real tokens: (hidden, [(args, kwargs) per decoder layer], mask) per batch."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None) or model  # skip the LM head
    device = next(model.parameters()).device
    state: dict = {}
    calls: list = []

    def record(j):
        def fn(module, args, kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if j == 0:
                state["hidden"] = hidden
            state["calls"].append((args[1:], kwargs))

        return fn

    handles = _sampling(layers, sampler, list(range(len(layers))), state)
    if decoders is not None:
        handles += [d.register_forward_pre_hook(record(j), with_kwargs=True) for j, d in enumerate(decoders)]
    try:
        for ids, mask in batches:
            state.update(mask=mask.reshape(-1).bool(), calls=[])
            base(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            calls.append((state.pop("hidden", None), state["calls"], state["mask"]))
            bar.update(len(decoders) if decoders is not None else 1)
    finally:
        for h in handles:
            h.remove()
    return calls


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
    meta: dict | None = None,
    under: RoutingConfig | None = None,
) -> Calibration:
    """The calibration of `model`'s routers on `batches` (input_ids, or (input_ids, attention_mask) pairs;
    padding is not counted): under the stock routers (`under=None`), or with every layer's null fitted
    while the layers above it route by `under` with their own fitted nulls (`under`'s calibration file, if
    any, is not read). The model must be unpatched."""
    from tqdm.auto import tqdm

    layers = find_moe_layers(model)  # a clear RoutingError when there is none
    num_experts = layers[0].router.num_experts
    batches = _take(batches, max_tokens)
    size = samples if samples is not None else (4096 if per_expert else SAMPLES)
    sampler = NullSampler(len(layers), num_experts, size=size, per_expert=per_expert, seed=seed)
    info = {"num_layers": len(layers), "num_experts": num_experts, "router_fingerprint": layers_fingerprint(layers)}
    if isinstance(getattr(layers[0].router, "top_k", None), int):
        info["top_k"] = layers[0].router.top_k
    cfg = getattr(model, "config", None)
    if cfg is not None:
        info["model_type"] = getattr(cfg, "model_type", None)
        info["model"] = getattr(cfg, "_name_or_path", None) or None
    info = {**info, **(meta or {}), "under": "stock" if under is None else {"routing": _routing_key(under, layers)}}
    routed = under is not None and under.mode == "patch" and len(layers) > 1
    decoders, owners = _decoder_layers(model, layers) if routed else (None, None)
    # progress in decoder-layer runs of one batch: a stock forward is one per decoder layer
    depth = len(decoders) if routed else 1
    steps = depth + (2 * depth - 2 if routed else 0)
    bar = tqdm(total=len(batches) * steps, unit="layer-batch", disable=not progress,
               desc="calibrate under routing" if routed else "calibrate")
    try:
        calls = _stock_pass(model, batches, layers, sampler, decoders, bar)
        if routed:
            _fit_under_routing(model, layers, sampler, info, under, decoders, owners, calls, bar)
    finally:
        bar.close()
    return sampler.calibration(info)


def _fit_under_routing(model, layers, sampler, info, under, decoders, owners, calls, bar) -> None:
    """Decoder layer by decoder layer on the recorded inputs: sample an MoE layer's router (stopping there),
    fit its null, then run the layer routed by `under` with it, which gives the next layer's inputs. The
    first MoE layer's null is the stock pass's (no routed layer precedes it)."""
    fitted = sampler.calibration(info)  # stock nulls stand in for the layers not fitted yet
    hidden = [h for h, _, _ in calls]
    state: dict = {}
    with BHRouting(under, fitted=fitted).patch(model) as routing:
        for j, decoder in enumerate(decoders):
            m = owners[j]
            if m is not None and m > 0:
                sampler.reset(m)
                handles = _sampling(layers, sampler, [m], state, stop=True)
                try:
                    for h, (_, per_layer, mask) in zip(hidden, calls):
                        state["mask"] = mask
                        try:
                            decoder(h, *per_layer[j][0], **per_layer[j][1])
                        except _Stop:
                            pass
                        bar.update(1)
                finally:
                    for handle in handles:
                        handle.remove()
                _replace(fitted, m, sampler.sample(m, fitted.null.shape[-1]))
                if routing.nulls[m] is not None:  # the patched router reads its null at every call
                    routing.nulls[m] = fitted.layer_nulls()[m].to(routing.nulls[m].device)
            if j + 1 < len(decoders):
                hidden = [_output(decoder(h, *per_layer[j][0], **per_layer[j][1]))
                          for h, (_, per_layer, _) in zip(hidden, calls)]
                bar.update(len(calls))


def _output(out) -> torch.Tensor:
    """A decoder layer's hidden states (older transformers return them first in a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _replace(cal: Calibration, layer: int, sample) -> None:
    """Fit one layer's null from `sample` into `cal` (the other layers are not fitted again)."""
    one = Calibration(sample[None])
    for name in ARRAYS:
        getattr(cal, name)[layer] = getattr(one, name)[0]


def routed_before_fit(cfg: RoutingConfig) -> RoutingConfig:
    """The routing a null is fitted under: `cfg` itself, or, while its budget (target_k, a per-layer profile)
    is still to be fitted with this very null, the same rule at its own knob in every layer (the starting
    point of the fit), so that the null and the budget are not each other's input."""
    if not cfg.needs_fit:
        return cfg
    return replace(cfg, target_k=None, allocation="uniform", layer_k=None, layer_knob=None, layer_budget=None,
                   fitted_k=None)


def _routing_key(cfg: RoutingConfig, layers) -> dict:
    """The routing setting a null is fitted under, with the model's defaults filled in (its calibration aside)."""
    first = layers[0]
    settings = cfg.resolve(first.num_experts, first.top_k, first.renormalizes).as_dict()
    settings.pop("calibration")
    return settings


def cache_path(key: dict) -> str:
    """The cache file of a fitted calibration, named by the hash of everything that changes it."""
    from .tiny import _cache_root

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return os.path.join(_cache_root(), "calibration", f"{key['source']}-{digest}.json")


def resolve(model: torch.nn.Module, tokenizer, cfg: RoutingConfig, *, tokens: int = AUTO_TOKENS,
            progress: bool = True) -> Calibration:
    """The calibration that `cfg.calibration` ("auto", or a text file) names for `model`: read from the cache
    or fitted under `cfg`'s routing (the stock routers in analyze mode) and cached. Its
    ``meta["provenance"]`` says what it was fitted on, how and whether it came from the cache."""
    source = source_kind(cfg.calibration)
    if source == "auto":
        texts, corpus, licence = builtin_texts(), CORPUS["name"], CORPUS["licence"]
    elif source == "text":
        try:
            texts = read_texts(cfg.calibration)
        except UsageError as e:
            raise RoutingError(f"calibration: {e}") from None
        corpus, licence = os.path.abspath(cfg.calibration), None
        if not texts:
            raise RoutingError(f"calibration={cfg.calibration}: the text file holds no text")
    else:
        raise RoutingError(f"calibration={cfg.calibration} is a calibration file, read as it is")
    layers = find_moe_layers(model)
    max_length = min(MAX_LENGTH, getattr(getattr(model, "config", None), "max_position_embeddings", None) or MAX_LENGTH)
    batches = _take(token_batches(tokenizer, texts, max_length, BATCH_SIZE), tokens)
    under = None if cfg.mode == "analyze" else routed_before_fit(cfg)
    key = {"source": source, "format": VERSION, "router_fingerprint": layers_fingerprint(layers),
           "corpus_sha256": corpus_hash(texts), "token_ids_sha256": token_ids_hash(batches),
           "tokens": sum(int(m.sum()) for _, m in batches), "max_length": max_length, "samples": SAMPLES,
           "under": "stock" if under is None else _routing_key(under, layers)}
    path = cache_path(key)
    prov = {"source": source, "corpus": corpus, "licence": licence, "corpus_sha256": key["corpus_sha256"],
            "tokens": key["tokens"], "under": "stock" if under is None else "routing", "path": path}
    start = time.perf_counter()
    if os.path.isfile(path):
        try:
            cal = read_calibration(path)
        except RoutingError:  # a damaged cache entry is fitted again
            pass
        else:
            if cal.meta.get("cache_key") == key:
                cal.meta["provenance"] = {**prov, "per_expert": cal.per_expert, "status": "cached", "seconds": round(time.perf_counter() - start, 3)}
                return cal
    cal = calibrate_model(model, batches, progress=progress, under=under, meta={"cache_key": key})
    cal.meta["provenance"] = {**prov, "per_expert": cal.per_expert, "status": "fitted", "seconds": round(time.perf_counter() - start, 3)}
    try:
        save_calibration(path, cal)
    except OSError as e:  # an unwritable cache costs a refit next time, not the evaluation
        import warnings

        warnings.warn(f"lm-eval-bh: could not cache the calibration in {path} ({e.strerror or e})")
    return cal
