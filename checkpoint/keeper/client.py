"""The trainer's side of the node keeper: a connection (``KeeperClient``), and finding or
starting this node's keeper (``connect``, ``start_keeper``)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from checkpoint.keeper import messages as m
from checkpoint.keeper.runtime import KeeperAddress, job_id, read_token, write_token
from checkpoint.keeper.wire import Channel, WireError, client_handshake, token_bytes
from comms import UserError

# A request is answered in milliseconds; only an allocation waits (for memory that level
# writes still read), and it says how long itself.
CALL_TIMEOUT_S = 120.0


class KeeperClient:
    """One connection to the node keeper (one request at a time); ``call`` returns the
    request's typed reply. Errors: UserError (the user's to fix), RuntimeError (the keeper
    refused), OSError/ConnectionError (the keeper is gone or does not answer)."""

    def __init__(self, sock_path: str, token: str, rank: int, local_world: int = 1, levels: list | None = None,
                 gen: str = ""):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CALL_TIMEOUT_S)
        try:
            sock.connect(sock_path)
            self.channel: Channel = client_handshake(sock, token_bytes(token), f"the node keeper at {sock_path}")
        except BaseException:
            sock.close()
            raise
        self.lock = threading.Lock()
        reply = self.call(m.Hello(rank, local_world, levels or [], gen))
        self.pid, self.budget, self.warning = reply.pid, reply.budget, reply.warning

    def call(self, msg, timeout_s: float = CALL_TIMEOUT_S):
        with self.lock:
            self.channel.sock.settimeout(timeout_s)
            try:
                self.channel.send(m.request_frame(msg))
                frame, _ = self.channel.recv(m.MAX_FRAME)
            except WireError as e:
                raise ConnectionError(f"node keeper: {e}") from None
        try:
            return m.decode_reply(msg, frame)
        except m.RequestFailed as e:
            raise (UserError if e.user else RuntimeError)(f"node keeper: {e}") from None
        except m.BadMessage as e:
            raise RuntimeError(f"node keeper answered {msg.op} with a malformed reply: {e}") from None

    def close(self):
        self.channel.close()


@dataclass
class KeeperHandle:
    """A keeper this process started (for ``kintsugi launch``): its address and process."""

    address: KeeperAddress
    token: str
    proc: subprocess.Popen

    def stop(self, timeout_s: float = 30.0):
        """Ask it to exit after its queued writes; kill it if it does not within the timeout."""
        try:
            c = KeeperClient(self.address.sock, self.token, rank=-1)
            c.call(m.Shutdown())
            c.close()
        except (OSError, ConnectionError, RuntimeError):
            pass
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def env(self) -> dict:
        """Environment for the job's workers so they use this keeper (and its token)."""
        return {"KINTSUGI_KEEPER_SOCK": self.address.sock, "KINTSUGI_JOB_TOKEN": self.token}


def start_keeper(run_dir: str | Path, job_token: str | None = None, host_memory_mb: int = 4096,
                 timeout_s: float = 60.0, agent_pid: int | None = None, exit_on_bye: bool = False,
                 job: str | None = None) -> KeeperHandle:
    """Start this node's keeper detached (own session: a signal to the job's process group
    does not reach it before its trainers) and return once it accepts connections.

    ``kintsugi launch`` calls this with its own pid as ``agent_pid`` and passes
    ``handle.env()`` to the workers; under plain torchrun local rank 0 calls it via ``connect``.
    """
    addr = KeeperAddress.of(run_dir, job or job_id())
    job_token = write_token(addr.token_file, job_token, replace=job_token is not None)
    args = [sys.executable, "-m", "checkpoint.keeper", "--sock", addr.sock, "--token-file", str(addr.token_file),
            "--host-memory-mb", str(host_memory_mb), "--timeout-s", str(timeout_s)]
    if agent_pid:
        args += ["--agent-pid", str(agent_pid)]
    if exit_on_bye:
        args.append("--exit-on-bye")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    with open(addr.log_file, "ab") as logf:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env,
                                start_new_session=True, close_fds=True)
    handle = KeeperHandle(addr, job_token, proc)
    deadline = time.monotonic() + 30
    while True:
        try:
            KeeperClient(addr.sock, job_token, rank=-1).close()
            return handle
        except (OSError, ConnectionError):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the node keeper did not start; see {addr.log_file}") from None
            time.sleep(0.05)


def connect(run_dir: str | Path, rank: int, local_rank: int, local_world: int, levels: list,
            host_memory_mb: int, timeout_s: float, gen: str = "") -> KeeperClient:
    """This rank's keeper: the launcher's (from the environment), else this job's keeper on
    this node, which local rank 0 starts when none answers (detached; the others wait)."""
    sock, token = os.environ.get("KINTSUGI_KEEPER_SOCK"), os.environ.get("KINTSUGI_JOB_TOKEN")
    if not (sock and token):
        addr = KeeperAddress.of(run_dir, job_id())
        sock = addr.sock
        if local_rank == 0:
            token = write_token(addr.token_file)
            try:
                return KeeperClient(sock, token, rank, local_world, levels, gen)
            except (OSError, ConnectionError):  # none alive: start it
                agent = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
                start_keeper(run_dir, token, host_memory_mb, timeout_s, agent_pid=agent, exit_on_bye=agent is None)
        else:
            token = _wait_token(addr.token_file)
    deadline = time.monotonic() + 60
    while True:
        try:
            return KeeperClient(sock, token, rank, local_world, levels, gen)
        except (OSError, ConnectionError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"cannot reach the node keeper at {sock}; is local rank 0 running?") from None
            time.sleep(0.1)


def _wait_token(path: Path, wait_s: float = 60.0) -> str:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            token = read_token(path)
            if len(token) == 64:
                return token
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"no keeper token appeared at {path} within {wait_s:.0f} s "
                               "(local rank 0 did not start the node keeper)")
        time.sleep(0.05)
