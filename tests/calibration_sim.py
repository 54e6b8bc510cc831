"""FDR and power of the calibration-based methods through `route`, under planted-signal models.

Each token has m = 64 experts with i.i.d. N(0, 1) logits; `signals` of them (at random positions)
are shifted by `shift`. The calibration sample is drawn from the same model (signal experts
included, as on real text), so the pooled sample is the mixture and the fitted null must find the
N(0, 1) part. FDR is the mean over tokens of (null experts selected) / max(1, selected), power the
mean share of signal experts selected; "selected" is the rule's own set, before the min_k clamp
(`Routed.discoveries` experts in routing order; max_k = m so nothing is cut).

    python tests/calibration_sim.py        # prints the tables in docs/pvalues.md (about a minute)

`fit_noise` compares central-matching windows: the spread of the fitted scale and of the fitted
null's tail probability at alpha/m, on pure N(0, 1) samples and with 12.5 % signals at +2.5.
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np
import torch

M = 64
SCENARIOS = [  # (name, signals per token, shift in null standard deviations)
    ("global null", 0, 0.0),
    ("sparse 1 @ +4", 1, 4.0),
    ("sparse 2 @ +3", 2, 3.0),
    ("sparse 2 @ +5", 2, 5.0),
    ("dense 8 @ +2.5", 8, 2.5),
    ("dense 8 @ +4", 8, 4.0),
]
METHODS = [("ecdf", "bh"), ("calibrated", "bh"), ("calibrated", "lfdr")]


def planted(tokens: int, signals: int, shift: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (tokens, M), is_signal (tokens, M))."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, M, generator=g)
    is_signal = torch.zeros(tokens, M, dtype=torch.bool)
    if signals:
        where = torch.rand(tokens, M, generator=g).argsort(dim=-1)[:, :signals]
        is_signal.scatter_(1, where, True)
    return logits + shift * is_signal, is_signal


def calibration_file(folder: str, signals: int, shift: float, samples: int = 65536, seed: int = 1) -> str:
    """A calibration of one 'layer' from pooled logits of the same model (signals included)."""
    from lm_eval_bh.calibration import Calibration, save_calibration

    logits, _ = planted(-(-samples // M), signals, shift, seed)
    pooled = logits.reshape(1, -1)[:, :samples].numpy()
    path = os.path.join(folder, f"sim_{signals}_{shift}.json")
    return save_calibration(path, Calibration.from_samples(pooled, {"num_experts": M, "model": "simulation"}))


def measure(pvalue: str, selection: str, alpha: float, path: str, signals: int, shift: float,
            tokens: int = 4000, seed: int = 2) -> dict:
    """FDR, power, P(any discovery) and mean discoveries of one method on one scenario."""
    from lm_eval_bh.calibration import load_calibration
    from lm_eval_bh.config import RoutingConfig
    from lm_eval_bh.routing import route

    (null,) = load_calibration(path, 1, M)
    cfg = RoutingConfig(alpha=alpha, pvalue=pvalue, selection=selection, calibration=path, min_k=1, max_k=M)
    cfg = cfg.resolve(M, M, False)
    logits, is_signal = planted(tokens, signals, shift, seed)
    r = route(logits, cfg, null=null)
    found = r.discoveries.clamp_max(M)
    chosen = torch.arange(M) < found[:, None]  # the rule's own set: the first `discoveries` in routing order
    hit = is_signal.gather(1, r.index.clamp_max(M - 1)) & chosen
    false = (chosen & ~hit).sum(-1).float()
    fdp = false / found.clamp_min(1)
    return {
        "fdr": fdp.mean().item(),
        "power": (hit.sum(-1).float() / signals).mean().item() if signals else float("nan"),
        "any": (found > 0).float().mean().item(),
        "discoveries": found.float().mean().item(),
    }


def table(alpha: float = 0.05) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, signals, shift in SCENARIOS:
            path = calibration_file(folder, signals, shift)
            for pvalue, selection in METHODS:
                rows.append({"scenario": name, "method": f"{selection}/{pvalue}",
                             **measure(pvalue, selection, alpha, path, signals, shift)})
    return rows


def fit_noise(rows: int = 200, alpha: float = 0.05) -> list[dict]:
    from scipy.stats import norm

    from lm_eval_bh.calibration import fit_null

    rng = np.random.default_rng(0)
    t = alpha / M
    out = []
    for model, share in (("N(0,1)", 0.0), ("12.5 % at +2.5", 0.125)):
        for n in (4096, 16384):
            x = rng.normal(size=(rows, n)) + 2.5 * (rng.random((rows, n)) < share)
            q25, q75 = np.quantile(x, [0.25, 0.75], axis=-1)
            for name, window, bins in (("central 50 %", (0.25, 0.75), 20), ("2-75 %", (0.02, 0.75), 50)):
                loc, scale, pi0 = fit_null(x, window, bins).T
                ratio = norm.sf(loc + scale * norm.isf(t)) / t  # true null tail at the fitted threshold / t
                out.append({"model": model, "n": n, "window": name, "scale": scale.mean(), "scale_sd": scale.std(),
                            "pi0": pi0.mean(), "ratio": ratio.mean(), "ratio_sd": ratio.std()})
            iqr = (q75 - q25) / 1.349  # the pooled robust scale, for comparison
            ratio = norm.sf(np.median(x, -1) + iqr * norm.isf(t)) / t
            out.append({"model": model, "n": n, "window": "median, IQR", "scale": iqr.mean(), "scale_sd": iqr.std(),
                        "pi0": float("nan"), "ratio": ratio.mean(), "ratio_sd": ratio.std()})
    return out


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    alpha = float(sys.argv[1]) if len(sys.argv) > 1 else 0.05
    print(f"alpha = {alpha}, m = {M}, 4000 tokens per scenario, calibration: 65536 pooled logits\n")
    print("| scenario | method | FDR | power | P(any discovery) | mean discoveries |")
    print("|---|---|---:|---:|---:|---:|")
    for row in table(alpha):
        power = "–" if np.isnan(row["power"]) else f"{row['power']:.3f}"
        print(f"| {row['scenario']} | {row['method']} | {row['fdr']:.4f} | {power} | {row['any']:.3f} | "
              f"{row['discoveries']:.2f} |")
    print(f"\nfitted null, 200 samples each; 'tail ratio': P_true(p <= {alpha}/{M}) / ({alpha}/{M})\n")
    print("| sample | n | fit | scale (sd) | pi0 | tail ratio (sd) |")
    print("|---|---:|---|---|---:|---|")
    for r in fit_noise(alpha=alpha):
        print(f"| {r['model']} | {r['n']} | {r['window']} | {r['scale']:.3f} ({r['scale_sd']:.3f}) | {r['pi0']:.3f} | "
              f"{r['ratio']:.2f} ({r['ratio_sd']:.2f}) |")
