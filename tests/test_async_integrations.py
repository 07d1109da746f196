"""The DeepSpeed checkpoint engine plug-in and the torch.distributed.checkpoint-style
Stateful API, each through a real engine/optimizer and a real node keeper."""
from __future__ import annotations


import pytest
import torch

from checkpoint.format import committed_steps
from diagnostics.drill import free_port

from test_async import stop_keeper


def ds_engine(seed: int):
    import deepspeed
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    cfg = {"train_batch_size": 4, "zero_optimization": {"stage": 2}, "steps_per_print": 10**9,
           "kintsugi": {"keeper_timeout_s": 20, "host_memory_mb": 64}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2), config=cfg)
    return engine


def ds_steps(engine, steps: range) -> list[float]:
    out = []
    for s in steps:
        g = torch.Generator().manual_seed(s)
        loss = torch.nn.functional.mse_loss(engine(torch.randn(4, 16, generator=g)), torch.randn(4, 4, generator=g))
        engine.backward(loss)
        engine.step()
        out.append(loss.item())
    return out


@pytest.fixture
def single_rank(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                     LOCAL_WORLD_SIZE="1").items():
        monkeypatch.setenv(k, v)
    yield
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


def test_deepspeed_zero2_saves_through_kintsugi_and_resumes_exactly(tmp_path, single_rank):
    from checkpoint import deepspeed_engine
    engine = ds_engine(0)
    kengine = deepspeed_engine.enable(engine)
    ds_steps(engine, range(3))
    engine.save_checkpoint(str(tmp_path), tag="global_step3")
    want = ds_steps(engine, range(3, 6))  # the optimizer steps while the copy may still run
    kengine.close()
    assert committed_steps(tmp_path / "kintsugi") == [3]
    assert all(p.stat().st_size < 100 for p in tmp_path.glob("global_step3/*.pt"))  # markers: no torch.save

    engine2 = ds_engine(1)  # other weights: everything must come from the checkpoint
    kengine2 = deepspeed_engine.enable(engine2)
    engine2.load_checkpoint(str(tmp_path))
    assert engine2.global_steps == 3
    assert ds_steps(engine2, range(3, 6)) == want
    kengine2.close()
    stop_keeper(tmp_path / "kintsugi")
    stop_keeper(tmp_path)


def test_stateful_api_restores_model_optimizer_and_scheduler_exactly(tmp_path):
    from checkpoint.config import CheckpointConfig
    from checkpoint import AsyncCheckpointer

    def make(seed):
        torch.manual_seed(seed)
        model = torch.nn.Linear(8, 4)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return model, opt, sched

    def run(model, opt, sched, steps):
        out = []
        for s in steps:
            g = torch.Generator().manual_seed(s)
            loss = model(torch.randn(4, 8, generator=g)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            out.append(loss.item())
        return out

    cfg = CheckpointConfig(keeper_timeout_s=20, host_memory_mb=64, capture="lazy")
    model, opt, sched = make(0)
    ck = AsyncCheckpointer(tmp_path, cfg)
    run(model, opt, sched, range(3))
    handle = ck.save(3, {"model": model, "optim": opt, "sched": sched}, final=True)
    want = run(model, opt, sched, range(3, 6))  # the copy runs beside these steps
    handle.wait()
    assert handle.done() and handle.durable_s >= handle.stall_s > 0
    ck.close()

    model2, opt2, sched2 = make(1)
    ck2 = AsyncCheckpointer(tmp_path, cfg)
    assert ck2.load({"model": model2, "optim": opt2, "sched": sched2}) == 3
    assert sched2.last_epoch == 3 and opt2.param_groups[0]["lr"] == 0.05
    assert run(model2, opt2, sched2, range(3, 6)) == want
    ck2.close()
    stop_keeper(tmp_path)
