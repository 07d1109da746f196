"""The job's one device mesh, with named dims in a fixed order.

Dims, outermost first: ``pp`` (pipeline stages), ``dp_replicate`` (DDP / HSDP replicas),
``dp_shard`` (FSDP2 shards), ``tp`` (tensor parallel). By default ranks fill the grid in
order, so TP groups are consecutive ranks (inside a node under torchrun). A placement plan
(comms/placement.py) may pass another ``rank_grid`` to keep bandwidth-heavy groups inside a
fabric; every group is then built from that grid.
"""
from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh

from comms import dist_utils

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


def build_mesh(device_type: str, sizes: dict[str, int], rank_grid=None, backend_override=None) -> DeviceMesh | None:
    """A DeviceMesh over all ranks with dims MESH_DIMS; None in a single process.

    ``backend_override`` (CUDA) gives groups their own NCCL options, e.g. socket transport
    for a group that spans fabrics (comms.placement.nccl_backend_override)."""
    if dist_utils.world_size() == 1:
        return None
    shape = tuple(sizes[d] for d in MESH_DIMS)
    grid = torch.arange(dist_utils.world_size()) if rank_grid is None else torch.tensor(rank_grid)
    kw = {"backend_override": backend_override} if backend_override else {}
    return DeviceMesh(device_type, grid.reshape(shape), mesh_dim_names=MESH_DIMS, **kw)


def coordinate(mesh: DeviceMesh | None, dim: str) -> tuple[int, int]:
    """(this rank's coordinate along ``dim``, that dim's size); (0, 1) without a mesh.

    The mesh coordinate, not the rank inside the dim's process group: groups number their
    members by global rank, which differs when a placement plan reorders the grid."""
    if mesh is None:
        return 0, 1
    i = mesh.mesh_dim_names.index(dim)
    return mesh.get_coordinate()[i], mesh.size(i)
