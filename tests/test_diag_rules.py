"""The detector's rules on recorded traces: files in the trace format, written here step by
step with chosen timings, read by the real Detector. The noise floor (no verdict for a rank
that is always a little late), onsets named within the window, thresholds that scale with
the step time, slow collectives with nobody late, hang limits, the rule table."""
import json
import math
import random

import pytest

from comms.records import TRACE_FORMAT, OpRecord, StepRecord, decode, encode
from diagnostics import DiagnosticsConfig, Detector
from diagnostics.detect import RULES


def write_run(run_dir, *, world=2, steps=60, step_s=0.2, compute=None, comm=None, noise=0.05, seed=0,
              inflight=None, now=None):
    """A generation whose ranks run ``steps`` steps of one all-reduce each.

    ``compute(rank, step)`` -> seconds of compute before the all-reduce (default step_s x 0.8
    with ``noise`` relative jitter); ``comm(step)`` -> seconds the all-reduce takes once every
    rank is in. ``inflight``: {rank: seconds before the end} for one more all-reduce that never
    completes (a hang). Returns the generation directory."""
    rnd = random.Random(seed)
    gen = run_dir / "diagnostics" / "gen-1000000000000000000"
    gen.mkdir(parents=True)
    compute = compute or (lambda r, s: step_s * 0.8)
    comm = comm or (lambda s: step_s * 0.1)
    t = 1.0e9
    lines = {r: [] for r in range(world)}
    last_end = t
    for s in range(steps):
        arrive = {r: t + compute(r, s) * (1 + noise * rnd.uniform(-1, 1)) for r in range(world)}
        done = max(arrive.values()) + comm(s) * (1 + noise * rnd.uniform(-1, 1))
        for r in range(world):
            lines[r].append(encode(OpRecord(",".join(map(str, range(world))), "all_reduce", s, -1, 4096, "float32",
                                            arrive[r], arrive[r], done, s)))
            lines[r].append(encode(StepRecord(s, t, done + 0.001, {"forward_backward": done - t})))
        t = last_end = done + 0.001
    members = {",".join(map(str, range(world))): list(range(world))}
    for r in range(world):
        (gen / f"meta-r{r}.json").write_text(json.dumps({"rank": r, "world": world, "trace_format": TRACE_FORMAT,
                                                         "host": "h", "node": 0, "pid": 0, "started": 1.0e9}))
        (gen / f"trace-r{r}.jsonl").write_text("\n".join(lines[r]) + "\n")
        infl = []
        if inflight and r in inflight:
            rec = OpRecord(",".join(map(str, range(world))), "all_reduce", steps, -1, 4096, "float32",
                           last_end + 0.01, last_end + 0.01, None, steps)
            infl.append(json.loads(encode(rec)))
        (gen / f"state-r{r}.json").write_text(json.dumps({
            "time": (now or last_end), "step": steps if inflight and r in inflight else steps, "phase": "", "inflight": infl,
            "seq": {k: steps if inflight and r in inflight else steps - 1 for k in members}, "groups": members,
            "closed": not inflight, "error": ""}))
    return gen


def verdicts(run_dir, **cfg):
    return Detector(run_dir, DiagnosticsConfig(**cfg), live=False, dump_stacks=False).poll()


def test_records_round_trip_and_refuse_junk():
    rec = OpRecord("0,1", "all_reduce", 3, -1, 64, "float32", 1.0, 1.0, 2.0, 7, "", 0.5)
    assert decode(encode(rec)) == rec
    st = StepRecord(7, 1.0, 2.0, {"data": 0.1})
    assert decode(encode(st)) == st
    for junk in ('["c", "0,1", "all_reduce"]', '{"t": "op", "channel": "0,1"}', '{"t": "nope"}', "3"):
        with pytest.raises(ValueError):
            decode(junk)


def test_rank_always_a_little_late_is_not_a_straggler(tmp_path):
    # Rank 0 logs: it reaches every all-reduce 9% of a step after rank 1, from the first step.
    write_run(tmp_path, compute=lambda r, s: 0.16 + (0.018 if r == 0 else 0.0))
    assert verdicts(tmp_path) == []


@pytest.mark.parametrize("step_s", [0.02, 0.2, 2.0])
def test_onset_is_named_within_the_window_at_any_step_time(tmp_path, step_s):
    # Rank 1 becomes 20% slower at step 30, on top of rank 0's constant 9% logging.
    write_run(tmp_path, step_s=step_s, steps=60 if step_s >= 0.2 else 200,
              compute=lambda r, s: step_s * (0.8 + (0.09 if r == 0 else 0.0) + (0.2 if r == 1 and s >= 30 else 0.0)))
    vs = verdicts(tmp_path)
    assert [(v.kind, v.suspects[0]["rank"]) for v in vs] == [("straggler", 1)], [v.line() for v in vs]
    ev = vs[0].evidence
    # Named within 20 steps, or once it has lasted confirm_s (2 s) when 20 steps are shorter.
    within = 20 + (math.ceil(DiagnosticsConfig().confirm_s / step_s) if step_s < 0.1 else 0)
    assert ev["pattern"] == "onset" and 30 <= ev["since_step"] and ev["steps"][1] <= 30 + within, ev["steps"]
    assert vs[0].since >= 1.0e9 + 29 * step_s  # the onset, not the verdict


def test_noise_alone_is_not_named(tmp_path):
    # Steps jittering 30% on every rank, rank 0 always 9% late: nothing to name, whatever the draw.
    for seed in range(5):
        write_run(tmp_path / str(seed), noise=0.3, seed=seed, compute=lambda r, s: 0.16 + (0.018 if r == 0 else 0.0))
        assert verdicts(tmp_path / str(seed)) == [], seed


def test_wait_moving_between_ranks_is_not_named(tmp_path):
    # Two ranks share contended cores: for steps 20-31 rank 1 gets more of them and rank 0 less,
    # so the others wait 20% of each step for rank 0, but the job is no slower (the make run
    # case of issue 14).
    write_run(tmp_path, compute=lambda r, s: 0.14 if (r == 1 and 20 <= s < 32) else 0.18)
    assert verdicts(tmp_path) == []


def test_a_real_slowdown_in_a_quiet_job_is_named(tmp_path):
    write_run(tmp_path, noise=0.02, compute=lambda r, s: 0.16 * (1.15 if r == 1 and s >= 30 else 1.0))
    assert [(v.kind, v.suspects[0]["rank"]) for v in verdicts(tmp_path)] == [("straggler", 1)]


def test_slow_from_the_start_is_named_when_it_costs_a_quarter(tmp_path):
    write_run(tmp_path, world=3, compute=lambda r, s: 0.16 * (1.6 if r == 2 else 1.0))
    vs = verdicts(tmp_path)
    assert [(v.kind, v.suspects[0]["rank"], v.evidence["pattern"]) for v in vs] == [("straggler", 2, "sustained")]
    assert verdicts(tmp_path, straggler_sustained=0.0) == []


def test_slow_collectives_with_nobody_late_is_slow_comm(tmp_path):
    write_run(tmp_path, world=3, comm=lambda s: 0.02 if s < 30 else 0.08)
    vs = verdicts(tmp_path)
    assert [v.kind for v in vs] == ["slow_comm"], [v.line() for v in vs]
    # Named once it held at 5 window ends over confirm_s (2 s: 10 steps of 0.2 s), within 20 steps.
    assert vs[0].suspects[0]["group"] == [0, 1, 2] and vs[0].evidence["steps"][1] <= 30 + 20


@pytest.mark.parametrize("step_s,waited,hang", [(0.02, 4.0, False), (0.02, 6.0, True), (2.0, 8.0, False), (2.0, 11.0, True)])
def test_hang_limit_scales_with_the_step_time(tmp_path, step_s, waited, hang):
    # Rank 0 waits in one more all-reduce that rank 1 never issued; judged `waited` s later.
    gen = write_run(tmp_path, step_s=step_s, steps=30, inflight={0: True})
    hb = json.loads((gen / "state-r0.json").read_text())["inflight"][0]["arrived"] + waited
    for r in (0, 1):
        st = json.loads((gen / f"state-r{r}.json").read_text())
        (gen / f"state-r{r}.json").write_text(json.dumps({**st, "time": hb}))
    vs = verdicts(tmp_path)
    assert [(v.kind, v.suspects[0]["rank"]) for v in vs] == ([("hang_noncomm", 1)] if hang else [])
    if hang:  # max(5 s, 5 x the median step): a small multiple of the step time
        assert vs[0].evidence["limit_s"] == pytest.approx(max(5.0, 5 * step_s * 0.901), rel=0.1)


def test_rule_table_names_every_kind_and_what_silences_it():
    kinds = {k for rule in RULES for k in rule.emits}
    assert kinds == {"hang_noncomm", "hang_comm", "crash", "straggler", "slow_comm", "slow_link"}
    by_name = {rule.name: rule for rule in RULES}
    assert set(by_name["crash"].silenced_by) == {"hang_noncomm", "hang_comm"} and by_name["hang"].silenced_by == ("crash",)
    assert all(callable(getattr(Detector, rule.handler)) for rule in RULES)


def test_a_live_watch_of_a_long_job_keeps_only_recent_steps(tmp_path):
    """Live, the detector forgets steps its windows no longer look at, and still names an
    onset long after; the trace arrives in two parts, as a running job writes it."""
    whole = write_run(tmp_path / "whole", steps=400, compute=lambda r, s: 0.16 * (1.25 if r == 1 and s >= 300 else 1.0))
    gen = tmp_path / "live" / "diagnostics" / whole.name
    gen.mkdir(parents=True)
    for p in whole.glob("*.json"):
        (gen / p.name).write_text(p.read_text())
    lines = {r: (whole / f"trace-r{r}.jsonl").read_text().splitlines(keepends=True) for r in (0, 1)}
    det = Detector(tmp_path / "live", DiagnosticsConfig(), live=True, dump_stacks=False)
    now = json.loads((whole / "state-r0.json").read_text())["time"]
    for part in (slice(0, 500), slice(500, None)):  # two lines a step: steps 0-249, then 250-399
        for r in (0, 1):
            with open(gen / f"trace-r{r}.jsonl", "a") as f:
                f.writelines(lines[r][part])
        vs = det.poll(now=now)
        (g,) = det.gens.values()
        assert min(g.steps[0]) > 100  # forgotten
    assert [(v.kind, v.suspects[0]["rank"]) for v in det.verdicts] == [("straggler", 1)]
    assert 300 <= det.verdicts[0].evidence["since_step"] and vs == det.verdicts
