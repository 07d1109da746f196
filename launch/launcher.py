"""`kintsugi launch`: preflight, this node's keeper, then torchrun's elastic agent running a
training script (the built-in trainer by default) with the collective monitor beside it.

    kintsugi launch [torchrun flags] [kintsugi flags] [SCRIPT.py | -m MODULE] [ARGS...]

Arguments are taken as torchrun takes them: flags first, then the script or ``-m MODULE``
(default ``-m trainer``), then the script's own arguments, which are passed on untouched.
Torchrun flags (--nnodes, --nproc-per-node, --rdzv-*, --node-rank, --max-restarts, ...) go
to ``torch.distributed.run``, whose agent restarts failed workers; they resume from the
newest committed checkpoint by themselves. Kintsugi's flags (--config, --run-dir,
--section.key=value, ...) configure the keeper, the preflight checks and the monitor; for
the built-in trainer they are its config too, and a script reads them through
``checkpoint.AsyncCheckpointer`` (RUN_DIR/kintsugi.toml, named by $KINTSUGI_CONFIG). Every
worker finds the run directory in $KINTSUGI_RUN_DIR.

``--nnodes MIN:MAX`` makes the job elastic (c10d rendezvous at ``--rdzv-endpoint``): when a
node is lost for good, torchrun restarts the survivors as a smaller world (down to MIN), and
they continue from the newest in-memory snapshot, the lost node's part rebuilt from erasure-
coded shares and resharded onto the new layout (docs/snapshots.md). The trainer's config is
checked here against every world size the bounds allow.

Stopping (SIGTERM or SIGINT to this process): the launcher signals the workers itself, so
that they finish their step, write the final checkpoint and exit 0, and the agent then ends
the job with exit code 0. torchrun's agent, signalled directly, would kill its workers 30 s
later (its shutdown timeout) and exit non-zero; the launcher escalates to the agent only
after ``checkpoint.close_timeout_s`` plus a step's grace, and tells agents that read
TORCH_ELASTIC_SHUTDOWN_TIMEOUT (torch >= 2.13) to wait that long too, for schedulers that
signal every process of the job at once (Slurm). The keeper ignores SIGTERM: it writes what
it holds and leaves with the job.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from checkpoint import start_keeper
from comms import RUN_DIR_ENV, UserError, exits_on_user_error
from launch.monitor import start_monitor
from trainer import load_config, to_toml

OVERRIDE = re.compile(r"^--([A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*)(=.*)?$")
TRAINER = "trainer"
# Beyond close_timeout_s: a step to finish before the final save, and the processes to exit.
STOP_GRACE_S = 60.0
FAILED_JOB_LINGER_S = 2.0  # the monitor's last polls after a failed job: the crash rule's 1 s grace, and a poll
USAGE = "kintsugi launch [torchrun flags] [kintsugi flags] [SCRIPT.py | -m MODULE] [ARGS...]"
EPILOG = """\
positional:
  SCRIPT.py | -m MODULE  what each worker runs (default: -m trainer, the built-in trainer)
  ARGS                   the script's own arguments, passed on untouched

torchrun flags pass through (`torchrun --help`); --section.key=value overrides the config
(with '='). Workers find the run directory in $KINTSUGI_RUN_DIR.

exit codes: 0 the job finished, or was stopped (SIGTERM/SIGINT) with its final checkpoint
durable; 2 bad input (one line, before any worker starts); other: the agent's (a worker
failed more often than --max-restarts allows)."""


@dataclass
class Launch:
    """The command line, taken apart."""

    config: str | None = None
    run_dir: str | None = None
    skip_preflight: bool = False
    on_fault: str | None = None
    dry_run: bool = False
    help: bool = False
    nproc: str = "1"
    nnodes: str = "1"
    node_rank: str = "0"
    max_restarts: str = "3"
    plan: str | None = None  # = --parallel.plan
    placement: str | None = None  # = --parallel.placement
    torchrun: list[str] = field(default_factory=list)  # other torchrun flags, as given
    overrides: list[str] = field(default_factory=list)  # --section.key=value
    target: list[str] = field(default_factory=lambda: ["-m", TRAINER])  # [SCRIPT] or ["-m", MODULE]
    args: list[str] = field(default_factory=list)  # the target's own arguments

    @property
    def trainer(self) -> bool:
        return self.target == ["-m", TRAINER]

    @property
    def name(self) -> str:
        return Path(self.target[-1]).stem if self.target[0] != "-m" else self.target[1].rsplit(".", 1)[-1]


def help_parser() -> argparse.ArgumentParser:
    """Kintsugi's own flags, for --help (the command line is split by ``split_args``)."""
    ap = argparse.ArgumentParser(prog="kintsugi launch", usage=USAGE, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description="Run a training script (the Kintsugi trainer by default) under torchrun's "
                                             "elastic agent, with preflight checks, this node's checkpoint keeper and "
                                             "the collective monitor.")
    ap.add_argument("--config", help="job TOML (default: configs/tiny.toml for the trainer, built-in defaults for a script)")
    ap.add_argument("--run-dir", help="run directory (the trainer's train.run_dir; default for a script: runs/<its name>)")
    ap.add_argument("--skip-preflight", action="store_true", help="do not run the health checks")
    ap.add_argument("--on-fault", choices=("warn", "restart", "exclude"),
                    help="on a hang or persistent straggler: warn, restart the workers, or exclude the suspect node "
                         "(default: diagnostics.policy)")
    ap.add_argument("--dry-run", action="store_true", help="check everything, print the agent's command, start nothing")
    ap.add_argument("--nproc-per-node", help="workers on this node (torchrun; default 1)")
    ap.add_argument("--nnodes", help="nodes, or MIN:MAX for an elastic job that continues on the survivors when nodes "
                                     "are lost (torchrun; elastic needs --rdzv-endpoint)")
    ap.add_argument("--node-rank", help="this node's rank (torchrun)")
    ap.add_argument("--max-restarts", help="worker-group restarts after a failure (torchrun; default 3)")
    ap.add_argument("--plan", help="placement plan file from `kintsugi plan` (= --parallel.plan)")
    ap.add_argument("--placement", choices=("auto",),
                    help="auto: detect the cluster at start and plan placement and pipeline split (= --parallel.placement=auto)")
    return ap


OURS = {"--config": "config", "--run-dir": "run_dir", "--on-fault": "on_fault", "--nproc-per-node": "nproc",
        "--nproc_per_node": "nproc", "--nnodes": "nnodes", "--node-rank": "node_rank", "--node_rank": "node_rank",
        "--max-restarts": "max_restarts", "--max_restarts": "max_restarts", "--plan": "plan", "--placement": "placement"}
SWITCHES = {"--skip-preflight": "skip_preflight", "--dry-run": "dry_run", "-h": "help", "--help": "help"}


def torchrun_arity() -> dict[str, bool]:
    """torchrun's flags -> whether each takes a value (from its own parser, which imports
    torch: asked only when the command line holds a flag that is not Kintsugi's)."""
    from torch.distributed.run import get_args_parser

    return {opt: a.nargs != 0 for a in get_args_parser()._actions for opt in a.option_strings}


def split_args(argv: list[str]) -> Launch:
    """Flags up to the script (or -m MODULE) are torchrun's or Kintsugi's; the rest is the script's."""
    out, arity, i = Launch(), None, 0
    while i < len(argv):
        arg = argv[i]
        flag, eq, value = arg.partition("=")
        if arg in ("-m", "--module"):
            if i + 1 == len(argv):
                raise UserError("-m needs a module name (e.g. -m trainer)")
            out.target, out.args = ["-m", argv[i + 1]], argv[i + 2:]
            break
        if not arg.startswith("-"):
            out.target, out.args = [arg], argv[i + 1:]
            break
        m = OVERRIDE.match(arg)
        if m and not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else "VALUE"
            raise UserError(f"{arg} {nxt}: write config overrides with '=', as {arg}={nxt}")
        if m:
            out.overrides.append(arg)
        elif flag in OURS:
            if not eq:
                if i + 1 == len(argv):
                    raise UserError(f"{flag} needs a value")
                i, value = i + 1, argv[i + 1]
            setattr(out, OURS[flag], value)
        elif arg in SWITCHES:
            setattr(out, SWITCHES[arg], True)
        elif flag in (arity := arity or torchrun_arity()):
            out.torchrun.append(arg)
            if arity[flag] and not eq:
                if i + 1 == len(argv):
                    raise UserError(f"{flag} needs a value")
                i += 1
                out.torchrun.append(argv[i])
        else:
            raise UserError(f"unknown flag {arg}; see `kintsugi launch --help` (flags for your script go after it)")
        i += 1
    if out.on_fault not in (None, "warn", "restart", "exclude"):
        raise UserError(f"--on-fault {out.on_fault!r}: use warn, restart or exclude")
    if out.trainer:  # the trainer's own --config and overrides are the job's config here too
        rest, j = [], 0
        while j < len(out.args):
            a = out.args[j]
            if a == "--config" and j + 1 < len(out.args):
                out.config, j = out.args[j + 1], j + 2
                continue
            m = OVERRIDE.match(a)
            if m and "=" not in a:
                raise UserError(f"{a}: write config overrides with '=', as {a}=VALUE")
            (out.overrides if m else rest).append(a)
            j += 1
        out.args = rest
    if out.placement not in (None, "auto"):
        raise UserError(f"--placement {out.placement!r}: the one placement is auto (or give --plan FILE)")
    for key, value in (("train.run_dir", out.run_dir), ("parallel.plan", out.plan), ("parallel.placement", out.placement)):
        if value:
            out.overrides.append(f"--{key}={value}")
    return out


def _cuda() -> bool:
    """Whether this node has a GPU torch can use (torch is imported here, after the config
    and the command line were checked: a mistake in them is named at once)."""
    import torch

    return torch.cuda.is_available()


def nproc_count(value: str) -> int:
    if value.isdigit():
        return int(value)
    if value in ("gpu", "auto") and _cuda():
        import torch

        return torch.cuda.device_count()
    if value in ("cpu", "auto"):
        return os.cpu_count() or 1
    raise UserError(f"--nproc-per-node {value!r}: give a number, auto, cpu or gpu")


def node_range(nnodes: str) -> tuple[int, int]:
    """--nnodes N or MIN:MAX -> (min, max) nodes."""
    m = re.fullmatch(r"(\d+)(?::(\d+))?", nnodes)
    lo, hi = (int(m[1]), int(m[2] or m[1])) if m else (0, 0)
    if not 1 <= lo <= hi:
        raise UserError(f"--nnodes {nnodes!r}: give a node count N, or MIN:MAX with 1 <= MIN <= MAX for an elastic job")
    return lo, hi


def check_world(cfg, nnodes: str, nproc: int):
    """The trainer's mesh and batch must fit every world size the job may run at: an elastic
    job continues on fewer nodes after losing some (down to MIN); its erasure code must fit MAX."""
    lo, hi = node_range(nnodes)
    for n in range(lo, hi + 1):
        try:
            cfg.validate(world_size=n * nproc)
        except UserError as e:
            if lo == hi:
                raise
            raise UserError(f"{e} (with {n} node(s) x {nproc} rank(s), which --nnodes {nnodes} allows)") from None


def check_snapshot_code(cfg, nnodes: str):
    _, hi = node_range(nnodes)
    snap = cfg.snapshot
    if snap.interval and snap.k + snap.m > hi:
        raise UserError(f"snapshot.k + snapshot.m = {snap.k + snap.m}, but --nnodes {nnodes} has at most {hi} node(s); "
                        f"use k + m <= {hi} (or 0 to choose them for the job size)")


def torchrun_flags(job: Launch, nproc: int) -> list[str]:
    flags = ["--nproc-per-node", str(nproc), "--nnodes", job.nnodes, "--node-rank", job.node_rank,
             "--max-restarts", job.max_restarts, *job.torchrun]
    lo, hi = node_range(job.nnodes)
    if lo < hi:  # elastic: torchrun restarts the job on the nodes still there, down to MIN
        if not any(a.startswith(("--rdzv-endpoint", "--rdzv_endpoint")) for a in job.torchrun):
            raise UserError(f"--nnodes {job.nnodes}: an elastic job needs --rdzv-endpoint HOST:PORT (the same on every "
                            "node: where the first node serves the rendezvous) and --rdzv-id JOB")
        if not any(a.startswith(("--rdzv-backend", "--rdzv_backend")) for a in job.torchrun):
            flags += ["--rdzv-backend", "c10d"]
    if job.nnodes == "1" and not any(a.startswith(("--rdzv", "--master", "--standalone")) for a in job.torchrun):
        flags.append("--standalone")  # a free port and c10d rendezvous on this host
    return flags


def run_dir_of(job: Launch, cfg) -> Path:
    """The trainer's train.run_dir; a script's --run-dir (or --train.run_dir=), else runs/<its name>."""
    if job.trainer or any(o.startswith("--train.run_dir=") for o in job.overrides):
        return Path(cfg.train.run_dir).resolve()
    return Path("runs", job.name).resolve()


class Stopper:
    """SIGTERM/SIGINT to the launcher: signal the workers (not the agent) so that they save
    and exit 0; escalate to the agent after ``deadline_s``, or at once on a second signal or
    when the agent starts new workers (a worker died on the signal instead of stopping)."""

    def __init__(self, agent: subprocess.Popen, deadline_s: float):
        self.agent, self.deadline_s = agent, deadline_s
        self.since: float | None = None
        self.workers: set[int] = set()
        self.escalated = 0.0
        self.lock = threading.RLock()  # the handler runs on the main thread, maybe inside poll()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.agent.pid).children()
        except psutil.Error:
            return []

    def _on_signal(self, signum, frame):
        with self.lock:
            if self.since is not None:
                self._escalate(f"a second {signal.Signals(signum).name}")
                return
            self.since = time.monotonic()
            print(f"kintsugi: {signal.Signals(signum).name}: stopping the workers; they save and exit "
                  f"(the agent is stopped if they are not done within {self.deadline_s:.0f} s)", flush=True)
            for p in self._children():
                self.workers.add(p.pid)
                try:
                    p.send_signal(signal.SIGTERM)
                except psutil.Error:
                    pass

    def poll(self):
        """Called every fraction of a second while the agent runs."""
        with self.lock:
            if self.since is None:
                return
            if self.escalated and time.monotonic() - self.escalated > self.deadline_s:
                self.kill_all()
            elif not self.escalated:
                if any(p.pid not in self.workers for p in self._children()):
                    self._escalate("the agent restarted workers after the stop")
                elif time.monotonic() - self.since > self.deadline_s:
                    self._escalate(f"the workers did not finish within {self.deadline_s:.0f} s")

    def _escalate(self, why: str):
        if self.escalated:
            self.kill_all()
            return
        self.escalated = time.monotonic()
        print(f"kintsugi: {why}: stopping torchrun's agent", flush=True)
        try:
            os.killpg(self.agent.pid, signal.SIGTERM)  # the agent leads its own session (start_new_session)
        except ProcessLookupError:
            pass

    def kill_all(self):
        """The agent did not stop its workers either: SIGKILL it and them (they run in sessions
        of their own, which its process group does not reach)."""
        try:
            procs = [psutil.Process(self.agent.pid), *psutil.Process(self.agent.pid).children(recursive=True)]
        except psutil.Error:
            return
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass


def rendezvous_limit_s(job: Launch) -> float:
    """The longest a healthy agent goes without workers: one rendezvous round, i.e. torchrun's
    join_timeout plus a store read timeout on each side of it (--rdzv-conf; torchrun's
    defaults 600 s and 60 s)."""
    conf: dict[str, str] = {}
    for i, arg in enumerate(job.torchrun):
        flag, eq, value = arg.partition("=")
        if flag in ("--rdzv-conf", "--rdzv_conf"):
            text = value if eq else (job.torchrun[i + 1] if i + 1 < len(job.torchrun) else "")
            conf.update(kv.split("=", 1) for kv in text.split(",") if "=" in kv)
    try:
        return float(conf.get("join_timeout", 600)) + 2 * float(conf.get("read_timeout", 60))
    except ValueError:
        raise UserError(f"--rdzv-conf join_timeout/read_timeout must be seconds, not {conf}") from None


class Watchdog:
    """An agent cut off from the rendezvous host (a network partition) blocks in a TCP read of
    the rendezvous store until the kernel gives up on the connection, ~15 min of retransmissions
    later, whatever --rdzv-conf says. When it has had no workers for longer than a rendezvous
    round may take, the launcher stops it: this node is out of the job."""

    def __init__(self, agent: subprocess.Popen, limit_s: float):
        self.agent, self.limit_s = agent, limit_s
        self.since = time.monotonic()  # the agent had no workers from then on

    def expired(self) -> bool:
        try:  # a worker that died is a zombie until the agent reaps it, which a blocked agent never does
            working = any(c.status() != psutil.STATUS_ZOMBIE for c in psutil.Process(self.agent.pid).children())
        except psutil.Error:
            working = False
        if working:
            self.since = time.monotonic()
        return time.monotonic() - self.since > self.limit_s


def start_keeper_detached(run_dir: Path, cfg):
    """This node's keeper, immune to SIGTERM (a scheduler signals every process of the job:
    the keeper must stay to write the final save; it leaves with its lease instead)."""
    old = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited across exec
    try:
        return start_keeper(run_dir, host_memory_mb=cfg.checkpoint.host_memory_mb,
                            timeout_s=cfg.checkpoint.keeper_timeout_s, agent_pid=os.getpid())
    finally:
        signal.signal(signal.SIGTERM, old)


@exits_on_user_error
def main(argv: list[str]) -> int:
    job = split_args(argv)
    if job.help:
        help_parser().print_help()
        return 0
    if job.target[0] != "-m" and "--no-python" not in job.torchrun and not Path(job.target[0]).is_file():
        raise UserError(f"script {job.target[0]} not found; give the path of your training script, or -m MODULE")
    # A bad config fails here, before any worker. A script without --config starts from the
    # built-in defaults, not the trainer's job file.
    cfg = load_config(job.config, job.overrides, default_file=job.trainer)
    nproc = nproc_count(job.nproc)
    check_snapshot_code(cfg, job.nnodes)
    rendezvous_s = rendezvous_limit_s(job)
    if job.trainer:
        check_world(cfg, job.nnodes, nproc)  # check the mesh now, not in every worker
    run_dir = run_dir_of(job, cfg)
    cfg.train.run_dir = str(run_dir)
    if not job.skip_preflight:
        from launch.preflight import run_checks

        for note in run_checks(cfg, nproc, run_dir, model=job.trainer):
            print(f"kintsugi: preflight: {note}", flush=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_flags(job, nproc), *job.target]
    cmd += (["--config", job.config] if job.trainer and job.config else []) + (job.overrides if job.trainer else []) + job.args
    deadline_s = cfg.checkpoint.close_timeout_s + STOP_GRACE_S
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # Each rendezvous round's rank 0 hosts a fresh store. With torchrun's shared agent store,
    # keys of a failed round stay and a restarted gloo rank can read a dead peer's address
    # ("connectFullMesh ... Connection refused"), burning restarts.
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    # An agent signalled directly (with the whole job, by a scheduler) waits this long for
    # its workers' final save before it kills them (torch >= 2.13; older agents wait 30 s).
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(int(deadline_s)))
    env[RUN_DIR_ENV] = str(run_dir)
    if job.dry_run:
        print(" ".join(cmd))
        print(f"run dir {run_dir}; {RUN_DIR_ENV}={run_dir} TORCH_ELASTIC_SHUTDOWN_TIMEOUT="
              f"{env['TORCH_ELASTIC_SHUTDOWN_TIMEOUT']}; nothing started (--dry-run)")
        return 0
    run_dir.mkdir(parents=True, exist_ok=True)
    if not job.trainer:  # the resolved config, for checkpoint.AsyncCheckpointer in the script
        from checkpoint.stateful import CONFIG_ENV

        (run_dir / "kintsugi.toml").write_text(to_toml(cfg))
        env[CONFIG_ENV] = str(run_dir / "kintsugi.toml")
    # This node's keeper: owns the shared-memory snapshots (level 0) so they outlive worker
    # restarts, and writes L1/L2 off the workers' cores. It leaves when this launcher does.
    keeper = start_keeper_detached(run_dir, cfg)
    env.update(keeper.env())
    if cfg.diagnostics.trace and _cuda():  # NCCL: a Flight Recorder ring, dumped on a hang
        from comms import trace

        env.update({k: v for k, v in trace.flight_recorder_env(run_dir).items() if k not in env})
    # Its own session: the monitor's actions signal the agent's process group, never ours.
    agent = subprocess.Popen(cmd, env=env, start_new_session=True)
    stopper = Stopper(agent, deadline_s)
    watchdog = Watchdog(agent, rendezvous_s)
    logging.basicConfig(format="kintsugi: %(message)s", level=logging.WARNING)
    monitor = start_monitor(run_dir, job.on_fault or cfg.diagnostics.policy, agent, int(job.node_rank), cfg=cfg.diagnostics)
    try:
        while agent.poll() is None:
            stopper.poll()
            if watchdog.expired():
                print(f"kintsugi: torchrun's agent has had no workers for {watchdog.limit_s:.0f} s (one rendezvous round, "
                      "--rdzv-conf join_timeout + 2 x read_timeout): this node cannot rejoin the job (cut off from the "
                      "rendezvous host?); stopping it", flush=True)
                stopper.kill_all()
                agent.wait()
                return 1
            time.sleep(0.2)
        rc = agent.returncode
    finally:
        monitor.stop(linger_s=FAILED_JOB_LINGER_S if agent.poll() not in (0, None) else 0.0)
        keeper.stop()
    if rc == 0 and (run_dir / "diagnostics").is_dir():
        print(f"kintsugi: diagnosis report: kintsugi diagnose report {run_dir}", flush=True)
    return rc
