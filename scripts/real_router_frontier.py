"""Why real-router cannot meet all of its quality targets: per layer, the relative error of the MLP output
(top-k of the fitted softmax router vs the dense MLP) at several non-uniformity targets (median top-1
probability), and an oracle bound (experts chosen by their true output norms, per-token least-squares
weights), which no router over the same experts can beat.

    PYTHONPATH=. python scripts/real_router_frontier.py [--out results/real/real_router_frontier.json]

Fit on the first 2048 calibration tokens, measured on 1024 held-out tokens (dense model's MLP inputs).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from tqdm.auto import tqdm

from lm_eval_bh import real, real_router as rr

TARGETS = (0.08, 0.10, 0.125, 0.14, 0.2)  # 1/16 would be tau = 0: all ties, not real's ranking


@torch.no_grad()
def oracle(gram: torch.Tensor, norms: torch.Tensor, k: int, norm: float) -> float:
    """Relative error of the best per-token weights on the k experts with the largest outputs."""
    b, total = gram.sum(-1).double(), gram.sum((-1, -2)).double()
    idx = norms.topk(k, dim=-1).indices
    sub = torch.gather(torch.gather(gram, 1, idx[:, :, None].expand(-1, -1, gram.shape[1])), 2,
                       idx[:, None, :].expand(-1, k, -1)).double()
    sub = sub + 1e-9 * sub.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * torch.eye(k, dtype=torch.float64)
    bs = torch.gather(b, 1, idx)
    return float((total - (torch.linalg.solve(sub, bs) * bs).sum(-1)).mean() / norm)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/real/real_router_frontier.json")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    dense, tok = real.load_dense(real.find_gguf())
    moe = AutoModelForCausalLM.from_pretrained(real.ensure_real(), dtype=torch.float32).eval()
    cal, ho = real.calibration_chunks(tok, 2048), real.calibration_chunks(tok, 1024, held_out=True)
    xs = real.mlp_inputs(dense, torch.cat([cal, ho]), moe.config.num_hidden_layers)
    layers = []
    for i, x in enumerate(tqdm(xs, desc="layers")):
        block = moe.model.layers[i].mlp
        data = {}
        for part, xp in (("cal", x[:cal.numel()]), ("held_out", x[cal.numel():])):
            o = rr.expert_outputs(block, xp)
            shared = torch.sigmoid(block.shared_expert_gate(xp)) * block.shared_expert(xp)
            data[part] = (xp, torch.einsum("neh,nfh->nef", o, o), float(((o.sum(1) + shared) ** 2).sum(-1).mean()), o)
        base = (block.gate.weight.double() / real.ROUTER_SCALE).float()
        (xc, gc, _, _), (xh, gh, nh, oh) = data["cal"], data["held_out"]
        row = {}
        for t in TARGETS:
            tau = rr.temperature_for(xc @ base.T, t)
            scales = rr.fit_scales(gc, (tau * xc @ base.T).softmax(-1)).float()
            row[f"top1={t:.4g}"] = rr.relative_errors(gh, scales, (tau * xh @ base.T).softmax(-1), (2, 4, 8, 16), nh)
        row["oracle"] = {k: oracle(gh, oh.norm(dim=-1), k, nh) for k in (2, 4, 8)}
        layers.append(row)
    median = {name: {k: statistics.median(r[name][k] for r in layers) for k in layers[0][name]} for name in layers[0]}
    res = {"command": "PYTHONPATH=. python scripts/real_router_frontier.py", "median_over_layers": median,
           "layers": layers}
    with open(args.out, "w") as f:
        f.write(json.dumps(res, indent=1) + "\n")
    for name, errs in median.items():
        print(f"{name:12s}", "  ".join(f"top-{k}: {v:.3f}" for k, v in errs.items()))


if __name__ == "__main__":
    main()
