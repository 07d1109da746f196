"""Where a node keeper lives on its machine, privately.

- The runtime directory (its socket, its lock) is ``$XDG_RUNTIME_DIR/kintsugi`` when that
  per-user directory exists, else ``/tmp/kintsugi-<uid>``; either must be a directory of
  this user, not a link, closed to others (0700): a directory someone else made (or a link
  to one) is refused with one line instead of trusted.
- Shared-memory slots are ``/dev/shm/kintsugi-<instance>-r<rank>-<n>``, 0600, where
  ``<instance>`` is 64 random bits of the keeper process: nobody can guess a name to
  squat. The instance holds an exclusive lock on ``<runtime>/<instance>.lock`` for its
  whole life; the lock dies with the process, even with kill -9, so anyone can tell a
  killed keeper's memory from a live one's: ``collect_garbage`` (run by every new keeper,
  by a trainer whose keeper died, and by ``kintsugi ckpt gc``) removes exactly that.
- The job token (32 random bytes, hex) is in ``RUN_DIR/keeper/<host>-<job>.token``, 0600.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import secrets
import socket
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from checkpoint.format import write_all
from comms import UserError

SHM = Path("/dev/shm")
SEGMENT = re.compile(r"^kintsugi-([0-9a-f]{16})-r(\d+)-(\d+)$")


def _problem(path: Path) -> str | None:
    """Why ``path`` is not a private directory of this user (None: it is)."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != os.getuid():
        return f"belongs to uid {st.st_uid}, not to you (uid {os.getuid()})"
    if st.st_mode & 0o022:
        return f"is writable by others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def runtime_dir() -> Path:
    """This user's private runtime directory (created 0700 if missing)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg) and _problem(Path(xdg)) is None:
        root = Path(xdg) / "kintsugi"
    else:
        root = Path(tempfile.gettempdir()) / f"kintsugi-{os.getuid()}"
    try:
        os.mkdir(root, 0o700)
    except FileExistsError:
        pass
    problem = _problem(root)
    if problem:
        raise UserError(f"the node keeper's runtime directory {root} {problem}; remove it, or set XDG_RUNTIME_DIR "
                        "to a private directory of yours")
    os.chmod(root, 0o700)  # ours and not writable by others: close it to reads too
    return root


@dataclass
class KeeperAddress:
    """Where a job's keeper on this node listens, and the files of the job's token and log."""

    sock: str
    token_file: Path
    log_file: Path

    @staticmethod
    def of(run_dir: str | Path, job: str, node_id: str | None = None) -> "KeeperAddress":
        run_dir = Path(run_dir).resolve()
        host = socket.gethostname()
        # KINTSUGI_NODE_ID tells several "nodes" (torchrun agents) on one machine apart
        node_id = os.environ.get("KINTSUGI_NODE_ID", "") if node_id is None else node_id
        host = f"{host}-{node_id}" if node_id else host
        key = hashlib.sha256(f"{run_dir}|{host}|{job}".encode()).hexdigest()[:20]
        base = run_dir / "keeper"
        # unix socket paths are limited to 107 bytes: keep it short and out of run_dir
        return KeeperAddress(str(runtime_dir() / f"{key}.sock"), base / f"{host}-{job}.token", base / f"{host}-{job}.log")


def job_id() -> str:
    """The job this process belongs to: torchrun's run id, else 'local'."""
    return os.environ.get("TORCHELASTIC_RUN_ID") or "local"


def write_token(path: Path, token: str | None = None, replace: bool = False) -> str:
    """Create the job's token file (0600) with ``token`` or a fresh one; returns the token in
    it (an existing file wins unless ``replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    token = token or secrets.token_hex(32)
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_TRUNC if replace else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        return read_token(path)
    try:
        write_all(fd, token.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return token


def read_token(path: Path) -> str:
    """The job token; refused (one line) when the file is not this user's private file."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise UserError(f"the job token {path} is not private to you (uid {st.st_uid}, mode "
                            f"{stat.S_IMODE(st.st_mode):o}); remove it and restart the job")
        return os.read(fd, 256).decode().strip()
    finally:
        os.close(fd)


class Instance:
    """This keeper process's identity: random segment names and the lock that shows it is alive."""

    def __init__(self, root: Path | None = None):
        self.root = root or runtime_dir()
        self.name = secrets.token_hex(8)
        # Lock a temporary file, then rename it into place: a lock file is never visible
        # unlocked while its keeper lives, so collect_garbage cannot take a live one for dead.
        tmp = self.root / f".{self.name}.lock.tmp"
        self.fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        os.rename(tmp, self.root / f"{self.name}.lock")

    def segment(self, rank: int, n: int) -> Path:
        return SHM / f"kintsugi-{self.name}-r{rank}-{n}"

    def close(self):
        (self.root / f"{self.name}.lock").unlink(missing_ok=True)
        os.close(self.fd)


def _dead(lock: Path) -> bool:
    """Whether no process holds ``lock`` (a missing lock file: no keeper owns the name)."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def collect_garbage(root: Path | None = None) -> list[str]:
    """Remove the shared memory (and lock files) of this user's keepers that are dead;
    returns the names removed. Safe while other keepers run: a live keeper holds its lock."""
    root = root or runtime_dir()
    uid, dead, removed = os.getuid(), {}, []
    for path in SHM.iterdir() if SHM.is_dir() else ():
        m = SEGMENT.match(path.name)
        if not m:
            continue
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if st.st_uid != uid or not stat.S_ISREG(st.st_mode):
            continue
        if dead.setdefault(m[1], _dead(root / f"{m[1]}.lock")):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    for lock in root.glob("*.lock"):
        if _dead(lock):
            lock.unlink(missing_ok=True)
    return removed


def open_segment(path: str) -> int:
    """Open a slot the keeper named, read-write, after checking it is one of this user's
    keeper segments (a regular file in /dev/shm, not a link): a file descriptor."""
    p = Path(path)
    if p.parent != SHM or not SEGMENT.match(p.name):
        raise PermissionError(f"the node keeper named {path!r}, which is not a keeper segment")
    fd = os.open(p, os.O_RDWR | os.O_NOFOLLOW)
    st = os.fstat(fd)
    if st.st_uid != os.getuid() or not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077:
        os.close(fd)
        raise PermissionError(f"{path} is not a private segment of yours")
    return fd


def shm_free() -> int:
    """Bytes free in /dev/shm."""
    st = os.statvfs(SHM)
    return st.f_bavail * st.f_frsize
