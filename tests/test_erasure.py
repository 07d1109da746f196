"""Erasure coding of node snapshots: layout, decode from any k shares, checksums, planning."""
import itertools
import math
import random

import numpy as np
import pytest

from checkpoint.erasure import (GroupCode, NodeShares, ShareError, ShareHeader, UnusableShare, code_for_target,
                                default_code, group_survival, inject_faults, plan_groups, rebuild_snapshot, survival)
from comms import UserError


def encoded_group(k, m, lengths, stripe, seed=0):
    code = GroupCode(k, m)
    rng = random.Random(seed)
    snaps = [rng.randbytes(n) for n in lengths]
    nodes = [NodeShares("job", 7, 0, 100 + pos, pos, code, snaps[pos]) for pos in range(code.n)]
    readers = dict(enumerate(nodes))
    for node in nodes:
        node.encode(readers, stripe)
    return code, snaps, nodes


@pytest.mark.parametrize("k,m", [(1, 1), (2, 1), (3, 1), (2, 2), (4, 2), (3, 3)])
def test_any_m_lost_nodes_are_rebuilt_exactly(k, m):
    # uneven lengths (one not a multiple of k, one shorter than k) and stripes smaller than a block
    lengths = [1000 + 37 * i for i in range(k + m)]
    lengths[-1] = max(1, k - 1)
    code, snaps, nodes = encoded_group(k, m, lengths, stripe=64)
    for lost in itertools.chain.from_iterable(itertools.combinations(range(code.n), f) for f in range(1, m + 1)):
        alive = {pos: node for pos, node in enumerate(nodes) if pos not in lost}
        for pos in lost:
            assert rebuild_snapshot(code, 7, pos, alive, stripe=48).tobytes() == snaps[pos]


@pytest.mark.parametrize("k,m", [(2, 1), (4, 2)])
def test_parity_memory_is_m_over_k_of_the_snapshot(k, m):
    code, snaps, nodes = encoded_group(k, m, [k * 4096] * (k + m), stripe=1000)
    for node in nodes:
        assert len(node.parity) == m
        assert node.nbytes == pytest.approx(m / k * len(node.snapshot))


def test_one_more_loss_than_m_cannot_be_rebuilt():
    code, snaps, nodes = encoded_group(3, 2, [3000] * 5, stripe=256)
    for lost in itertools.combinations(range(5), 3):
        alive = {pos: node for pos, node in enumerate(nodes) if pos not in lost}
        with pytest.raises(ShareError, match="needed"):
            rebuild_snapshot(code, 7, lost[0], alive)


def test_snapshot_of_several_buffers_reads_as_one():
    code = GroupCode(2, 1)
    rng = random.Random(3)
    parts = [[rng.randbytes(n) for n in sizes] for sizes in ([100, 0, 333, 7], [1000], [5, 5])]
    nodes = [NodeShares("job", 2, 0, pos, pos, code, [bytearray(b) for b in p]) for pos, p in enumerate(parts)]
    assert nodes[0].snapshot[90:110] == b"".join(parts[0])[90:110]  # across buffer boundaries
    for node in nodes:
        node.encode(dict(enumerate(nodes)), stripe=64)
    for lost in range(3):
        alive = {pos: n for pos, n in enumerate(nodes) if pos != lost}
        assert rebuild_snapshot(code, 2, lost, alive, stripe=50).tobytes() == b"".join(parts[lost])


def test_snapshot_spanning_many_stripes_into_a_preallocated_buffer():
    code = GroupCode(2, 1)
    snaps = [np.random.default_rng(pos).integers(0, 256, 3 << 20, dtype=np.uint8) for pos in range(3)]
    nodes = [NodeShares("job", 1, 0, pos, pos, code, snaps[pos]) for pos in range(3)]
    parity = {(c, s): np.zeros(2 << 20, np.uint8) for c, s in code.parity_roles(0)}
    for pos, node in enumerate(nodes):
        node.encode(dict(enumerate(nodes)), stripe=1 << 18, out=parity if pos == 0 else None)
    assert next(iter(nodes[0].parity.values())).base is next(iter(parity.values()))  # written in place
    out = bytearray(len(snaps[1]))
    rebuild_snapshot(code, 1, 1, {0: nodes[0], 2: nodes[2]}, stripe=1 << 18, out=out)
    assert out == snaps[1].tobytes()


def test_corrupt_share_is_rejected_and_another_used_when_one_is_left():
    code, snaps, nodes = encoded_group(2, 2, [5000] * 4, stripe=512)
    memory = bytearray(snaps[1])
    nodes[1].snapshot.parts[0] = (memory, len(memory))
    memory[10] ^= 0xFF  # bit flips in both of node 1's blocks after its checksums were taken
    memory[-10] ^= 0xFF
    # node 0 lost: 3 survivors, k = 2; node 1's shares fail their checksum and are replaced
    assert rebuild_snapshot(code, 7, 0, {1: nodes[1], 2: nodes[2], 3: nodes[3]}).tobytes() == snaps[0]
    # node 0 and 2 lost: node 1's bad share is one of the only two left
    with pytest.raises(ShareError, match="needed"):
        rebuild_snapshot(code, 7, 0, {1: nodes[1], 3: nodes[3]})


def test_encoding_from_a_corrupt_data_share_fails():
    code, snaps, nodes = encoded_group(2, 1, [4000] * 3, stripe=512)
    memory = bytearray(snaps[0])
    nodes[0].snapshot.parts[0] = (memory, len(memory))
    memory[0] ^= 1
    with pytest.raises(UnusableShare, match="bad checksum"):
        nodes[2].encode(dict(enumerate(nodes)), stripe=512)


def test_share_header_roundtrip_and_malformed_headers():
    h = ShareHeader("job", 3, 0, 1, 2, 5, 2, 1, 100, 90, 12345, [90, 80], [1, 2])
    assert ShareHeader.from_json(h.to_json()) == h
    for raw in [b"not json", b'{"job": "j"}', h.to_json().replace(b'"step":3', b'"step":-3'),
                h.to_json().replace(b'"length":90', b'"length":900')]:
        with pytest.raises(ShareError, match="malformed"):
            ShareHeader.from_json(raw)


def test_wrong_step_or_share_is_refused():
    code, snaps, nodes = encoded_group(2, 1, [100] * 3, stripe=64)
    with pytest.raises(ShareError, match="no share"):
        nodes[0].header(8, 0, 0)
    with pytest.raises(ShareError, match="read past"):
        nodes[0].read(7, 0, 0, 40, 20)


@pytest.mark.parametrize("num_nodes", [2, 3, 4, 7, 8, 9, 16, 17, 100])
def test_groups_cover_every_node_once(num_nodes):
    groups = plan_groups(num_nodes)
    nodes = [n for g in groups for n in g.nodes]
    assert nodes == list(range(num_nodes))
    for g in groups:
        assert g.code.n == len(g.nodes) and g.code.m >= 1 and len(g.nodes) <= 9
    groups = plan_groups(num_nodes, k=1, m=1)
    assert [n for g in groups for n in g.nodes] == list(range(num_nodes))
    assert all(g.code.m == 1 for g in groups)


def test_plan_rejects_what_cannot_work():
    assert plan_groups(1) == []
    with pytest.raises(UserError, match="snapshot.k"):
        plan_groups(4, k=4, m=1)
    with pytest.raises(UserError, match="target_survival"):
        plan_groups(4, target=1.5, p_fail=0.1)
    with pytest.raises(UserError, match="target_survival"):
        plan_groups(3, target=0.999999999, p_fail=0.5)


def test_target_survival_picks_the_cheapest_code_that_reaches_it():
    target, p = 0.999, 0.01
    def parity_fraction(groups):
        return max(g.code.m / g.code.k for g in groups)

    chosen = plan_groups(16, *code_for_target(16, target, p))
    assert survival(chosen, p) >= target
    for n, m in itertools.product(range(2, 17), range(1, 16)):
        groups = plan_groups(16, n - m, m) if m < n else None
        if groups and parity_fraction(groups) < parity_fraction(chosen):  # every cheaper code misses the target
            assert survival(groups, p) < target
    assert default_code(8) == (6, 2)


def test_analytic_survival():
    assert group_survival(4, 1, 0.1) == pytest.approx(0.9 ** 4 + 4 * 0.1 * 0.9 ** 3)
    assert survival(plan_groups(8, 3, 1), 0.1) == pytest.approx(group_survival(4, 1, 0.1) ** 2)


@pytest.mark.parametrize("num_nodes,k,m,p", [(8, 3, 1, 0.1), (10, 3, 2, 0.2)])
def test_fault_injection_confirms_analytic_survival(num_nodes, k, m, p):
    groups = plan_groups(num_nodes, k, m)
    trials = 3000
    expected = survival(groups, p)
    sigma = math.sqrt(expected * (1 - expected) / trials)
    assert abs(inject_faults(groups, p, trials, seed=1) - expected) < 4.5 * sigma
