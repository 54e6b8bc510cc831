"""Routing statistics under data parallelism: totals over ranks equal the single-process figures."""

import json
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import make_olmoe

from lm_eval_bh import BHRouting

SEQUENCES = torch.randint(2, 256, (6, 16), generator=torch.Generator().manual_seed(3))
# Each sequence's task; rank 1 meets the tasks in another order and rank 0 never sees task "c".
TASKS = ["b", "a", "a", "c", "b", "a"]


def _route(model, indices):
    routing = BHRouting(alpha=0.2).patch(model)
    with torch.no_grad():
        for i in sorted(indices, key=lambda i: TASKS[i], reverse=bool(indices[0] % 2)):
            with routing.group(TASKS[i]):
                model(SEQUENCES[i : i + 1])
    return routing


def _worker(rank, world_size, port, out_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        routing = _route(make_olmoe(), [i for i in range(len(SEQUENCES)) if i % world_size == rank])
        totals = routing.stats.total_over_ranks()
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(routing.summary(**totals), f)
    finally:
        dist.destroy_process_group()


def test_totals_over_two_gloo_ranks_equal_one_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "rank0.json"
    mp.spawn(_worker, args=(2, port, str(out)), nprocs=2, join=True)
    distributed = json.loads(out.read_text())
    single = json.loads(json.dumps(_route(make_olmoe(), list(range(len(SEQUENCES)))).summary()))
    for key in ("tokens", "k_histogram", "per_layer_mean", "mean_experts_per_token", "nonfinite_router_tokens",
                "diagnostics"):
        assert distributed[key] == single[key], key
    assert len(single["diagnostics"]["per_layer"]) == 2
    assert sum(single["diagnostics"]["per_layer"][0]["pvalue_histogram"]) == single["tokens"] * 16
    assert distributed["per_task"] == single["per_task"]
    assert set(single["per_task"]) == {"a", "b", "c"}
