"""Ablations of real-router's down-projection refit (lm_eval_bh.real_router.refit_sequentially), full model.

    PYTHONPATH=. python scripts/real_router_refit.py [--inputs sequential|dense] [--tokens 18432]
                                                    [--ridge 0.003] [--correction 0.5] [--no-shared] [--first]
                                                    [--ks 4,8,16] [--device cpu]

Converts the cached ``real`` in memory with the shipped router parameters and the given refit settings
(``--inputs dense`` is router-v2: every layer fitted on the dense model's MLP inputs; ``--no-shared`` keeps the
shared expert's down projection, as router-v3 did; ``--first`` fits on the first calibration chunks instead of
chunks spread over the text), then appends one JSON line to results/real/real_router_refit.jsonl: perplexity x
dense at top-2/4/8/16 on the first 1,024 held-out (odd-chunk) tokens and on 8,192 spread over the text, in-sample
(the first 4 of the chunks fitted on) at 4/8/16, and the seconds the refit took.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from lm_eval_bh import real, real_router
from lm_eval_bh.patch import BHRouting


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", choices=["sequential", "dense"], default="sequential")
    ap.add_argument("--tokens", type=int, default=real_router.REFIT_TOKENS)
    ap.add_argument("--ridge", type=float, default=real_router.RIDGE)
    ap.add_argument("--correction", type=float, default=real_router.CORRECTION)
    ap.add_argument("--no-shared", action="store_true", help="keep the shared expert's down projection")
    ap.add_argument("--first", action="store_true", help="fit on the first calibration chunks, not spread ones")
    ap.add_argument("--ks", default=",".join(map(str, real_router.FIT_KS)), help="the top-k values fitted jointly")
    ap.add_argument("--device", default="cpu", help="where the refit and the perplexities run (cuda: fast tuning)")
    ap.add_argument("--out", default="results/real/real_router_refit.jsonl")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    ks = tuple(int(k) for k in args.ks.split(","))
    dense, tok = real.load_dense(real.find_gguf())
    dense = dense.to(args.device)
    moe = AutoModelForCausalLM.from_pretrained(real.ensure_real(), dtype=torch.float32).eval().to(args.device)
    t0 = time.time()
    tokens = real_router.refit_sequentially(moe, real_router.load_params(), tok, args.tokens, ridge=args.ridge,
                                            ks=ks, correction=args.correction, sequential=args.inputs == "sequential",
                                            shared=not args.no_shared, spread=not args.first)
    row = {"inputs": args.inputs, "tokens": tokens, "ridge": args.ridge,
           "correction": args.correction if args.inputs == "sequential" else None,  # unused on dense inputs
           "shared_expert": not args.no_shared, "chunks": "first" if args.first else "spread",
           "ks": list(ks), "refit_s": round(time.time() - t0), "device": args.device,
           "torch": torch.__version__}
    for name, chunks, measured in (
            ("held_out", real.calibration_chunks(tok, 1024, held_out=True), (2, 4, 8, 16)),
            ("spread", real.calibration_chunks(tok, 8192, held_out=True, spread=True), (2, 4, 8, 16)),
            ("in_sample", real.calibration_chunks(tok, args.tokens, spread=not args.first)[:4], (4, 8, 16))):
        dense_ppl = math.exp(real.heldout_nll(dense, chunks))
        for k in measured:
            with BHRouting(min_k=k, max_k=k).patch(moe):
                row[f"{name}_{k}"] = round(math.exp(real.heldout_nll(moe, chunks)) / dense_ppl, 3)
    print(json.dumps(row))
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
