"""Exact routing statistics: how many experts each real token used, per layer and per group (task).

Counts live on the device as one histogram per MoE layer, indexed (group, k), and are updated with a
scatter-add: no host synchronisation in the forward pass. Tokens whose group is -1 (padding added
by batching, dummy batches) are not counted.
"""

from __future__ import annotations

import torch

__all__ = ["RoutingStats"]


class RoutingStats:
    def __init__(self, devices: list[torch.device], max_k: int):
        self.max_k = max_k
        self.groups: list[str] = []
        self._devices = list(devices)
        self._counts = [torch.zeros(0, max_k + 1, dtype=torch.long, device=d) for d in self._devices]
        self._every_layer = torch.zeros(0, max_k + 1, dtype=torch.long, device=self._devices[0])
        self.nonfinite_tokens = [torch.zeros((), dtype=torch.long, device=d) for d in self._devices]

    @property
    def num_layers(self) -> int:
        return len(self._counts)

    def group_id(self, name: str) -> int:
        """The id of a named group, adding it (and a row to every layer's histogram) if new."""
        if name not in self.groups:
            self.groups.append(name)
            self._counts = [torch.cat([c, c.new_zeros(1, self.max_k + 1)]) for c in self._counts]
            self._every_layer = torch.cat([self._every_layer, self._every_layer.new_zeros(1, self.max_k + 1)])
        return self.groups.index(name)

    def add(self, layer: int, k: torch.Tensor, groups: torch.Tensor, nonfinite: torch.Tensor | None = None) -> None:
        """Count each token's k under its group; groups < 0 are skipped."""
        counts = self._counts[layer]
        counted = groups >= 0
        flat = torch.where(counted, groups * (self.max_k + 1) + k, 0)
        counts.view(-1).scatter_add_(0, flat, counted.long())
        if nonfinite is not None:
            self.nonfinite_tokens[layer] += (nonfinite & counted).sum()

    def add_to_all_layers(self, k: int, groups: torch.Tensor) -> None:
        """Count every token at the same k in every layer (fixed k): one update per forward."""
        counted = groups >= 0
        flat = torch.where(counted, groups * (self.max_k + 1) + k, 0).to(self._every_layer.device)
        self._every_layer.view(-1).scatter_add_(0, flat, counted.long().to(flat.device))

    def reset(self) -> None:
        for c in self._counts:
            c.zero_()
        self._every_layer.zero_()
        for n in self.nonfinite_tokens:
            n.zero_()

    def counts(self) -> torch.Tensor:
        """All histograms on the CPU: (layers, groups, max_k + 1)."""
        if not self._counts:
            return torch.zeros(0, len(self.groups), self.max_k + 1, dtype=torch.long)
        return torch.stack([c.cpu() for c in self._counts]) + self._every_layer.cpu()

    def total_over_ranks(self) -> tuple[list[str], torch.Tensor]:
        """(groups, counts) summed over all data-parallel ranks; every rank must call it.

        Ranks may have met the groups in different orders (or not at all), so counts are matched
        by group name, not by position.
        """
        groups, counts = list(self.groups), self.counts()
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return groups, counts
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, (groups, counts))
        names = sorted({name for rank_groups, _ in gathered for name in rank_groups})
        total = torch.zeros(counts.shape[0], len(names), counts.shape[2], dtype=torch.long)
        for rank_groups, rank_counts in gathered:
            for j, name in enumerate(rank_groups):
                total[:, names.index(name)] += rank_counts[:, j]
        return names, total

    def summary(self, counts: torch.Tensor | None = None, groups: list[str] | None = None) -> dict:
        """Means and histograms for the results file; means are over real tokens and MoE layers."""
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
            "nonfinite_router_tokens": int(sum(int(n) for n in self.nonfinite_tokens)),
        }
