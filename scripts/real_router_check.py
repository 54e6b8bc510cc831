"""Measure real-router against the dense model and ``real`` on the same held-out tokens: perplexity at fixed
top-k, and the router's softmax statistics per layer (median top-1 probability, mean entropy).

    PYTHONPATH=. python scripts/real_router_check.py [--tokens 8192] [--first] [--out results/real/real_router]

Held-out text: odd 256-token chunks of real.py's calibration text (both models are fitted on even ones), spread
evenly over the whole text (every topic's prose), or with --first the first ones (next to the chunks real's own
fit used).  ``real``'s perplexities are read from results/real/check.json when it measured the same tokens
(the first ones), else measured.  Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from lm_eval_bh import real, real_router

TARGETS = {"16": 1.15, "8": 1.5, "4": 2.5}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--first", action="store_true", help="the first held-out chunks, not chunks spread over the text")
    ap.add_argument("--ks", default="1,2,4,8,16")
    ap.add_argument("--out", default="results/real/real_router")
    ap.add_argument("--remeasure-real", action="store_true")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    t0 = time.time()
    folder = real_router.ensure_real_router()
    ks = [int(k) for k in args.ks.split(",")]
    dense, tok = real.load_dense(real.find_gguf())
    spread = not args.first
    chunks = real.calibration_chunks(tok, args.tokens, held_out=True, spread=spread)
    check = json.loads(Path("results/real/check.json").read_text())
    if args.remeasure_real or spread or check["held_out_tokens"] != chunks.numel():
        moe = AutoModelForCausalLM.from_pretrained(real.ensure_real(), dtype=torch.float32).eval()
        real_ppl = {str(int(r["mean_k"])): r["ppl"]
                    for r in real.perplexity_curve(moe, tok, ks, [], tokens=args.tokens, spread=spread)}
        dense_ppl = math.exp(real.heldout_nll(dense, chunks))
    else:
        real_ppl = {r["setting"][4:]: r["ppl"] for r in check["curve"] if r["setting"].startswith("top-")}
        dense_ppl = check["dense_ppl"]
    moe = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    curve = real.perplexity_curve(moe, tok, ks, [], tokens=args.tokens, spread=spread)
    stats = real_router.router_stats(moe, chunks)
    E = moe.config.num_experts
    rows = [{"k": int(r["mean_k"]), "real_router_ppl": r["ppl"], "real_router_x_dense": r["ppl"] / dense_ppl,
             "real_ppl": real_ppl.get(str(int(r["mean_k"]))), "target_x_dense": TARGETS.get(str(int(r["mean_k"])))}
            for r in curve]
    for r in rows:
        r["real_x_dense"] = r["real_ppl"] / dense_ppl if r["real_ppl"] else None
    res = {"model": folder.name, "held_out_tokens": int(chunks.numel()), "held_out": "spread" if spread else "first",
           "dense_ppl": dense_ppl, "perplexity": rows,
           "router_stats": stats, "uniform": {"top1": 1 / E, "entropy": math.log(E)},
           "median_over_layers": {"median_top1": statistics.median(s["median_top1"] for s in stats),
                                  "mean_entropy": statistics.median(s["mean_entropy"] for s in stats)},
           "build": json.loads((folder / "lm_eval_bh_real.json").read_text()),
           "command": "PYTHONPATH=. python scripts/real_router_check.py --tokens %d%s" % (args.tokens,
                                                                                           "" if spread else " --first"),
           "seconds": round(time.time() - t0, 1)}
    Path(args.out + ".json").write_text(json.dumps(res, indent=1) + "\n")
    Path(args.out + ".md").write_text(render(res))
    print(render(res))


def render(res: dict) -> str:
    lines = [f"# real-router: held-out perplexity and router statistics ({res['model']})", "",
             f"{res['held_out_tokens']} held-out tokens (odd chunks of the calibration text, "
             f"{'spread over the whole text' if res['held_out'] == 'spread' else 'the first ones'}); "
             f"dense SmolLM2-135M-Instruct perplexity {res['dense_ppl']:.2f}. Reproduce: `{res['command']}`", "",
             "| top-k | real-router ppl | x dense | target | real ppl | x dense |", "|---|---|---|---|---|---|"]
    for r in res["perplexity"]:
        tgt = f"<= {r['target_x_dense']}" if r["target_x_dense"] else ""
        rp = f"{r['real_ppl']:.1f} | {r['real_x_dense']:.2f}" if r["real_ppl"] else " | "
        lines.append(f"| {r['k']} | {r['real_router_ppl']:.1f} | {r['real_router_x_dense']:.2f} | {tgt} | {rp} |")
    u = res["uniform"]
    lines += ["", f"Router softmax per layer at top-4 (uniform: top-1 {u['top1']:.4f}, entropy {u['entropy']:.3f} nats; "
              f"`real`: uniform to 1e-5)", "", "| layer | median top-1 p | mean entropy (nats) | tau |", "|---|---|---|---|"]
    params = json.loads(real_router.ASSET.read_text())
    for i, s in enumerate(res["router_stats"]):
        lines.append(f"| {i} | {s['median_top1']:.3f} | {s['mean_entropy']:.3f} | {params['tau'][i]:.3f} |")
    m = res["median_over_layers"]
    lines += ["", f"Median over layers: top-1 {m['median_top1']:.3f}, entropy {m['mean_entropy']:.3f}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
