"""Expert-parallel process groups and the all-to-all itself.

Exchanges run on lanes (comms/lanes.py), so the caller's thread keeps computing while a
dispatch or combine is in flight.

The all-to-all is flat (one ``all_to_all_single`` over the EP group) or hierarchical when
the EP group spans nodes: first an intra-node exchange that gathers, on each local rank j,
everything bound for local rank j of any node, then one inter-node exchange among ranks with
the same local index. Inter-node messages are then ``ranks_per_node`` times larger and
``ranks_per_node`` times fewer, which is what slow links want (FSMoE, section 4).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from comms import UserError, dist_utils
from comms.lanes import Done, Lane


@dataclass
class EPGroups:
    """The process groups of expert parallelism for this rank.

    Ranks ``[b*ep, (b+1)*ep)`` of the data-parallel ranks form EP group b; the ranks holding
    the same experts (same position in their EP groups) form the expert-data-parallel group.
    """

    ep: int
    mesh: DeviceMesh | None  # 1-D mesh of this rank's EP group (for DTensor sharding)
    group: object  # the EP process group (all-to-all)
    expert_dp: object  # ranks with the same experts (their gradients are summed)
    dp: object  # all data-parallel ranks (non-expert gradient reduction lane)
    dp_size: int
    intra: object = None  # hierarchical: this node's part of the EP group
    inter: object = None  # hierarchical: same local index on the other nodes
    ranks_per_node: int = 1

    @property
    def hierarchical(self) -> bool:
        return self.intra is not None


def build_ep_groups(ep: int, device_type: str = "cpu", ranks_per_node: int | None = None,
                    hierarchical: str = "auto") -> EPGroups:
    """Create the EP, expert-DP and (when EP spans nodes) intra/inter-node groups; collective.

    Assumes the data-parallel ranks are all ranks (tensor/pipeline parallel is rejected
    together with ep > 1). ``ranks_per_node`` defaults to torchrun's LOCAL_WORLD_SIZE.
    """
    world = dist_utils.world_size()
    if world % ep:
        raise UserError(f"config parallel.ep: {ep} does not divide the data-parallel size {world}")
    if ranks_per_node is None:
        ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    mesh2 = DeviceMesh(device_type, torch.arange(world).view(world // ep, ep), mesh_dim_names=("ep_replicate", "ep"))
    spans_nodes = 1 < ranks_per_node < ep and ep % ranks_per_node == 0
    use_hier = hierarchical == "on" or (hierarchical == "auto" and spans_nodes)
    if use_hier and not spans_nodes:
        raise UserError(f"config moe.hierarchical: EP size {ep} is not a multiple of {ranks_per_node} ranks per node "
                        "spanning several nodes; set it to `auto` or `off`")
    intra = inter = None
    if use_hier:
        mesh3 = DeviceMesh(device_type, torch.arange(world).view(world // ep, ep // ranks_per_node, ranks_per_node),
                           mesh_dim_names=("ep_replicate", "ep_node", "ep_local"))
        intra, inter = mesh3.get_group("ep_local"), mesh3.get_group("ep_node")
    # A group of its own for the gradient lane, so its all-reduces never interleave with the
    # trainer's collectives on the default group.
    dp = dist.new_group(list(range(world)))
    return EPGroups(ep=ep, mesh=mesh2["ep"], group=mesh2.get_group("ep"), expert_dp=mesh2.get_group("ep_replicate"),
                    dp=dp, dp_size=world, intra=intra, inter=inter, ranks_per_node=ranks_per_node)


def _a2a(x: torch.Tensor, group) -> torch.Tensor:
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def _phase1(x: torch.Tensor, groups: EPGroups) -> torch.Tensor:
    """Intra-node: to local peer j go the blocks bound for (any node m, local index j)."""
    nodes, local = groups.ep // groups.ranks_per_node, groups.ranks_per_node
    return _a2a(x.view(nodes, local, *x.shape[1:]).transpose(0, 1).contiguous(), groups.intra)  # (local_src, nodes, ...)


def _phase2(staged: torch.Tensor, groups: EPGroups) -> torch.Tensor:
    """Inter-node: to node m go the blocks bound for (m, my local index), from every local source."""
    out = _a2a(staged.transpose(0, 1).contiguous(), groups.inter)  # (node_src, local_src, ...)
    return out.view(groups.ep, *out.shape[2:])


def all_to_all(x: torch.Tensor, groups: EPGroups | None) -> torch.Tensor:
    """Exchange blocks: ``x`` is (ep, ...), block j goes to EP rank j; returns (ep, ...) with
    block j received from EP rank j. Blocking; ``Exchanger`` runs it on lanes to overlap."""
    if groups is None or groups.ep == 1:
        return x
    x = x.contiguous()
    if not groups.hierarchical:
        return _a2a(x, groups.group)
    return _phase2(_phase1(x, groups), groups)


class Exchanger:
    """Asynchronous all-to-all on lanes. Hierarchical exchanges use two lanes, so the
    inter-node phase of one chunk runs while the intra-node phase of the next one does
    (FSMoE's co-scheduling of intra- and inter-node communication)."""

    def __init__(self, groups: EPGroups | None):
        self.groups = groups
        active = groups is not None and groups.ep > 1
        self.lane = Lane("ep") if active else None
        self.inter_lane = Lane("ep-inter") if active and groups.hierarchical else None

    def start(self, x: torch.Tensor, pre=None, post=None, inline: bool = False):
        """all_to_all(pre(x)) then post(...), without blocking the caller; returns a Pending.
        ``inline``: run it on the caller's thread (nothing to overlap with, e.g. d = 1: a
        thread hand-off costs a scheduler slice on busy cores)."""
        pre, post = pre or (lambda t: t), post or (lambda t: t)
        if self.lane is None or inline:
            return Done(post(all_to_all(pre(x), self.groups)))
        g = self.groups
        if self.inter_lane is None:
            return self.lane.submit(lambda: post(_a2a(pre(x).contiguous(), g.group)))
        first = self.lane.submit(lambda: _phase1(pre(x).contiguous(), g))
        return self.inter_lane.submit(lambda: post(_phase2(first.result(), g)))

    def close(self):
        for lane in (self.lane, self.inter_lane):
            if lane is not None:
                lane.close()
