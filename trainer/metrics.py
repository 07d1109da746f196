"""What a run reports: rank 0's progress bar (on a terminal) and step lines, every rank's
log file, metrics as JSONL (and TensorBoard when it is installed).

RUN_DIR/metrics.jsonl holds one record per step (``step``, ``loss``, ..., ``attempt``: the
torchrun restart it ran in, ``redone``: true for a step trained again after a recovery)
and one per save once it is durable (``event: "checkpoint"``, ``step``, ``stall_s``: how
long ``save`` held the loop, ``durable_s``: from ``save`` to committed at every level,
``capture``: lazy or eager, ``levels``, ``failed``), and with ``diagnostics.trace_cost_steps``
one ``event: "trace_cost"`` at the end (``comms.trace_cost.TraceCost``)."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import psutil


def setup_logging(run_dir: Path, rank: int):
    """Every rank logs to RUN_DIR/logs/rank{R}.log; nothing of it reaches the console."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "logs" / f"rank{rank}.log")
    handler.setFormatter(logging.Formatter(f"%(asctime)s rank{rank} %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


class Metrics:
    def __init__(self, run_dir: Path, is_main: bool, total_steps: int, start_step: int, progress: bool):
        self.is_main = is_main
        self.log = logging.getLogger("trainer")
        self.bar = self.jsonl = self.tb = None
        self.attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
        self.logged_until = 0  # steps up to here were logged by an earlier attempt: redone now
        if not is_main:
            return
        path = run_dir / "metrics.jsonl"
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                    self.logged_until = max(self.logged_until, rec["step"] if "loss" in rec else 0)
                except (json.JSONDecodeError, AttributeError):  # a line cut by a crash
                    pass
        self.jsonl = open(path, "a")
        if progress and sys.stdout.isatty():  # a log file gets the step lines, not \r frames
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stdout, leave=False)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional
            pass

    def step(self, record: dict, print_line: bool):
        record = {**record, "attempt": self.attempt, "redone": record["step"] <= self.logged_until}
        self.log.info("step %s", json.dumps(record))
        if not self.is_main:
            return
        self._write(record)
        if self.tb:
            for k, v in record.items():
                if k != "step":
                    self.tb.add_scalar(k, v, record["step"])
        if self.bar:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}")
        if print_line:
            self.print(f"step {record['step']:>6} | loss {record['loss']:.4f} | grad norm {record['grad_norm']:.3f} | "
                       f"lr {record['lr']:.2e} | {record['tokens_per_s']:,.0f} tok/s | "
                       f"{record['step_time_s'] * 1000:.0f} ms/step | rss {record['rss_mb']:.0f} MB")

    def saves(self, timings):
        """A record per save that became durable (checkpoint.SaveTiming)."""
        for t in timings:
            self.event("checkpoint", {"step": t.step, "stall_s": t.stall_s, "durable_s": t.durable_s,
                                      "capture": t.capture, "levels": list(t.levels), "failed": t.failed})

    def event(self, name: str, fields: dict):
        """A record of something that happened once (``event: name``), on rank 0."""
        self.log.info("%s %s", name, json.dumps(fields))
        if self.is_main:
            self._write({"event": name, **fields})

    def _write(self, record: dict):
        self.jsonl.write(json.dumps({**record, "time": time.time()}) + "\n")
        self.jsonl.flush()

    def print(self, line: str):
        """A line on rank 0's console (above the progress bar) and in the log."""
        self.log.info(line)
        if not self.is_main:
            return
        if self.bar:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self):
        if self.bar:
            self.bar.close()
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
