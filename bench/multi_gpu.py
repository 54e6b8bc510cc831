"""Multi-GPU check of BH routing and its statistics (2 CUDA GPUs; nothing is downloaded).

1. Data parallel: two processes (NCCL, one GPU each) route the two halves of a set of sequences,
   grouped by task, meeting the tasks in different orders; the totals over ranks
   (`RoutingStats.total_over_ranks`, what `olmoe_bh` writes under accelerate) must equal one process
   routing all of them.
2. Sharded model (what `parallelize=True` does): the tiny model's layers on cuda:0 and cuda:1 through
   accelerate's `dispatch_model`; each layer routes on its own device, and outputs and statistics must
   equal the single-device run.

    python3 bench/multi_gpu.py --out results/multi_gpu.json        # on a 2-GPU machine
    python bench/multi_gpu.py --cpu                                 # the same code on CPU + gloo (smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lm_eval_bh import BHRouting  # noqa: E402
from lm_eval_bh.tiny import make_tiny_olmoe  # noqa: E402

SEQUENCES = torch.randint(2, 4000, (8, 48), generator=torch.Generator().manual_seed(0))
TASKS = ["b", "a", "a", "c", "b", "a", "c", "b"]
SETTINGS = dict(alpha=0.3, min_k=1)


def _device(rank: int, cpu: bool) -> torch.device:
    return torch.device("cpu") if cpu else torch.device("cuda", rank)


def _route(model, indices, reverse=False):
    routing = BHRouting(compile=False, **SETTINGS).patch(model)
    device = next(model.parameters()).device
    logits = {}
    with torch.no_grad():
        for i in sorted(indices, key=lambda i: TASKS[i], reverse=reverse):
            with routing.group(TASKS[i]):
                logits[i] = model(SEQUENCES[i : i + 1].to(device)).logits.float().cpu()
    return routing, logits


def _worker(rank: int, port: int, cpu: bool, out: str) -> None:
    backend = "gloo" if cpu else "nccl"
    if not cpu:
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = make_tiny_olmoe().to(_device(rank, cpu))
        routing, _ = _route(model, [i for i in range(len(SEQUENCES)) if i % 2 == rank], reverse=rank == 1)
        totals = routing.stats.total_over_ranks()
        if rank == 0:
            with open(out, "w") as f:
                json.dump(routing.summary(**totals), f)
    finally:
        dist.destroy_process_group()


def data_parallel(cpu: bool, tmp: str) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, cpu, tmp), nprocs=2, join=True)
    two = json.load(open(tmp))
    one = json.loads(json.dumps(_route(make_tiny_olmoe().to(_device(0, cpu)), range(len(SEQUENCES)))[0].summary()))
    keys = ("tokens", "k_histogram", "per_layer_mean", "mean_experts_per_token", "per_task")
    return {"equal": all(two[k] == one[k] for k in keys), "two_ranks": {k: two[k] for k in keys},
            "one_process": {k: one[k] for k in keys}}


def sharded(cpu: bool) -> dict:
    from accelerate import dispatch_model

    single = make_tiny_olmoe().to(_device(0, cpu))
    ref_routing, ref_logits = _route(single, range(len(SEQUENCES)))
    model = make_tiny_olmoe()
    first, second = ("cpu", "cpu") if cpu else (0, 1)
    device_map = {"model.embed_tokens": first, "model.rotary_emb": first, "model.layers.0": first,
                  "model.layers.1": second, "model.norm": second, "lm_head": second}
    model = dispatch_model(model, device_map=device_map)
    routing, logits = _route(model, range(len(SEQUENCES)))
    diff = max(float((logits[i] - ref_logits[i]).abs().max()) for i in logits)
    one, two = ref_routing.summary(), routing.summary()
    keys = ("tokens", "k_histogram", "per_layer_mean", "per_task")
    return {
        "router_devices": [str(layer.router.weight.device) for layer in routing.layers],
        "max_logit_difference": diff,
        "stats_equal": all(one[k] == two[k] for k in keys),
        "sharded": {k: two[k] for k in keys},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="run on CPU with gloo (smoke test of the same code)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not args.cpu and torch.cuda.device_count() < 2:
        sys.exit("multi_gpu.py needs 2 CUDA GPUs (or --cpu)")
    tmp = (args.out or "/tmp/multi_gpu") + ".rank0.json"
    report = {
        "devices": ["cpu"] if args.cpu else [torch.cuda.get_device_name(i) for i in range(2)],
        "torch": torch.__version__,
        "settings": SETTINGS,
        "data_parallel": data_parallel(args.cpu, tmp),
        "sharded": sharded(args.cpu),
    }
    os.remove(tmp)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    ok = report["data_parallel"]["equal"] and report["sharded"]["stats_equal"]
    ok = ok and report["sharded"]["max_logit_difference"] < 1e-4
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
