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
"""
from __future__ import annotations

import resource
import threading
import time
import weakref

import numpy as np
import torch
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
    ``on_done(crcs)`` (from the copier) once every byte is in host memory.

    ``crc``: also the CRC32 of each pair's destination bytes, in the same pass (each piece
    is checksummed right after its copy, while it is in the cache, instead of by a second
    pass over the snapshot in the keeper). ``crcs`` then holds one per pair, or None for a
    pair whose pieces were not copied in order by one thread (the step hook took one over),
    or on CUDA: the keeper computes those.

    ``stats`` (a dict it fills) says what the copy cost, summed over the threads that
    copied: ``copy_s`` CPU seconds copying (``copy_wall_s`` their wall time: with the CPU
    shared, also time waiting for it), ``faults`` minor page faults taken meanwhile (first
    touches of shared memory not yet mapped here), ``gil_s`` the copier thread's time
    between pieces (waiting for the GIL), ``hook_wait_s`` the optimizer's pre-step wait,
    ``report_s`` the ``on_done`` call (the keeper round trip saying the copy is complete)."""

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], on_done, stats: dict | None = None,
                 crc: bool = False):
        self.cuda = any(src.is_cuda for src, _ in pairs)
        self.pieces = []  # (source, destination, pair, piece number within the pair)
        for k, (src, dst) in enumerate(pairs):
            flat = src.detach().reshape(-1).view(torch.uint8)
            if not self.cuda:  # numpy's copy is one plain memcpy per piece (no thread pool), GIL released
                flat, dst = flat.numpy(), dst.numpy()
            for n, lo in enumerate(range(0, flat.shape[0], PIECE)):
                self.pieces.append((flat[lo:lo + PIECE], dst[lo:lo + PIECE], k, n))
        self.crc = crc and not self.cuda
        self.crcs: list[int | None] = [0 if self.crc else None] * len(pairs)
        self.summed = [0] * len(pairs)  # pieces of each pair in its running CRC
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
        else:
            threading.Thread(target=self._copier, name="kintsugi-lazy-copy", daemon=True).start()

    # CPU: a copier thread and the step hook take pieces from the same queue; the copy
    # releases the GIL, so the copier overlaps the forward/backward of the main thread.
    def _take(self):
        with self.lock:
            if self.next == len(self.pieces):
                return None
            self.next += 1
            return self.pieces[self.next - 1]

    def _copy_some(self) -> float | None:
        """Copy (and checksum) the next piece; its seconds, or None when none is left."""
        piece = self._take()
        if piece is None:
            return None
        src, dst, k, n = piece
        t, cpu, faults = time.perf_counter(), time.thread_time(), resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        try:
            fault_point("copy")
            np.copyto(dst, src)
        except BaseException as e:  # surfaced by wait() on the training thread
            self.error = e
        faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - faults
        cpu, dt = time.thread_time() - cpu, time.perf_counter() - t
        if self.crc:
            self._sum(dst, k, n)
        busy = time.perf_counter() - t  # copying and checksumming: not waiting for the GIL
        with self.lock:
            self.stats["copy_s"] += cpu
            self.stats["copy_wall_s"] += dt
            self.stats["faults"] += faults
            self.left -= 1
            last = self.left == 0
        if last:
            self._finish()
        return busy

    def _sum(self, dst: np.ndarray, k: int, n: int):
        """Extend pair ``k``'s running CRC by its piece ``n`` if that is the next one in order
        (a CRC extends only in order); otherwise give up on the pair."""
        t = time.thread_time()
        with self.lock:  # the other thread waits at most one piece's CRC (~0.5 ms)
            if self.crcs[k] is not None and self.summed[k] == n:
                self.crcs[k] = checksum(dst, self.crcs[k])
                self.summed[k] += 1
            else:
                self.crcs[k] = None
            self.stats["crc_s"] += time.thread_time() - t

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
            for src, dst, _, _ in self.pieces:
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
                self.on_done(self.crcs)
        except BaseException as e:
            self.error = e
        self.stats["report_s"] = time.perf_counter() - t
        self.done.set()

    def wait(self):
        """Block until every piece is in host memory (helping on CPU)."""
        if self.cuda:
            torch.cuda.current_stream().wait_event(self.event)
            return
        while self._copy_some() is not None:
            pass
        self.done.wait()

    def join(self):
        """Wait until the copy is complete and reported (also on CUDA); re-raise its error."""
        self.wait()
        self.done.wait()
        if self.error is not None:
            raise self.error
