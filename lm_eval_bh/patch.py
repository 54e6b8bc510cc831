"""Patch a loaded transformers MoE model so its routers select experts adaptively.

Nothing in transformers is changed: the patch sets instance-level `forward`s on the routers (under
accelerate's device hooks, the `_old_forward` they call); when k varies, it switches the model's
experts implementation to the padding-aware dispatch (lm_eval_bh/dispatch.py), registered with
transformers' experts interface in front of the model's own backend; and it adds two forward hooks on
the model: before, which tokens are real and in which group; after, one update of the statistics for
all layers. With a fixed k the stock routers run untouched (only their
`top_k` changes). `unpatch()` undoes exactly what `patch()` did, so the model is the stock model
again, bit for bit. Use it as a context manager or with explicit patch/unpatch:

    with BHRouting(alpha=0.05, min_k=1).patch(model) as routing:
        model(**batch)
    print(routing.summary())
"""

from __future__ import annotations

import contextlib
import functools
import math
import types
from copy import deepcopy as _deepcopy
import warnings

import torch

from . import calibration, dispatch, routing
from .families import MoELayer, check_settings, find_moe_layers, param_split
from .errors import RoutingError
from .checks import as_bool
from .config import RoutingConfig
from .results_schema import RoutingBlock
from .stats import RoutingStats

__all__ = ["BHRouting", "ROUTER_KERNELS", "check_kernel", "warm_up_kernel"]

_OWNER = "_lm_eval_bh_routing"


class BHRouting:
    """Adaptive (Benjamini-Hochberg) routing for one model, with exact statistics of experts per token."""

    def __init__(self, config: RoutingConfig | None = None, *, kernel: str | None = None,
                 compile: bool | None = None, fitted: "calibration.Calibration | None" = None, **settings):
        """`kernel`: how the variable-k router runs (`ROUTER_KERNELS`): "auto" (default) is the fused Triton
        kernel (lm_eval_bh/routing_kernel.py: one launch per layer) on CUDA where it supports the
        settings, else the reference `routing.route`; "triton" insists on the kernel (an error for settings
        it does not compute; tensors off CUDA still take the reference path); "torch" is the
        reference; "compile" runs the reference through torch.compile on CUDA (~17 s of compilation at the
        first forward of a process and of each new alpha). `compile=True` is the older spelling of
        kernel="compile". `fitted`: the calibration of ``calibration=auto`` or of a text file, fitted at load
        (lm_eval_bh/autocal.py), used instead of reading the setting's calibration as a file."""
        self.config = config if config is not None else RoutingConfig(**settings)
        if config is not None and settings:
            raise TypeError("pass either a RoutingConfig or keyword settings, not both")
        self.kernel = check_kernel(kernel, compile, self.config)
        self.model: torch.nn.Module | None = None
        self.layers: list[MoELayer] = []
        self.stats: RoutingStats | None = None
        self.nulls: list = []
        self.fitted = fitted
        self.provenance: dict | None = None  # where the calibration came from (results: config.routing.calibration)
        self.fixed = False
        self.info: dict = {}
        self._group = 0
        self.token_mask: torch.Tensor | None = None  # (batch, length) real tokens; else the attention mask
        self._paused = False
        self._groups: dict[torch.device, torch.Tensor] = {}
        self._pending: dict[int, tuple] = {}
        self._undo: list = []
        self.layer_configs: list[RoutingConfig] = []  # each layer's config (a per-layer knob: cfg.for_layer)
        self.layer_means: list[float | None] = []  # each layer's budget under a fixed rule (layer_k), else None
        self._positions: dict[torch.device, torch.Tensor] = {}  # of the flattened tokens, for split_counts
        self._probe: list[float] | None = None  # per-layer logit ranges while probing the router probabilities
        self.budget: dict | None = None  # how a budget was fitted (lm_eval_bh/budget.py), for the results

    # --- patch / unpatch --------------------------------------------------------------------

    def patch(self, model: torch.nn.Module) -> "BHRouting":
        if self.model is not None:
            raise RuntimeError("this BHRouting is already patched into a model; unpatch() it first")
        owner = getattr(model, _OWNER, None)
        if owner is not None:
            raise RuntimeError("model is already patched by another BHRouting; unpatch() that one first")
        layers = find_moe_layers(model)
        first = layers[0]
        if any((l.num_experts, l.top_k) != (first.num_experts, first.top_k) for l in layers):
            raise RoutingError("MoE layers with different expert counts or top_k are not supported")
        cfg = self.config.resolve(first.num_experts, first.top_k, first.renormalizes)
        check_settings(first, cfg)
        if cfg.needs_fit:
            raise RoutingError(f"{cfg.label()} must first be fitted on calibration text: load the model through "
                               "lm-eval (moe_bh) or call lm_eval_bh.budget.fit_budget(model, tokenizer, config)")
        self.layer_configs = [cfg.for_layer(i) for i in range(len(layers))]
        self.layer_means = [cfg.layer_budget_k(i, len(layers)) for i in range(len(layers))]
        devices = [_router_device(model, l) for l in layers]
        self.nulls = self._load_nulls(cfg, layers, devices)
        self.config, self.model, self.layers = cfg, model, layers
        self.stats = RoutingStats(devices, cfg.max_k)
        self.info = param_split(model, layers)  # the cost model's parameter counts
        self.stats.group_id("all")
        # k cannot vary, the p-values order experts like the logits and the weights are the model's
        # own: the stock routers with top_k = k select the same experts, at stock speed, and every
        # layer's count is known from the real tokens alone. (With finite router weights the logits
        # can only be non-finite where the hidden state already is, as in the stock model.)
        self.fixed = (
            cfg.mode == "patch"
            and cfg.fixed_k
            and all(cfg.renormalize == l.renormalizes for l in layers)
            and all(routing.is_monotone(cfg, null) for null in self.nulls)
            and all(l.weight.device.type != "meta" and bool(torch.isfinite(l.weight).all())
                    for l in layers)  # offloaded weights cannot be checked here: route them by the exact path
        )
        try:
            for i, layer in enumerate(layers):
                self._patch_layer(i, layer)
            if cfg.mode == "patch" and not self.fixed and not cfg.fixed_k:
                self._use_dispatch(model, layers)
            if cfg.mode == "patch" and not self.fixed:
                self._warm_up_kernel(layers, devices)
            if routing.SELECTIONS[cfg.selection].reads_probs:
                self._check_probabilities(model)
            for handle in (
                model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
                model.register_forward_hook(self._after_forward),
            ):
                self._undo.append(handle.remove)
            setattr(model, _OWNER, self)
            self._undo.append(lambda: delattr(model, _OWNER))
        except BaseException:
            self.unpatch()
            raise
        return self

    def _load_nulls(self, cfg: RoutingConfig, layers: list[MoELayer], devices: list[torch.device]) -> list:
        """Each layer's calibration null on that layer's device (None per layer unless calibrated)."""
        if cfg.calibration is None:  # no p-value method or rule of this config needs a null
            return [None] * len(layers)
        fingerprint = calibration.layers_fingerprint(layers)
        if self.fitted is not None:
            cal = calibration.check_model(self.fitted, cfg.calibration, len(layers), layers[0].num_experts,
                                          fingerprint=fingerprint)
            self.provenance = cal.meta.get("provenance")
        elif calibration.source_kind(cfg.calibration) != "file":
            raise RoutingError(f"calibration={cfg.calibration} is fitted at load with the model's tokenizer: use the "
                               "lm-eval model class (moe_bh), or pass BHRouting(fitted=lm_eval_bh.autocal."
                               "resolve(model, tokenizer, config)[0])")
        else:
            path = cfg.calibration
            cal = calibration.check_model(calibration.read_calibration(path), path, len(layers),
                                          layers[0].num_experts, fingerprint=fingerprint)
            self.provenance = calibration.file_provenance(path, cal)
        return [null.to(device) for null, device in zip(cal.layer_nulls(), devices)]

    def _patch_layer(self, i: int, layer: MoELayer) -> None:
        cfg = self.config
        if cfg.mode == "analyze":
            self._set_forward(layer.router, self._make_analyze_router(i, layer))
        elif self.fixed:
            self._set_attr(layer.router, "top_k", cfg.max_k)  # counted once per forward, see _before_forward
        else:
            self._set_forward(layer.router, self._make_router(i, layer))

    # a router whose logits of one token all lie within this of each other gives every expert the same
    # probability to 1 %: rules that read the probabilities (top-p, skipping, entropy) then decide on
    # rounding noise. Absolute on purpose: softmax probabilities depend on the logits' absolute differences.
    UNIFORM_LOGIT_RANGE = 1e-2

    def _check_probabilities(self, model: torch.nn.Module) -> None:
        """Refuse a rule that reads router probabilities on a model whose probabilities are uniform by
        construction (e.g. the embedded `real` model, real.ROUTER_SCALE): one forward of 32 tokens."""
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        weight = getattr(embeddings, "weight", None)
        if weight is None or weight.device.type == "meta":
            return  # offloaded: no cheap probe
        ids = torch.arange(1, min(33, weight.shape[0]), device=weight.device).unsqueeze(0)
        self._probe = []
        try:
            with self.paused(), torch.no_grad():
                model(input_ids=ids)
            spread = max(self._probe, default=None)
        finally:
            self._probe = None
        if spread is not None and spread < self.UNIFORM_LOGIT_RANGE:
            raise RoutingError(
                f"selection={self.config.selection} reads the router's softmax probabilities, but this model's router "
                f"logits span at most {spread:.2g} per token (probabilities uniform to {spread:.1e}): the rule would "
                "decide on rounding noise; use bh, hc, lfdr or topk")

    def _use_dispatch(self, model: torch.nn.Module, layers: list[MoELayer]) -> None:
        """Variable k: every experts call goes through dispatch.py (padding slots never reach transformers'
        backends), set through transformers' experts interface and restored by unpatch."""
        stock = getattr(getattr(layers[0].experts, "config", None), "_experts_implementation", None)
        if not isinstance(stock, str) or not hasattr(type(layers[0].experts).forward, "__wrapped__"):
            raise RoutingError(
                f"{type(layers[0].experts).__name__} does not dispatch through transformers' experts interface, "
                "which a variable number of experts per token needs (transformers >= 5.7)"
            )
        name = dispatch.backend_name(stock)
        model.set_experts_implementation(name)
        self._undo.append(lambda: model.set_experts_implementation(stock))
        if any(l.experts.config._experts_implementation != name for l in layers):
            raise RoutingError(f"{type(model).__name__} did not take the padding-aware experts implementation")

    def _warm_up_kernel(self, layers: list[MoELayer], devices: list[torch.device]) -> None:
        """Start compiling the fused router kernel in the background for each GPU the routers run on."""
        for device in dict.fromkeys(devices):
            warm_up_kernel(self.kernel, self.config, layers[0].num_experts, layers[0].scores_dtype, device)

    def _set_forward(self, module: torch.nn.Module, forward) -> None:
        attr = "forward"
        if "forward" in module.__dict__:
            if not (hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__):
                raise RuntimeError(f"{type(module).__name__} already has an instance forward (another patch?)")
            attr = "_old_forward"  # accelerate's device hook (device_map, parallelize=True) calls this one
        old = module.__dict__.get(attr)
        setattr(module, attr, _PatchedForward(forward))
        self._undo.append(lambda: setattr(module, attr, old) if old is not None else module.__dict__.pop(attr))

    def _set_attr(self, module: torch.nn.Module, name: str, value) -> None:
        old = getattr(module, name)
        setattr(module, name, value)
        self._undo.append(lambda: setattr(module, name, old))

    def unpatch(self) -> None:
        """Remove everything patch() added; the model is the stock model again."""
        if self.model is None and not self._undo:
            raise RuntimeError("this BHRouting is not patched into a model")
        while self._undo:
            self._undo.pop()()
        self.model = None

    def __deepcopy__(self, memo):
        if self.model is None:  # unpatched: a plain copy (settings and statistics)
            copy = object.__new__(BHRouting)
            memo[id(self)] = copy
            copy.__dict__.update(_deepcopy(self.__dict__, memo))
            return copy
        raise RuntimeError(COPY_ERROR)

    def __reduce_ex__(self, protocol):
        if self.model is not None:
            raise RuntimeError(COPY_ERROR)
        return super().__reduce_ex__(protocol)

    def __enter__(self) -> "BHRouting":
        if self.model is None:
            raise RuntimeError("use `with BHRouting(...).patch(model) as routing:`")
        return self

    def __exit__(self, *exc) -> None:
        self.unpatch()

    # --- routers ----------------------------------------------------------------------------

    def _make_router(self, i: int, layer: MoELayer):
        def forward(router, hidden, *args, **kwargs):
            logits, scores, allowed = layer.scores(hidden, args, kwargs)
            if self._probe is not None:
                self._note_spread(scores)
            routed = self._route(scores, self.nulls[i], allowed, i)
            self._record(i, routed.k, routed.nonfinite, routed.discoveries, routed.pvalues)
            weight = layer.weights(logits, routed, self.config.renormalize)
            return logits, weight.to(logits.dtype), routed.index

        return types.MethodType(forward, layer.router)

    def _note_spread(self, scores: torch.Tensor) -> None:
        finite = torch.isfinite(scores)
        spread = (scores.masked_fill(~finite, -math.inf).amax(-1) - scores.masked_fill(~finite, math.inf).amin(-1))
        self._probe.append(float(spread[finite.any(-1)].amax()) if finite.any() else math.inf)

    def _counts(self, i: int, logits: torch.Tensor) -> torch.Tensor | None:
        """Layer i's per-token counts under a fixed rule's per-layer budget (routing.split_counts), else None."""
        mean = self.layer_means[i] if self.layer_means else None
        if mean is None:
            return None
        positions = self._positions.get(logits.device)
        if positions is None or positions.numel() != logits.shape[0]:  # a router call of another size than the input
            positions = torch.arange(logits.shape[0], device=logits.device)
        return routing.split_counts(mean, positions, i)

    def _route(self, logits: torch.Tensor, null, allowed=None, i: int = 0) -> routing.Routed:
        kernel, cfg = self.kernel, self.layer_configs[i]
        counts = self._counts(i, logits)
        if counts is not None:  # a per-layer budget: the reference computes it
            return routing.route(logits, cfg, null=null, allowed=allowed, counts=counts)
        if kernel == "triton" or (kernel == "auto" and logits.is_cuda):
            fused = _routing_kernel()
            if kernel == "triton" and (fused is None or not fused.supports(cfg, logits, null, allowed)):
                what = ("a group-limited router's expert mask" if allowed is not None
                        else "a per-expert null" if null is not None and null.per_expert
                        else f"{logits.dtype} logits of {logits.shape[-1]} experts on {logits.device}")
                raise RoutingError(f"router_kernel=triton cannot route {what}; use router_kernel=auto")
            if fused is not None and fused.supports(cfg, logits, null, allowed):
                try:
                    return fused.route(logits, cfg, null)
                except (RoutingError, torch.cuda.OutOfMemoryError):
                    raise
                except Exception as e:  # e.g. no Triton backend for this GPU: "auto" routes by the reference
                    if kernel == "triton":
                        raise
                    warnings.warn(f"lm-eval-bh: the fused router kernel failed ({type(e).__name__}: {e}); "
                                  "routing with the reference implementation")
                    self.kernel = kernel = "torch"
        if kernel == "compile" and logits.is_cuda:
            try:
                return _compiled_route()(logits, cfg, null=null, allowed=allowed)
            except (RoutingError, torch.cuda.OutOfMemoryError):  # OOM: lm-eval's batch-size search handles it
                raise
            except Exception as e:  # a torch.compile failure must not stop an evaluation
                warnings.warn(f"lm-eval-bh: torch.compile of the router failed ({type(e).__name__}); routing eagerly")
                self.kernel = "torch"
        return routing.route(logits, cfg, null=null, allowed=allowed)

    def _make_analyze_router(self, i: int, layer: MoELayer):
        def forward(router, hidden, *args, **kwargs):
            out = type(router).forward(router, hidden, *args, **kwargs)
            if self._probe is not None:
                self._note_spread(layer.scores(hidden, args, kwargs)[1])
            if self._counting():
                _, scores, allowed = layer.scores(hidden, args, kwargs)
                sel = routing.select_count(scores, self.layer_configs[i], null=self.nulls[i], allowed=allowed,
                                           counts=self._counts(i, scores))
                self._record(i, sel.k, None, sel.discoveries, sel.pvalues)
            return out

        return types.MethodType(forward, layer.router)

    # --- which tokens count -----------------------------------------------------------------

    def _counting(self) -> bool:
        return not self._paused and bool(self._groups)

    def _before_forward(self, module, args, kwargs):
        """Work out, once per model call, which flattened tokens are real and in which group."""
        self._groups, self._pending = {}, {}
        if self._paused:
            return None
        inputs = kwargs.get("input_ids", args[0] if args else None)
        if inputs is None:
            inputs = kwargs.get("inputs_embeds")
        if inputs is None:
            return None
        batch, length = inputs.shape[:2]
        mask = self.token_mask if self.token_mask is not None else kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            real = mask[:, -length:].to(torch.bool)
        else:
            real = torch.ones(batch, length, dtype=torch.bool, device=inputs.device)
        groups = self._groups[real.device] = torch.where(real, self._group, -1).reshape(-1)
        if any(m is not None for m in self.layer_means):
            self._positions = {inputs.device: _positions(inputs, kwargs.get("attention_mask"), length)}
        if self.fixed:
            self.stats.add_to_all_layers(self.config.max_k, groups)
        return None

    def _record(self, layer: int, k: torch.Tensor, nonfinite: torch.Tensor | None = None,
                discoveries: torch.Tensor | None = None, pvalues: torch.Tensor | None = None) -> None:
        """Keep a layer's k until the model forward ends, then count all layers at once."""
        if not self._counting():
            return
        groups = self._groups.get(k.device)
        if groups is None:
            groups = self._groups[k.device] = next(iter(self._groups.values())).to(k.device)
        if groups.numel() != k.numel():  # a router call of another size than the model input
            groups = torch.full_like(k, self._group)
        self._pending.setdefault(id(groups), (groups, []))[1].append((layer, k, nonfinite, discoveries, pvalues))

    def _after_forward(self, module, args, output):
        pending, self._pending = self._pending, {}
        for groups, records in pending.values():
            layers, ks, nonfinite, found, p = zip(*records)
            self.stats.add(list(layers), list(ks), groups, None if nonfinite[0] is None else list(nonfinite),
                           None if found[0] is None else list(found), None if p[0] is None else list(p))
        return None

    @contextlib.contextmanager
    def group(self, name: str):
        """Count the tokens of the forwards inside this block under `name` (e.g. an lm-eval task)."""
        previous, self._group = self._group, self.stats.group_id(name)
        try:
            yield self
        finally:
            self._group = previous

    @contextlib.contextmanager
    def tokens(self, mask: torch.Tensor):
        """Count only the positions where `mask` (batch, length) is true in the forwards inside this block."""
        previous, self.token_mask = self.token_mask, mask
        try:
            yield self
        finally:
            self.token_mask = previous

    @contextlib.contextmanager
    def paused(self):
        """Count nothing inside this block (e.g. lm-eval's batch-size probing)."""
        previous, self._paused = self._paused, True
        try:
            yield self
        finally:
            self._paused = previous

    # --- reporting --------------------------------------------------------------------------

    def summary(self, **totals) -> dict:
        """Settings, model info and exact statistics, as stored under `config.routing` in results files
        (`totals`: the counts of all data-parallel ranks, from `stats.total_over_ranks()`)."""
        info = self.info
        stats = self.stats.summary(**totals)
        per_layer = [m for m in stats["per_layer_mean"] if m is not None]
        active = info["dense_params"] + info["params_per_expert"] * sum(per_layer) if per_layer else None
        budget = None if self.budget is None else {**self.budget, "achieved_k": stats["mean_experts_per_token"]}
        block = RoutingBlock.from_dict({"settings": self.config.as_dict(), "model": info, **stats,
                                        "active_params_per_token": active, "calibration": self.provenance,
                                        "budget": budget})
        return block.to_dict()


def _positions(inputs: torch.Tensor, mask, length: int) -> torch.Tensor:
    """The positions of the flattened tokens of a forward (routing.split_counts' key): the number of real
    tokens before each in its row (by the attention mask, so left padding and cached decoding keep each
    token's own position)."""
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        positions = (mask.long().cumsum(dim=1) - 1).clamp_min(0)[:, -length:]
    else:
        positions = torch.arange(length, device=inputs.device).expand(inputs.shape[0], length)
    return positions.reshape(-1).to(inputs.device)


COPY_ERROR = ("a model patched by lm-eval-bh cannot be copied or pickled (the copy would route with the "
              "original's routers and statistics): copy or save the model before patch() or after unpatch(), "
              "then patch the copy")


class _PatchedForward:
    """An instance `forward` set by the patch: calls the patched function, refuses to be copied or pickled
    (a copied module would keep routing through the original's closures)."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo):
        raise RuntimeError(COPY_ERROR)

    def __reduce_ex__(self, protocol):
        raise RuntimeError(COPY_ERROR)


_COMPILED = {}


def _compiled_route():
    """routing.route compiled once per process (dynamic shapes: lm-eval's batches vary in length)."""
    fn = routing.route
    if fn not in _COMPILED:
        routing.prepare_compile()
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


ROUTER_KERNELS = ("auto", "triton", "torch", "compile")


def check_kernel(kernel, compile_router, config: RoutingConfig) -> str:
    """The router kernel to use (`router_kernel=`, or the older `compile_router=true`), checked against the
    settings: "triton" needs Triton and settings the fused kernel computes (one line otherwise)."""
    compiled = None if compile_router is None else as_bool("compile_router", compile_router)
    if kernel is None:
        kernel = "compile" if compiled else "auto"
    elif kernel not in ROUTER_KERNELS:
        raise RoutingError(f"router_kernel must be one of {', '.join(ROUTER_KERNELS)}; got {kernel!r}")
    elif compiled and kernel != "compile":
        raise RoutingError(f"compile_router=true contradicts router_kernel={kernel}; pass router_kernel alone")
    if kernel == "triton":
        fused = _routing_kernel()
        if fused is None:
            raise RoutingError("router_kernel=triton needs the triton package (it comes with torch's CUDA wheels)")
        if not fused.supports_config(config):
            raise RoutingError(f"router_kernel=triton computes {fused.SUPPORTED}; got pvalue={config.pvalue}, "
                               f"selection={config.selection} (use router_kernel=auto)")
    return kernel


def warm_up_kernel(kernel: str, config: RoutingConfig, num_experts: int, dtype: torch.dtype,
                   device: torch.device) -> None:
    """Compile the fused router kernel for these settings in a background thread, if it will run them (a
    resolved `config`; lm.py calls this before the weights load, so the compilation overlaps the loading).
    Where "triton" cannot run, the error comes here, before any forward."""
    fused = _routing_kernel() if kernel in ("auto", "triton") else None
    if kernel == "triton" and not fused.runs_on(device):  # "triton" insists: no silent reference router
        raise RoutingError(f"router_kernel=triton runs on CUDA GPUs; the routers run on {device} "
                           "(use router_kernel=auto or torch)")
    if fused is not None and device.type == "cuda" and fused.supports_config(config):
        fused.warm_up(config, num_experts, dtype, device)


@functools.lru_cache(maxsize=1)
def _routing_kernel():
    """lm_eval_bh.routing_kernel, or None where Triton cannot be imported (tried once per process)."""
    try:
        from . import routing_kernel
    except ImportError:
        return None
    return routing_kernel


def _router_device(model: torch.nn.Module, layer: MoELayer) -> torch.device:
    """Where a router runs: its weight's device or, for weights that accelerate offloads (kept on the
    meta device between forwards), the execution device of the accelerate hook that brings them in."""
    device = layer.weight.device
    if device.type != "meta":
        return device
    path = next(name for name, m in model.named_modules() if m is layer.router).split(".")
    for depth in range(len(path), -1, -1):
        hook = getattr(model.get_submodule(".".join(path[:depth])), "_hf_hook", None)
        for h in getattr(hook, "hooks", [hook]):  # accelerate's SequentialHook holds several
            if getattr(h, "execution_device", None) is not None:
                return torch.device(h.execution_device)
    raise RoutingError("the router weights are on the meta device and no accelerate hook runs them")

