"""Fit real-router's routers (lm_eval_bh/real_router.py) and write lm_eval_bh/assets/real_router.json.

    PYTHONPATH=. python scripts/fit_real_router.py [--out lm_eval_bh/assets/real_router.json]

Builds (or reuses) the cached ``real`` model, runs the dense SmolLM2 on real.py's calibration chunks
(4096 tokens) and fits, per layer, the router temperature and the 16 expert output scales.  Deterministic.
The per-layer relative errors of the fit (real's uniform router, softmax top-k with and without
norm_topk_prob) go into the asset too.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lm_eval_bh import real, real_router


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(real_router.ASSET))
    ap.add_argument("--target-top1", type=float, default=real_router.TARGET_TOP1)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    t0 = time.time()
    real_dir = real.ensure_real()
    dense, tok = real.load_dense(real.find_gguf())
    moe = AutoModelForCausalLM.from_pretrained(real_dir, dtype=torch.float32).eval()
    params = real_router.fit_routers(moe, dense, tok, target_top1=args.target_top1)
    params = {"real_build": real_dir.name, **params, "fit_seconds": round(time.time() - t0, 1)}
    Path(args.out).write_text(json.dumps(params, indent=1) + "\n")
    print(f"wrote {args.out} in {params['fit_seconds']}s")


if __name__ == "__main__":
    main()
