"""Lazy capture (DataStates-LLM): copy a save's tensors into host memory while the next
forward/backward runs, and hold the optimizer back only for what is not yet copied.

Parameters and optimizer state change only in ``optimizer.step()``, so between a save at
a step boundary and the next step their bytes are stable: a background copier (a thread on
CPU; a side CUDA stream into pinned memory on GPU) takes them meanwhile. One global
optimizer pre-step hook (``torch.optim.optimizer.register_optimizer_step_pre_hook``: every
torch optimizer, DeepSpeed's inner ones included) waits for the pieces still missing, and
on CPU copies them itself rather than idling. Tensors that the forward pass may change
(buffers such as BatchNorm statistics: neither trainable nor optimizer state) are copied
eagerly at the save instead.

Lazy pays where the copy runs on something the step leaves idle: a GPU's copy engine, or
CPU cores beside the step's threads. When the step's threads fill every core, a copy
thread beside them slows each of the step's parallel regions to its slowest thread, and
the whole copy on all the step's threads at the save costs less (``now``; measured in
docs/async.md). The checkpointer chooses (``checkpoint.capture``).
"""
from __future__ import annotations

import resource
import threading
import time
import weakref

import numpy as np
import torch
from isal import isal_zlib
from torch.optim.optimizer import register_optimizer_step_pre_hook

from checkpoint.format import checksum, fault_point
from checkpoint.state import is_dtensor

# Copies are cut into 8 MiB pieces: the step hook can take over the rest of a large
# tensor, and the CPU copier holds no lock for long (~1-5 ms per piece).
PIECE = 8 << 20

_active: "weakref.WeakSet[LazyCopy]" = weakref.WeakSet()
_optimizers: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()  # optimizers seen stepping or declared


def protect(optimizer: torch.optim.Optimizer):
    """Declare an optimizer: only its ``step`` mutates its parameters and state."""
    _optimizers.add(optimizer)


def _storage(t: torch.Tensor) -> int:
    """The address of the storage holding ``t``'s local data (a DTensor's local shard)."""
    if is_dtensor(t):
        t = t.to_local()
    return t.untyped_storage().data_ptr()


def optimizer_storages() -> set[int]:
    """Storage addresses of the parameters and state of the live optimizers, taken now: an
    address remembered from a tensor since freed could name an unrelated buffer that the
    forward pass changes (a snapshot copied lazily from it would be torn)."""
    out = set()
    for opt in list(_optimizers):
        for group in opt.param_groups:
            out.update(_storage(p) for p in group["params"])
        for st in opt.state.values():
            out.update(_storage(v) for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return out


def lazy_ok(t: torch.Tensor, owned: set[int]) -> bool:
    """May ``t`` be copied after the save returns (only an optimizer step mutates it)?
    ``owned``: ``optimizer_storages()``. (``state_dict()`` detaches parameters: they count
    once their optimizer is known.)"""
    return t.requires_grad or _storage(t) in owned


def _pre_step(optimizer, args, kwargs):
    protect(optimizer)
    for copy in list(_active):
        t = time.perf_counter()
        copy.wait()
        copy.stats["hook_wait_s"] += time.perf_counter() - t


register_optimizer_step_pre_hook(_pre_step)


def host_view(mm) -> torch.Tensor:
    """A uint8 tensor over a shared-memory map; pinned for DMA when CUDA is present."""
    buf = torch.frombuffer(mm, dtype=torch.uint8)
    if torch.cuda.is_available():
        rc = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel(), 0)
        if rc != 0:
            raise RuntimeError(f"cudaHostRegister of the snapshot buffer failed (error {int(rc)})")
    return buf


def host_unview(buf: torch.Tensor):
    if torch.cuda.is_available():
        torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())


class LazyCopy:
    """Copies ``(source tensor, destination byte view)`` pairs in the background; calls
    ``on_done(crcs)`` (from the copier) once every byte is in host memory. ``now`` > 0:
    copy every piece before returning instead, on ``now`` threads (the caller's and
    ``now - 1`` helpers; on CUDA the side stream's copy, waited for).

    ``crc``: also the CRC32 of each pair's destination bytes, in the same pass (each piece
    is checksummed right after its copy, while it is in the cache, instead of by a second
    pass over the snapshot in the keeper; the pieces' CRCs, taken by whichever thread
    copied them, are combined in order). ``crcs`` then holds one per pair; None on CUDA:
    the keeper computes those.

    ``stats`` (a dict it fills) says what the copy cost, summed over the threads that
    copied: ``copy_s`` CPU seconds copying (``copy_wall_s`` their wall time: with the CPU
    shared, also time waiting for it), ``faults`` minor page faults taken meanwhile (first
    touches of shared memory not yet mapped here), ``gil_s`` the copier thread's time
    between pieces (waiting for the GIL), ``hook_wait_s`` the optimizer's pre-step wait,
    ``report_s`` the ``on_done`` call (the keeper round trip saying the copy is complete)."""

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], on_done, stats: dict | None = None,
                 crc: bool = False, now: int = 0):
        self.cuda = any(src.is_cuda for src, _ in pairs)
        self.pieces = []  # (source, destination, its pair)
        for k, (src, dst) in enumerate(pairs):
            flat = src.detach().reshape(-1).view(torch.uint8)
            if not self.cuda:  # numpy's copy is one plain memcpy per piece (no thread pool), GIL released
                flat, dst = flat.numpy(), dst.numpy()
            for lo in range(0, flat.shape[0], PIECE):
                self.pieces.append((flat[lo:lo + PIECE], dst[lo:lo + PIECE], k))
        self.crc = crc and not self.cuda
        self.npairs = len(pairs)
        self.piece_crcs: list[int | None] = [None] * len(self.pieces)
        self.on_done = on_done
        self.next = 0
        self.left = len(self.pieces)
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.stats = stats if stats is not None else {}
        self.stats.update(copy_s=0.0, copy_wall_s=0.0, faults=0, gil_s=0.0, hook_wait_s=0.0, report_s=0.0, crc_s=0.0)
        _active.add(self)
        if not self.pieces:  # everything was copied eagerly
            self._finish()
        elif self.cuda:
            self._start_cuda()
            if now:
                self.join()
        elif now > 0:
            helpers = [threading.Thread(target=self._drain, name="kintsugi-copy", daemon=True) for _ in range(now - 1)]
            for h in helpers:
                h.start()
            self._drain()
            for h in helpers:
                h.join()
        else:
            threading.Thread(target=self._copier, name="kintsugi-lazy-copy", daemon=True).start()

    # CPU: a copier thread and the step hook take pieces from the same queue; the copy
    # releases the GIL, so the copier overlaps the forward/backward of the main thread.
    def _take(self) -> int | None:
        with self.lock:
            if self.next == len(self.pieces):
                return None
            self.next += 1
            return self.next - 1

    def _copy_some(self) -> float | None:
        """Copy (and checksum) the next piece; its seconds, or None when none is left."""
        i = self._take()
        if i is None:
            return None
        src, dst, _ = self.pieces[i]
        t, cpu, faults = time.perf_counter(), time.thread_time(), resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        try:
            fault_point("copy")
            np.copyto(dst, src)
        except BaseException as e:  # surfaced by wait() on the training thread
            self.error = e
        faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - faults
        cpu, dt = time.thread_time() - cpu, time.perf_counter() - t
        crc_s = 0.0
        if self.crc:
            c = time.thread_time()
            self.piece_crcs[i] = checksum(dst)
            crc_s = time.thread_time() - c
        busy = time.perf_counter() - t  # copying and checksumming: not waiting for the GIL
        with self.lock:
            self.stats["copy_s"] += cpu
            self.stats["copy_wall_s"] += dt
            self.stats["crc_s"] += crc_s
            self.stats["faults"] += faults
            self.left -= 1
            last = self.left == 0
        if last:
            self._finish()
        return busy

    def _crcs(self) -> list[int | None]:
        """Each pair's CRC32, its pieces' combined in order."""
        if not self.crc:
            return [None] * self.npairs
        out: list[int | None] = [0] * self.npairs
        for (_, dst, k), c in zip(self.pieces, self.piece_crcs):
            out[k] = isal_zlib.crc32_combine(out[k], c, dst.shape[0])
        return out

    def _drain(self):
        while self._copy_some() is not None:
            pass

    def _copier(self):
        start, copying = time.perf_counter(), 0.0
        while (dt := self._copy_some()) is not None:
            copying += dt
        # the copier's time between its pieces: waiting for the GIL (and taking the next piece)
        self.stats["gil_s"] = max(0.0, time.perf_counter() - start - copying - self.stats["report_s"])

    # CUDA: the side stream first waits for the work that produced the tensors, then copies
    # them non-blocking into pinned host memory; the optimizer's stream waits on the event
    # (on the GPU, without holding the CPU), and a helper thread reports completion.
    def _start_cuda(self):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for src, dst, _ in self.pieces:
                dst.copy_(src, non_blocking=True)
                src.record_stream(stream)  # the allocator must not reuse src before the copy ran
            self.event = torch.cuda.Event()
            self.event.record(stream)
        self.next = len(self.pieces)

        def finish():
            self.event.synchronize()
            self._finish()

        threading.Thread(target=finish, name="kintsugi-lazy-copy", daemon=True).start()

    def _finish(self):
        _active.discard(self)
        t = time.perf_counter()
        try:
            if self.error is None:
                self.on_done(self._crcs())
        except BaseException as e:
            self.error = e
        self.stats["report_s"] = time.perf_counter() - t
        self.done.set()

    def wait(self):
        """Block until every piece is in host memory (helping on CPU)."""
        if self.cuda:
            torch.cuda.current_stream().wait_event(self.event)
            return
        self._drain()
        self.done.wait()

    def join(self):
        """Wait until the copy is complete and reported (also on CUDA); re-raise its error."""
        self.wait()
        self.done.wait()
        if self.error is not None:
            raise self.error
