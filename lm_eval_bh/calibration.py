"""Calibrated router p-values: per-layer (or per-expert) null distributions of router logits.

A calibration is, for every MoE layer, a uniform random sample (without replacement, bounded size)
of the router logits that the model produced on unlabeled text: one sample shared by all experts of
the layer, or one per expert (`per_expert`). The p-value of a logit x against such a null sample
z_1..z_n is the empirical upper tail with the +1 ("conformal") correction

    p(x) = (1 + #{j : z_j >= x}) / (n + 1),

which is exactly super-uniform when x and the z_j are exchangeable (P(p <= t) <= t for every t), so
Benjamini-Hochberg keeps its guarantee with these p-values (Bates et al. 2023, "Testing for outliers
with conformal p-values": conformal p-values that share one calibration sample are PRDS). p is
never 0 (the smallest value is 1/(n+1)), a step function of x, non-increasing in x. With a shared
null it orders experts exactly like their logits; with per-expert nulls it does not (see
routing.route). The "null" is the marginal distribution of the layer's logits over all tokens and
experts, so a small p means "this logit is extreme for this layer", not "this expert is needed".

Collecting is streaming and bounded: `NullSampler` keeps, per layer (and expert), the `size` values
with the smallest i.i.d. uniform random keys seen so far (a bottom-k / priority sample, which is a
uniform sample without replacement of everything seen), plus exact running count, mean, std, min and
max. Memory is O(layers x [experts x] size) whatever the amount of text.

File format (written by `save_calibration`, read by `read_calibration`), chosen by the extension:

* ``*.npz``: numpy archive with ``null`` (float32, (L, n) or (L, E, n), each row sorted ascending)
  and ``meta`` (a 0-d unicode array holding the metadata as JSON).
* anything else (e.g. ``*.json``): one JSON object
  ``{"format": "lm-eval-bh-calibration", "version": 1, "meta": {...}, "null": {"dtype": "float32",
  "shape": [...], "encoding": "base64", "data": "<little-endian float32 bytes, base64>"}}``.

``meta`` holds at least: format, version, model, num_layers, num_experts, per_expert,
samples_per_null (n), tokens (number of tokens seen), and per-layer summary statistics.

Torch and numpy only (no transformers); the model-facing part is lm_eval_bh/calibrate.py.
"""

from __future__ import annotations

import base64
import json
import os
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
    "load_calibration",
    "read_calibration",
    "read_header",
    "save_calibration",
]

FORMAT = "lm-eval-bh-calibration"
VERSION = 1


# --- p-values from a null sample ----------------------------------------------------------------


@dataclass(frozen=True)
class LayerNull:
    """One layer's null: `samples` float32 sorted ascending along the last dim, shape (n,) shared by all
    experts or (E, n) one per expert. Pass it as ``routing.route(logits, cfg, null=...)``."""

    samples: torch.Tensor

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
        return LayerNull(self.samples.to(device))

    def pvalue(self, x: torch.Tensor) -> torch.Tensor:
        """p = (1 + #{null >= x}) / (n + 1) for every element of x (shape (..., E)), float32.

        One `searchsorted` (binary search, log2(n) steps per value), no host synchronisation. NaN in
        x is not supported (routing cleans logits first).
        """
        x = x.float()
        n = self.n
        if self.per_expert:
            e = self.samples.shape[0]
            if x.shape[-1] != e:
                raise RoutingError(f"calibration has {e} experts per layer but the logits have {x.shape[-1]}")
            flat = x.reshape(-1, e).t().contiguous()  # (E, T): one row of values per expert's sample
            below = torch.searchsorted(self.samples, flat, side="left").t().reshape(x.shape)
        else:
            below = torch.searchsorted(self.samples, x.contiguous(), side="left")  # #null < x
        return (n + 1 - below).float() / (n + 1)


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

    def calibration(self, meta: dict | None = None) -> "Calibration":
        """The sorted samples and metadata (summary statistics per layer included)."""
        if min(self.tokens, default=0) == 0:
            raise RoutingError("calibration saw no tokens: give it some text (--text or --tasks)")
        n = min(v.shape[1] for v in self._values)
        null = np.stack([v[:, :n].sort(dim=1).values.numpy() for v in self._values]).astype(np.float32)
        if not self.per_expert:
            null = null[:, 0, :]
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
            "samples_per_null": int(n),
            "tokens": int(self.tokens[0]),
            "layer_stats": stats,
            **(meta or {}),
        }
        return Calibration(null, full)


def _r(v):
    return [round(float(a), 5) for a in v] if isinstance(v, list) else round(float(v), 5)


# --- files --------------------------------------------------------------------------------------


@dataclass
class Calibration:
    """`null`: float32 (L, n) shared or (L, E, n) per expert, rows sorted ascending; `meta`: metadata."""

    null: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def per_expert(self) -> bool:
        return self.null.ndim == 3

    def layer_nulls(self, device=None) -> list[LayerNull]:
        return [LayerNull(torch.from_numpy(np.ascontiguousarray(a)).to(device or "cpu")) for a in self.null]


def save_calibration(path: str | os.PathLike, cal: Calibration) -> str:
    """Write `cal` to `path` (.npz -> numpy archive, else JSON with base64 float32), atomically."""
    path = os.fspath(path)
    null = np.ascontiguousarray(cal.null, dtype="<f4")
    meta = {"format": FORMAT, "version": VERSION, **cal.meta, "per_expert": null.ndim == 3}
    meta["num_layers"] = int(null.shape[0])
    meta["samples_per_null"] = int(null.shape[-1])
    if null.ndim == 3:
        meta["num_experts"] = int(null.shape[1])
    tmp = f"{path}.tmp{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        if path.endswith(".npz"):
            with open(tmp, "wb") as f:
                np.savez_compressed(f, null=null, meta=np.array(json.dumps(meta)))
        else:
            doc = {
                "format": FORMAT,
                "version": VERSION,
                "meta": meta,
                "null": {"dtype": "float32", "shape": list(null.shape), "encoding": "base64",
                         "data": base64.b64encode(null.tobytes()).decode("ascii")},
            }
            with open(tmp, "w") as f:
                json.dump(doc, f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    read_header.cache_clear()
    return path


def read_calibration(path: str | os.PathLike) -> Calibration:
    """Read a calibration file; RoutingError (one line) if it is missing or not a valid one."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise RoutingError(f"calibration file not found: {path}")
    bad = lambda why: RoutingError(f"calibration file {path} is not a valid lm-eval-bh calibration file: {why}")  # noqa: E731
    try:
        if zipfile.is_zipfile(path):
            with np.load(path, allow_pickle=False) as z:
                if "null" not in z or "meta" not in z:
                    raise bad("the archive lacks 'null' or 'meta'")
                null, meta = np.asarray(z["null"], dtype=np.float32), json.loads(str(z["meta"]))
        else:
            with open(path) as f:
                doc = json.load(f)
            if not isinstance(doc, dict) or doc.get("format") != FORMAT:
                raise bad(f"'format' is not {FORMAT!r}")
            meta, blob = doc.get("meta"), doc.get("null") or {}
            if blob.get("encoding") != "base64" or blob.get("dtype") != "float32":
                raise bad("'null' must be base64 float32")
            null = np.frombuffer(base64.b64decode(blob["data"], validate=True), dtype="<f4")
            shape = tuple(int(s) for s in blob["shape"])
            if int(np.prod(shape)) != null.size:
                raise bad(f"'null' holds {null.size} values, not {shape}")
            null = null.reshape(shape).astype(np.float32)
    except RoutingError:
        raise
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, UnicodeDecodeError, EOFError) as e:
        raise bad(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise bad(f"metadata 'format' is not {FORMAT!r}")
    if int(meta.get("version", -1)) > VERSION:
        raise bad(f"version {meta.get('version')} is newer than this lm-eval-bh reads ({VERSION})")
    if null.ndim not in (2, 3) or null.shape[-1] < 1 or null.shape[0] < 1:
        raise bad(f"'null' must have shape (layers, n) or (layers, experts, n), got {null.shape}")
    if not np.isfinite(null).all():
        raise bad("'null' contains NaN or infinity")
    if int(meta.get("num_layers", -1)) != null.shape[0] or (null.ndim == 3 and int(meta.get("num_experts", -1)) != null.shape[1]):
        raise bad(f"metadata (num_layers={meta.get('num_layers')}, num_experts={meta.get('num_experts')}) "
                  f"does not match 'null' of shape {null.shape}")
    return Calibration(np.sort(null, axis=-1), meta)


@lru_cache(maxsize=16)
def _header(path: str, mtime: float) -> dict:
    return read_calibration(path).meta


def read_header(path: str | os.PathLike) -> dict:
    """The metadata of a calibration file (cached per path and modification time)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise RoutingError(f"calibration file not found: {path}")
    return _header(path, os.path.getmtime(path))


read_header.cache_clear = _header.cache_clear  # type: ignore[attr-defined]


def load_calibration(path: str | os.PathLike, num_layers: int, num_experts: int, device=None) -> list[LayerNull]:
    """The per-layer nulls of a calibration file, checked against the model (one per MoE layer, in order).

    RoutingError (one line) when the file is missing, corrupt, or made for a model with another number
    of MoE layers or experts. Each `LayerNull` can be moved with `.to(device)`.
    """
    cal = read_calibration(path)
    meta = cal.meta
    layers, experts = int(meta.get("num_layers", -1)), int(meta.get("num_experts", -1))
    if (layers, experts) != (num_layers, num_experts):
        made_for = f" ({meta['model']})" if meta.get("model") else ""
        raise RoutingError(
            f"calibration file {os.fspath(path)} was made for a model with {layers} MoE layers and {experts} experts"
            f"{made_for}; this model has {num_layers} MoE layers and {num_experts} experts"
        )
    return cal.layer_nulls(device)
