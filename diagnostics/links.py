"""Which cells of a src x dst matrix of transfer times are slow, and whom to name for them.

Shared by the two sources of such matrices: the job's own point-to-point traffic (pipeline
sends, ``Generation.links``) and the pairwise link probe (``diagnostics.probe``). A cell is
slow when most of its samples exceed ``factor`` x the typical cell + ``min_ms``; the typical
cell is a low quantile of the cells' medians (the lower median: it holds while up to half
the cells are slow).
A whole slow row (at least two cells) is a bad sender, a whole slow column a bad receiver
(a host's NIC or link, one direction; both: ``sender and receiver``), anything else the
single link.
"""
from __future__ import annotations

import statistics
from typing import Callable


def slow_cells(samples: dict[tuple[int, int], list[float]], *, factor: float, min_ms: float,
               persistence: float, quantile: float = 0.5) -> tuple[set, float, float]:
    """(slow cells, typical ms, limit ms) of a matrix of per-cell samples in ms; the typical
    cell is the lower ``quantile`` of the cells' medians."""
    if len(samples) < 2:
        return set(), 0.0, 0.0
    meds = sorted(statistics.median(v) for v in samples.values())
    typical = meds[int(quantile * (len(meds) - 1))]
    limit = factor * typical + min_ms
    slow = {cell for cell, v in samples.items() if sum(ms > limit for ms in v) >= persistence * len(v)}
    return slow, typical, limit


def name_cells(slow: set, cells, node_of: Callable[[int], dict]) -> list[dict]:
    """Suspects for the slow cells: senders (whole rows), receivers (whole columns), links."""
    roles: dict[int, list[str]] = {}
    covered: set = set()
    for axis, role in ((0, "sender"), (1, "receiver")):
        for r in sorted({cell[axis] for cell in slow}):
            line = [cell for cell in cells if cell[axis] == r]
            if len(line) >= 2 and all(cell in slow for cell in line):
                roles.setdefault(r, []).append(role)
                covered |= set(line)
    # Slow both ways: the host's own link (or NIC), not one direction of it.
    suspects = [{**node_of(r), "role": " and ".join(rs)} for r, rs in sorted(roles.items())]
    suspects += [{"link": list(cell), "nodes": [node_of(cell[0])["node"], node_of(cell[1])["node"]],
                  "hosts": [node_of(cell[0])["host"], node_of(cell[1])["host"]]} for cell in sorted(slow - covered)]
    return suspects
