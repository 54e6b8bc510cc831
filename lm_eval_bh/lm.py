"""`moe_bh` / `olmoe_bh`: lm-eval's HFLM with adaptive (BH) expert routing and exact routing statistics.

A small HFLM subclass in the manner of lm-eval's `hf_steered`: it takes its routing arguments out
of model_args, validates them before any weights load, patches the loaded model, and tells the patch
which tokens are real (lm-eval right-pads loglikelihood batches without an attention mask) and which
task they belong to. The statistics land in the results file under `config.routing`.
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import os
import sys
import threading
from collections import Counter, defaultdict

import lm_eval.models  # noqa: F401  (registers lm-eval's own models first; see lm_eval_bh._startup)
import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils_hf import stop_sequences_criteria

from .errors import RoutingError
from .calibration import check_settings as check_calibration, source_kind
from .families import config_shape
from .model_args import DEFAULT_PRETRAINED, LM_ARGS, ROUTING_ARGS, closest_lm_arg
from .budget import CAL_TOKENS, check_fit_tokens, fit_budget
from .patch import BHRouting, check_kernel, warm_up_kernel
from .config import TARGET_ALLOCATION, RoutingConfig

__all__ = ["MoEBHLM", "OlmoeBHLM", "DEFAULT_PRETRAINED", "routing_table"]

# Arguments HFLM itself consumes (everything else goes on to from_pretrained and the model config).
_HFLM_ARGS = {name for f in (HFLM.__init__, HFLM._create_model) for name in inspect.signature(f).parameters}


def _cannot_load(pretrained: str, reason: str) -> str:
    return (f"could not load the model '{pretrained}' ({reason}); give pretrained=<a local folder with the "
            "model's config, weights and tokenizer>, or try everything offline with `lm-eval-bh demo`")


def _hub_reachable_or_unneeded(pretrained: str, timeout: float = 3.0) -> bool:
    """False only when `pretrained` must come from the hub and the hub does not answer within `timeout`.

    Without this an unreachable hub costs several retries (a minute here) before the same error.
    Skipped (True) for local folders, offline mode, cached models and behind a proxy.
    """
    from huggingface_hub import constants, try_to_load_from_cache
    from urllib.parse import urlparse

    if os.path.isdir(pretrained) or constants.HF_HUB_OFFLINE or any(
        os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
    ):
        return True
    try:
        if isinstance(try_to_load_from_cache(pretrained, "config.json"), str):
            return True
    except Exception:  # not a repo id: let transformers say why
        return True
    url = urlparse(constants.ENDPOINT)
    reached = []

    def probe():
        import socket

        with contextlib.suppress(OSError), socket.create_connection(
            (url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout
        ):
            reached.append(True)

    thread = threading.Thread(target=probe, daemon=True)  # a thread: name resolution has no timeout
    thread.start()
    thread.join(timeout)
    return bool(reached)


@register_model("moe_bh")
class MoEBHLM(HFLM):
    """Any supported MoE family (see lm_eval_bh.families.FAMILIES); `pretrained` is required."""

    def __init__(self, pretrained=None, **kwargs):
        if pretrained is None:
            raise RoutingError("moe_bh needs pretrained=<hub id, local path or model>")
        routing = {k: kwargs.pop(k) for k in ROUTING_ARGS if k in kwargs}
        if routing.get("target_k") is not None and "allocation" not in routing:
            routing["allocation"] = TARGET_ALLOCATION
        self.routing_config = RoutingConfig(**routing)
        # how the router runs (patch.ROUTER_KERNELS; compile_router=true is the older spelling of "compile")
        self._router_kernel = check_kernel(kwargs.pop("router_kernel", None), kwargs.pop("compile_router", None),
                                           self.routing_config)
        # calibration tokens of a budget fit (target_k, layer_k; lm_eval_bh/budget.py)
        self._fit_tokens = check_fit_tokens(kwargs.pop("fit_tokens", CAL_TOKENS))
        self._real_inputs: set[int] | None = None
        self._zero_tail = False
        self._found_batch: tuple[int, int] | None = None
        self._rank_totals: dict = {}
        self._downstream_args = set(kwargs) - _HFLM_ARGS  # what goes on to from_pretrained
        self._dtype_arg = kwargs.get("dtype", "auto")
        super().__init__(pretrained=pretrained, **kwargs)
        self.routing = self._patch(self.routing_config)
        self._reported: dict | None = None  # the routing block of the last results (get_model_info)
        if self.rank == 0 and _run_by_lm_eval_cli():
            _print_at_exit(self)

    def _get_config(self, pretrained, **kwargs) -> None:
        """Check the model, the expert bounds and the model_args from the config, before the weights load."""
        if isinstance(pretrained, str) and pretrained.startswith(("/", "./", "../", "~")) and not os.path.isdir(
            os.path.expanduser(pretrained)
        ):
            raise RoutingError(_cannot_load(pretrained, "no such folder"))
        if isinstance(pretrained, str) and not _hub_reachable_or_unneeded(pretrained):
            raise RoutingError(_cannot_load(pretrained, "the model hub cannot be reached from here"))
        try:
            super()._get_config(pretrained, **kwargs)
        except OSError as e:
            raise RoutingError(_cannot_load(pretrained, str(e).strip().split("\n")[0])) from None
        resolved = self.routing_config.resolve(*config_shape(self._config, source=str(pretrained)))
        check_calibration(self.routing_config, config_shape(self._config)[0])  # the calibration file, too
        dtype = self._dtype_arg
        dtype = getattr(self._config, "dtype", None) if dtype in (None, "auto") else dtype
        dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype  # as HFLM reads it
        if isinstance(self._device, torch.device) and isinstance(dtype, torch.dtype):
            # the fused router kernel compiles (~2 s, once per process) while the weights load
            warm_up_kernel(self._router_kernel, resolved, config_shape(self._config)[0], dtype, self._device)
        for name in sorted(self._downstream_args):
            guess = closest_lm_arg(name)
            if guess and not hasattr(self._config, name):  # a config field passes through (it overrides the config)
                raise RoutingError(f"unknown model_arg '{name}': did you mean '{guess}'? "
                                   f"(routing arguments: {', '.join(LM_ARGS)})")

    def _patch(self, config: RoutingConfig) -> BHRouting:
        """Patch the loaded (stock) model with `config`. First `calibration=auto` or a text file is fitted under
        this routing, or read from its cache (lm_eval_bh/autocal.py); then a budget (target_k, layer_k) is
        fitted on the built-in corpus with that null (lm_eval_bh/budget.py). Both land in the results."""
        fitted = None
        if config.calibration is not None and source_kind(config.calibration) != "file":
            from .autocal import resolve

            fitted = resolve(self.model, self.tokenizer, config, progress=self.rank == 0)
        config, fit = fit_budget(self.model, self.tokenizer, config, tokens=self._fit_tokens,
                                 kernel=self._router_kernel, fitted=fitted, progress=self.rank == 0)
        self.routing_config = config
        routing = BHRouting(config, kernel=self._router_kernel, fitted=fitted).patch(self.model)
        routing.budget = fit
        return routing

    def set_routing(self, **settings) -> None:
        """Re-patch the loaded model with new routing settings (fresh statistics); weights stay loaded."""
        config = RoutingConfig(**settings)
        config.resolve(*config_shape(self.model.config))  # a bad setting leaves the current routing in place
        previous = self.routing_config
        self.routing.unpatch()
        try:
            self.routing = self._patch(config)
        except BaseException:  # e.g. an unreachable target_k: the previous routing stays in place
            self.routing = self._patch(previous)
            raise
        self._rank_totals = {}

    def set_cache_hook(self, cache_hook) -> None:
        """lm-eval's request cache (`--use_cache`) attaches here; refuse it, before any request runs."""
        if getattr(cache_hook, "dbdict", None) is not None:
            raise RoutingError(
                "--use_cache cannot be used with adaptive routing: lm-eval's request cache is keyed on the "
                "request alone (not the model or its routing settings), so it would serve answers computed "
                "under other settings, and cached requests would be missing from the routing statistics; "
                "run without --use_cache (--cache_requests, which caches only the prompts, is fine)")
        super().set_cache_hook(cache_hook)

    # --- which tokens are real, and which task they belong to --------------------------------

    def _by_task(self, method, requests, **kwargs):
        """Run `method` once per task so every forward's tokens are counted under their task.

        Under data parallelism lm-eval pads a rank's share with extra copies of its last request
        (beyond the request's own `repeats`); those run uncounted, and the counts of all ranks are
        summed after every call, so the results file holds the totals of a single process.
        """
        by_task, seen = defaultdict(list), Counter()
        for i, request in enumerate(requests):
            seen[id(request)] += 1
            padding = seen[id(request)] > (request.repeats or 1)
            by_task[None if padding else request.task_name or "unknown"].append(i)
        results = [None] * len(requests)
        self._found_batch = None  # see _detect_batch_size
        longest = {n: max(len(str(requests[i].args)) for i in idx) for n, idx in by_task.items()}
        for name in sorted(by_task, key=lambda n: (n is None, -longest[n], n or "")):  # longest inputs first
            idx = by_task[name]
            with self.routing.paused() if name is None else self.routing.group(name):
                for i, out in zip(idx, method([requests[i] for i in idx], **kwargs)):
                    results[i] = out
        if self.world_size > 1:
            self._rank_totals = self.routing.stats.total_over_ranks()
        return results

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self._by_task(super().loglikelihood, requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self._by_task(super().loglikelihood_rolling, requests, disable_tqdm=disable_tqdm)

    def generate_until(self, requests, disable_tqdm: bool = False):
        return self._by_task(super().generate_until, requests, disable_tqdm=disable_tqdm)

    def _detect_batch_size(self, requests=None, pos: int = 0):
        """batch_size=auto: lm-eval probes 5 forwards at the largest batch per call, and this class calls
        once per task. Within one call of `_by_task` (tasks with the longest inputs first) a batch size
        found for inputs at least as long is reused: memory only grows with length. Not under data
        parallelism, where every rank must probe as often as the others."""
        length = len((requests[pos][1] + requests[pos][2])[-(self.max_length + 1):][:-1]) if requests else self.max_length
        found = self._found_batch
        if found is not None and found[0] >= length and self.world_size == 1:
            return found[1]
        with self.routing.paused():
            batch_size = super()._detect_batch_size(requests, pos)
        if found is None or length > found[0]:
            self._found_batch = (length, batch_size)
        return batch_size

    def _loglikelihood_tokens(self, requests, *args, **kwargs):
        # Remember every request's model input so _model_call can tell real tokens from padding.
        window = self.max_length + 1
        inputs = [tuple((ctx + cont)[-window:][:-1]) for _, ctx, cont in requests]
        self._real_inputs = {hash(t) for t in inputs}
        # Usually no input ends in token 0: then a row's real tokens end at its last non-zero one.
        self._zero_tail = any(t and t[-1] == 0 for t in inputs)
        try:
            return super()._loglikelihood_tokens(requests, *args, **kwargs)
        finally:
            self._real_inputs = None

    def _real_token_mask(self, inps: torch.Tensor) -> torch.Tensor:
        """Right padding is token 0 and so can be a real token: the real length of each row is the
        shortest prefix, ending after its last non-zero token, that is one of the requests' inputs.

        When no request's input ends in token 0 that prefix ends at the row's last non-zero token:
        computed on the device (no copy to the host, no Python loop per row)."""
        if not self._zero_tail:
            nonzero = inps != 0
            positions = torch.arange(1, inps.shape[1] + 1, device=inps.device)
            length = torch.where(nonzero, positions, 0).amax(dim=1, keepdim=True)
            return positions <= length
        mask = torch.zeros(inps.shape, dtype=torch.bool)
        for row, tokens in enumerate(inps.tolist()):
            length = len(tokens)
            while length and tokens[length - 1] == 0:
                length -= 1
            while length < len(tokens) and hash(tuple(tokens[:length])) not in self._real_inputs:
                length += 1
            mask[row, :length] = True
        return mask.to(inps.device)

    def _model_call(self, inps, attn_mask=None, labels=None):
        if self._real_inputs is None or attn_mask is not None:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        with self.routing.tokens(self._real_token_mask(inps)):
            return super()._model_call(inps)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        with self._count_live_rows(context.shape[0], stop):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    @contextlib.contextmanager
    def _count_live_rows(self, batch_size: int, stop: list[str]):
        """Count a decoded token only while its row would still be generating at batch size 1.

        HF keeps decoding every row of a batch until all rows have stopped; the extra tokens of rows
        that are done (by lm-eval's stop sequences, judged exactly as lm-eval judges them, or by an
        end-of-sequence token) are batching artefacts, like padding.
        """
        stops = stop_sequences_criteria(self.tokenizer, stop, 0, batch_size)
        eos = self.model.generation_config.eos_token_id
        eos = torch.tensor(eos if isinstance(eos, list) else [] if eos is None else [eos])
        fed: list[torch.Tensor] = []  # the decoded tokens fed back so far, one (batch,) tensor per step

        def before_forward(module, args, kwargs):
            ids, mask = kwargs.get("input_ids", args[0] if args else None), kwargs.get("attention_mask")
            if ids is None or mask is None:
                return None
            real = mask[:, -ids.shape[1] :].bool()
            if self.routing.token_mask is not None:  # not the prompt: a decode step
                fed.append(ids[:, -1].cpu())
                history = torch.stack(fed, dim=1)
                for criterion in stops:
                    criterion(history, None)
                done = torch.isin(history, eos).any(dim=1)
                done |= torch.tensor([any(c.done_tracker[i] for c in stops) for i in range(batch_size)])
                real &= ~done.to(real.device).unsqueeze(1)
            self.routing.token_mask = real
            return None

        handle = self.model.register_forward_pre_hook(before_forward, with_kwargs=True, prepend=True)
        try:
            with self.routing.tokens(None):
                yield
        finally:
            handle.remove()

    # --- results ----------------------------------------------------------------------------

    def get_model_info(self) -> dict:
        self._reported = self.routing.summary(**self._rank_totals)
        return {**super().get_model_info(), "routing": self._reported}


@register_model("olmoe_bh")
class OlmoeBHLM(MoEBHLM):
    """`moe_bh` with OLMoE-1B-7B as the default `pretrained`."""

    def __init__(self, pretrained=DEFAULT_PRETRAINED, **kwargs):
        super().__init__(pretrained=pretrained, **kwargs)


def routing_table(routing: dict, label: str) -> str:
    """The routing cost of a results file's `config.routing` block as a Markdown table (lm-eval's style):
    mean experts per token, k / top_k and active parameters per token, overall and per task."""
    from pytablewriter import MarkdownTableWriter

    model = routing["model"]

    def row(name, mean, tokens):
        if mean is None:
            return [name, tokens, "", "", ""]
        active = model["dense_params"] + model["params_per_expert"] * model["num_layers"] * mean
        return [name, tokens, f"{mean:.4f}", f"{mean / model['top_k']:.4f}", round(active)]

    writer = MarkdownTableWriter()
    writer.headers = ["Routing", "Tokens", "Mean experts/token", "k / top_k", "Active params/token"]
    writer.value_matrix = [row("all tasks", routing["mean_experts_per_token"], routing["tokens"])] + [
        row(task, v["mean_experts_per_token"], v["tokens"]) for task, v in sorted(routing["per_task"].items())
    ]
    return (f"routing {label}: top_k {model['top_k']} of {model['num_experts']} experts, "
            f"{model['total_params']:,} parameters in all\n{writer.dumps()}")


def _run_by_lm_eval_cli() -> bool:
    """True inside the `lm_eval` / `lm-eval` command or `python -m lm_eval` (not the Python API)."""
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return "lm_eval.__main__" in sys.modules or getattr(main_spec, "name", None) == "lm_eval.__main__"


_LAST_MODEL: list = []  # the model whose routing table the lm_eval CLI prints at exit


def _print_at_exit(lm: MoEBHLM) -> None:
    """lm-eval's CLI prints its results table at the very end of the run: print ours after it (at
    interpreter exit), if the run got as far as its results."""
    if not _LAST_MODEL:
        atexit.register(_print_routing_table)
    _LAST_MODEL[:] = [lm]


def _print_routing_table() -> None:
    lm = _LAST_MODEL[0]
    if lm._reported is not None:
        print(routing_table(lm._reported, lm.routing.config.label()))
