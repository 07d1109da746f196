"""The trace's cost measured inside a job: alternate traced and paused blocks of steps."""
import json

import pytest

from comms import UserError
from comms.records import OpRecord, StepRecord, decode
from comms.trace_cost import measure, traced
from conftest import records, steps, train
from diagnostics import DiagnosticsConfig


def test_blocks_alternate_traced_first():
    assert [traced(done, 3) for done in range(9)] == [True] * 3 + [False] * 3 + [True] * 3


def test_cost_is_each_block_against_its_neighbours_without_warmup_saves_or_drift():
    # 3-step blocks; traced steps 10% slower; the machine drifts 1% slower each block, which
    # comparing a block with the mean of its two neighbours cancels; the start-up blocks are
    # outliers that must not count.
    k, base = 3, 0.100
    times = {}
    for s in range(1, 31):
        b = (s - 1) // k
        times[s] = base * (1 + 0.01 * b) * (1.10 if traced(s - 1, k) else 1.0)
    times[1] = times[4] = 5.0  # start-up
    cost = measure(times, k)
    assert cost.pairs == 6  # blocks 2..9: the 6 inner ones have both neighbours
    assert cost.pct == pytest.approx(10.0, abs=0.1)
    assert 9.5 < cost.low_pct <= cost.pct <= cost.high_pct < 10.5
    assert cost.traced_ms > cost.untraced_ms
    # Steps left out (after saves): a block left with one step has no median; its neighbours
    # then lack a neighbour.
    assert measure(times, k, skip={19, 20}).pairs == 3


def test_too_few_blocks_is_none():
    assert measure({s: 0.1 for s in range(1, 13)}, 3) is None  # blocks 2 and 3: one pair


def test_trace_cost_needs_the_trace():
    DiagnosticsConfig(trace_cost_steps=5).validate()
    with pytest.raises(UserError, match="diagnostics.trace_cost_steps"):
        DiagnosticsConfig(trace=False, trace_cost_steps=5).validate()
    with pytest.raises(UserError, match="diagnostics.trace_cost_steps"):
        DiagnosticsConfig(trace_cost_steps=-1).validate()


def test_a_job_weighs_its_trace_against_its_own_paused_steps(tmp_path):
    out = train(2, tmp_path, "--train.steps=16", "--diagnostics.trace_cost_steps=2", "--checkpoint.interval=0",
                "--snapshot.interval=0")
    recs = steps(tmp_path)
    paused = {r["step"] for r in recs if not r["traced"]}
    assert [r["traced"] for r in recs] == [traced(s - 1, 2) for s in range(1, 17)]
    cost = [r for r in records(tmp_path / "metrics.jsonl") if r.get("event") == "trace_cost"]
    # Blocks 2..7 (steps 5-16, no saves before the final one): 4 with both neighbours.
    assert len(cost) == 1 and cost[0]["pairs"] == 4 and cost[0]["block_steps"] == 2, cost
    assert "tracing cost" in out.stdout
    # The paused steps left nothing in the trace: no step record, no op.
    gen = next((tmp_path / "diagnostics").glob("gen-*"))
    for r in range(2):
        rs = [decode(x) for x in (gen / f"trace-r{r}.jsonl").read_text().splitlines()]
        assert {x.step for x in rs if isinstance(x, StepRecord)} == set(range(1, 17)) - paused
        ops = [x for x in rs if isinstance(x, OpRecord)]
        assert ops and not {x.step for x in ops} & paused
    assert json.loads((gen / "state-r0.json").read_text())["closed"]
