"""sweep --shard I/N and --list: a deterministic partition of the grid balanced by expected cost, that
three real sweep processes run at once (two sharing a folder through their claims) to exactly the
unsharded grid; the --target_ks and --twins grids; bad input in one line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_concurrently

from lm_eval_bh.cli import main
from lm_eval_bh.commands import sweep as S


def _args(*argv: str):
    parser = argparse.ArgumentParser()
    S.add_arguments(parser)
    return parser.parse_args(list(argv))


def _listed(capsys, model: Path, *extra: str) -> list[tuple[str, str]]:
    """[(setting_id, 'I/N')] that `sweep --list` prints."""
    assert main(["sweep", "--model_args", f"pretrained={model}", "--list", *extra]) == 0
    rows = [ln.split("\t") for ln in capsys.readouterr().out.splitlines() if not ln.startswith(("#", "shard"))]
    return [(sid, shard) for shard, _, sid in rows]


@pytest.mark.parametrize("shard, named", [
    ("3/3", "--shard: I=3 must be less than N=3"), ("0/0", "--shard: N=0 must be at least 1"),
    ("x", "--shard: 'x' is not I/N"), ("1/2/3", "is not I/N"), ("-1/2", "is not I/N"), ("1.5/3", "is not I/N"),
])
def test_bad_shard_is_one_line(tiny_model_dir, capsys, shard, named):
    rc = main(["sweep", "--model_args", f"pretrained={tiny_model_dir}", "--list", f"--shard={shard}"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error" in ln]
    assert rc == 2 and len(lines) == 1 and named in lines[0] and "Traceback" not in err


def test_list_loads_nothing(tiny_model_dir):
    """--list reads the model's config only: no weights, no lm-eval task index, no evaluator; and needs
    neither --tasks nor --output_path."""
    code = ("import sys; from lm_eval_bh.cli import main; rc = main(sys.argv[1:]); "
            "print('loaded:', [m for m in ('lm_eval.tasks', 'lm_eval.evaluator', 'lm_eval_bh.lm', 'safetensors.torch') "
            "if m in sys.modules]); sys.exit(rc)")
    import subprocess

    from conftest import subprocess_env

    p = subprocess.run([sys.executable, "-c", code, "sweep", "--model_args", f"pretrained={tiny_model_dir}", "--list",
                        "--shard", "1/2", "--alphas", "0.05"], cwd=ROOT, env=subprocess_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "loaded: []" in p.stdout
    assert "# 5 settings in 2 shard(s)" in p.stdout and "\tbh-zscore_a0.05_k1-4" in p.stdout


def test_shards_partition_the_grid_by_cost_the_same_every_time():
    args = _args("--alphas", "0.01,0.05,0.1,0.2", "--selections", "bh,hc", "--twins")
    grid = S.build_grid(args, top_k=4, num_experts=16, base_routing={})
    assert len(grid) == 4 + 8 + 8  # top-1..4, 8 adaptive settings, each followed by its twin
    top_k = 4
    for n in (1, 2, 3, 4, 7, 30):
        shards = S.assign_shards(grid, n, top_k)
        assert shards == S.assign_shards(list(grid), n, top_k)  # deterministic
        assert set(shards) == {sid for sid, _ in grid} and set(shards.values()) <= set(range(n))
        for sid, r in grid:  # a twin runs in its source's shard
            if r.get("layer_budget"):
                assert shards[sid] == shards[Path(r["layer_budget"]).stem]
        load = [sum(S.expected_cost(r, top_k) for sid, r in grid if shards[sid] == j) for j in range(n)]
        if n <= 8:  # as many units as shards or more: every shard works, the loads within one unit's cost
            assert min(load) > 0 and max(load) - min(load) <= 2 * (1 + 4 / top_k)
    shards = S.assign_shards(grid, 4, top_k)
    assert len({shards[f"topk{k}"] for k in (1, 2, 3, 4)}) >= 3  # the fixed top-k settings are spread


def test_target_ks_and_twins_grids(tiny_model_dir, capsys):
    """--target_ks replaces each rule's parameter list (alpha, top_p) with target_k=K; fixed top-k keeps its
    k; --twins follows each adaptive setting with its layer-budget twin."""
    ids = [sid for sid, _ in _listed(capsys, tiny_model_dir, "--target_ks", "1.5,2,3", "--selections", "bh,hc,topp",
                                     "--topk", "1,4", "--twins")]
    assert len(ids) == 2 + 2 * 9 and ids[:2] == ["topk1", "topk4"]
    assert all("_a0." not in sid and "_p0." not in sid for sid in ids)  # no alpha, no top_p
    assert [sid for sid in ids[2::2]] == [f"{rule}_K{k}_k1-4" for rule in ("bh-zscore", "hc-zscore", "topp")
                                           for k in ("1.5", "2", "3")]
    for i in range(2, len(ids), 2):
        assert ids[i + 1].startswith(f"topk_twin-{ids[i]}-")  # named by the file it reads, in any folder
    elsewhere = [sid for sid, _ in S.build_grid(_args("--target_ks", "1.5,2,3", "--selections", "bh,hc,topp",
                                                      "--topk", "1,4", "--twins"), top_k=4, num_experts=16,
                                                base_routing={}, out=Path("/some/other/folder"))]
    assert elsewhere == ids
    sens = dict(S.build_grid(_args("--target_ks", "2", "--topk", "1", "--twins", "--allocations", "sensitivity"),
                             top_k=4, num_experts=16, base_routing={}))  # the allocation: target settings only
    assert {sid: r.get("allocation") for sid, r in sens.items() if not sid.startswith("topk_twin-")} == {
        "topk1": None, "bh-zscore_K2_sensitivity_k1-4": "sensitivity"}
    grid = dict(S.build_grid(_args("--target_ks", "1.5,2,3", "--selections", "bh,hc,topp", "--topk", "none"),
                             top_k=4, num_experts=16, base_routing={}))
    assert sorted(r["target_k"] for r in grid.values()) == [1.5, 1.5, 1.5, 2, 2, 2, 3, 3, 3]
    assert all("alpha" not in r and "top_p" not in r for r in grid.values())
    for bad, named in (("0,2", "--target_ks: 0 is out of range"), ("5", "--target_ks: '5' is out of range"),
                       ("x", "--target_ks: 'x' is not a number")):
        assert main(["sweep", "--model_args", f"pretrained={tiny_model_dir}", "--list", "--target_ks", bad]) == 2
        err = capsys.readouterr().err
        assert named in err and len(err.strip().splitlines()) == 1


def test_allocations_axis_and_top_k_at_each_target(tiny_model_dir, capsys):
    """--allocations crosses every target with each allocation (distinct ids, `allocation=sensitivity` in the
    routing of those only); with --selections topk the grid gains top-k at each target (the fitted per-layer
    budget for sensitivity; uniform only where --topk does not already run that k), never twinned; --list
    and --shard partition it like any grid; model_args allocation= and --allocations without --target_ks
    are one line each."""
    flags = ("--target_ks", "1.5,2", "--allocations", "uniform,sensitivity", "--selections", "bh,topk",
             "--topk", "1,2", "--twins")
    grid = dict(S.build_grid(_args(*flags), top_k=4, num_experts=16, base_routing={}))
    assert [sid for sid in grid if not sid.startswith("topk_twin-")] == [
        "topk1", "topk2", "topk_K1.5", "topk_K1.5_sensitivity", "topk_K2_sensitivity",  # top-2 is topk_K2
        "bh-zscore_K1.5_k1-4", "bh-zscore_K1.5_sensitivity_k1-4", "bh-zscore_K2_k1-4", "bh-zscore_K2_sensitivity_k1-4"]
    assert grid["topk_K1.5"] == {"selection": "topk", "min_k": 1, "max_k": 4, "target_k": 1.5}
    assert grid["topk_K2_sensitivity"] == {"selection": "topk", "min_k": 1, "max_k": 4, "target_k": 2.0,
                                           "allocation": "sensitivity"}
    assert all(("allocation" in r) == ("sensitivity" in sid) for sid, r in grid.items() if "twin" not in sid)
    twins = [sid for sid in grid if sid.startswith("topk_twin-")]  # the adaptive settings' only
    assert len(twins) == 4 and not [t for t in twins if t.startswith("topk_twin-topk")]
    listed = _listed(capsys, tiny_model_dir, *flags, "--shard", "0/3")
    assert [sid for sid, _ in listed] == list(grid)
    shards = S.assign_shards(list(grid.items()), 3, 4)
    assert [shard for _, shard in listed] == [f"{shards[sid]}/3" for sid in grid]
    assert len(set(shards.values())) == 3
    for argv, named in (
            (["--model_args", f"pretrained={tiny_model_dir},allocation=sensitivity", "--target_ks", "2"],
             "--model_args: 'allocation' is a grid key; set it with --allocations"),
            (["--model_args", f"pretrained={tiny_model_dir}", "--allocations", "sensitivity"],
             "--allocations: 'sensitivity' is not allowed; allowed: uniform, or with --target_ks"),
            (["--model_args", f"pretrained={tiny_model_dir}", "--allocations", "even", "--target_ks", "2"],
             "--allocations: 'even' is not allowed; allowed: uniform, sensitivity")):
        assert main(["sweep", "--list", *argv]) == 2
        err = capsys.readouterr().err
        assert named in err and len(err.strip().splitlines()) == 1


def test_three_concurrent_shards_are_the_unsharded_grid(tiny_model_dir, tmp_path, capsys):
    """Shards 0/3 and 2/3 share folder A (through their claims), 1/3 writes folder B; all three at once.
    The union of their settings is the unsharded grid, with no setting run twice; report joins A and B."""
    grid = ("--topk", "1,4", "--alphas", "0.05,0.5")
    listed = dict(_listed(capsys, tiny_model_dir, "--shard", "0/3", *grid))
    assert len(listed) == 4 and {s.split("/")[0] for s in listed.values()} == {"0", "1", "2"}
    folders = {0: tmp_path / "A", 1: tmp_path / "B", 2: tmp_path / "A"}
    jobs = {i: ([sys.executable, "-m", "lm_eval_bh.cli", "sweep", "--model_args", f"pretrained={tiny_model_dir}",
                 "--tasks", "mmlu_dev_offline", "--include_path", str(ROOT / "tasks"), "--limit", "1", "--device",
                 "cpu", "--bootstrap_iters", "0", "--shard", f"{i}/3", "--output_path", str(folders[i]), *grid],
                {"cwd": ROOT}) for i in range(3)}
    done = run_concurrently(jobs, workers=3)
    ran = {}
    for i, p in done.items():
        assert p.returncode == 0, p.stderr[-3000:]
        ran[i] = int(p.stderr.split(" setting(s) run here")[0].rsplit("sweep: ", 1)[1])
        assert ran[i] == sum(1 for s in listed.values() if s == f"{i}/3")
    files = {f.stem: f for folder in (tmp_path / "A", tmp_path / "B") for f in folder.glob("*.json")}
    assert sorted(files) == sorted(listed) and sum(ran.values()) == len(listed)  # the grid, each setting once
    for sid, f in files.items():
        data = json.loads(f.read_text())
        assert data["sweep"]["setting_id"] == sid and f"{data['sweep']['shard'][0]}/3" == listed[sid]
        assert f.parent == folders[data["sweep"]["shard"][0]]
    assert sorted(x.name for x in (tmp_path / "A").iterdir() if x.name.startswith(".")) == []  # no locks left
    assert main(["report", str(tmp_path / "A"), str(tmp_path / "B")]) == 0
    table = capsys.readouterr().out
    assert all(label in table for label in ("top-1", "top-4", "bh/zscore alpha=0.05", "bh/zscore alpha=0.5"))
