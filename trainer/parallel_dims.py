"""The job's parallel degrees, resolved once for its world size.

The config says what the user asked for (``dp_shard = -1``: whatever is left; a placement
plan that fixes the sizes; a DeepSpeed engine that is pure data parallel); ``ParallelDims``
is what the job runs: every degree a number, which kinds of parallelism are on, and where
this rank reads its slice of the global batch. The config itself is never rewritten.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from comms.configlib import check
from comms.mesh import MESH_DIMS, coordinate


@dataclass(frozen=True)
class ParallelDims:
    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int
    ep: int
    world: int
    pp_layers: tuple[int, ...]  # blocks per pipeline stage
    engine: str = "torch"

    @staticmethod
    def resolve(cfg, world: int) -> "ParallelDims":
        """The degrees of ``cfg`` (a JobConfig) on ``world`` ranks; a UserError names the field
        that does not fit."""
        p, n_layers = cfg.parallel, cfg.model.n_layers
        pp, dp_replicate, dp_shard, tp, layers = p.pp, p.dp_replicate, p.dp_shard, p.tp, list(p.pp_layers)
        if p.plan:  # `kintsugi plan` fixed the sizes and the split
            from comms.placement import load_plan

            plan = load_plan(p.plan)
            pp, dp_replicate, dp_shard, tp = (plan.sizes[d] for d in MESH_DIMS)
            layers = list(plan.layers_per_stage)
        if p.engine == "deepspeed":
            check(tp == 1 and pp == 1, "parallel.engine", "the deepspeed engine runs pure data parallel here; set tp=1, pp=1")
            dp_replicate, dp_shard = 1, world if dp_shard == -1 else dp_shard
        if p.ep > 1 and dp_shard == -1 and dp_replicate == 1:
            dp_replicate, dp_shard = world // (tp * pp), 1  # experts need plain DDP replicas
        other = dp_replicate * tp * pp
        if dp_shard == -1:
            check(world % other == 0, "parallel", f"world size {world} is not divisible by dp_replicate x tp x pp = {other}")
            dp_shard = world // other
        check(dp_replicate * dp_shard * tp * pp == world, "parallel",
              f"dp_replicate x dp_shard x tp x pp = {dp_replicate}x{dp_shard}x{tp}x{pp} "
              f"does not equal the world size {world}; change the sizes or --nproc-per-node")
        if not layers:  # as even as possible, earlier stages take the remainder
            layers = [n_layers // pp + (1 if s < n_layers % pp else 0) for s in range(pp)]
        return ParallelDims(pp, dp_replicate, dp_shard, tp, p.ep, world, tuple(layers), p.engine)

    # ---- what is on ---------------------------------------------------------------------
    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    @property
    def fsdp_enabled(self) -> bool:
        """FSDP2 ``fully_shard`` (HSDP with replicas): sharded data parallel, or replicas
        combined with TP/PP (which DDP does not compose with)."""
        return self.engine == "torch" and (self.dp_shard > 1 or (self.dp_replicate > 1 and (self.tp_enabled or self.pp_enabled)))

    @property
    def ddp_enabled(self) -> bool:
        """Plain DDP: replicas and nothing else."""
        return self.engine == "torch" and self.dp_replicate > 1 and not (self.dp_shard > 1 or self.tp_enabled or self.pp_enabled)

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    def mesh_sizes(self) -> dict[str, int]:
        return {"pp": self.pp, "dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard, "tp": self.tp}

    def dp_rank(self, mesh) -> int:
        """Which slice of every global batch this rank reads (its data-parallel coordinate)."""
        rep, _ = coordinate(mesh, "dp_replicate")
        shard, n_shard = coordinate(mesh, "dp_shard")
        return rep * n_shard + shard

    def describe(self) -> str:
        return (f"pp={self.pp} dp_replicate={self.dp_replicate} dp_shard={self.dp_shard} tp={self.tp}"
                + (f" ep={self.ep}" if self.ep_enabled else "") + f" engine={self.engine}")

    def applied_to(self, cfg):
        """A copy of ``cfg`` whose [parallel] section states these degrees (for the run
        directory's config.toml: what ran, not only what was asked)."""
        out = copy.deepcopy(cfg)
        out.parallel.pp, out.parallel.dp_replicate, out.parallel.dp_shard, out.parallel.tp = self.pp, self.dp_replicate, self.dp_shard, self.tp
        out.parallel.pp_layers = list(self.pp_layers) if self.pp_enabled else out.parallel.pp_layers
        return out
