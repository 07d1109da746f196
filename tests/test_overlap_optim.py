"""Holmes' overlapped optimizer (trainer/overlap_optim.py): every bucket is stepped as soon as
its reduction is done, the updates equal one step after every reduction, on real gloo ranks
and in the trainer's pipeline."""
from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from comms import UserError, dist_utils
from conftest import losses, train
from trainer.config import load_config
from trainer.overlap_optim import OverlappedOptimizer, buckets


def _worker(rank: int, world: int, tmp: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    copies = [copy.deepcopy(model) for _ in range(3)]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=False) for m in copies]
    group = dist.new_group(list(range(world)))
    # ~1 KB buckets: 4 of them, so steps and reductions interleave.
    overlapped = OverlappedOptimizer(copies[0], opts[0], group, bucket_mb=0.001)
    after = OverlappedOptimizer(copies[1], opts[1], group, bucket_mb=0.001, overlap=False)
    assert len(overlapped.buckets) == 4
    for step in range(3):
        torch.manual_seed(100 * step + rank)  # each replica its own batch
        x, y = torch.randn(16, 8), torch.randn(16, 4)
        for m in copies:
            nn.functional.mse_loss(m(x), y).backward()
        squares = [overlapped.step(), after.step()]
        # By hand: average every gradient over the replicas, then one step.
        for p in copies[2].parameters():
            dist.all_reduce(p.grad)
            p.grad.div_(world)
        opts[2].step()
        assert torch.equal(squares[0], squares[1])
        assert squares[0].item() == pytest.approx(sum(p.grad.double().square().sum().item() for p in copies[2].parameters()))
        for opt in opts:
            opt.zero_grad(set_to_none=True)
    # Bucket i is stepped right after its own reduction, before the next one is waited for.
    assert overlapped.events == [(e, i) for i in range(4) for e in ("reduced", "stepped")]
    assert after.events[-1] == ("stepped", -1) and [e for e, _ in after.events].count("stepped") == 1
    for a, b, c in zip(*(m.parameters() for m in copies)):
        assert torch.equal(a, b) and torch.equal(a, c)
    # Every replica holds the same parameters.
    flat = torch.cat([p.detach().reshape(-1) for p in copies[0].parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(g, flat) for g in gathered)
    overlapped.close()
    after.close()
    dist_utils.exit_process()  # leave without tearing gloo down (see dist_utils)


def test_bucket_steps_equal_one_step_after_all_reductions(tmp_path):
    mp.start_processes(_worker, args=(2, str(tmp_path)), nprocs=2, start_method="spawn")


def test_buckets_keep_order_and_size():
    params = [nn.Parameter(torch.zeros(n)) for n in (100, 100, 300, 50, 50)]
    got = buckets(params, 800)  # bytes: 200 floats
    assert [[p.numel() for p in b] for b in got] == [[100, 100], [300], [50, 50]]


@pytest.mark.parametrize("overrides, needle", [
    (["--parallel.dp_replicate=2", "--parallel.dp_shard=2"], "needs dp_replicate > 1 and dp_shard = 1"),
    (["--parallel.dp_replicate=4", "--parallel.dp_shard=1", "--optim.grad_clip=1.0"], "set optim.grad_clip=0"),
    (["--parallel.dp_replicate=2", "--parallel.tp=2", "--parallel.dp_shard=1"], "needs parallel.engine=torch, tp=1"),
])
def test_config_errors_name_the_field(overrides, needle):
    with pytest.raises(UserError, match=re.escape(needle)) as e:
        load_config(None, ["--parallel.overlap_optimizer=true", "--optim.grad_clip=0", *overrides]).validate(world_size=4)
    assert "parallel.overlap_optimizer" in str(e.value)


@pytest.mark.slow
def test_pipeline_with_overlapped_optimizer_matches_single_process(tmp_path):
    # pp 2 x 2 replicas, the replicas reduced and stepped bucket by bucket (small buckets:
    # several per stage), and the same stepped once after every reduction (the overlap's
    # baseline, parallel.optimizer_overlap=false): the losses of one process training the
    # whole batch.
    common = ["--train.steps=4", "--optim.grad_clip=0", "--checkpoint.interval=0"]
    train(1, tmp_path / "one", *common)
    want = losses(tmp_path / "one")
    for overlap in ("true", "false"):
        run = tmp_path / f"four-{overlap}"
        train(4, run, *common, "--parallel.pp=2", "--parallel.dp_replicate=2", "--parallel.dp_shard=1",
              "--parallel.overlap_optimizer=true", "--parallel.bucket_mb=0.02", f"--parallel.optimizer_overlap={overlap}")
        got = losses(run)
        assert sorted(got) == [1, 2, 3, 4]
        for step in got:
            assert got[step] == pytest.approx(want[step], rel=1e-5), (overlap, step)
        assert got[4] < got[1] - 0.3
