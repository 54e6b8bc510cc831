"""Measure the embedded real MoE against its dense source: logits with all experts, held-out perplexity
at fixed top-k, and BH routing's perplexity and mean experts per token on the same tokens (the README's figures).

    PYTHONPATH=. python scripts/real_check.py [--tokens 1024] [--out results/real/check.json]

Held-out text: the odd 256-token chunks of the calibration text (the build fits on the even ones).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from lm_eval_bh import real


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024, help="held-out tokens (default 1024)")
    ap.add_argument("--ks", default="1,2,4,8,16", help="fixed top-k values")
    ap.add_argument("--alphas", default="0.01,0.05,0.2,0.5", help="BH levels (z-score p-values, k = 1..16)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    t0 = time.time()
    folder = real.ensure_real()
    dense, tok = real.load_dense(real.find_gguf())
    moe = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    chunks = real.calibration_chunks(tok, args.tokens, held_out=True)
    res = {"model": folder.name, "held_out_tokens": int(chunks.numel()),
           "dense_ppl": math.exp(real.heldout_nll(dense, chunks))}
    diff, peak = [], 0.0
    with torch.no_grad():
        for layer in moe.model.layers:  # all experts
            layer.mlp.gate.top_k = moe.config.num_experts
        for row in chunks.split(4):
            ref = dense(input_ids=row).logits
            diff.append((moe(input_ids=row).logits - ref).abs())
            peak = max(peak, ref.abs().max().item())
        for layer in moe.model.layers:
            layer.mlp.gate.top_k = moe.config.num_experts_per_tok
    d = torch.cat(diff)
    res["all_experts_vs_dense"] = {"max_abs_logit_diff": d.max().item(), "mean_abs_logit_diff": d.mean().item(),
                                   "max_abs_dense_logit": peak}
    res["curve"] = real.perplexity_curve(moe, tok, [int(k) for k in args.ks.split(",")],
                                         [float(a) for a in args.alphas.split(",")], tokens=args.tokens)
    res["seconds"] = round(time.time() - t0, 1)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
