"""Fit the t degrees of freedom of the `zscore` null, per number of experts m (routing._NU_TABLE).

Under i.i.d. normal logits the robust z of one expert, (x - median) / (IQR / 1.349) over the token's
m logits, has a law that depends on m alone. For each m this simulates it (fixed seed, 4M values,
the router's own quantile code) and finds the nu for which Student's t has the same upper 1e-3
quantile. Prints the table that lm_eval_bh/routing.py holds. Takes a few minutes on one CPU core:

    python scripts/fit_zscore_null.py 5 64
"""

import sys

import numpy as np
import torch
from scipy import optimize, stats

from lm_eval_bh import routing

LEVEL = 1e-3


def robust_z(x: torch.Tensor) -> torch.Tensor:
    s = x.sort(dim=-1, descending=True).values
    n = torch.full(s.shape[:-1], s.shape[-1], dtype=s.dtype)
    median, q75, q25 = routing._quantiles_desc(s, n, (0.5, 0.75, 0.25))
    return (x - median[:, None]) / ((q75 - q25)[:, None] * routing._IQR_TO_SIGMA)


def fit_nu(m: int, values: int = 4_000_000, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed + m)
    z = robust_z(torch.randn(values // m, m, generator=g, dtype=torch.float64)).flatten().numpy()
    q = np.quantile(z, 1 - LEVEL)
    return optimize.brentq(lambda nu: stats.t.sf(q, nu) - LEVEL, 0.05, 1e6)


if __name__ == "__main__":
    lo, hi = (int(a) for a in sys.argv[1:3])
    nus = [fit_nu(m) for m in range(lo, hi + 1)]
    print(f"_NU_TABLE = ({', '.join(f'{v:.2f}' for v in nus)})  # m = {lo}..{hi}")
