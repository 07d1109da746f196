"""The collective trace: every torch.distributed op of this rank, in a ring buffer on disk.

``install(run_dir, rank, world)`` patches torch.distributed's Python collectives and
point-to-point ops (the trainer, DeepSpeed and FSDP2 all call them) so that each call is
recorded per rank with its process group, a per-group sequence number, bytes, dtype, and
three times: arrived (the rank entered the call), started and completed (wall clock on
CPU; CUDA events mapped to wall clock for tensors on a GPU; for ``async_op=True`` the
completion is taken when the returned Work's future finishes). Each op is an
``OpRecord`` and each step a ``StepRecord`` (typed records, one JSON object a line,
``comms.records``) with its phase times, the time the rank was blocked in traced ops and the
time its thread waited for a CPU. Records go into a fixed-size ring buffer that a background thread
appends to ``RUN_DIR/diagnostics/gen-<G>/trace-r<R>.jsonl`` every ``flush_s`` seconds,
together with a small state file (heartbeat, ops in flight, last sequence number per group,
current step and phase) that ``diagnostics`` reads to call hangs while they happen.

The same thread carries out what the monitor asks of a rank through files in that
directory: a pairwise link probe at a step boundary (``probe-request.json``, run by
``comms.probe``) and a dump of torch's Flight Recorder (``fr-request``) when it is on.

The generation ``G`` is rank 0's start time broadcast at install, so each torchrun restart
(and every node of one restart) writes into one fresh directory.

Not covered: functional collectives (``torch.distributed._functional_collectives``, used
by DTensor/tensor parallelism) are C++ ops completed by ``wait_tensor``; they are recorded
at enqueue only (``end`` = when the call returned). Ops issued inside a
``_coalescing_manager`` block are recorded when issued, not when the batch runs.

Overhead: about 10 us of Python per op plus the background thread's JSON encoding;
benchmarks/detect_bench.py measures it against an untraced run (docs/diagnostics.md).
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import faulthandler
import hashlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from comms import sockets
from comms.records import TRACE_FORMAT, OpRecord, StepRecord, encode, hostname

# Collectives and p2p ops patched, with the argument that carries the payload (for bytes
# and dtype) and, for p2p, the argument naming the peer.
_PAYLOAD = {
    "all_reduce": "tensor", "all_reduce_coalesced": "tensors", "all_gather": "tensor",
    "all_gather_into_tensor": "input_tensor", "all_gather_single": "input_tensor",
    "_all_gather_base": "input_tensor", "reduce_scatter": "input_list",
    "reduce_scatter_tensor": "input", "reduce_scatter_single": "input",
    "_reduce_scatter_base": "input", "broadcast": "tensor", "reduce": "tensor",
    "gather": "tensor", "scatter": "tensor", "all_to_all_single": "input",
    "all_to_all": "input_tensor_list", "send": "tensor", "recv": "tensor",
    "isend": "tensor", "irecv": "tensor", "barrier": None, "monitored_barrier": None,
    "all_gather_object": None, "broadcast_object_list": None, "gather_object": None,
    "scatter_object_list": None, "send_object_list": None, "recv_object_list": None,
}
_PEER = {"send": "dst", "isend": "dst", "recv": "src", "irecv": "src",
         "send_object_list": "dst", "recv_object_list": "src"}
_SENDS = {"send", "isend", "send_object_list"}
_FUNCOL = ("all_reduce", "all_gather_tensor", "all_gather_single", "reduce_scatter_tensor", "reduce_scatter_single",
           "all_to_all_single", "broadcast")

# Seconds an op is in flight before the writer looks for stalled connections (comms.sockets).
STALL_CHECK_S = 1.0
_active: "Tracer | None" = None
_originals: dict[str, object] = {}  # name -> the function torch shipped
_depth = threading.local()  # ops called inside a traced op are part of it, not new records


def install(run_dir, rank: int | None = None, world: int | None = None, *, enabled: bool = True,
            capacity: int = 65536, flush_s: float = 0.5) -> "Tracer":
    """Start tracing this process's collectives; call right after init_process_group.

    With ``enabled=False`` it returns a tracer whose methods do nothing (phases are not
    timed, no files are written) so the training loop needs no branches.
    """
    global _active
    if _active is not None:
        _active.close()
    rank = dist.get_rank() if rank is None and dist.is_initialized() else (rank or 0)
    world = dist.get_world_size() if world is None and dist.is_initialized() else (world or 1)
    tracer = Tracer(Path(run_dir), rank, world, enabled=enabled, capacity=capacity, flush_s=flush_s)
    if enabled:
        _patch(tracer)
        _active = tracer
    return tracer


def failed(exc: BaseException):
    """This rank is leaving because a collective failed where no traced call saw it raise
    (inside DDP's reducer or another autograd hook): record it as a traced failure is, so
    that the detector reads this rank as failing after a crashed peer, not as one that went
    quiet at the same moment."""
    if _active is not None:
        _active._fail(None, exc)


def _generation() -> int:
    """Rank 0's clock in ns, the same on every rank of this process group."""
    stamp = time.time_ns()
    if not (dist.is_available() and dist.is_initialized()):
        return stamp
    device = "cuda" if "nccl" in str(dist.get_backend()).lower() else "cpu"
    t = torch.tensor([stamp], dtype=torch.int64, device=device)
    _originals.get("broadcast", dist.broadcast)(t, src=0)
    return int(t.item())


class Tracer:
    """Per-rank recorder; see the module doc. Methods are cheap and never block on I/O."""

    def __init__(self, run_dir: Path, rank: int, world: int, *, enabled: bool = True,
                 capacity: int = 65536, flush_s: float = 0.5):
        self.rank, self.world, self.enabled = rank, world, enabled
        # fn(op, group_key, peer, arrived) run as an op is entered (arrived=False) and right
        # after its arrival is recorded (arrived=True); for fault injection.
        self.hooks: list = []
        # While paused (``pause``), ops and steps go unrecorded: the job measures what
        # tracing costs it against its own untraced steps (diagnostics.trace_cost_steps).
        self.paused = False
        self.step = 0
        self.last_step_s = 0.0
        self._phase = ""
        self._phase_since = 0.0  # wall time the current phase began
        self._phases: dict[str, float] = {}
        self._step_t0 = time.time()
        self._blocked = 0.0  # seconds spent inside blocking traced ops, ever
        self._blocked_t0 = 0.0  # _blocked when the current step began
        self._cpu_wait_t0 = _run_delay()  # the training thread's run-queue delay when the step began
        if not enabled:
            return
        self.generation = _generation()
        self.dir = Path(run_dir) / "diagnostics" / f"gen-{self.generation}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._ring = collections.deque(maxlen=capacity)  # oldest records drop if the writer falls behind
        self._appended = 0
        self._written = 0
        self._inflight: dict[int, OpRecord] = {}
        self._funcol: dict[int, OpRecord] = {}  # storage address of a functional collective's result -> its op
        self._blocked_at: dict[str, float] = {}  # channel -> _blocked when its last op returned
        self._seq: dict[str, int] = {}
        self._groups: dict[int, tuple[str, tuple[int, ...]]] = {}
        self._members: dict[str, list[int]] = {}
        self._events: dict[int, list] = {}  # id(record) -> [start, end] CUDA events
        self._cuda: list[OpRecord] = []  # records whose CUDA end event has not completed yet
        self._cuda_ref = None
        self._closed = False
        self._error = ""
        self._flush_s = flush_s
        self._probe: dict | None = None  # the monitor's probe request, read by the writer thread
        self._probes_done: set[str] = set()
        self._lock = threading.Lock()  # serialises writers of the files (thread vs error/close)
        self._trace = open(self.dir / f"trace-r{rank}.jsonl", "a", buffering=1 << 16)
        # Stacks on request (SIGUSR1, sent by the monitor on a hang), on SIGTERM (so a rank
        # that was stopped by its agent is told apart from the one that crashed) and on a
        # fatal signal. faulthandler writes from C, even while Python is stuck in a collective.
        self._stack_files = [open(self.dir / f"{n}-r{rank}.txt", "w") for n in ("stacks", "term", "fault")]
        faulthandler.register(signal.SIGUSR1, file=self._stack_files[0], all_threads=True, chain=False)
        faulthandler.register(signal.SIGTERM, file=self._stack_files[1], all_threads=True, chain=True)
        faulthandler.enable(file=self._stack_files[2], all_threads=True)
        meta = {"rank": rank, "world": world, "generation": self.generation, "trace_format": TRACE_FORMAT,
                "pid": os.getpid(), "ppid": os.getppid(), "host": hostname(),
                "node": int(os.environ.get("GROUP_RANK", 0)), "local_rank": int(os.environ.get("LOCAL_RANK", 0)),
                "local_world": int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
                "backend": str(dist.get_backend()) if dist.is_initialized() else "", "started": time.time(),
                "flight_recorder": flight_recorder_on(), "addrs": sockets.local_addresses()}
        self._meta = meta
        _atomic_json(self.dir / f"meta-r{rank}.json", meta)
        self._write_state()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._flush_loop, name="kintsugi-trace", daemon=True)
        self._thread.start()
        self._unwatched: list = []  # (work, record) of ops without a future, until they complete
        self._poke = threading.Event()
        threading.Thread(target=self._poll_loop, name="kintsugi-trace-p2p", daemon=True).start()
        atexit.register(self.close)

    # ---- the training loop's side -------------------------------------------------
    @contextlib.contextmanager
    def phase(self, name: str):
        """Time one phase of the current step (data, forward_backward, optimizer, checkpoint)."""
        if not self.enabled:
            yield
            return
        self._phase_since, t0 = time.time(), time.perf_counter()
        self._phase = name
        try:
            yield
        finally:
            self._phases[name] = self._phases.get(name, 0.0) + time.perf_counter() - t0
            self._phase = ""

    def annotate(self, **fields):
        """Add facts about this rank to its metadata, e.g. ``pipeline_stage`` (the detector
        does not compare a pipeline's stages with each other from the start: they do
        different work)."""
        if self.enabled:
            self._meta.update(fields)
            _atomic_json(self.dir / f"meta-r{self.rank}.json", self._meta)

    def pause(self, paused: bool):
        """Stop (or resume) recording ops and steps; the heartbeat, probes and stack dumps go on.
        Ops already in flight still complete in the trace."""
        self.paused = paused

    def end_step(self, step: int):
        """Close step ``step``: its duration and phase times become one record. If the
        monitor asked for a link probe at this step, every rank takes part in it here (its
        time is the step's ``probe`` phase, so the detector leaves the step out)."""
        if self.enabled and self._probe is not None and self._probe.get("step") == step:
            req, self._probe = self._probe, None
            if req["id"] not in self._probes_done:
                self._probes_done.add(req["id"])
                with self.phase("probe"):
                    self._run_probe(req)
        if self.enabled and self._funcol:  # results nobody waited on in their step: done by its end
            for rec in self._funcol.values():
                self._complete(rec)
            self._funcol.clear()
        now, delay = time.time(), _run_delay()
        self.last_step_s = now - self._step_t0
        if self.enabled and not self.paused:
            waited = None if delay is None or self._cpu_wait_t0 is None else round(delay - self._cpu_wait_t0, 6)
            self._push(StepRecord(step, self._step_t0, now, self._phases, round(self._blocked - self._blocked_t0, 6), waited))
        self._phases, self._step_t0, self._blocked_t0, self._cpu_wait_t0, self.step = {}, now, self._blocked, delay, step + 1

    def close(self):
        """Flush everything and mark this rank as cleanly finished."""
        global _active
        if not self.enabled or self._closed:
            return
        self._closed = True
        self._stop.set()
        self._thread.join(timeout=5)
        self._flush()
        with self._lock:
            self._trace.close()
        faulthandler.unregister(signal.SIGUSR1)
        faulthandler.unregister(signal.SIGTERM)
        faulthandler.disable()
        for f in self._stack_files:
            f.close()
        if _active is self:
            _unpatch()
            _active = None

    def _run_probe(self, req: dict):
        from comms import probe

        _depth.n = 1  # the probe's own sends are not the job's traffic
        try:
            result = probe.run(req, self.rank, self.world)
        except Exception as e:  # a probe must never take training down; the report says why
            result = {"id": req["id"], "rank": self.rank, "status": f"failed: {type(e).__name__}: {e}"[:300]}
        finally:
            _depth.n = 0
        if result is not None:
            _atomic_json(self.dir / f"probe-{req['id']}-r{self.rank}.json", result)

    # ---- recording ----------------------------------------------------------------
    def _group(self, group) -> tuple[str, tuple[int, ...]] | None:
        g = self._groups.get(id(group))
        if g is None:
            if group is c10d.GroupMember.NON_GROUP_MEMBER:
                return None
            ranks = tuple(dist.get_process_group_ranks(group or c10d._get_default_group()))
            key = ",".join(map(str, ranks)) if len(ranks) <= 16 else "h" + hashlib.sha1(str(ranks).encode()).hexdigest()[:10]
            g = self._groups[id(group)] = (key, ranks)
            self._members[key] = list(ranks)
        return g

    def _begin(self, op: str, group, payload, peer, group_peer) -> OpRecord | None:
        g = self._group(group)
        if g is None:
            return None
        key, ranks = g
        if peer is None and group_peer is not None:
            peer = ranks[group_peer]
        if op in _PEER:  # p2p: one sequence per direction, so send #n matches recv #n
            src, dst = (self.rank, peer) if op in _SENDS else (peer, self.rank)
            chan = f"{key}|{src}>{dst}"
        else:
            chan = key
        for hook in self.hooks:
            hook(op, key, peer, False)
        seq = self._seq[chan] = self._seq.get(chan, -1) + 1
        nbytes, dtype, cuda = _payload(payload)
        now = time.time()
        # Time this rank spent blocked in other traced ops since its last op on this channel:
        # a rank late because it waited elsewhere (a serialised p2p ring, a slow link) is not
        # a compute straggler.
        blk = self._blocked - self._blocked_at.get(chan, self._blocked)
        rec = OpRecord(chan, op, seq, -1 if peer is None else peer, nbytes, dtype, now, now, None, self.step, "", blk)
        self._inflight[id(rec)] = rec
        if cuda:
            self._events[id(rec)] = [_cuda_event()]
        for hook in self.hooks:
            hook(op, key, peer, True)
        return rec

    def _end(self, rec: OpRecord | None, work=None):
        """The op returned; returns the Work to hand to the caller."""
        if rec is None:
            return work
        if work is None:  # a blocking call: its time is time this rank could not compute
            self._blocked += time.time() - rec.arrived
        self._blocked_at[rec.channel] = self._blocked
        events = self._events.get(id(rec))
        if events is not None:  # CUDA: completion comes from the events, resolved by the flusher
            events.append(_cuda_event())
            self._cuda.append(rec)
            return work
        if work is not None:
            try:
                work.get_future().add_done_callback(lambda _f, rec=rec: self._complete(rec))
            except RuntimeError:  # gloo's send/recv have no future: poll it (see _poll_loop)
                self._unwatched.append((work, rec))
                self._poke.set()
                return _TracedWork(work, self._waited, lambda: self._complete(rec))
            return _TracedWork(work, self._waited)
        self._complete(rec)
        return work

    def _funcol_issued(self, rec: OpRecord | None, out):
        """A functional collective returned its (asynchronous) result: in flight until waited on."""
        if rec is None:
            return
        elem = getattr(out, "elem", None)  # an AsyncCollectiveTensor; a plain tensor was waited on already
        if not isinstance(elem, torch.Tensor):
            self._end(rec)
            return
        self._blocked_at[rec.channel] = self._blocked
        # Keyed by storage: the wait may come through a view of the result.
        self._funcol[elem.untyped_storage().data_ptr()] = rec

    def _funcol_waited(self, tensor, t0: float):
        rec = self._funcol.pop(tensor.untyped_storage().data_ptr(), None) if isinstance(tensor, torch.Tensor) else None
        if rec is None:
            return
        self._blocked += time.time() - t0
        self._blocked_at[rec.channel] = self._blocked
        events = self._events.get(id(rec))
        if events is not None:
            events.append(_cuda_event())
            self._cuda.append(rec)
        else:
            self._complete(rec)

    def _waited(self, seconds: float):
        self._blocked += seconds

    def _complete(self, rec: OpRecord):
        if self._inflight.pop(id(rec), None) is None:  # atomic: the first of wait/poller/callback wins
            return
        rec.ended = time.time()
        self._push(rec)

    def _fail(self, rec: OpRecord | None, exc: BaseException):
        """A collective raised (peer gone, timeout): record it and write to disk now, since the
        process is likely about to die."""
        if rec is not None:
            rec.ended, rec.error = time.time(), f"{type(exc).__name__}: {exc}"[:300]
            self._inflight.pop(id(rec), None)
            self._events.pop(id(rec), None)
            self._push(rec)
        self._error = f"{type(exc).__name__}: {exc}"[:300]
        self._flush()

    def _push(self, rec: OpRecord | StepRecord):
        self._ring.append(rec)
        self._appended += 1

    def _poll_loop(self):
        """Stamp futureless works (gloo send/recv) when they complete, not when the caller
        gets round to waiting for them: a rank waits its works in order, so a slow first
        transfer would otherwise make every later one look slow. Polls every 0.5 ms, and
        only while such works are outstanding."""
        while not self._stop.is_set():
            self._poke.wait(1.0)
            self._poke.clear()
            while self._unwatched and not self._stop.is_set():
                still = []
                for work, rec in self._unwatched:
                    if rec.ended is None and not work.is_completed():
                        still.append((work, rec))
                    else:
                        self._complete(rec)
                self._unwatched[:] = still
                time.sleep(0.0005)

    # ---- the background writer ----------------------------------------------------
    def _flush_loop(self):
        refused = False
        while not self._stop.wait(self._flush_s):
            try:
                self._flush()
            except Exception as e:  # never let tracing take training down; say so once
                print(f"kintsugi trace: rank {self.rank}: writer stopped: {e}", file=sys.stderr)
                return
            try:
                self._requests()
            except Exception as e:  # a bad request (or dump) must not stop the heartbeat
                if not refused:
                    print(f"kintsugi trace: rank {self.rank}: a request from the monitor failed: {e}", file=sys.stderr)
                refused = True

    def _flush(self):
        with self._lock:
            if self._trace.closed:
                return
            self._resolve_cuda()
            lines = []
            while True:
                try:
                    lines.append(encode(self._ring.popleft()))
                except IndexError:
                    break
            self._written += len(lines)
            if lines:
                self._trace.write("\n".join(lines) + "\n")
                self._trace.flush()
            self._write_state()

    def _requests(self):
        """What the monitor asked for: a probe at a coming step boundary (the request names
        the step, far enough ahead that every rank reads it first), a Flight Recorder dump."""
        req = _read_json(self.dir / "probe-request.json")
        if req and req.get("id") not in self._probes_done and req.get("step", -1) >= self.step:
            self._probe = req
        fr = self.dir / "fr-request"
        out = self.dir / f"fr-r{self.rank}.pkl"
        if fr.exists() and not out.exists() and flight_recorder_on():
            # torch's own pickle of its ring of collectives (read back by diagnostics.flight,
            # which unpickles plain types only); from this thread, since the training thread
            # may be stuck in the very collective the dump is for.
            dump = torch._C._distributed_c10d._dump_fr_trace(includeStackTraces=False)
            tmp = out.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(dump)
            os.replace(tmp, out)

    def _resolve_cuda(self):
        still = []
        for rec in self._cuda:
            start, end = self._events[id(rec)]
            if end.query():
                base_wall, base_ev = self._cuda_base()
                rec.started = base_wall + base_ev.elapsed_time(start) / 1e3
                rec.ended = base_wall + base_ev.elapsed_time(end) / 1e3
                del self._events[id(rec)]
                self._inflight.pop(id(rec), None)
                self._ring.append(rec)
            else:
                still.append(rec)
        self._cuda = still

    def _cuda_base(self):
        """A CUDA event with a known wall-clock time, to turn event times into wall time."""
        if self._cuda_ref is None:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            ev.synchronize()
            self._cuda_ref = (time.time(), ev)
        return self._cuda_ref

    def _write_state(self):
        now = time.time()
        ops = list(self._inflight.values())
        inflight = [json.loads(encode(r)) for r in ops]
        # An op in flight this long may be waiting on a network that stopped carrying its
        # data: say which peers' connections are stalled (read only then: a few ms). So may a
        # link probe (its transfers are untraced).
        phase, since = self._phase, self._phase_since
        stuck = any(now - r.arrived > STALL_CHECK_S for r in ops) or (phase == "probe" and now - since > STALL_CHECK_S)
        state = {"time": now, "step": self.step, "phase": phase, "phase_since": since if phase else None, "inflight": inflight,
                 "stalled": sockets.stalled() if stuck else {}, "nics_down": sockets.nics_down() if stuck else {},
                 "seq": dict(self._seq), "groups": dict(self._members), "closed": self._closed,
                 "error": self._error, "records": self._appended,
                 "dropped": self._appended - self._written - len(self._ring) - len(self._cuda)}
        _atomic_json(self.dir / f"state-r{self.rank}.json", state)


class _TracedWork(c10d.Work):
    """An async op's Work as its caller sees it: the time spent waiting for it is time
    blocked (a pipeline stage waiting for its neighbour, FSDP waiting for an all-gather it
    prefetched: not computing, so not late). ``done``: for a Work without a future (gloo
    send/recv), the op completes, as far as this rank can tell, when it is waited for or
    found completed (or dropped)."""

    def __init__(self, work, waited, done=None):
        super().__init__()
        self._work, self._waited, self._done = work, waited, done or (lambda: None)

    def wait(self, timeout=None):
        t0 = time.time()
        ok = self._work.wait() if timeout is None else self._work.wait(timeout)
        self._waited(time.time() - t0)
        self._done()
        return ok

    def is_completed(self):
        done = self._work.is_completed()
        if done:
            self._done()
        return done

    def is_success(self):
        return self._work.is_success()

    def exception(self):
        return self._work.exception()

    def source_rank(self):
        return self._work.source_rank()

    def result(self):
        return self._work.result()

    def synchronize(self):
        return self._work.synchronize()

    def get_future(self):
        return self._work.get_future()

    def __del__(self):  # dropped without a wait (fire-and-forget send): not in flight any more
        self._done()


def _run_delay() -> float | None:
    """Seconds the calling thread has spent runnable but not running (Linux schedstat's
    run-queue delay), or None where the kernel does not keep it."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


def _payload(x) -> tuple[int, str, bool]:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size(), str(x.dtype)[6:], x.is_cuda
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], torch.Tensor):
        return sum(t.numel() * t.element_size() for t in x), str(x[0].dtype)[6:], x[0].is_cuda
    return 0, "", False


def _cuda_event():
    ev = torch.cuda.Event(enable_timing=True)
    ev.record()
    return ev


def flight_recorder_on() -> bool:
    """Whether torch's Flight Recorder keeps a ring of this process's collectives (NCCL, and
    gloo in recent torch): ``TORCH_FR_BUFFER_SIZE`` or ``TORCH_NCCL_TRACE_BUFFER_SIZE`` > 0."""
    for name in ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE"):
        if name in os.environ:
            return os.environ[name].strip().isdigit() and int(os.environ[name]) > 0
    return False


def flight_recorder_env(run_dir, entries: int = 2000) -> dict:
    """Environment that makes an NCCL job keep a Flight Recorder ring and dump it per rank
    into RUN_DIR/diagnostics/flight-recorder/ on a watchdog timeout, where
    ``kintsugi diagnose`` reads it. Set it before the process group is created (the
    launcher's environment for its workers)."""
    d = Path(run_dir).resolve() / "diagnostics" / "flight-recorder"
    d.mkdir(parents=True, exist_ok=True)
    return {"TORCH_NCCL_TRACE_BUFFER_SIZE": str(entries), "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
            "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": str(d / "nccl_trace_rank_")}


def _atomic_json(path: Path, obj):
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    """A small JSON file another process replaces atomically; None when absent or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---- patching torch.distributed -----------------------------------------------------
def _make_wrapper(name: str, fn):
    import inspect

    params = list(inspect.signature(fn).parameters)
    pos = {p: i for i, p in enumerate(params)}
    payload_name, peer_name = _PAYLOAD[name], _PEER.get(name)
    group_peer_name = {"dst": "group_dst", "src": "group_src"}.get(peer_name)

    def arg(args, kwargs, pname):
        if pname is None:
            return None
        i = pos.get(pname)
        if i is not None and i < len(args):
            return args[i]
        return kwargs.get(pname)

    def wrapper(*args, **kwargs):
        tracer = _active
        if tracer is None or tracer.paused or getattr(_depth, "n", 0):
            return fn(*args, **kwargs)
        rec = tracer._begin(name, arg(args, kwargs, "group"), arg(args, kwargs, payload_name),
                            arg(args, kwargs, peer_name), arg(args, kwargs, group_peer_name))
        _depth.n = 1
        try:
            out = fn(*args, **kwargs)
        except BaseException as e:
            tracer._fail(rec, e)
            raise
        finally:
            _depth.n = 0
        is_work = name in ("isend", "irecv") or arg(args, kwargs, "async_op")
        if is_work and out is not None:
            return tracer._end(rec, out)
        tracer._end(rec)
        return out

    wrapper.__name__, wrapper.__qualname__, wrapper.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    wrapper.__wrapped__ = fn
    return wrapper


def _batch_wrapper(fn):
    def batch_isend_irecv(p2p_op_list):
        tracer = _active
        if tracer is None or tracer.paused or getattr(_depth, "n", 0):
            return fn(p2p_op_list)
        recs = []
        for p in p2p_op_list:  # ops built from torch's own isend before we patched: point them at ours
            name = "isend" if p.op in (c10d.isend, _originals["isend"]) else "irecv"
            p.op = getattr(c10d, name)
            recs.append(tracer._begin(name, p.group, p.tensor, p.peer, None))
        _depth.n = 1
        try:
            works = fn(p2p_op_list)
        except BaseException as e:
            for rec in recs:
                tracer._fail(rec, e)
            raise
        finally:
            _depth.n = 0
        if len(works) == len(recs):
            return [tracer._end(rec, w) for rec, w in zip(recs, works)]
        for rec in recs:  # coalesced (NCCL): one work for the batch
            tracer._end(rec, works[-1] if works else None)
        return works

    batch_isend_irecv.__wrapped__ = fn
    batch_isend_irecv.__doc__ = fn.__doc__
    return batch_isend_irecv


def _funcol_wrapper(name: str, fn):
    """A functional collective (DTensor's redistributions: tensor parallel) returns at once;
    the op completes when its result is waited on (``_wait_wrapper``)."""
    import inspect

    import torch.distributed._functional_collectives as funcol

    pos = {p: i for i, p in enumerate(inspect.signature(fn).parameters)}

    def arg(args, kwargs, pname, default=None):
        i = pos.get(pname)
        return args[i] if i is not None and i < len(args) else kwargs.get(pname, default)

    def wrapper(*args, **kwargs):
        tracer = _active
        if tracer is None or tracer.paused or getattr(_depth, "n", 0):
            return fn(*args, **kwargs)
        try:
            group = funcol._resolve_group(arg(args, kwargs, "group"), arg(args, kwargs, "tag", ""))
            group = c10d._resolve_process_group(group) if isinstance(group, str) else group
        except Exception:  # a group form this tracer cannot name: leave the op untraced
            return fn(*args, **kwargs)
        rec = tracer._begin("funcol." + name, group, args[0] if args else None, None, None)
        out = fn(*args, **kwargs)
        tracer._funcol_issued(rec, out)
        return out

    wrapper.__wrapped__ = fn
    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


def _wait_wrapper(fn):
    def wait_tensor(tensor):
        tracer = _active
        if tracer is None or not tracer._funcol:
            return fn(tensor)
        t0 = time.time()
        out = fn(tensor)
        tracer._funcol_waited(tensor, t0)
        return out

    wait_tensor.__wrapped__ = fn
    wait_tensor.__name__, wait_tensor.__doc__ = fn.__name__, fn.__doc__
    return wait_tensor


def _patch(tracer: Tracer):
    """Replace the functions in distributed_c10d, in torch.distributed, and in every loaded
    module that imported them by name earlier (``from torch.distributed import all_reduce``)."""
    if _originals:
        return
    replace: dict[int, object] = {}
    for name in _PAYLOAD:
        fn = getattr(c10d, name, None)
        if fn is not None:
            _originals[name] = fn
            replace[id(fn)] = _make_wrapper(name, fn)
    _originals["batch_isend_irecv"] = c10d.batch_isend_irecv
    replace[id(c10d.batch_isend_irecv)] = _batch_wrapper(c10d.batch_isend_irecv)
    try:
        import torch.distributed._functional_collectives as funcol
        for name in _FUNCOL:
            fn = getattr(funcol, name)
            _originals["funcol." + name] = fn
            replace[id(fn)] = _funcol_wrapper(name, fn)
        _originals["funcol.wait_tensor"] = funcol.wait_tensor
        replace[id(funcol.wait_tensor)] = _wait_wrapper(funcol.wait_tensor)
    except ImportError:
        pass
    originals = {id(f): f for f in _originals.values()}
    for mod in list(sys.modules.values()):
        d = getattr(mod, "__dict__", None)
        if not d or mod is sys.modules[__name__]:
            continue
        for attr, val in list(d.items()):
            if id(val) in replace and val is originals.get(id(val)):
                d[attr] = replace[id(val)]


def _unpatch():
    originals = {id(f) for f in _originals.values()}
    for mod in list(sys.modules.values()):
        d = getattr(mod, "__dict__", None)
        if not d or mod is sys.modules[__name__]:
            continue
        for attr, val in list(d.items()):
            orig = getattr(val, "__wrapped__", None) if callable(val) else None
            if orig is not None and id(orig) in originals:
                d[attr] = orig
    _originals.clear()
