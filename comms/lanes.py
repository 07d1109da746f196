"""Lanes: FIFO queues of communication work, each on its own thread.

A ``Lane`` plays the role of a CUDA communication stream on any backend: operations run in
submission order on one worker thread (with its own CUDA stream on GPU), so the caller's
thread keeps computing while a collective is in flight. gloo and NCCL release the GIL inside
a collective, so the overlap is real. FIFO order is also what makes it safe: every rank
submits the same operations in the same order, so collectives on a group always match.
Used by the MoE exchanges and gradient partitions (comms/moe) and the overlapped optimizer
(trainer/overlap_optim.py).
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch


class Lane:
    """A FIFO lane of work on its own thread (and CUDA stream), like a communication stream."""

    def __init__(self, name: str):
        # New threads start with the OpenMP default (all cores); keep the caller's setting so
        # the lane does not oversubscribe the cores the compute thread is using.
        threads = torch.get_num_threads()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"kintsugi-{name}", initializer=torch.set_num_threads,
                                        initargs=(threads,))
        self._stream = torch.cuda.Stream() if torch.cuda.is_available() else None

    def submit(self, fn, *args) -> "Pending":
        if self._stream is None:
            return Pending(self._pool.submit(fn, *args), None)
        # GPU: the lane's stream first waits for what the compute stream has queued so far,
        # and the consumer later waits on the lane's event (written, not run on this machine).
        ready = torch.cuda.current_stream().record_event()
        stream = self._stream

        def run():
            with torch.cuda.stream(stream):
                stream.wait_event(ready)
                out = fn(*args)
                return out, stream.record_event()

        return Pending(self._pool.submit(run), stream)

    def close(self):
        self._pool.shutdown(wait=True)


class Pending:
    """The result of a lane operation; ``result()`` waits for it (and orders CUDA streams)."""

    def __init__(self, future: Future, stream):
        self._future, self._stream = future, stream

    def result(self):
        if self._stream is None:
            return self._future.result()
        out, done = self._future.result()
        torch.cuda.current_stream().wait_event(done)
        return out


class Done:
    """An already available result (single process: communication is the identity)."""

    def __init__(self, value):
        self._value = value

    def result(self):
        return self._value
