"""Tail rates of `zscore` p-values under null logits, for docs/pvalues.md.

For each number of experts m and each null law of the logits (i.i.d. normal, Gumbel, Student t5)
prints P(p <= t) / t at t = 1e-4, 1e-3, 1e-2, 0.05 (pooled over 4M expert p-values, fixed seed) and
the share of tokens for which BH at alpha = 0.05 finds any expert (should be <= 0.05 under the null):

    PYTHONPATH=. python scripts/zscore_null_table.py 8,16,32,64,128,256
"""

import sys

import torch

from lm_eval_bh import routing
from lm_eval_bh.config import RoutingConfig

LEVELS = (1e-4, 1e-3, 1e-2, 0.05)


def draw(law: str, shape, g: torch.Generator) -> torch.Tensor:
    if law == "normal":
        return torch.randn(shape, generator=g)
    u = torch.rand(shape, generator=g).clamp_min(1e-12)
    if law == "gumbel":
        return -torch.log(-torch.log(u))
    if law == "t5":  # normal / sqrt(chi2_5 / 5)
        chi2 = (torch.randn((*shape, 5), generator=g) ** 2).sum(-1)
        return torch.randn(shape, generator=g) / torch.sqrt(chi2 / 5)
    raise ValueError(law)


def main(ms):
    g = torch.Generator().manual_seed(0)
    print("| logits | m | " + " | ".join(f"t = {t:g}" for t in LEVELS) + " | BH at 0.05 adds an expert |")
    print("|---|---:|" + "---:|" * (len(LEVELS) + 1))
    for law in ("normal", "gumbel", "t5"):
        for m in ms:
            x = draw(law, (4_000_000 // m, m), g)
            p = routing.pvalues(x, "zscore")
            rates = [(p <= t).double().mean().item() / t for t in LEVELS]
            cfg = RoutingConfig(alpha=0.05, min_k=1, max_k=m).resolve(m, m, False)
            fired = (routing.route(x[:20000], cfg).discoveries > 0).double().mean().item()
            print(f"| {law} | {m} | " + " | ".join(f"{r:.2f}" for r in rates) + f" | {fired:.3f} |", flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1].split(",")])
