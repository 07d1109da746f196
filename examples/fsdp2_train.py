"""A plain FSDP2 training loop, as you would write it, with Kintsugi's checkpoints and tracing.

    kintsugi launch --nproc-per-node 2 examples/fsdp2_train.py --steps 40

Kintsugi adds four things to the loop: ``AsyncCheckpointer`` (saves return at once, the node
keeper holds them in memory and writes them to disk; ``load`` restores from memory after a
crash), its ``check()`` at every step (SIGTERM stops the job at a step boundary with a final
save), and the three tracing calls that let `kintsugi launch` name a hung or slow rank.
"""
import argparse
import json
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import comms
from checkpoint import AsyncCheckpointer


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens, targets):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return nn.functional.cross_entropy(self.head(x).flatten(0, 1), targets.flatten())


def batch(step: int, rank: int, world: int, args):
    """This rank's part of step ``step``'s batch: a pure function of the step, so a resumed
    run sees exactly the batches it would have seen."""
    g = torch.Generator().manual_seed(step)
    tokens = [torch.randint(0, args.vocab, (args.batch,), generator=g)]
    for _ in range(args.seq):  # each token follows from the one before: something to learn
        tokens.append((tokens[-1] * 5 + 1) % args.vocab)
    mine = torch.stack(tokens, 1).chunk(world)[rank]
    return mine[:, :-1], mine[:, 1:]


def parse_args(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--save-every", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--zero-stage", type=int, default=2, help="deepspeed_train.py only")
    return ap.parse_args(argv)


def main():
    args = parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    comms.install()  # 1/3: record every collective (RUN_DIR/diagnostics) for the monitor and reports

    torch.manual_seed(0)
    model = TinyLM(args.vocab, args.dim, args.layers).to(device)
    mesh = init_device_mesh(device, (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    ckpt = AsyncCheckpointer(snapshots=True)  # erasure-coded across the nodes' keepers
    state = {"model": model, "optim": optimizer}
    start = ckpt.load(state) or 0  # keeper memory first (a restarted worker), then disk
    log = open(ckpt.run_dir / "metrics.jsonl", "a") if rank == 0 else None

    step = start
    for step in range(start + 1, args.steps + 1):
        inputs, targets = (t.to(device) for t in batch(step, rank, world, args))
        with comms.phase("forward_backward"):  # 2/3: time the parts of a step
            loss = model(inputs, targets)
            loss.backward()
        with comms.phase("optimizer"):
            optimizer.step()  # waits only for checkpoint copies not yet done
            optimizer.zero_grad()
        stop = ckpt.check()  # every step, every rank: True once SIGTERM/SIGINT arrived
        loss = loss.detach()
        dist.all_reduce(loss)
        if log:
            log.write(json.dumps({"step": step, "loss": loss.item() / world}) + "\n")
            log.flush()
        if step % args.save_every == 0 and step < args.steps and not stop:
            with comms.phase("checkpoint"):
                ckpt.save(step, state)  # returns at once; copied during the next forward/backward
        comms.end_step(step)  # 3/3: one record per step
        if stop:
            break
    # The end, a stop request, or a restart that found the last step already saved: the
    # final save goes to every level and close() waits until it is durable there.
    ckpt.save(step, state, final=True)
    ckpt.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
