#!/usr/bin/env python3
"""What the fused router kernel's compilation costs at the first call of a process (CUDA only).

`python3 bench/first_call.py cold 0`: the first `routing_kernel.route` call compiles the kernel (plus CUDA's
own start-up); `warm S`: `routing_kernel.warm_up` first, then S seconds of other work (as the weights load in
lm-eval), then the first call. Then 7 more batch shapes, each checked bit for bit against `routing.route`,
and the number of compiled variants (one: the kernel is not specialised on the batch shape). Run each case
in a fresh process with an empty TRITON_CACHE_DIR (Triton caches compiled kernels on disk across processes).
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lm_eval_bh import routing, routing_kernel  # noqa: E402
from lm_eval_bh.config import RoutingConfig  # noqa: E402

device = torch.device("cuda", 0)
cfg = RoutingConfig(alpha=0.3, min_k=1, max_k=8).resolve(64, 8, False)
t0 = time.perf_counter()
if sys.argv[1] == "warm":
    routing_kernel.warm_up(cfg, 64, torch.bfloat16, torch.device("cuda"))
    time.sleep(float(sys.argv[2]))
t1 = time.perf_counter()
x = torch.randn(6528, 64, device=device).to(torch.bfloat16)
routing_kernel.route(x, cfg)
torch.cuda.synchronize()
t2 = time.perf_counter()
for tokens in (1, 2, 3, 7, 8, 33, 6528):
    x = torch.randn(tokens, 64, device=device).to(torch.bfloat16)
    a, b = routing_kernel.route(x, cfg), routing.route(x, cfg)
    assert torch.equal(a.index, b.index) and torch.equal(a.weight, b.weight) and torch.equal(a.pvalues, b.pvalues)
torch.cuda.synchronize()
t3 = time.perf_counter()
variants = sum(len(cache[0]) for cache in routing_kernel.route_kernel.device_caches.values())
print(f"{sys.argv[1:]}: first call {t2 - t1:.3f} s after {t1 - t0:.1f} s; 7 more shapes {t3 - t2:.3f} s; "
      f"compiled variants {variants}")
