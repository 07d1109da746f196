"""A planned, unevenly split pipeline trains on 4 real gloo ranks (torchrun) and reproduces
the single-process losses."""
from __future__ import annotations

import json

import numpy as np
import pytest

from comms.placement import load_plan
from comms.topology import load_topology
from conftest import JOB, ROOT, losses, train
from launch.plan import main as plan_main


def test_planned_uneven_pipeline_matches_single_process(reference, tmp_path):
    # configs/topology-cpu4.toml, node ranks handed out a-0, b-0, a-1, b-1. Under the
    # trainer's eager 1F1B the plan puts the slow fabric b first with the lighter share (its
    # stage's sends hide behind the fast stage's compute), so stage 0 holds the higher rank of
    # every pipeline pair: the trainer must route the pipeline by stage (stage_to_group_rank),
    # not by group rank.
    topo_path = ROOT / "configs/topology-cpu4.toml"
    assert 'order = ["a-0", "b-0", "a-1", "b-1"]' in topo_path.read_text()
    plan_path = tmp_path / "plan.json"
    assert plan_main(["--topology", str(topo_path), "--model", str(JOB),
                      "--pp", "2", "--dp", "2", "--microbatches", "2", "--out", str(plan_path)]) == 0
    plan = load_plan(plan_path)
    topo = load_topology(topo_path)
    # Each stage on one fabric (not the contiguous ranks 0-1 / 2-3), the slow fabric's stage lighter.
    assert [sorted({topo.fabric_of(r) for r in np.ravel(s)}) for s in plan.rank_grid] == [["b"], ["a"]]
    assert plan.rank_grid == [[[[1], [3]]], [[[0], [2]]]] and plan.layers_per_stage == [1, 3]
    run = tmp_path / "run"
    train(4, run, "--train.steps=4", f"--parallel.plan={plan_path}", "--parallel.pp_microbatches=2")
    got, want = losses(run), losses(reference)
    assert sorted(got) == [1, 2, 3, 4]
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5), f"step {step}: {got[step]} vs {want[step]}"
    assert got[4] < got[1] - 0.3
    config = (run / "config.toml").read_text()
    assert "pp_layers = [1, 3]" in config and "dp_shard = 2" in config
    # The mesh followed the plan: the checkpoint's block 0 comes from ranks 1 and 3 (stage 0,
    # fabric b), blocks 1-3 from ranks 0 and 2 (stage 1, fabric a).
    step_dir = run / "checkpoints" / (run / "checkpoints/latest").read_text().strip()
    tensors = json.loads((step_dir / "manifest.json").read_text())["tensors"]
    writers = {layer: sorted({int(c["file"][6:11]) for name, t in tensors.items() if name.startswith(f"model.layers.{layer}.")
                              for c in t["chunks"]}) for layer in range(4)}
    assert writers == {0: [1, 3], 1: [0, 2], 2: [0, 2], 3: [0, 2]}
