"""FDR and power of `route` under planted-signal models, and higher criticism, for docs/pvalues.md.

Tokens of m = 64 i.i.d. N(0, 1) logits; the first s experts get +delta (the signals). Routed with
pvalue=zscore, min_k = 1, max_k = m, so that `Routed.discoveries` (the rule's count before the clamp)
are the first experts of `Routed.index`. FDR = mean over tokens of (null experts among the
discoveries) / max(discoveries, 1); power = mean share of the signals discovered; "any" = share of
tokens with at least one discovery. 20,000 tokens per row, fixed seed:

    PYTHONPATH=. python scripts/routing_simulations.py
"""

import torch

from lm_eval_bh import routing
from lm_eval_bh.config import RoutingConfig

M, TOKENS = 64, 20_000


def planted(signals: int, delta: float, tokens: int = TOKENS, m: int = M, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, m, generator=g)
    x[:, :signals] += delta
    return x


def fdr_power(x: torch.Tensor, signals: int, cfg: RoutingConfig) -> tuple[float, float, float, float]:
    """(FDR, power, share of tokens with any discovery, mean k after the clamp) of route(x, cfg)."""
    r = routing.route(x, cfg)
    m = x.shape[-1]
    found = torch.arange(r.index.shape[-1]) < r.discoveries.clamp_max(r.index.shape[-1]).unsqueeze(-1)
    false = (found & (r.index >= signals) & (r.index < m)).sum(-1).double()
    true = (found & (r.index < signals)).sum(-1).double()
    fdp = false / r.discoveries.clamp_min(1).double()
    power = (true / signals).mean().item() if signals else float("nan")
    return fdp.mean().item(), power, (r.discoveries > 0).double().mean().item(), r.k.double().mean().item()


MODELS = [(0, 0.0)] + [(s, d) for s in (1, 2, 8) for d in (3.0, 4.0, 6.0)]


def main():
    print("| signals | strength | alpha | FDR | alpha·m0/m | power | tokens with a discovery | mean k (min_k = 1) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s, d in MODELS:
        x = planted(s, d)
        for alpha in (0.01, 0.05, 0.2):
            cfg = RoutingConfig(alpha=alpha, min_k=1, max_k=M).resolve(M, 8, False)
            fdr, power, anyd, mean_k = fdr_power(x, s, cfg)
            pw = "–" if s == 0 else f"{power:.3f}"
            print(f"| {s} | {d:g}σ | {alpha:g} | {fdr:.4f} | {alpha * (M - s) / M:.4f} | {pw} | {anyd:.3f} | {mean_k:.2f} |")
    print()
    print("| logits | HC+ dropping p <= 1/m: fires / mean k / signals kept | floored at 1/m (used): fires / mean k / signals kept |")
    print("|---|---|---|")
    dropped = _hc_dropped_variant()
    for s, d in ((0, 0.0), (2, 6.0), (8, 3.0), (8, 5.0)):
        x = planted(s, d, seed=1)
        cfg = RoutingConfig(selection="hc", alpha=0.05, min_k=1, max_k=8).resolve(M, 8, False)
        cells = []
        for variant in (dropped, routing._hc_plus):
            saved = routing._hc_plus
            routing._hc_plus = variant
            routing._hc_null_maxima.cache_clear()
            try:
                r = routing.route(x, cfg)
            finally:
                routing._hc_plus = saved
                routing._hc_null_maxima.cache_clear()
            kept = ((r.index < s) & (torch.arange(8) < r.k.unsqueeze(-1))).sum(-1).double().mean().item() / max(s, 1)
            fires = (r.discoveries > 0).double().mean().item()
            cells.append(f"{fires:.3f} / {r.k.double().mean().item():.2f} / " + ("–" if s == 0 else f"{kept:.2f}"))
        name = "pure noise" if s == 0 else f"{s} signals at +{d:g}σ"
        print(f"| {name} | {cells[0]} | {cells[1]} |")


def _hc_dropped_variant():
    """Donoho & Jin's HC+ as written: the ranks with p_(i) <= 1/m dropped (for comparison only)."""
    plus = routing._hc_plus

    def dropped(p_sorted):
        m = p_sorted.shape[-1]
        hc = plus(p_sorted)
        return hc.masked_fill(p_sorted[..., : hc.shape[-1]] <= 1.0 / m, float("-inf"))

    return dropped


if __name__ == "__main__":
    main()
