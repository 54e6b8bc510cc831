"""Router-logit calibration: an empirical null per layer (or per expert), fitted on unlabeled text.

A calibration holds, for every MoE layer, a uniform random sample (bounded size) of the router logits
the model produced on unlabeled text: one sample shared by all experts of the layer, or one per
expert (`per_expert`). From each sample it fits Efron's two-group model f = pi0 f0 + (1 - pi0) f1:

* the **empirical null** f0 = N(loc, scale^2), by central matching: a weighted least-squares fit of
  a quadratic to the log counts of a histogram of the part of the sample between its 2 % and 75 %
  quantiles. Signals are *high* logits, so the lower and central part of the sample estimates the
  null; the wider one-sided window cuts the noise of the fitted scale four- to five-fold against the
  central 50 % (measured, see docs/pvalues.md). pi0 is the sample's share in that window over f0's
  share there (capped at 1). When the fit has no negative curvature the null falls back to median
  and IQR / 1.349 with pi0 = 1.
* the **local fdr** lfdr(x) = pi0 f0(x) / f(x), f a Gaussian kernel density estimate of the sample
  (Silverman's bandwidth, binned on a grid of `GRID` points), stored on that grid. It is made
  non-increasing in x and set to 1 at and below the null's centre, because only a logit *above* the
  null's centre can be evidence for an expert; beyond the grid it keeps the grid's end values.

Each layer's `LayerNull` gives routing what a p-value method or selection rule asks for:

* ``pvalue(x)``: the upper tail of the fitted null, p = P(N(loc, scale^2) >= x) (``pvalue=calibrated``);
* ``ecdf_pvalue(x)``: the +1-corrected empirical upper tail of the pooled sample,
  p = (1 + #{z_j >= x}) / (n + 1) (``pvalue=ecdf``: alpha then bounds only the chance that a token
  gets any expert beyond min_k, because signal experts are part of the pooled sample);
* ``lfdr(x)``: the local false discovery rate (``selection=lfdr``).

All of them are invariant under a common rescaling of the logits, so `temperature`, applied to the
test logits and the null alike, has no effect on them.

Files (``save_calibration`` / ``read_calibration``; format version 2): arrays ``null`` (float32,
(L, n) or (L, E, n), rows sorted), ``fit`` ((L[, E], 3): loc, scale, pi0), ``lfdr`` ((L[, E], GRID))
and ``lfdr_range`` ((L[, E], 2): the grid's first and last point), plus a metadata object (format,
version, model, num_layers, num_experts, per_expert, samples_per_null, tokens, router_fingerprint:
the sha256 of the routers' weights, summary statistics per layer). ``*.npz``: a numpy archive with
those arrays and ``meta`` (JSON in a 0-d string array). Anything else: one JSON object
``{"format": ..., "version": 2, "meta": {...}, "arrays": {name: {"dtype": "float32", "shape": [...],
"encoding": "base64", "data": "<little-endian bytes>"}}}``.

A routing setting names its calibration as a file path, as ``auto`` (fitted at model load on the built-in
corpus, lm_eval_bh/corpus.py) or as a plain-text file to fit on (`source_kind` tells them apart); the
fitting and its cache are lm_eval_bh/autocal.py.

Torch, numpy and scipy only (no transformers).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import math
import os
import warnings
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from .errors import RoutingError

__all__ = [
    "FORMAT",
    "VERSION",
    "Calibration",
    "LayerNull",
    "NullSampler",
    "check_model",
    "check_settings",
    "file_provenance",
    "fit_null",
    "layers_fingerprint",
    "lfdr_table",
    "load_calibration",
    "read_calibration",
    "read_header",
    "router_fingerprint",
    "save_calibration",
    "source_kind",
]

FORMAT = "lm-eval-bh-calibration"
VERSION = 2
GRID = 512  # points of the stored lfdr grid
WINDOW = (0.02, 0.75)  # quantiles of the sample that central matching fits (signals are high logits)
BINS = 50  # histogram bins in that window
MIN_TAIL = 20  # fewer calibration values than this beyond the first BH threshold: a warning


# --- fitting the two-group model --------------------------------------------------------------------


def fit_null(samples: np.ndarray, window: tuple[float, float] = WINDOW, bins: int = BINS) -> np.ndarray:
    """Empirical null and pi0 of every row of `samples` (..., n), by central matching over the
    quantiles `window` in `bins` bins: (..., 3) float64 holding loc, scale, pi0. Location-scale
    equivariant (all arithmetic in units of the row's median and IQR); rows with no spread raise
    RoutingError."""
    from scipy.stats import norm

    x = np.sort(np.asarray(samples, dtype=np.float64), axis=-1)
    shape, n = x.shape[:-1], x.shape[-1]
    x = x.reshape(-1, n)
    q_lo, q25, med, q75, q_hi = np.quantile(x, [window[0], 0.25, 0.5, 0.75, window[1]], axis=-1)
    robust = (q75 - q25) / (norm.ppf(0.75) - norm.ppf(0.25))
    if not (robust > 0).all():
        raise RoutingError("calibration: a null sample has no spread (its interquartile range is 0); "
                           "calibrate on more text")
    u = (x - med[:, None]) / robust[:, None]
    a, b = (q_lo - med) / robust, (q_hi - med) / robust
    width = (b - a) / bins
    j = np.floor((u - a[:, None]) / width[:, None])
    inside = (j >= 0) & (j < bins)
    counts = np.zeros((x.shape[0], bins))
    rows = np.broadcast_to(np.arange(x.shape[0])[:, None], x.shape)
    np.add.at(counts, (rows[inside], j[inside].astype(np.int64)), 1.0)
    t = a[:, None] + (np.arange(bins) + 0.5) * width[:, None]
    design = np.stack([np.ones_like(t), t, t * t], axis=-1)  # log count = b0 + b1 t + b2 t^2
    logc = np.log(np.maximum(counts, 1.0))
    lhs = np.einsum("rk,rki,rkj->rij", counts, design, design)
    rhs = np.einsum("rk,rki,rk->ri", counts, design, logc)
    with np.errstate(all="ignore"):
        beta = np.linalg.solve(lhs + 1e-12 * np.eye(3), rhs[..., None])[..., 0]
        var = -0.5 / beta[:, 2]
        sd = np.sqrt(var)
        loc = beta[:, 1] * var
    ok = np.isfinite(sd) & (beta[:, 2] < 0) & (sd > 0.2) & (sd < 5.0) & (np.abs(loc) < 2.0)
    loc, sd = np.where(ok, loc, 0.0), np.where(ok, sd, 1.0)
    share = norm.cdf((b - loc) / sd) - norm.cdf((a - loc) / sd)  # f0's mass in the window
    inside_share = inside.mean(axis=-1)
    pi0 = np.where(ok, np.minimum(1.0, inside_share / np.maximum(share, 1e-12)), 1.0)
    out = np.stack([med + robust * loc, robust * sd, pi0], axis=-1)
    return out.reshape(*shape, 3)


def lfdr_table(samples: np.ndarray, fit: np.ndarray, grid: int = GRID) -> tuple[np.ndarray, np.ndarray]:
    """The local fdr pi0 f0 / f of every row of `samples` (..., n) on a grid: (range (..., 2), values
    (..., grid)). f is a binned Gaussian KDE (Silverman's bandwidth); lfdr is capped at 1, set to 1 at
    and below the null's location, and made non-increasing in x (a running minimum upwards)."""
    from scipy.ndimage import gaussian_filter1d
    from scipy.stats import norm

    x = np.sort(np.asarray(samples, dtype=np.float64), axis=-1)
    shape, n = x.shape[:-1], x.shape[-1]
    x, fit = x.reshape(-1, n), np.asarray(fit, dtype=np.float64).reshape(-1, 3)
    q25, q75 = np.quantile(x, [0.25, 0.75], axis=-1)
    spread = np.minimum(x.std(axis=-1), (q75 - q25) / 1.349)
    h = 0.9 * np.where(spread > 0, spread, fit[:, 1]) * n ** -0.2
    lo, hi = x[:, 0] - 4 * h, x[:, -1] + 4 * h
    step = (hi - lo) / (grid - 1)
    values = np.empty((x.shape[0], grid))
    points = lo[:, None] + step[:, None] * np.arange(grid)
    for r in range(x.shape[0]):  # linear binning, then one Gaussian filter per row (bandwidth in bins)
        pos = (x[r] - lo[r]) / step[r]
        left = np.clip(np.floor(pos).astype(np.int64), 0, grid - 2)
        frac = pos - left
        mass = np.bincount(left, 1.0 - frac, grid) + np.bincount(left + 1, frac, grid)
        dens = gaussian_filter1d(mass, h[r] / step[r], mode="constant", truncate=6.0) / (n * step[r])
        f0 = fit[r, 2] * norm.pdf(points[r], fit[r, 0], fit[r, 1])
        with np.errstate(divide="ignore", invalid="ignore"):
            raw = np.where(dens > 0, f0 / dens, 1.0)
        raw = np.where(points[r] <= fit[r, 0], 1.0, np.minimum(raw, 1.0))
        values[r] = np.minimum.accumulate(raw)
    return np.stack([lo, hi], axis=-1).reshape(*shape, 2), values.reshape(*shape, grid)


def layers_fingerprint(layers) -> str:
    """The router fingerprint of MoE layers (anything with a `.router` module): every router's weight
    and bias, in layer order. Written by ``lm-eval-bh calibrate``, checked when a calibration loads.
    Routers whose weights accelerate offloads (on the meta device between forwards) are read in, one at a
    time, through accelerate's own hooks."""

    def tensors():
        for layer in layers:
            with contextlib.ExitStack() as stack:
                for module in layer.router.modules():
                    if any(p.device.type == "meta" for p in module.parameters(recurse=False)):
                        from accelerate.utils import align_module_device

                        stack.enter_context(align_module_device(module, execution_device="cpu"))
                yield from (layer.weight, getattr(layer.router, "bias", None))

    return router_fingerprint(tensors())


def router_fingerprint(tensors) -> str:
    """sha256 over the routers' weights (and biases), in the order given, rounded to bfloat16 so that
    the same checkpoint loaded in float32, float16 or bfloat16 gives the same fingerprint."""
    digest = hashlib.sha256()
    for t in tensors:
        if t is None:
            continue
        t = t.detach().to("cpu", torch.bfloat16).contiguous()
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


# --- one layer's null, as routing uses it ---------------------------------------------------------


def _t(a) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)


@dataclass(frozen=True)
class LayerNull:
    """One layer's null, on one device. `samples`: float32 sorted along the last dim, (n,) shared by all
    experts or (E, n) one per expert. `fit`: (3,) or (E, 3) loc, scale, pi0 (fitted from `samples` when
    not given); `lfdr_values`, `lfdr_range`: the local-fdr grid (optional). Pass it as
    ``routing.route(logits, cfg, null=...)``."""

    samples: torch.Tensor
    fit: torch.Tensor | None = None
    lfdr_values: torch.Tensor | None = None
    lfdr_range: torch.Tensor | None = None

    def __post_init__(self):
        if self.fit is None:
            object.__setattr__(self, "fit", _t(fit_null(self.samples.cpu().numpy())).to(self.samples.device))

    @property
    def per_expert(self) -> bool:
        return self.samples.dim() == 2

    @property
    def n(self) -> int:
        return self.samples.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.samples.device

    def to(self, device) -> "LayerNull":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return LayerNull(move(self.samples), move(self.fit), move(self.lfdr_values), move(self.lfdr_range))

    def _check(self, x: torch.Tensor) -> None:
        if self.per_expert and x.shape[-1] != self.samples.shape[0]:
            raise RoutingError(f"calibration has {self.samples.shape[0]} experts per layer but the logits have "
                               f"{x.shape[-1]}")

    def pvalue(self, x: torch.Tensor) -> torch.Tensor:
        """p = P(N(loc, scale^2) >= x) for every element of x (shape (..., E)), float32: the upper tail of
        the fitted empirical null (``pvalue=calibrated``). No host synchronisation."""
        self._check(x)
        z = (x.float() - self.fit[..., 0]) / self.fit[..., 1]
        return 0.5 * torch.erfc(z * (1.0 / math.sqrt(2.0)))

    def ecdf_pvalue(self, x: torch.Tensor) -> torch.Tensor:
        """p = (1 + #{null >= x}) / (n + 1), the +1 empirical upper tail of the pooled sample
        (``pvalue=ecdf``): one `searchsorted` per value. NaN in x is not supported (routing cleans
        logits first)."""
        self._check(x)
        x = x.float()
        n = self.n
        if self.per_expert:
            e = self.samples.shape[0]
            flat = x.reshape(-1, e).t().contiguous()  # (E, T): one row of values per expert's sample
            below = torch.searchsorted(self.samples, flat, side="left").t().reshape(x.shape)
        else:
            below = torch.searchsorted(self.samples, x.contiguous(), side="left")  # #null < x
        return (n + 1 - below).float() / (n + 1)

    def lfdr(self, x: torch.Tensor) -> torch.Tensor:
        """The local false discovery rate of every element of x (shape (..., E)), float32 in [0, 1]:
        linear interpolation on the stored grid, clamped to its ends."""
        if self.lfdr_values is None:
            raise RoutingError("this calibration has no local-fdr table (selection=lfdr needs a calibration file "
                               "from `lm-eval-bh calibrate`)")
        self._check(x)
        grid = self.lfdr_values.shape[-1]
        lo, hi = self.lfdr_range[..., 0], self.lfdr_range[..., 1]
        pos = ((x.float() - lo) / (hi - lo) * (grid - 1)).clamp(0, grid - 1)
        left = pos.floor().clamp_max(grid - 2)
        frac = pos - left
        left = left.long()
        if self.per_expert:  # (..., E): gather along each expert's own row
            table = self.lfdr_values
            e = table.shape[0]
            flat_left = left.reshape(-1, e)
            rows = torch.arange(e, device=x.device).expand_as(flat_left)
            v0 = table[rows, flat_left].reshape(x.shape)
            v1 = table[rows, flat_left + 1].reshape(x.shape)
        else:
            v0, v1 = self.lfdr_values[left], self.lfdr_values[left + 1]
        return v0 + (v1 - v0) * frac


# --- streaming collection -----------------------------------------------------------------------


class NullSampler:
    """Bounded uniform sample of router logits for `num_layers` layers, shared or per expert.

    `add(layer, logits)` with logits (T, E) of real tokens only. Shared: the sample is over all
    (token, expert) values of the layer. Per expert: over the tokens, separately for each expert.
    """

    def __init__(self, num_layers: int, num_experts: int, size: int = 16384, per_expert: bool = False, seed: int = 0):
        if size < 1:
            raise RoutingError(f"samples must be an integer >= 1, got {size!r}")
        self.num_layers, self.num_experts, self.size, self.per_expert = num_layers, num_experts, size, per_expert
        self._gen = torch.Generator().manual_seed(seed)
        rows = num_experts if per_expert else 1
        self._values = [torch.empty(rows, 0) for _ in range(num_layers)]
        self._keys = [torch.empty(rows, 0) for _ in range(num_layers)]
        self.tokens = [0] * num_layers
        self._sum = [torch.zeros(rows, dtype=torch.float64) for _ in range(num_layers)]
        self._sumsq = [torch.zeros(rows, dtype=torch.float64) for _ in range(num_layers)]
        self._min = [torch.full((rows,), np.inf, dtype=torch.float64) for _ in range(num_layers)]
        self._max = [torch.full((rows,), -np.inf, dtype=torch.float64) for _ in range(num_layers)]

    def add(self, layer: int, logits: torch.Tensor) -> None:
        x = logits.detach().float().cpu().reshape(-1, self.num_experts)
        x = x[torch.isfinite(x).all(dim=-1)]  # a broken token must not poison the null
        if x.shape[0] == 0:
            return
        self.tokens[layer] += x.shape[0]
        v = x.t() if self.per_expert else x.reshape(1, -1)  # (rows, N)
        v64 = v.double()
        self._sum[layer] += v64.sum(dim=1)
        self._sumsq[layer] += (v64 * v64).sum(dim=1)
        self._min[layer] = torch.minimum(self._min[layer], v64.amin(dim=1))
        self._max[layer] = torch.maximum(self._max[layer], v64.amax(dim=1))
        n_new = v.shape[1]
        # one key per token for per-expert samples (every expert keeps the same tokens), one per value otherwise
        keys = torch.rand(1, n_new, generator=self._gen).expand(v.shape[0], n_new)
        values = torch.cat([self._values[layer], v], dim=1)
        allkeys = torch.cat([self._keys[layer], keys], dim=1)
        if values.shape[1] > self.size:
            allkeys, idx = allkeys.topk(self.size, dim=1, largest=False, sorted=False)
            values = values.gather(1, idx)
        self._values[layer], self._keys[layer] = values.contiguous(), allkeys.contiguous()

    def sample(self, layer: int, n: int | None = None) -> np.ndarray:
        """Layer `layer`'s sample (its first `n` values), sorted: float32 (n,) shared or (E, n) per expert."""
        v = self._values[layer][:, :n].sort(dim=1).values.numpy().astype(np.float32)
        return v if self.per_expert else v[0]

    def reset(self, layer: int) -> None:
        """Forget what layer `layer` has seen (its sample is then taken again, e.g. under other routing)."""
        rows = self.num_experts if self.per_expert else 1
        self._values[layer], self._keys[layer] = torch.empty(rows, 0), torch.empty(rows, 0)
        self.tokens[layer] = 0
        self._sum[layer], self._sumsq[layer] = torch.zeros(rows, dtype=torch.float64), torch.zeros(rows, dtype=torch.float64)
        self._min[layer] = torch.full((rows,), np.inf, dtype=torch.float64)
        self._max[layer] = torch.full((rows,), -np.inf, dtype=torch.float64)

    def calibration(self, meta: dict | None = None) -> "Calibration":
        """The sorted samples and metadata (summary statistics per layer included)."""
        if min(self.tokens, default=0) == 0:
            raise RoutingError("calibration saw no tokens: give it some text (--text or --tasks)")
        n = min(v.shape[1] for v in self._values)
        null = np.stack([self.sample(i, n) for i in range(self.num_layers)])
        stats = []
        for i in range(self.num_layers):
            count = self.tokens[i] * (1 if self.per_expert else self.num_experts)
            mean = self._sum[i] / count
            std = (self._sumsq[i] / count - mean * mean).clamp_min(0).sqrt()
            q = np.quantile(null[i], [0.01, 0.5, 0.99], axis=-1)
            entry = {"mean": mean, "std": std, "min": self._min[i], "max": self._max[i]}
            entry = {k: _r(v.tolist() if self.per_expert else v.item()) for k, v in entry.items()}
            entry.update({f"q{int(p * 100):02d}": _r(q[j].tolist() if self.per_expert else float(q[j]))
                          for j, p in enumerate((0.01, 0.5, 0.99))})
            stats.append(entry)
        full = {
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "per_expert": self.per_expert,
            "router_fingerprint": None,
            "samples_per_null": int(n),
            "tokens": int(self.tokens[0]),
            "layer_stats": stats,
            **(meta or {}),
        }
        return Calibration.from_samples(null, full)


def _r(v):
    return [round(float(a), 5) for a in v] if isinstance(v, list) else round(float(v), 5)


# --- calibrations and their files --------------------------------------------------------------------

ARRAYS = ("null", "fit", "lfdr", "lfdr_range")


@dataclass
class Calibration:
    """`null`: float32 (L, n) shared or (L, E, n) per expert, rows sorted ascending; `fit`, `lfdr`,
    `lfdr_range`: the fitted two-group model (computed from `null` when not given); `meta`: metadata."""

    null: np.ndarray
    meta: dict = field(default_factory=dict)
    fit: np.ndarray | None = None
    lfdr: np.ndarray | None = None
    lfdr_range: np.ndarray | None = None

    def __post_init__(self):
        self.null = np.sort(np.asarray(self.null, dtype=np.float32), axis=-1)
        if self.fit is None:
            self.fit = fit_null(self.null).astype(np.float32)
        if self.lfdr is None or self.lfdr_range is None:
            lfdr_range, lfdr = lfdr_table(self.null, self.fit)
            self.lfdr_range, self.lfdr = lfdr_range.astype(np.float32), lfdr.astype(np.float32)

    @classmethod
    def from_samples(cls, null: np.ndarray, meta: dict | None = None) -> "Calibration":
        """A calibration with its two-group model fitted from the null samples."""
        return cls(null, dict(meta or {}))

    @property
    def per_expert(self) -> bool:
        return self.null.ndim == 3

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        return {name: np.ascontiguousarray(getattr(self, name), dtype="<f4") for name in ARRAYS}

    def layer_nulls(self, device=None) -> list[LayerNull]:
        """One `LayerNull` per layer, on `device`."""
        device = device or "cpu"
        return [LayerNull(*(_t(getattr(self, a)[i]).to(device) for a in ARRAYS)) for i in range(self.null.shape[0])]


def save_calibration(path: str | os.PathLike, cal: Calibration) -> str:
    """Write `cal` to `path` (.npz -> numpy archive, else JSON with base64 float32), atomically."""
    path = os.fspath(path)
    arrays = cal.arrays
    null = arrays["null"]
    meta = {"router_fingerprint": None, **cal.meta, "format": FORMAT, "version": VERSION,
            "per_expert": null.ndim == 3, "num_layers": int(null.shape[0]), "samples_per_null": int(null.shape[-1])}
    if null.ndim == 3:
        meta["num_experts"] = int(null.shape[1])
    errors = _header_errors(meta) + _array_errors(meta, arrays)
    if errors:
        raise RoutingError(f"cannot write calibration file {path}: {'; '.join(errors)}")
    tmp = f"{path}.tmp{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        if path.endswith(".npz"):
            with open(tmp, "wb") as f:
                np.savez_compressed(f, meta=np.array(json.dumps(meta)), **arrays)
        else:
            blobs = {name: {"dtype": "float32", "shape": list(a.shape), "encoding": "base64",
                            "data": base64.b64encode(a.tobytes()).decode("ascii")} for name, a in arrays.items()}
            with open(tmp, "w") as f:
                json.dump({"format": FORMAT, "version": VERSION, "meta": meta, "arrays": blobs}, f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _read.cache_clear()
    return path


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _header_errors(meta) -> list[str]:
    """Every malformed metadata field, one message each (types included)."""
    if not isinstance(meta, dict):
        return [f"'meta' must be an object, got {type(meta).__name__}"]
    errors = []
    for name in ("num_layers", "num_experts", "samples_per_null"):
        v = meta.get(name)
        if not (_is_int(v) and v >= 1):
            errors.append(f"'{name}' must be an integer >= 1, got {v!r}")
    if not isinstance(meta.get("per_expert"), bool):
        errors.append(f"'per_expert' must be true or false, got {meta.get('per_expert')!r}")
    fp = meta.get("router_fingerprint")
    if fp is not None and not (isinstance(fp, str) and len(fp) == 64 and all(c in "0123456789abcdef" for c in fp)):
        errors.append(f"'router_fingerprint' must be a sha256 hex digest or null, got {fp!r}")
    if meta.get("model") is not None and not isinstance(meta.get("model"), str):
        errors.append(f"'model' must be a string or null, got {meta.get('model')!r}")
    return errors


def _array_errors(meta: dict, arrays: dict) -> list[str]:
    """Every array that is missing, of the wrong shape for the metadata, non-finite or out of range."""
    errors = []
    for name in ARRAYS:
        if not isinstance(arrays.get(name), np.ndarray):
            errors.append(f"array '{name}' is missing")
        elif not np.isfinite(arrays[name]).all():
            errors.append(f"array '{name}' contains NaN or infinity")
    if errors or _header_errors(meta):
        return errors
    lead = (meta["num_layers"], meta["num_experts"]) if meta["per_expert"] else (meta["num_layers"],)
    null, fit, lfdr, rng = (arrays[a] for a in ARRAYS)
    expected = {"null": lead + (meta["samples_per_null"],), "fit": lead + (3,), "lfdr_range": lead + (2,)}
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            errors.append(f"array '{name}' has shape {list(arrays[name].shape)}, the metadata say {list(shape)}")
    if lfdr.shape[:-1] != lead or lfdr.shape[-1] < 2:
        errors.append(f"array 'lfdr' has shape {list(lfdr.shape)}, the metadata say {list(lead)} + [grid >= 2]")
    if errors:
        return errors
    if not ((fit[..., 1] > 0).all() and (fit[..., 2] > 0).all() and (fit[..., 2] <= 1).all()):
        errors.append("array 'fit' needs scale > 0 and pi0 in (0, 1]")
    if not (rng[..., 0] < rng[..., 1]).all():
        errors.append("array 'lfdr_range' needs its first point below its last")
    if not ((lfdr >= 0).all() and (lfdr <= 1).all()):
        errors.append("array 'lfdr' must lie in [0, 1]")
    return errors


def _decode(name: str, blob, errors: list[str]) -> np.ndarray | None:
    if not isinstance(blob, dict):
        errors.append(f"array '{name}' must be an object with dtype, shape, encoding and data")
        return None
    shape = blob.get("shape")
    if blob.get("dtype") != "float32" or blob.get("encoding") != "base64" or not isinstance(blob.get("data"), str):
        errors.append(f"array '{name}' must be base64 float32 data")
    elif not (isinstance(shape, list) and all(_is_int(s) and s >= 0 for s in shape)):
        errors.append(f"array '{name}': 'shape' must be a list of integers, got {shape!r}")
    else:
        try:
            a = np.frombuffer(base64.b64decode(blob["data"], validate=True), dtype="<f4")
        except ValueError as e:
            errors.append(f"array '{name}': {e}")
            return None
        if a.size != math.prod(shape):
            errors.append(f"array '{name}' holds {a.size} values, not {shape}")
            return None
        return a.reshape(shape).astype(np.float32)
    return None


def _parse(path: str) -> tuple[object, dict, list[str]]:
    """(meta, arrays, errors) of a file; format and version problems raise at once."""
    bad = lambda why: RoutingError(f"calibration file {path} is not a valid lm-eval-bh calibration file: {why}")  # noqa: E731
    errors: list[str] = []
    try:
        if zipfile.is_zipfile(path):
            with np.load(path, allow_pickle=False) as z:
                if "meta" not in z:
                    raise bad("the archive has no 'meta'")
                meta = json.loads(str(z["meta"]))
                arrays = {a: np.asarray(z[a], dtype=np.float32) for a in ARRAYS if a in z}
            version = meta.get("version") if isinstance(meta, dict) else None
            fmt = meta.get("format") if isinstance(meta, dict) else None
        else:
            with open(path) as f:
                doc = json.load(f)
            if not isinstance(doc, dict):
                raise bad("the JSON document is not an object")
            fmt, version, meta = doc.get("format"), doc.get("version"), doc.get("meta")
            blobs = doc.get("arrays") if _is_int(version) and version == VERSION else {}
            if not isinstance(blobs, dict):
                raise bad("'arrays' must be an object")
            arrays = {a: _decode(a, blobs[a], errors) for a in ARRAYS if a in blobs}
    except RoutingError:
        raise
    except RecursionError:
        raise bad("the JSON is nested too deeply") from None
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, UnicodeDecodeError, EOFError) as e:
        raise bad(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")) from None
    if fmt != FORMAT:
        raise bad(f"'format' must be {FORMAT!r}, got {fmt!r}")
    if not _is_int(version):
        raise bad(f"'version' must be an integer, got {version!r}")
    if version < VERSION:
        raise RoutingError(f"calibration file {path} has format version {version}, which this lm-eval-bh no longer "
                           f"reads (version {VERSION} adds the fitted null and the router fingerprint); "
                           "run `lm-eval-bh calibrate` again")
    if version > VERSION:
        raise bad(f"version {version} is newer than this lm-eval-bh reads ({VERSION})")
    return meta, {a: v for a, v in arrays.items() if v is not None}, errors


@lru_cache(maxsize=4)
def _read(path: str, stamp: tuple) -> Calibration:
    meta, arrays, errors = _parse(path)
    errors += _header_errors(meta)
    errors += _array_errors(meta, arrays) if not errors else []
    if errors:
        raise RoutingError(f"calibration file {path} is not a valid lm-eval-bh calibration file: {'; '.join(errors)}")
    return Calibration(arrays["null"], meta, arrays["fit"], arrays["lfdr"], arrays["lfdr_range"])


def read_calibration(path: str | os.PathLike) -> Calibration:
    """Read and validate a calibration file (every field's type and every array's shape and values);
    RoutingError (one line naming the file and each malformed field) otherwise. Cached per path and
    modification time."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise RoutingError(f"calibration file not found: {path}")
    st = os.stat(path)
    return _read(path, (st.st_mtime_ns, st.st_size))


def read_header(path: str | os.PathLike) -> dict:
    """The validated metadata of a calibration file."""
    return read_calibration(path).meta


def _check_experts(path: str, meta: dict, num_experts: int, num_layers: int | None = None) -> None:
    layers, experts = meta["num_layers"], meta["num_experts"]
    if experts != num_experts or (num_layers is not None and layers != num_layers):
        made_for = f" ({meta['model']})" if meta.get("model") else ""
        has = f"{num_layers} MoE layers and " if num_layers is not None else ""
        raise RoutingError(f"calibration file {path} was made for a model with {layers} MoE layers and {experts} "
                           f"experts{made_for}; this model has {has}{num_experts} experts")


TEXT_SUFFIXES = (".txt", ".text", ".md", ".jsonl")


def source_kind(value: str) -> str:
    """What a `calibration` value names: "auto" (the built-in corpus), "text" (a plain-text or JSON-lines
    file to fit on at load: a name ending in .txt, .text, .md or .jsonl) or "file" (a calibration file)."""
    if value == "auto":
        return "auto"
    return "text" if str(value).lower().endswith(TEXT_SUFFIXES) else "file"


def check_settings(cfg, num_experts: int) -> None:
    """Before any weights load: the calibration file of `cfg` (if any) is valid, made for `num_experts`
    experts, and can resolve cfg's alpha. pvalue=ecdf with selection=bh needs alpha / num_experts >=
    1 / (n + 1) (else no expert could ever be added: a one-line RoutingError) and warns when fewer than
    MIN_TAIL calibration values lie beyond that first BH threshold (the tail rate there is then known
    to about 1 / sqrt(count))."""
    path = getattr(cfg, "calibration", None)
    if path is None or source_kind(path) != "file":  # fitted at load (autocal), checked there
        return
    cal = read_calibration(path)
    _check_experts(path, cal.meta, num_experts)
    if getattr(cfg, "pvalue", None) != "ecdf" or getattr(cfg, "selection", None) != "bh":
        return
    n, threshold = cal.meta["samples_per_null"], cfg.alpha / num_experts
    if threshold * (n + 1) < 1:
        raise RoutingError(
            f"alpha={cfg.alpha:g} is finer than calibration file {path} can resolve with pvalue=ecdf: its nulls hold "
            f"{n} values, so the smallest p-value is 1/(n+1) = {1 / (n + 1):.3g} > alpha/num_experts = {threshold:.3g}; "
            f"use alpha >= {num_experts / (n + 1):.3g} or calibrate with --samples >= {math.ceil(num_experts / cfg.alpha)}")
    beyond = math.floor(threshold * (n + 1)) - 1
    if beyond < MIN_TAIL:
        warnings.warn(
            f"lm-eval-bh: only {beyond} of the {n} values per null in calibration file {path} lie beyond the first "
            f"BH threshold alpha/num_experts = {threshold:.3g}, so the tail rate there is known to about "
            f"{100 / math.sqrt(max(beyond, 1)):.0f} %; calibrate with --samples >= "
            f"{math.ceil((MIN_TAIL + 1) * num_experts / cfg.alpha)} for a steadier pvalue=ecdf", stacklevel=2)


def load_calibration(path: str | os.PathLike, num_layers: int, num_experts: int, device=None, *,
                     fingerprint: str | None = None) -> list[LayerNull]:
    """The per-layer nulls of a calibration file, checked against the model (one per MoE layer, in order).

    RoutingError (one line naming the file) when the file is missing or malformed, made for a model with
    another number of MoE layers or experts, or, given this model's `router_fingerprint`, for other
    router weights."""
    path = os.fspath(path)
    return check_model(read_calibration(path), path, num_layers, num_experts, fingerprint=fingerprint).layer_nulls(device)


def file_provenance(path: str, cal: Calibration) -> dict:
    """The results file's record of a calibration file: its path, content hash and what it was fitted on."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    prov = dict(cal.meta.get("provenance") or {})
    under = cal.meta.get("under", "stock")  # files older than --under were fitted under the stock routers
    out = {**prov, "source": "file", "status": "file", "path": path, "sha256": digest.hexdigest(),
           "per_expert": cal.per_expert,
           "tokens": prov.get("tokens", cal.meta.get("tokens")), "under": "stock" if under == "stock" else "routing"}
    if isinstance(under, dict):
        out["under_settings"] = under.get("routing")
    return out


def check_model(cal: Calibration, name: str, num_layers: int, num_experts: int, *,
                fingerprint: str | None = None) -> Calibration:
    """`cal` (from the file or source `name`), checked against a model's MoE layers, experts and routers."""
    _check_experts(name, cal.meta, num_experts, num_layers)
    theirs = cal.meta.get("router_fingerprint")
    if fingerprint is not None and theirs is not None and theirs != fingerprint:
        raise RoutingError(f"calibration file {name} was made for other router weights (fingerprint {theirs[:12]}, "
                           f"this model's {fingerprint[:12]}); run `lm-eval-bh calibrate` on this model")
    return cal
