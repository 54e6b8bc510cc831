"""Exact routing statistics: how many experts each real token used, per layer and per group (task),
and per-layer diagnostics of the p-values and the selection rule.

Counts live on the device, a histogram per MoE layer indexed (group, k), updated with one scatter-add
per model forward: no host synchronisation and few kernel launches in the forward pass. Tokens whose
group is -1 (padding added by batching, dummy batches) are not counted. The diagnostics (per layer:
real tokens, the rule's count before clamping summed, tokens raised to min_k, tokens cut to max_k, a
20-bin histogram of all experts' p-values) are device counters of the same kind, with the same mask.
"""

from __future__ import annotations

import torch

__all__ = ["RoutingStats", "PVALUE_BINS"]

PVALUE_BINS = 20  # equal bins over [0, 1]
_DIAG = 4 + PVALUE_BINS  # tokens, sum of discoveries, raised to min_k, cut to max_k, p-value histogram


class RoutingStats:
    """Histograms of k per (MoE layer, group), one table per device holding that device's layers."""

    def __init__(self, devices: list[torch.device], max_k: int):
        self.max_k = max_k
        self.groups: list[str] = []
        self._where = []  # layer -> (device, row in that device's table)
        layers_on: dict[torch.device, int] = {}
        for d in devices:
            self._where.append((d, layers_on.get(d, 0)))
            layers_on[d] = layers_on.get(d, 0) + 1
        self._tables = {d: torch.zeros(n, 0, max_k + 1, dtype=torch.long, device=d) for d, n in layers_on.items()}
        self._every_layer = torch.zeros(0, max_k + 1, dtype=torch.long, device=devices[0])
        self._nonfinite = {d: torch.zeros((), dtype=torch.long, device=d) for d in layers_on}
        self._diag = {d: torch.zeros(n, _DIAG, dtype=torch.long, device=d) for d, n in layers_on.items()}
        self.diagnosed = False  # whether any p-values were recorded (not with the fixed-k stock router)
        self._rows: dict = {}  # (device, layers) -> their rows in the device's table, as a tensor

    def group_id(self, name: str) -> int:
        """The id of a named group, adding it (and a row to every histogram) if new."""
        if name not in self.groups:
            self.groups.append(name)
            self._tables = {d: torch.cat([t, t.new_zeros(t.shape[0], 1, self.max_k + 1)], 1) for d, t in self._tables.items()}
            self._every_layer = torch.cat([self._every_layer, self._every_layer.new_zeros(1, self.max_k + 1)])
        return self.groups.index(name)

    def add(self, layers: list[int], ks: list[torch.Tensor], groups: torch.Tensor, nonfinite=None,
            discoveries=None, pvalues=None) -> None:
        """Count each token's k in each of `layers` (all on `groups`' device) under its group; groups < 0
        are skipped. One scatter for all the layers of a forward: few kernel launches, no host sync.
        `discoveries` (the rule's counts before clamping, (T,) per layer) and `pvalues` ((T, E) per
        layer) feed the diagnostics."""
        device = groups.device
        table = self._tables[device]
        key = (device, tuple(layers))
        rows = self._rows.get(key)
        if rows is None:  # built once: a host-to-device copy every forward would cost a transfer
            rows = self._rows[key] = torch.tensor([self._where[i][1] for i in layers], device=device)
        counted = groups >= 0
        cell = (rows.unsqueeze(1) * table.shape[1] + groups.clamp_min(0)) * (self.max_k + 1) + torch.stack(ks)
        table.view(-1).scatter_add_(0, cell.reshape(-1), counted.long().expand(len(layers), -1).reshape(-1))
        if nonfinite is not None:
            self._nonfinite[device] += (torch.stack(nonfinite) & counted).sum()
        if discoveries is not None:
            self._add_diagnostics(rows, torch.stack(ks), torch.stack(discoveries), torch.stack(pvalues), counted)

    def _add_diagnostics(self, rows, k, found, p, counted) -> None:
        """(layers, T) k and discoveries, (layers, T, E) p-values: one scatter-add into the diagnostics."""
        self.diagnosed = True
        real = counted.long()
        per_token = torch.stack([real.expand_as(found), found * real, (k > found) * real, (k < found) * real], -1)
        table = self._diag[found.device]
        table[:, :4].index_add_(0, rows, per_token.sum(dim=1))
        # bin i holds [i/20, (i+1)/20) exactly (float32 p times 20 is exact in float64); p = 1 -> the last bin
        bins = (p.double() * PVALUE_BINS).long().clamp(0, PVALUE_BINS - 1)
        cell = rows.view(-1, 1, 1) * _DIAG + 4 + bins
        table.view(-1).scatter_add_(0, cell.reshape(-1), real.view(1, -1, 1).expand_as(bins).reshape(-1))

    def add_to_all_layers(self, k: int, groups: torch.Tensor) -> None:
        """Count every token at the same k in every layer (fixed k): one update per forward."""
        counted = groups >= 0
        cell = (groups.clamp_min(0) * (self.max_k + 1) + k).to(self._every_layer.device)
        self._every_layer.view(-1).scatter_add_(0, cell, counted.long().to(cell.device))

    def reset(self) -> None:
        for t in (*self._tables.values(), self._every_layer, *self._nonfinite.values(), *self._diag.values()):
            t.zero_()
        self.diagnosed = False

    def counts(self) -> torch.Tensor:
        """All histograms on the CPU: (layers, groups, max_k + 1)."""
        tables = {d: t.cpu() for d, t in self._tables.items()}
        per_layer = [tables[d][row] for d, row in self._where]
        if not per_layer:
            return torch.zeros(0, len(self.groups), self.max_k + 1, dtype=torch.long)
        return torch.stack(per_layer) + self._every_layer.cpu()

    def diagnostics(self) -> torch.Tensor | None:
        """The diagnostics counters on the CPU, (layers, 4 + PVALUE_BINS); None when no p-values were
        recorded (fixed k: the stock router ran)."""
        if not self.diagnosed:
            return None
        tables = {d: t.cpu() for d, t in self._diag.items()}
        return torch.stack([tables[d][row] for d, row in self._where])

    @property
    def nonfinite_tokens(self) -> int:
        """(token, layer) pairs whose router logits had a NaN or an infinity."""
        return int(sum(int(n) for n in self._nonfinite.values()))

    def total_over_ranks(self) -> dict:
        """Keyword arguments for `summary` with the counts summed over all data-parallel ranks (every
        rank must call it).

        Ranks may have met the groups in different orders (or not at all), so counts are matched
        by group name, not by position.
        """
        mine = (list(self.groups), self.counts(), self.nonfinite_tokens, self.diagnostics())
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return dict(zip(("groups", "counts", "nonfinite", "diagnostics"), mine))
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, mine)
        names = sorted({name for rank_groups, *_ in gathered for name in rank_groups})
        total = torch.zeros(mine[1].shape[0], len(names), mine[1].shape[2], dtype=torch.long)
        for rank_groups, rank_counts, *_ in gathered:
            for j, name in enumerate(rank_groups):
                total[:, names.index(name)] += rank_counts[:, j]
        diags = [d for *_, d in gathered if d is not None]
        return {"groups": names, "counts": total, "nonfinite": sum(n for _, _, n, _ in gathered),
                "diagnostics": sum(diags) if diags else None}

    def summary(self, counts: torch.Tensor | None = None, groups: list[str] | None = None,
                nonfinite: int | None = None, diagnostics: torch.Tensor | None = None) -> dict:
        """Means and histograms for the results file; means are over real tokens and MoE layers."""
        if counts is None:
            diagnostics = self.diagnostics()
        counts = self.counts() if counts is None else counts
        groups = self.groups if groups is None else groups
        ks = torch.arange(self.max_k + 1, dtype=torch.float64)
        per_layer = counts.sum(dim=1).double()  # (layers, k)
        per_group = counts.sum(dim=0).double()  # (groups, k)
        histogram = per_layer.sum(dim=0)
        tokens = int(per_layer[0].sum()) if len(per_layer) else 0

        def mean(h: torch.Tensor) -> float | None:
            n = float(h.sum())
            return float((h * ks).sum() / n) if n else None

        return {
            "mean_experts_per_token": mean(histogram),
            "per_layer_mean": [mean(h) for h in per_layer],
            "k_histogram": {str(k): int(n) for k, n in enumerate(histogram.tolist()) if n},
            "tokens": tokens,
            "per_task": {
                name: {
                    "mean_experts_per_token": mean(per_group[g]),
                    "tokens": int(counts[0, g].sum()) if len(counts) else 0,
                }
                for g, name in enumerate(groups)
                if counts[:, g].sum()
            },
            "nonfinite_router_tokens": self.nonfinite_tokens if nonfinite is None else nonfinite,
            "diagnostics": diagnostics_summary(diagnostics),
        }


def diagnostics_summary(diag: torch.Tensor | None) -> dict:
    """`config.routing.diagnostics` from the counters (layers, 4 + PVALUE_BINS): per MoE layer the rule's
    mean count before clamping, the fractions of real tokens raised to min_k and cut to max_k, the
    p-value histogram (all experts of real tokens) and Storey's pi0 at lambda = 0.5 (capped at 1)."""
    if diag is None:
        return {"per_layer": None, "note": "fixed k: the stock router ran and no p-values were computed"}
    per_layer = []
    for row in diag.tolist():
        tokens, found, raised, cut, hist = row[0], row[1], row[2], row[3], row[4:]
        total = sum(hist)
        per_layer.append({
            "mean_discoveries": found / tokens if tokens else None,
            "frac_raised_to_min_k": raised / tokens if tokens else None,
            "frac_cut_to_max_k": cut / tokens if tokens else None,
            "pvalue_histogram": hist,
            "pi0": min(1.0, sum(hist[PVALUE_BINS // 2:]) / (0.5 * total)) if total else None,
        })
    return {"per_layer": per_layer}
