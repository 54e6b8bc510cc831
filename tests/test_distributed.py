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


# --- the same through lm.py: lm-eval's data-parallel padding requests are not counted ------------

PROMPTS = ["The capital of France is", "Two plus two is", "Water boils at", "The sky is", "A week has"]


def _generate_requests():
    """generate_until requests (lm-eval shares no forward between them, unlike identical loglikelihood inputs)."""
    from lm_eval.api.instance import Instance

    gen = {"until": ["\n"], "max_gen_toks": 4, "do_sample": False}
    return [Instance("generate_until", {}, (p, gen), i, ("qa", i, 1)) for i, p in enumerate(PROMPTS)]


def _shared_input_requests():
    from test_lm import loglikelihood_requests

    return loglikelihood_requests([("The same question on every rank", " yes")], task="shared")


def _olmoe_bh(model_dir):
    from lm_eval.api.registry import get_model

    return get_model("olmoe_bh").create_from_arg_string(f"pretrained={model_dir},alpha=0.2",
                                                        {"device": "cpu", "batch_size": 2})


def _lm_worker(rank, world_size, port, model_dir, out_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        lm = _olmoe_bh(model_dir)
        lm._rank, lm._world_size = rank, world_size  # what HFLM sets under `accelerate launch` (on GPUs only)
        mine = [r for i, r in enumerate(_generate_requests()) if i % world_size == rank]
        # lm-eval's evaluator evens out the ranks with copies of a rank's last request (rank 1: 2 -> 3)
        padding = (len(PROMPTS) + world_size - 1) // world_size - len(mine)
        lm.generate_until(mine + [mine[-1]] * padding)
        lm.loglikelihood(_shared_input_requests())  # every rank holds the same request
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(lm.get_model_info()["routing"], f)
    finally:
        dist.destroy_process_group()


def test_lm_totals_over_two_gloo_ranks_skip_padding_requests(tiny_model_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "rank0.json"
    mp.spawn(_lm_worker, args=(2, port, str(tiny_model_dir), str(out)), nprocs=2, join=True)
    distributed = json.loads(out.read_text())
    lm = _olmoe_bh(tiny_model_dir)
    lm.generate_until(_generate_requests())
    lm.loglikelihood(_shared_input_requests() * 2)  # in one process, the two share one forward
    single = json.loads(json.dumps(lm.get_model_info()["routing"]))
    assert single["per_task"]["qa"]["tokens"] > 0
    assert distributed["per_task"]["qa"] == single["per_task"]["qa"]
    # a model input that requests on different ranks share runs, and is counted, once per rank
    assert distributed["per_task"]["shared"]["tokens"] == 2 * single["per_task"]["shared"]["tokens"] > 0
