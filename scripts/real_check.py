"""Measure the embedded real MoE against its dense source: logits with all experts, held-out perplexity
at fixed top-k, and BH routing's perplexity and mean experts per token on the same tokens (the README's figures).

    python scripts/real_check.py [--tokens 2048] [--out results/real_check.json]

Held-out text: the odd 256-token chunks of the calibration text (the build fits on the even ones).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from lm_eval_bh import real  # run from the checkout: PYTHONPATH=. python scripts/real_check.py


@torch.no_grad()
def nll_and_logits(model, chunks, keep_logits=False):
    total, n, logits = 0.0, 0, []
    for row in chunks.split(4):
        out = model(input_ids=row).logits
        total += torch.nn.functional.cross_entropy(out[:, :-1].flatten(0, 1), row[:, 1:].flatten(), reduction="sum").item()
        n += row[:, 1:].numel()
        if keep_logits:
            logits.append(out)
    return total / n, (torch.cat(logits) if keep_logits else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048, help="held-out tokens (default 2048)")
    ap.add_argument("--ks", default="1,2,4,8,16")
    ap.add_argument("--alphas", default="0.01,0.05,0.2,0.5", help="BH levels (z-score p-values, k = 1..16)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    t0 = time.time()
    folder = real.ensure_real()
    dense, tok = real.load_dense(real.find_gguf())
    moe = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    chunks = real.calibration_chunks(tok, args.tokens, held_out=True)
    dense_nll, dense_logits = nll_and_logits(dense, chunks, keep_logits=True)
    res = {"model": str(folder), "held_out_tokens": int(chunks.numel()), "dense_ppl": math.exp(dense_nll), "fixed_k": {}}
    for k in [int(x) for x in args.ks.split(",")]:
        for layer in moe.model.layers:
            layer.mlp.gate.top_k = k
        nll, logits = nll_and_logits(moe, chunks, keep_logits=k == moe.config.num_experts)
        res["fixed_k"][k] = {"ppl": math.exp(nll)}
        if logits is not None:
            diff = (logits - dense_logits).abs()
            res["all_experts_vs_dense"] = {
                "max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item(),
                "max_abs_dense_logit": dense_logits.abs().max().item(),
                "argmax_agreement": (logits.argmax(-1) == dense_logits.argmax(-1)).float().mean().item()}
        print(f"k={k}: perplexity {res['fixed_k'][k]['ppl']:.2f}", flush=True)
    # adaptive routing on the same tokens, through the plugin's Python API
    from lm_eval_bh import BHRouting

    for label, kw in (("bh/zscore alpha=%g" % a, dict(alpha=a)) for a in [float(x) for x in args.alphas.split(",")]):
        with BHRouting(min_k=1, max_k=moe.config.num_experts, **kw).patch(moe) as routing:
            nll, _ = nll_and_logits(moe, chunks)
        mean_k = routing.summary()["mean_experts_per_token"]
        res.setdefault("adaptive", {})[label] = {"ppl": math.exp(nll), "mean_k": mean_k}
        print(f"{label}: mean k {mean_k:.2f}, perplexity {math.exp(nll):.2f}", flush=True)
    res["seconds"] = round(time.time() - t0, 1)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
