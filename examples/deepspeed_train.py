"""The model and data of fsdp2_train.py under a DeepSpeed ZeRO engine, with Kintsugi's
checkpoints and tracing.

    kintsugi launch --nproc-per-node 2 examples/deepspeed_train.py --zero-stage 2 --steps 40

``ZeroState(engine)`` hands the engine's state to ``AsyncCheckpointer`` as full fp32
weights and Adam moments by parameter name (layout-free: it restores onto any world size
or engine). To keep ``engine.save_checkpoint``/``load_checkpoint`` instead, one line after
``deepspeed.initialize`` makes them Kintsugi's: ``checkpoint.deepspeed_engine.enable(engine)``
(disk levels only).
"""
import json
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
import deepspeed  # noqa: E402  (reads DS_ACCELERATOR at import)

import comms  # noqa: E402
from checkpoint import AsyncCheckpointer  # noqa: E402
from checkpoint.deepspeed_engine import ZeroState  # noqa: E402
from fsdp2_train import TinyLM, batch, parse_args  # noqa: E402  (this directory)


def main():
    args = parse_args()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    comms.install()  # record every collective for the monitor and `kintsugi diagnose report`

    torch.manual_seed(0)
    model = TinyLM(args.vocab, args.dim, args.layers)
    config = {"train_batch_size": args.batch, "zero_optimization": {"stage": args.zero_stage},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3),
                                      config=config)

    ckpt = AsyncCheckpointer(snapshots=True)
    state = {"zero": ZeroState(engine)}
    start = ckpt.load(state) or 0  # keeper memory first (a restarted worker), then disk
    log = open(ckpt.run_dir / "metrics.jsonl", "a") if rank == 0 else None

    step = start
    for step in range(start + 1, args.steps + 1):
        inputs, targets = (t.to(engine.device) for t in batch(step, rank, world, args))
        with comms.phase("forward_backward"):
            loss = engine(inputs, targets)
            engine.backward(loss)
        with comms.phase("optimizer"):
            engine.step()
        stop = ckpt.check()  # every step, every rank: True once SIGTERM/SIGINT arrived
        loss = loss.detach()
        torch.distributed.all_reduce(loss)
        if log:
            log.write(json.dumps({"step": step, "loss": loss.item() / world}) + "\n")
            log.flush()
        if step % args.save_every == 0 and step < args.steps and not stop:
            with comms.phase("checkpoint"):
                ckpt.save(step, state)  # gathers the full state (ZeRO-3: collective), returns at once
        comms.end_step(step)
        if stop:
            break
    ckpt.save(step, state, final=True)
    ckpt.close()  # waits until the final save is durable


if __name__ == "__main__":
    main()
