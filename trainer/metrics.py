"""What a run reports: rank 0's progress bar and step lines, every rank's log file,
metrics as JSONL (and TensorBoard when it is installed)."""
from __future__ import annotations

import json
import logging
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
        if not is_main:
            return
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stdout, leave=False)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional
            pass

    def step(self, record: dict, print_line: bool):
        self.log.info("step %s", json.dumps(record))
        if not self.is_main:
            return
        self.jsonl.write(json.dumps({**record, "time": time.time()}) + "\n")
        self.jsonl.flush()
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
