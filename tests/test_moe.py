"""MoE layer and performance model, single process: routers against an independent
reference, chunking invariance, capacity dropping, config validation, schedule choice."""
import dataclasses

import pytest
import torch

from comms import UserError
from comms.moe import Cost, LayerShape, MoEScheduler, Profile, choose, gpu_cluster_profile, sequential, simulate
from comms.moe.pipeline import packed_layout
from tests.moe_reference import reference_moe
from trainer.moe import MoE, GroupedExperts, capacity
from trainer.moe_config import MoEConfig

ROUTERS = ["switch", "gshard", "expert_choice", "sigmoid"]


def make_cfg(router, **kw):
    base = dict(every=1, n_experts=4, top_k=1 if router == "switch" else 2, router=router,
                shared_experts=1 if router == "sigmoid" else 0, capacity_factor=1.0)
    return MoEConfig(**{**base, **kw})


def run(m, x, d):
    m.scheduler.chunks = str(d)
    m.zero_grad()
    x = x.detach().clone().requires_grad_()
    y = m(x)
    (y.square().sum() + m.aux_loss).backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in m.named_parameters()}


def test_handwritten_expert_backward_matches_autograd():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(3, 7, 6, dtype=torch.float64, requires_grad=True), torch.randn(3, 7, 6, dtype=torch.float64, requires_grad=True),
          torch.randn(3, 6, 7, dtype=torch.float64, requires_grad=True)]
    y, saved = GroupedExperts.fwd(x, *ws)
    gy = torch.randn_like(y)
    expected = torch.autograd.grad(y, [x, *ws], gy)
    gx, gws = GroupedExperts.bwd(gy, saved, *ws)
    for got, want in zip([gx, *gws], expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("router", ROUTERS)
def test_router_matches_reference_and_chunking(router):
    torch.manual_seed(1)
    cfg = make_cfg(router)
    m = MoE(16, 24, cfg)
    x = torch.randn(3, 12, 16)
    y1, gx1, g1 = run(m, x, 1)
    want, kept = reference_moe(x, m.router.gate.weight, m.experts.w1, m.experts.w3, m.experts.w2, cfg, m.shared)
    torch.testing.assert_close(y1, want.detach(), rtol=1e-5, atol=1e-6)
    # Reference gradient of the same loss w.r.t. the input (aux loss included through the router).
    xr = x.clone().requires_grad_()
    yr, _ = reference_moe(xr, m.router.gate.weight, m.experts.w1, m.experts.w3, m.experts.w2, cfg, m.shared)
    m.zero_grad()
    yr.square().sum().backward()
    expert_ref = m.experts.w1.grad.clone()
    torch.testing.assert_close(g1["experts.w1"], expert_ref, rtol=1e-4, atol=1e-6)
    for d in (2, 4):
        yd, gxd, gd = run(m, x, d)
        torch.testing.assert_close(yd, y1, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gxd, gx1, rtol=1e-5, atol=1e-6)
        for n in g1:
            torch.testing.assert_close(gd[n], g1[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("router", ["switch", "gshard", "sigmoid"])
def test_capacity_drops_deterministically_and_identically_across_chunks(router):
    torch.manual_seed(2)
    cfg = make_cfg(router, capacity_factor=0.5, shared_experts=0)
    m = MoE(8, 16, cfg)
    # Skew the router so that experts overflow: every token prefers expert 0.
    with torch.no_grad():
        m.router.gate.weight[0] += 3.0 * m.router.gate.weight[0].sign()
    x = torch.randn(2, 16, 8).abs()
    r1, r2 = m.router(x), m.router(x)
    assert torch.equal(r1.tok, r2.tok) and torch.equal(r1.expert, r2.expert) and torch.equal(r1.row, r2.row)
    k = cfg.top_k
    assert r1.tok.numel() < 2 * 16 * k, "capacity must drop some assignments in this setup"
    _, kept = reference_moe(x, m.router.gate.weight, m.experts.w1, m.experts.w3, m.experts.w2, cfg)
    ours = {(int(t) // 16, int(t) % 16, int(e)) for t, e in zip(r1.tok, r1.expert)}
    assert ours == kept
    # Packed: expert e's kept tokens fill rows 0..n_e-1, sequence after sequence, and
    # the counts say how many, at most 2 sequences x capacity.
    for e in range(cfg.n_experts):
        mine = r1.expert == e
        assert torch.equal(r1.row[mine].sort().values, torch.arange(int(mine.sum())))
        seqs = (r1.tok[mine] // 16)[r1.row[mine].argsort()]
        assert torch.equal(seqs, seqs.sort().values)
    assert torch.equal(r1.counts, torch.bincount(r1.expert, minlength=cfg.n_experts))
    assert int(r1.counts.max()) <= 2 * capacity(cfg, 16)
    ys = [run(m, x, d)[0] for d in (1, 2, 4)]
    dropped = sorted({(b, s) for b in range(2) for s in range(16)} - {(b, s) for b, s, _ in kept})
    for y in ys:
        torch.testing.assert_close(y, ys[0], rtol=1e-5, atol=1e-6)
        for b, s in dropped:  # a token every choice of which was dropped gets exactly zero
            assert torch.count_nonzero(y[b, s]) == 0


def test_receiver_packs_only_the_used_rows_of_each_block():
    # 2 sources x 2 local experts, blocks of 4 rows; used rows per (source, expert):
    counts = torch.tensor([[3, 1], [2, 0]])
    pos, dest, width, s = packed_layout(counts, 0, 4)
    # Expert 0 takes rows 0-2 of source 0's block and 0-1 of source 1's, expert 1 row 0 of
    # source 0's; flat index in (source, expert, row) blocks, packed (expert, width) places.
    assert (width, s) == (5, 4)
    assert pos.tolist() == [0, 1, 2, 8, 9, 4] and dest.tolist() == [0, 1, 2, 3, 4, 5]
    # The second of two chunks of 2 rows: only row 2 of source 0's expert-0 block is used.
    pos, dest, width, _ = packed_layout(counts, 2, 2)
    assert (pos.tolist(), dest.tolist(), width) == ([0], [0], 1)
    assert packed_layout(torch.full((2, 2), 4), 0, 4) is None  # nothing to skip


def test_output_independent_of_batch_split():
    """Capacity is per sequence, so a batch on one rank equals its halves on two ranks."""
    torch.manual_seed(3)
    m = MoE(8, 16, make_cfg("gshard", capacity_factor=0.75))
    x = torch.randn(4, 10, 8)
    with torch.no_grad():
        whole = m(x)
        aux_whole = m.aux_loss
        halves = torch.cat([m(x[:2]), m(x[2:])])
    torch.testing.assert_close(whole, halves)
    with torch.no_grad():
        m(x[:2]); a = m.aux_loss
        m(x[2:]); b = m.aux_loss
    torch.testing.assert_close(aux_whole, (a + b) / 2)


def test_aux_loss_is_weighted_load_balance_plus_z_loss():
    torch.manual_seed(4)
    x = torch.randn(2, 8, 8)
    losses = {}
    for aux, z in ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0)):
        m = MoE(8, 16, make_cfg("gshard", aux_loss_coef=aux, z_loss_coef=z))
        torch.manual_seed(5)
        m.router.gate.reset_parameters()
        with torch.no_grad():
            m(x)
        losses[(aux, z)] = m.aux_loss.item()
    assert losses[(0.0, 0.0)] == 0.0
    assert losses[(1.0, 0.0)] >= 1.0 - 1e-6  # E * sum f P >= 1, equality only when perfectly balanced
    logits = x @ m.router.gate.weight.T
    assert losses[(0.0, 1.0)] == pytest.approx(torch.logsumexp(logits, -1).pow(2).mean().item(), rel=1e-5)


@pytest.mark.parametrize("field, value, msg", [
    ("router", "hash", "moe.router"), ("top_k", 2, "moe.top_k"), ("chunks", "many", "moe.chunks"),
    ("chunks", "0", "moe.chunks"), ("z_loss_coef", -1.0, "moe.z_loss_coef"), ("hierarchical", "maybe", "moe.hierarchical"),
    ("shared_experts", -1, "moe.shared_experts"), ("tune_calls", -1, "moe.tune_calls"),
])
def test_config_errors_name_the_field(field, value, msg):
    cfg = MoEConfig(every=1, router="switch", top_k=1)
    setattr(cfg, field, value)
    with pytest.raises(UserError, match=msg):
        cfg.validate()


def test_config_fields_are_documented():
    for f in dataclasses.fields(MoEConfig):
        assert f.metadata.get("doc"), f.name


# ---- performance model on recorded profiles (no wall time involved) ---------------------

SHAPE = LayerShape(n_experts=8, slots=512, dim=512, hidden=2048, ep=4, elt_bytes=2, grad_bytes=32 << 20)


def profile(a2a_alpha, a2a_beta):
    return Profile(a2a=Cost(a2a_alpha, a2a_beta), allreduce=Cost(50e-6, 1 / 10e9), allgather=Cost(50e-6, 1 / 10e9),
                   expert=Cost(20e-6, 1 / 50e12), source="recorded")


def test_model_picks_more_chunks_when_comm_is_bandwidth_bound_and_fewer_when_latency_bound():
    # No gradient to place: only the all-to-all / compute overlap decides d here.
    shape = dataclasses.replace(SHAPE, grad_bytes=0)
    compute = profile(0, 0).expert(shape.expert_flops)
    # All-to-all as long as the expert compute, tiny latency: chunking hides it.
    bw = profile(5e-6, compute / shape.a2a_bytes)
    assert choose(shape, bw).d >= 4
    # Same bandwidth, but each exchange pays a latency larger than the whole compute.
    lat = profile(2 * compute, compute / shape.a2a_bytes)
    assert choose(shape, lat).d == 1
    # Monotone in alpha: more latency never asks for more chunks.
    ds = [choose(shape, profile(a, compute / shape.a2a_bytes)).d for a in (1e-6, 1e-4, 1e-3, 1e-2)]
    assert ds == sorted(ds, reverse=True) and ds[0] > ds[-1]
    # Monotone in beta: a slower link (more to hide) never asks for fewer chunks.
    ds = [choose(shape, profile(5e-6, f * compute / shape.a2a_bytes)).d for f in (1e-4, 0.1, 0.5, 1.0)]
    assert ds == sorted(ds) and ds[0] < ds[-1]
    # Negligible communication: nothing to hide, one chunk.
    assert choose(shape, profile(5e-6, 1e-15)).d == 1
    # Communication that cannot run alongside compute (shared CPU cores): nothing to gain.
    assert choose(shape, dataclasses.replace(bw, overlap=0.0)).d == 1
    assert choose(shape, dataclasses.replace(bw, overlap=0.5)).d <= choose(shape, bw).d


def test_auto_schedules_from_the_profile_it_holds():
    """chunks="auto" asks the model with the scheduler's (measured) profile, for the packed
    rows rounded up to their bucket; a profile where overlap is impossible gives d=1."""
    shape = dataclasses.replace(SHAPE, grad_bytes=0, slots=500)
    compute = profile(0, 0).expert(shape.expert_flops)
    bw = profile(5e-6, compute / shape.a2a_bytes)
    sched = MoEScheduler(None, "auto")
    sched.profile = bw
    want = choose(dataclasses.replace(shape, slots=512), bw)  # 500 rows -> bucket 2^9
    got = sched.schedule(shape)
    assert got.d == want.d >= 4 and got.predicted_s == want.predicted_s
    shared_cores = MoEScheduler(None, "auto")
    shared_cores.profile = dataclasses.replace(bw, overlap=0.0)
    assert shared_cores.schedule(shape).d == 1


def test_auto_settles_d_on_measured_calls_and_calibrates_the_overlap():
    """The model alone picks d=1 from a profile that read no overlap; the calls themselves,
    timed as an overlap of 0.6 would run them, show d=4 fastest: auto cycles the candidates
    call by call, settles on d=4 for every later bucket, and refits the overlap to 0.6."""
    shape = dataclasses.replace(SHAPE, grad_bytes=0)
    compute = profile(0, 0).expert(shape.expert_flops)
    bw = profile(5e-6, compute / shape.a2a_bytes)
    truth = dataclasses.replace(bw, overlap=0.6)
    sched = MoEScheduler(None, "auto", tune_calls=2)
    sched.profile = dataclasses.replace(bw, overlap=0.0)
    issued = []
    while not sched.trials or sched.tuning():
        s = sched.schedule(shape)
        trial = sched.trials[(8, 512, 2048, 2)]
        if trial.chosen is None:
            issued.append(s.d)
            trial.add(s.d, simulate(shape, truth, s.d).predicted_s)
    assert trial.model_d == 1 and trial.candidates == [1, 2, 4]
    assert issued == [1, 2, 4, 1, 2, 4]  # interleaved: a load burst hits every candidate alike
    assert s.d == trial.chosen == 4 and not sched.tuning()
    assert sched.profile.overlap == pytest.approx(0.6)
    assert sched.schedule(dataclasses.replace(shape, slots=300)).d == 4  # another bucket, same family
    # Measured within MIN_GAIN of the model's pick: the model's pick stays.
    close = MoEScheduler(None, "auto", tune_calls=1)
    close.profile = bw
    close.schedule(shape)
    trial = close.trials[(8, 512, 2048, 2)]
    model_d = trial.model_d
    assert model_d >= 4
    for d in trial.candidates:
        trial.add(d, 1.0 if d == model_d else 0.97)
    assert close.schedule(shape).d == model_d


def test_auto_layer_times_its_own_calls():
    """Through the layer: each call's forward + backward lands on the d it ran with."""
    torch.manual_seed(0)
    m = MoE(16, 24, make_cfg("gshard", chunks="auto", tune_calls=1))
    x = torch.randn(2, 32, 16)
    for _ in range(4):
        run(m, x, "auto")
    (trial,) = m.scheduler.trials.values()
    assert trial.chosen in trial.candidates and len(trial.candidates) >= 2
    assert all(len(trial.samples[d]) == 1 for d in trial.candidates)
    assert set(trial.measured_ms) == set(trial.candidates)


def test_large_gradient_to_hide_favours_longer_link_gaps():
    """FSMoE's trade-off: more chunks keep the link busier, leaving smaller gaps for the
    gradient all-reduce; with a big gradient the model picks fewer chunks than without."""
    compute = profile(0, 0).expert(SHAPE.expert_flops)
    p = profile(5e-6, compute / SHAPE.a2a_bytes)
    assert choose(SHAPE, p).d < choose(dataclasses.replace(SHAPE, grad_bytes=0), p).d


def test_model_schedule_replay_and_gradient_partition():
    compute = profile(0, 0).expert(SHAPE.expert_flops)
    p = profile(5e-6, compute / SHAPE.a2a_bytes)
    seq, best = sequential(SHAPE, p), choose(SHAPE, p)
    assert seq.d == 1 and seq.gap_bytes == [0]
    # Sequential: dispatch + compute + combine, backward the same with 2x compute, then the
    # whole gradient all-reduce exposed.
    a2a = p.a2a(SHAPE.a2a_bytes)
    assert seq.predicted_fwd_s == pytest.approx(2 * a2a + compute)
    assert seq.predicted_bwd_s == pytest.approx(2 * a2a + p.expert(2 * SHAPE.expert_flops) + p.allreduce(SHAPE.grad_bytes))
    assert best.predicted_s < seq.predicted_s
    assert sum(best.gap_bytes) > 0  # partitions placed in the gaps of the backward
    assert sum(best.gap_bytes) <= SHAPE.grad_bytes
    # A partition in a gap runs beside compute: where none of a reduction overlaps it (shared
    # cores), the partition costs what reducing after the backward does, plus its latencies.
    none_hidden = dataclasses.replace(p, reduce_overlap=0.0)
    after = simulate(SHAPE, none_hidden, best.d, partition=False).predicted_s
    assert simulate(SHAPE, none_hidden, best.d).predicted_s >= after
    assert simulate(SHAPE, p, best.d).predicted_s < after
    # Round trip of a recorded profile.
    assert Profile.from_dict(p.to_dict()) == p


def test_gpu_cluster_profile_predicts_speedup_over_sequential():
    prof = gpu_cluster_profile(8, 4)
    shape = LayerShape(n_experts=32, slots=640, dim=2048, hidden=8192, ep=32, elt_bytes=2, grad_bytes=3 * 2048 * 8192 * 2)
    speedup = sequential(shape, prof).predicted_s / choose(shape, prof).predicted_s
    assert speedup > 1.1
    assert simulate(shape, prof, 1).predicted_s <= sequential(shape, prof).predicted_s
