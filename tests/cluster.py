"""An emulated cluster on one box, for tests, benchmarks and drills (docs/testbed.md).

Each host is a network namespace with its own address, hostname, /etc/hosts (every host
resolves every other by name), /dev/shm and keeper socket directory, and a cgroup holding
every process it runs; hosts meet on a bridge in a namespace of their own, so their traffic
never leaves the testbed (no default route, no address in the box's own stack). Links are
shaped with tc: HTB per destination for bandwidth, netem under it for delay and loss.

    tb = Testbed(3, root=tmp_path)           # node0..node2, 10.213.X.1-3
    tb.link([0, 1], [2], rate_mbit=200)      # 200 Mbit/s between {node0, node1} and node2
    procs = tb.launch_job("job", "--config", "tests/job.toml", f"--train.run_dir={tb.shared}/run")
    tb.kill(2); tb.replace(2)                # lose node2 whole, then a fresh machine in its place
    tb.down()                                # everything removed

Everything a testbed makes is named after its id (``ktb`` + the third octet of its /24 in
10.213.0.0/16) and recorded in /run/kintsugi-testbed-<id>.json first, so that ``down`` finds
it all even after a crash. The owner's exit (atexit), SIGTERM/SIGHUP, or a watchdog that
outlives a SIGKILLed owner tear it down. CLI: ``python tests/cluster.py --help``.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

ROOT = Path(__file__).resolve().parent.parent  # the repository: hosts run commands from here
HERE = Path(__file__).resolve()
PREFIX = "ktb"  # every namespace, cgroup and directory a testbed makes starts with <PREFIX>NNN-
ID = re.compile(rf"^({PREFIX}\d{{3}})(?:-|\.json$|$)")
NET = "10.213"  # the /16 the testbed owns; an instance takes 10.213.N.0/24
REGISTRY = Path("/run")
SHM = Path("/dev/shm")
SOCK_DIR = Path(f"/tmp/kintsugi-{os.getuid()}")  # the keepers' socket directory (checkpoint/keeper/runtime.py)
IFACE = "eth0"  # every host's interface: GLOO_SOCKET_IFNAME=eth0 names it on any host
UNLIMITED_MBIT = 100_000  # HTB wants a rate for a class that only delays
QUANTUM = 200_000  # HTB bytes per round: above a GSO packet (64 KiB), the largest tc takes quietly


class Unavailable(RuntimeError):
    """The testbed cannot run here (the message is one line saying why)."""


# ------------------------------------------------------------------------- can it run here?

_REASON: list[str | None] = []


def unavailable() -> str | None:
    """Why no testbed can be made on this machine (one line), or None when it can."""
    if not _REASON:
        _REASON.append(_probe())
    return _REASON[0]


def _probe() -> str | None:
    need = "needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN), iproute2 (ip, tc), util-linux (unshare, nsenter, mount) and cgroup v2"
    missing = [t for t in ("ip", "tc", "unshare", "nsenter", "mount") if not shutil.which(t)]
    if missing:
        return f"emulated cluster unavailable: {', '.join(missing)} not installed ({need})"
    try:
        caps = int(re.search(r"CapEff:\s*([0-9a-f]+)", Path("/proc/self/status").read_text())[1], 16)
    except (OSError, TypeError):
        return f"emulated cluster unavailable: not Linux ({need})"
    if not (caps >> 12 & 1 and caps >> 21 & 1):
        return f"emulated cluster unavailable: this process lacks CAP_NET_ADMIN/CAP_SYS_ADMIN ({need})"
    if _cgroup2() is None:
        return f"emulated cluster unavailable: no writable cgroup v2 hierarchy ({need})"
    # A throwaway namespace that vanishes with the probe: veth and HTB are what hosts need.
    probe = subprocess.run(["unshare", "--net", "--mount", "--uts", "sh", "-c",
                            "ip link add ktbx type veth peer name ktby && tc qdisc add dev ktbx root handle 1: htb"],
                           capture_output=True, text=True)
    if probe.returncode:
        why = (probe.stderr.strip().splitlines() or ["failed"])[-1]
        return f"emulated cluster unavailable: cannot make a namespace with veth and HTB here: {why} ({need})"
    return None


def _cgroup2() -> Path | None:
    """The cgroup v2 hierarchy (pure v2 at /sys/fs/cgroup, or the hybrid's 'unified')."""
    for p in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        if (p / "cgroup.controllers").exists() and os.access(p, os.W_OK):
            return p
    return None


def _cpu_controller() -> tuple[Path, str] | None:
    """Where CPU limits are set: (hierarchy, 'v2') when v2 has the cpu controller, else
    (the v1 cpu mount, 'v1'), else None."""
    v2 = _cgroup2()
    if v2 is not None and "cpu" in (v2 / "cgroup.subtree_control").read_text().split():
        return v2, "v2"
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mnt, fstype, opts, *_ = line.split()
        if fstype == "cgroup" and "cpu" in opts.split(","):
            return Path(mnt), "v1"
    return None


def _cgroup_roots() -> list[Path]:
    """Where each host gets a cgroup: the v2 hierarchy (membership, kill) and, on a hybrid
    machine, the v1 cpu one (limits)."""
    cpu = _cpu_controller()
    return [r for r in (_cgroup2(), cpu[0] if cpu and cpu[1] == "v1" else None) if r is not None]


# ----------------------------------------------------------------------------------- state

@dataclass
class Shape:
    """How a link (or a host's own port) is shaped; None/0 = as fast as the box allows."""

    rate_mbit: float | None = None
    delay_ms: float = 0.0  # one way: a round trip over a link with delay d takes 2d more
    loss_pct: float = 0.0  # per direction

    def __bool__(self):
        return bool(self.rate_mbit or self.delay_ms or self.loss_pct)


@dataclass
class Host:
    """One emulated machine. Paths are as seen from outside the hosts (the test process)."""

    index: int
    name: str
    addr: str
    ns: str  # its network namespace (`ip netns exec NS ...`)
    local_dir: str  # its node-local disk (L1); inside the host it is mounted at Testbed.local
    alive: bool = True  # False after kill(): powered off, until replace()
    partitioned: bool = False
    cpu: float | None = None  # CPU limit in cores, None = unlimited


@dataclass
class State:
    """What /run/kintsugi-testbed-<id>.json records: enough for any process to find and
    change or remove the testbed."""

    id: str
    root: str
    own_root: bool
    owner: int | None  # the process whose exit tears the testbed down (None: `cluster.py up`)
    owner_start: int | None  # its start time, so that a reused pid is not mistaken for it
    watchdog: int | None = None
    hosts: list[Host] = field(default_factory=list)
    links: dict[str, Shape] = field(default_factory=dict)  # "i-j" (i < j) -> shape both ways
    ports: dict[str, Shape] = field(default_factory=dict)  # "i" -> shape of host i's own port

    @staticmethod
    def path(tid: str) -> Path:
        return REGISTRY / f"kintsugi-testbed-{tid}.json"

    def save(self):
        tmp = self.path(self.id).with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(self.path(self.id))

    @staticmethod
    def load(tid: str) -> "State":
        d = json.loads(State.path(tid).read_text())
        d["hosts"] = [Host(**h) for h in d["hosts"]]
        d["links"] = {k: Shape(**v) for k, v in d["links"].items()}
        d["ports"] = {k: Shape(**v) for k, v in d["ports"].items()}
        return State(**d)


def _start_time(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _owner_gone(st: State) -> bool:
    return st.owner is not None and _start_time(st.owner) != st.owner_start


# ------------------------------------------------------------------------------- commands

def _run(*cmd: str, check: bool = True) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if check and out.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip() or f'exit {out.returncode}'}")
    return out.stdout


# Run inside the host's network namespace and a fresh mount and UTS namespace per command (all
# seeing the same per-host files): join the host's cgroups first, so that every process it forks
# is the host's; then its own /sys (its interfaces only; the machine's cgroup hierarchies moved
# back over its /sys/fs/cgroup, so a process reads its host's CPU throttling as on a real
# machine), /etc/hosts, /dev/shm, keeper sockets, node-local dir and hostname.
_ENTER = ('for cg in "$1" "$2"; do [ -z "$cg" ] || echo $$ > "$cg/cgroup.procs" || exit 97; done; '
          'cg=$(mktemp -d) && { mount --rbind /sys/fs/cgroup "$cg" 2>/dev/null || { rmdir "$cg"; cg=; }; } && '
          'mount -t sysfs sysfs /sys && { [ -z "$cg" ] || { mount --move "$cg" /sys/fs/cgroup && rmdir "$cg"; }; } && '
          'mount --bind "$3" /etc/hosts && mount --bind "$4" /dev/shm && '
          'mount --bind "$5" "$6" && mount --bind "$7" "$8" && echo "$9" > /proc/sys/kernel/hostname || exit 97; '
          'shift 9; exec "$@"')


class Testbed:
    """N emulated hosts (node0, node1, ...) on one bridge; see the module docstring."""

    def __init__(self, hosts: int | Sequence[str] = 2, root: str | Path | None = None, *, owner: bool = True):
        """``hosts``: a count or the hostnames. ``root``: where the hosts file, the shared run
        directory and the hosts' node-local dirs and logs go (default: a new directory in
        /tmp, removed by down()). ``owner``: tear down when this process ends (False: the
        testbed stays until ``cluster.py down ID``)."""
        reason = unavailable()
        if reason:
            raise Unavailable(reason)
        names = [f"node{i}" for i in range(hosts)] if isinstance(hosts, int) else list(hosts)
        self.st = _allocate(root, owner)
        self.procs: dict[int, list[subprocess.Popen]] = {}
        try:
            if owner:
                self.st.watchdog = subprocess.Popen(
                    [sys.executable, str(HERE), "_watch", self.id, str(os.getpid())], start_new_session=True,
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid
                _OWNED.append(self)
                _install_handlers()
            for d in (self.shared, self.local, self.shm_root):
                d.mkdir(parents=True, exist_ok=True)
            SOCK_DIR.mkdir(mode=0o700, exist_ok=True)  # a mount point for each host's own
            self.hosts_file.touch()
            _run("ip", "netns", "add", self.switch)
            _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", self.switch, "link", "set", "br0", "up")
            for i, name in enumerate(names):
                self.st.hosts.append(self._make_host(i, name))
            self._write_hosts_file()
            self.st.save()
        except BaseException:
            self.down()
            raise

    @classmethod
    def attach(cls, tid: str) -> "Testbed":
        """A handle on a testbed another process made (the CLI's drills)."""
        tb = cls.__new__(cls)
        tb.st, tb.procs = State.load(tid), {}
        return tb

    # -------------------------------------------------------------------------- names, paths

    id = property(lambda self: self.st.id)
    hosts = property(lambda self: self.st.hosts)
    head = property(lambda self: self.st.hosts[0], doc="host 0: it serves the c10d rendezvous")
    root = property(lambda self: Path(self.st.root))
    shared = property(lambda self: self.root / "shared", doc="the shared run directory (L2, as on NFS)")
    local = property(lambda self: self.root / "local",
                     doc="the node-local directory (L1) as every host sees it: each its own disk")
    hosts_file = property(lambda self: self.root / "hosts")
    shm_root = property(lambda self: SHM / self.id)
    switch = property(lambda self: f"{self.id}-sw")

    def host(self, h: int | str | Host) -> Host:
        """A host by index, name or Host."""
        if isinstance(h, Host):
            return self.st.hosts[h.index]
        for host in self.st.hosts:
            if h in (host.index, host.name) or (isinstance(h, str) and h.isdigit() and int(h) == host.index):
                return host
        raise KeyError(f"testbed {self.id} has no host {h!r}; hosts: {', '.join(x.name for x in self.st.hosts)}")

    def rdzv_endpoint(self, port: int = 29500) -> str:
        return f"{self.head.name}:{port}"

    def log(self, h, what: str = "launch") -> Path:
        """Where a host's command writes its output by default."""
        return self.root / self.host(h).name / f"{what}.log"

    def _cgroups(self, h: Host) -> list[Path]:
        return [r / h.ns for r in _cgroup_roots()]

    # --------------------------------------------------------------------------------- hosts

    def _make_host(self, index: int, name: str, addr: str | None = None) -> Host:
        addr = addr or f"{NET}.{int(self.id[len(PREFIX):])}.{index + 1}"
        h = Host(index, name, addr, f"{self.id}-h{index}", str(self.root / name / "local"))
        self._host_dirs(h)
        _run("ip", "netns", "add", h.ns)
        # Both ends are made inside their namespaces, so their names collide with no one's; the
        # MAC follows the address, so a replaced host needs no new ARP entries on its peers.
        mac = "02:6b:74:%02x:%02x:%02x" % tuple(int(x) for x in addr.split(".")[1:])
        _run("ip", "link", "add", IFACE, "netns", h.ns, "address", mac, "type", "veth",
             "peer", "name", f"p{index}", "netns", self.switch)
        _run("ip", "-n", self.switch, "link", "set", f"p{index}", "master", "br0", "up")
        _run("ip", "-n", h.ns, "addr", "add", f"{addr}/24", "dev", IFACE)
        _run("ip", "-n", h.ns, "link", "set", IFACE, "up")
        _run("ip", "-n", h.ns, "link", "set", "lo", "up")
        for cg in self._cgroups(h):
            cg.mkdir(exist_ok=True)
        return h

    def _host_dirs(self, h: Host):
        for d in (Path(h.local_dir), self.root / h.name / "tmp", self.shm_root / h.name):
            d.mkdir(parents=True, exist_ok=True)

    def _write_hosts_file(self):
        text = "127.0.0.1 localhost\n" + "".join(f"{h.addr} {h.name}\n" for h in self.st.hosts)
        # In place: hosts have it bind-mounted, and a new inode would not reach them.
        with open(self.hosts_file, "r+") as f:
            f.write(text)
            f.truncate()

    def add_host(self, name: str | None = None) -> Host:
        """A new machine on the testbed (the next index and address)."""
        index = len(self.st.hosts)
        h = self._make_host(index, name or f"node{index}")
        self.st.hosts.append(h)
        self._write_hosts_file()
        self._shape_all()
        self.st.save()
        return h

    def popen(self, h, argv: Sequence[str], *, env: dict | None = None, cwd: str | Path = ROOT,
              log: str | Path | None = None, **kw) -> subprocess.Popen:
        """Start ``argv`` on host ``h`` (its own session, cwd the repo, the repo on PYTHONPATH).
        ``log``: append stdout and stderr to this file; else ``kw`` (stdout=PIPE, ...) apply."""
        h = self.host(h)
        if not h.alive:
            raise RuntimeError(f"host {h.name} is down (killed); replace() it first")
        if env is None:
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("start_new_session", True)
        cgs = [str(c) for c in self._cgroups(h)] + [""]
        cmd = ["nsenter", f"--net=/run/netns/{h.ns}", "unshare", "--mount", "--uts", "--propagation", "private", "--",
               "sh", "-c", _ENTER, "sh", cgs[0], cgs[1], str(self.hosts_file), str(self.shm_root / h.name),
               str(self.root / h.name / "tmp"), str(SOCK_DIR), h.local_dir, str(self.local), h.name, *argv]
        if log is not None:
            Path(log).parent.mkdir(parents=True, exist_ok=True)
            with open(log, "ab") as f:
                p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, **kw)
        else:
            p = subprocess.Popen(cmd, env=env, cwd=cwd, **kw)
        self.procs.setdefault(h.index, []).append(p)
        return p

    def run(self, h, argv: Sequence[str], *, timeout: float | None = 120, check: bool = False,
            **kw) -> subprocess.CompletedProcess:
        """Run ``argv`` on host ``h`` to completion; output captured as text."""
        p = self.popen(h, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            raise
        done = subprocess.CompletedProcess(p.args, p.returncode, out, err)
        if check and p.returncode:
            raise RuntimeError(f"{' '.join(map(str, argv))} on {self.host(h).name} exited {p.returncode}:\n{err[-3000:]}")
        return done

    def launch(self, h, *args: str, env: dict | None = None, log: str | Path | None = None) -> subprocess.Popen:
        """``kintsugi launch ARGS`` on host ``h``; output appended to ``log`` (default its launch.log)."""
        return self.popen(h, [sys.executable, "-m", "launch", "launch", *args], env=env,
                          log=log if log is not None else self.log(h))

    def launch_job(self, rdzv_id: str, *args: str, hosts: Iterable | None = None, nnodes: str | None = None,
                   port: int = 29500, env: dict | None = None) -> list[subprocess.Popen]:
        """One ``kintsugi launch`` per host (default: every live host), one rank each, meeting at
        a c10d rendezvous on the head host."""
        hosts = [self.host(h) for h in (hosts if hosts is not None else [h for h in self.st.hosts if h.alive])]
        common = ["--nnodes", nnodes or str(len(hosts)), "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                  "--rdzv-endpoint", self.rdzv_endpoint(port), "--rdzv-id", rdzv_id]
        return [self.launch(h, *common, "--node-rank", str(i), *args, env=env) for i, h in enumerate(hosts)]

    def pids(self, h) -> list[int]:
        """Every live process of host ``h``."""
        procs = _cgroup2() / self.host(h).ns / "cgroup.procs"
        return [int(p) for p in procs.read_text().split()] if procs.exists() else []

    # -------------------------------------------------------------------------------- faults

    def kill(self, h):
        """Lose host ``h`` whole: its port goes dark first (peers hear nothing more, not even
        a reset), then every process it ran is SIGKILLed and its memory (/dev/shm, keeper
        sockets) is gone. Its node-local disk stays, as on a machine that died."""
        h = self.host(h)
        _run("ip", "-n", self.switch, "link", "set", f"p{h.index}", "down")
        _kill_cgroups(self._cgroups(h), h.ns)
        for p in self.procs.pop(h.index, []):
            p.wait()
        for d in (self.shm_root / h.name, self.root / h.name / "tmp"):
            shutil.rmtree(d, ignore_errors=True)
        h.alive = False
        self.st.save()

    def replace(self, h, name: str | None = None, keep_disk: bool = False) -> Host:
        """A fresh machine in host ``h``'s place: same index and address, its name (or
        ``name``), empty memory and (unless ``keep_disk``) an empty node-local disk; ``h``
        is killed first if it still runs. Link shapes of the slot apply to it."""
        old = self.host(h)
        if old.alive:
            self.kill(old)
        # The veth first: a namespace is destroyed in the background, and the switch-side end
        # would still hold the port's name when the new host's veth is made.
        _run("ip", "-n", old.ns, "link", "del", IFACE)
        _run("ip", "netns", "del", old.ns)
        for cg in self._cgroups(old):
            _rmdir_cgroup(cg)
        if not keep_disk:
            shutil.rmtree(old.local_dir, ignore_errors=True)
        new = self._make_host(old.index, name or old.name, old.addr)
        self.st.hosts[old.index] = new
        self._write_hosts_file()
        self._shape_all()
        self.st.save()
        return new

    def partition(self, h):
        """Drop all traffic to and from host ``h`` (its processes keep running)."""
        h = self.host(h)
        _run("ip", "-n", self.switch, "link", "set", f"p{h.index}", "down")
        h.partitioned = True
        self.st.save()

    def heal(self, h):
        """Undo partition(h)."""
        h = self.host(h)
        if h.alive:
            _run("ip", "-n", self.switch, "link", "set", f"p{h.index}", "up")
        h.partitioned = False
        self.st.save()

    def slow_cpu(self, h, cores: float | None, period_ms: float = 100.0):
        """Limit host ``h`` to ``cores`` CPUs' worth of time (cgroup CPU quota) per ``period_ms``
        (the kernel's default period: a burst of work shorter than the quota is not slowed; a
        short period cuts every burst alike, as a slower CPU would); None = no limit."""
        h = self.host(h)
        cpu = _cpu_controller()
        if cpu is None:
            raise Unavailable("no cgroup cpu controller on this machine: CPU limits are unavailable")
        period = int(period_ms * 1000)
        quota = None if cores is None else max(1000, int(cores * period))
        if cpu[1] == "v2":
            (cpu[0] / h.ns / "cpu.max").write_text(f"{quota or 'max'} {period}")
        else:
            (cpu[0] / h.ns / "cpu.cfs_period_us").write_text(str(period))
            (cpu[0] / h.ns / "cpu.cfs_quota_us").write_text(str(quota or -1))
        h.cpu = cores
        self.st.save()

    # ------------------------------------------------------------------------------- shaping

    def link(self, a, b, rate_mbit: float | None = None, delay_ms: float = 0.0, loss_pct: float = 0.0):
        """Shape the links between hosts ``a`` and hosts ``b`` (a host or a list; every pair
        across, both ways; a == b: every pair inside the group). All defaults = unshaped.

            tb.link([2, 3], [2, 3], rate_mbit=1000)    # 2-3 on 1 Gbit Ethernet
            tb.link([0, 1], [2, 3], rate_mbit=200)     # 200 Mbit between the fabrics
        """
        shape = self._checked(Shape(rate_mbit, delay_ms, loss_pct))
        group = lambda x: [self.host(y).index for y in (x if isinstance(x, (list, tuple, range, set)) else [x])]
        for i in group(a):
            for j in group(b):
                if i != j:
                    self.st.links[f"{min(i, j)}-{max(i, j)}"] = shape
        self.st.links = {k: v for k, v in self.st.links.items() if v}
        for i in sorted(set(group(a)) | set(group(b))):  # the others' queues are left alone
            self._shape(self.st.hosts[i])
        self.st.save()

    def port(self, h, rate_mbit: float | None = None, delay_ms: float = 0.0, loss_pct: float = 0.0):
        """Shape host ``h``'s own link to the switch (all it sends and all it receives: a slow
        NIC or cable); all defaults = unshaped."""
        h = self.host(h)
        self.st.ports[str(h.index)] = self._checked(Shape(rate_mbit, delay_ms, loss_pct))
        self.st.ports = {k: v for k, v in self.st.ports.items() if v}
        self._shape(h)
        self.st.save()

    @property
    def can_delay(self) -> bool:
        """Whether this kernel has netem (delay and loss); bandwidth needs only HTB."""
        if not hasattr(Testbed, "_netem"):
            probe = subprocess.run(["tc", "-n", self.switch, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
                                   capture_output=True)
            Testbed._netem = probe.returncode == 0
            _run("tc", "-n", self.switch, "qdisc", "del", "dev", "lo", "root", check=False)
        return Testbed._netem

    def _checked(self, s: Shape) -> Shape:
        if (s.rate_mbit is not None and s.rate_mbit <= 0) or s.delay_ms < 0 or not 0 <= s.loss_pct <= 100:
            raise ValueError(f"{s}: rate_mbit must be > 0 (or None), delay_ms >= 0, loss_pct in [0, 100]")
        if (s.delay_ms or s.loss_pct) and not self.can_delay:
            raise Unavailable("this kernel has no netem (CONFIG_NET_SCH_NETEM): link delay and loss are "
                              "unavailable here; bandwidth shaping (rate_mbit) works")
        return s

    def _shape_all(self):
        for h in self.st.hosts:
            self._shape(h)

    def _shape(self, h: Host):
        """Rebuild host ``h``'s qdiscs from the tables. Its egress (in its namespace): an HTB
        class per shaped destination, capped by its port's rate, netem under each class for
        the port's and the link's delay and loss. Its ingress (the switch port's egress): its
        port's shape again, so that a port's delay counts each way, like a link's."""
        own = self.st.ports.get(str(h.index), Shape())
        dests = [(other, self.st.links.get(f"{min(h.index, other.index)}-{max(h.index, other.index)}"))
                 for other in self.st.hosts if other.index != h.index]
        dests = [(other, pair) for other, pair in dests if pair]
        _run("tc", "-n", h.ns, "qdisc", "del", "dev", IFACE, "root", check=False)
        if own or dests:
            top = own.rate_mbit or UNLIMITED_MBIT
            # Unclassified traffic (other hosts, ARP) goes through 1:2 under the port's cap, or
            # straight out (default 0) when the port is unshaped.
            _htb(h.ns, IFACE, top, default=2 if own else 0)
            if own:
                _leaf(h.ns, IFACE, 2, top, top / (len(dests) + 1), own.delay_ms, own.loss_pct)
            for other, pair in dests:
                ceil = min(pair.rate_mbit or UNLIMITED_MBIT, top)
                # A child's guaranteed rate is a share of the port's, so together they honour its cap.
                _leaf(h.ns, IFACE, 16 + other.index, ceil, min(ceil, top / (len(dests) + 1)),
                      own.delay_ms + pair.delay_ms, 100 - (100 - own.loss_pct) * (100 - pair.loss_pct) / 100)
                _run("tc", "-n", h.ns, "filter", "add", "dev", IFACE, "parent", "1:", "protocol", "ip", "prio", "1",
                     "u32", "match", "ip", "dst", f"{other.addr}/32", "flowid", f"1:{16 + other.index:x}")
        port = f"p{h.index}"
        _run("tc", "-n", self.switch, "qdisc", "del", "dev", port, "root", check=False)
        if own:
            top = own.rate_mbit or UNLIMITED_MBIT
            _htb(self.switch, port, top, default=2)
            _leaf(self.switch, port, 2, top, top, own.delay_ms, own.loss_pct)  # and its way in

    # ----------------------------------------------------------------------------- measuring

    def _exchange(self, a, b, server: str, client: str, arg: str, check: bool = True) -> str:
        """Run probe ``server`` on host ``b`` (none if it is down: then port 9 gets no answer)
        and probe ``client`` on host ``a`` against it by name; the server's output if it
        prints a result, else the client's."""
        port, srv = 9, None
        if self.host(b).alive:
            srv = self.popen(b, [sys.executable, str(HERE), server], stdout=subprocess.PIPE, text=True)
            port = int(srv.stdout.readline().split()[1])  # "ready PORT"
        try:
            out = self.run(a, [sys.executable, str(HERE), client, self.host(b).name, str(port), arg], check=check).stdout
            return srv.communicate(timeout=600)[0] if server == "_sink" else out
        finally:
            if srv and srv.poll() is None:
                srv.kill()
            if srv:
                srv.wait()

    def measure(self, a, b, mbytes: float = 8.0) -> float:
        """MB/s (1e6 bytes) of one TCP stream of ``mbytes`` from host ``a`` to host ``b`` by name,
        timed at the receiver from the first byte to the last."""
        got = json.loads(self._exchange(a, b, "_sink", "_send", str(int(mbytes * 1e6))))
        return got["bytes"] / got["seconds"] / 1e6

    def rtt(self, a, b, count: int = 5) -> float:
        """Median seconds of a 1-byte TCP round trip from host ``a`` to host ``b`` by name."""
        times = sorted(json.loads(self._exchange(a, b, "_echo", "_ping", str(count))))
        return times[len(times) // 2]

    def connect(self, a, b, timeout: float = 1.0) -> str:
        """Open a TCP connection from host ``a`` to a listener on host ``b`` (by name): "ok",
        or the error's name ("TimeoutError": silence, as from a lost or partitioned host;
        "ConnectionRefusedError": a host that is up answered)."""
        return self._exchange(a, b, "_echo", "_connect", str(timeout), check=False).strip()

    def reachable(self, a, b, timeout: float = 1.0) -> bool:
        return self.connect(a, b, timeout) == "ok"

    # ------------------------------------------------------------------------------ teardown

    def down(self):
        """Remove everything this testbed made: processes, namespaces (with their veths and
        bridge), cgroups, per-host memory, the registry entry; its root if it made it."""
        st = getattr(self, "st", None)
        if st is None or not State.path(st.id).exists() and not _leftovers(st.id):
            return
        for ps in self.procs.values():
            for p in ps:
                if p.poll() is None:
                    p.kill()
        _destroy(st.id, st)
        for ps in self.procs.values():
            for p in ps:
                p.wait()
        self.procs.clear()
        if self in _OWNED:
            _OWNED.remove(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.down()


def _htb(ns: str, dev: str, rate_mbit: float, default: int):
    _run("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", f"{default:x}")
    _run("tc", "-n", ns, "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb", *_rates(rate_mbit, rate_mbit))


def _rates(rate_mbit: float, ceil_mbit: float) -> list[str]:
    # Bursts of a timer tick's worth (1 ms) plus a GSO packet: tc's default (rate/HZ, a few
    # hundred bytes at Gbit rates) holds a link well under its rate.
    burst = lambda mbit: f"{int(mbit * 1e6 / 8 / 1000) + 65536}b"
    return ["rate", f"{rate_mbit}mbit", "ceil", f"{ceil_mbit}mbit", "burst", burst(rate_mbit), "cburst", burst(ceil_mbit),
            "quantum", str(QUANTUM)]


def _leaf(ns: str, dev: str, minor: int, ceil_mbit: float, rate_mbit: float, delay_ms: float, loss_pct: float):
    _run("tc", "-n", ns, "class", "add", "dev", dev, "parent", "1:1", "classid", f"1:{minor:x}", "htb",
         *_rates(rate_mbit, ceil_mbit))
    if delay_ms or loss_pct:
        _run("tc", "-n", ns, "qdisc", "add", "dev", dev, "parent", f"1:{minor:x}", "handle", f"{minor:x}:", "netem",
             "delay", f"{delay_ms}ms", "loss", f"{loss_pct}%", "limit", "100000")


# ---------------------------------------------------------------------- allocation, cleanup

_OWNED: list[Testbed] = []


def _allocate(root, owner: bool) -> State:
    """Claim a free /24 of 10.213.0.0/16 and its id: the registry file is created exclusively
    before anything else, so that concurrent testbeds never share a block and every later
    resource has a record."""
    used = set(re.findall(rf"inet {re.escape(NET)}\.(\d+)\.", _run("ip", "-4", "-o", "addr")))
    for block in random.sample(range(256), 256):
        tid = f"{PREFIX}{block:03d}"
        if str(block) in used:
            continue
        try:
            os.close(os.open(State.path(tid), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            continue
        if _leftovers(tid, record=False):  # of a testbed whose owner died before removing them
            _destroy(tid, None, keep_registry=True)
        own_root = root is None
        root = Path(root) if root is not None else Path(f"/tmp/kintsugi-testbed-{tid}")
        root.mkdir(parents=True, exist_ok=True)
        pid = os.getpid() if owner else None
        st = State(tid, str(root.resolve()), own_root, pid, _start_time(pid) if pid else None)
        st.save()
        return st
    raise Unavailable(f"every /24 of {NET}.0.0/16 is taken by running testbeds")


def _netns() -> list[str]:
    return [line.split()[0] for line in _run("ip", "netns", "list", check=False).splitlines() if line.strip()]


def _leftovers(tid: str, record: bool = True) -> list[str]:
    """Everything named after testbed ``tid`` that still exists (``record``: its registry file too)."""
    found = [n for n in _netns() if n.startswith(f"{tid}-")]
    found += [str(p) for r in _cgroup_roots() for p in r.glob(f"{tid}-*")]
    found += [str(p) for p in (SHM / tid, *([State.path(tid)] if record else [])) if p.exists()]
    return found


def _kill_cgroups(cgs: list[Path], ns: str | None):
    """SIGKILL every process in the cgroups (and in the namespace, if any got in by other means)
    and wait until none is left."""
    for _ in range(200):
        pids = set()
        for cg in cgs:
            if (cg / "cgroup.procs").exists():
                pids |= {int(p) for p in (cg / "cgroup.procs").read_text().split()}
        if ns and ns in _netns():
            pids |= {int(p) for p in _run("ip", "netns", "pids", ns, check=False).split()}
        if not pids:
            return
        if (cgs[0] / "cgroup.kill").exists():
            (cgs[0] / "cgroup.kill").write_text("1")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    raise RuntimeError(f"processes of {ns} survive SIGKILL: {sorted(pids)}")


def _rmdir_cgroup(cg: Path):
    for _ in range(100):  # a killed task leaves its cgroup a moment after it is gone
        try:
            cg.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)
    cg.rmdir()


def _destroy(tid: str, st: State | None, keep_registry: bool = False):
    """Remove everything named after testbed ``tid``: hosts silenced first (switch down), then
    their processes killed, namespaces (veths, bridge go with them) and cgroups removed."""
    if st and st.watchdog and st.owner == os.getpid():
        try:
            os.kill(st.watchdog, signal.SIGTERM)
        except ProcessLookupError:
            pass
    spaces = [n for n in _netns() if n.startswith(f"{tid}-")]
    if f"{tid}-sw" in spaces:
        _run("ip", "netns", "del", f"{tid}-sw")
    roots = _cgroup_roots()
    for ns in sorted({n for n in spaces if n != f"{tid}-sw"} | {p.name for r in roots for p in r.glob(f"{tid}-*")}):
        cgs = [r / ns for r in roots]
        _kill_cgroups(cgs, ns if ns in spaces else None)
        if ns in spaces:
            _run("ip", "netns", "del", ns)
        for cg in cgs:
            if cg.exists():
                _rmdir_cgroup(cg)
    shutil.rmtree(SHM / tid, ignore_errors=True)
    if st and st.own_root:
        shutil.rmtree(st.root, ignore_errors=True)
    if not keep_registry:
        State.path(tid).unlink(missing_ok=True)


def testbeds() -> list[str]:
    """Ids of every testbed on this machine (recorded, or leftovers without a record)."""
    ids = {m[1] for p in REGISTRY.glob("kintsugi-testbed-*.json") if (m := ID.match(p.name[len("kintsugi-testbed-"):]))}
    names = _netns() + [p.name for r in _cgroup_roots() for p in r.glob(f"{PREFIX}*")] + [p.name for p in SHM.glob(f"{PREFIX}*")]
    return sorted(ids | {m[1] for n in names if (m := ID.match(n))})


def reap() -> list[str]:
    """Remove testbeds whose owner process is gone and leftovers nobody records; return their
    ids. Testbeds of live processes and those made by ``cluster.py up`` stay."""
    gone = []
    for tid in testbeds():
        try:
            st = State.load(tid)
        except FileNotFoundError:
            st = None
        except (OSError, ValueError, TypeError):
            continue  # being written by its maker this very moment
        if st is None or _owner_gone(st):
            _destroy(tid, st)
            gone.append(tid)
    return gone


def _down_owned():
    for tb in list(_OWNED):
        tb.down()


atexit.register(_down_owned)


def _install_handlers():
    """SIGTERM/SIGHUP tear down this process's testbeds, then act as they would have."""
    def handler(signum, frame):
        _down_owned()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            if signal.getsignal(sig) is signal.SIG_DFL:
                signal.signal(sig, handler)
        except ValueError:  # not the main thread: atexit and the watchdog still apply
            pass


def _watch(tid: str, owner: int):
    """The watchdog: when the owner dies without tearing down (SIGKILL), tear down for it."""
    try:
        fd = os.pidfd_open(owner)
    except ProcessLookupError:
        fd = None
    while fd is not None and State.path(tid).exists():
        if select.select([fd], [], [], 1.0)[0]:
            break
    if State.path(tid).exists():
        _destroy(tid, State.load(tid))


# ------------------------------------------------------------------- probes run on the hosts

def _sink():
    srv = socket.create_server(("", 0))
    print("ready", srv.getsockname()[1], flush=True)
    conn, _ = srv.accept()
    n, t0 = 0, None
    while chunk := conn.recv(1 << 20):
        t0 = t0 or time.perf_counter()
        n += len(chunk)
    print(json.dumps({"bytes": n, "seconds": time.perf_counter() - t0}), flush=True)


def _send(host: str, port: int, nbytes: int):
    conn = socket.create_connection((host, port), timeout=60)
    block = b"\0" * (1 << 20)
    for left in range(nbytes, 0, -len(block)):
        conn.sendall(block[:left])
    conn.shutdown(socket.SHUT_WR)
    conn.recv(1)  # the sink closes once it has counted every byte


def _echo():
    srv = socket.create_server(("", 0))
    print("ready", srv.getsockname()[1], flush=True)
    while True:
        conn, _ = srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := conn.recv(4096):
            conn.sendall(data)


def _ping(host: str, port: int, count: int):
    conn = socket.create_connection((host, port), timeout=60)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        conn.sendall(b"x")
        conn.recv(1)
        times.append(time.perf_counter() - t0)
    print(json.dumps(times))


def _connect(host: str, port: int, timeout: float):
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        print("ok")
    except OSError as e:
        print(type(e).__name__)


# ------------------------------------------------------------------------------------- CLI

def _describe(tb: Testbed) -> str:
    st = tb.st
    owner = f"owner pid {st.owner}" + (" (gone)" if _owner_gone(st) else "") if st.owner else "made by `up`"
    lines = [f"{st.id}  {NET}.{int(st.id[len(PREFIX):])}.0/24  {owner}  root {st.root}",
             f"  shared (L2) {tb.shared}   node-local (L1) inside hosts: {tb.local}"]
    for h in st.hosts:
        state = "up" if h.alive else "down (killed)"
        state += ", partitioned" if h.partitioned else ""
        state += f", cpu {h.cpu} core(s)" if h.cpu else ""
        lines.append(f"  {h.index}: {h.name:<10} {h.addr:<15} {state}; {len(tb.pids(h))} process(es); netns {h.ns}")
    lines += [f"  link {k}: {asdict(v)}" for k, v in st.links.items()]
    lines += [f"  port {k}: {asdict(v)}" for k, v in st.ports.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python tests/cluster.py", description="Emulated cluster for drills (docs/testbed.md).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("up", help="make a testbed that stays until `down ID`")
    p.add_argument("--hosts", type=int, default=2)
    p.add_argument("--root", default=None, help="its directory (default /tmp/kintsugi-testbed-ID, removed by down)")
    sub.add_parser("status", help="every testbed on this machine").add_argument("id", nargs="*")
    p = sub.add_parser("down", help="remove testbeds: the IDs given, or (none given) those whose owner is gone")
    p.add_argument("id", nargs="*")
    p.add_argument("--all", action="store_true", help="every testbed, also live ones of other processes")
    for name, help_ in (("kill", "lose a host whole"), ("replace", "a fresh host in a lost one's place"),
                        ("partition", "drop a host's traffic"), ("heal", "undo partition")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("id")
        p.add_argument("host")
    p = sub.add_parser("run", help="run a command on a host (foreground): run ID HOST -- CMD ...")
    p.add_argument("id")
    p.add_argument("host")
    p.add_argument("argv", nargs=argparse.REMAINDER)
    p = sub.add_parser("launch", help="`kintsugi launch ARGS` on a host in the background: launch ID HOST -- ARGS")
    p.add_argument("id")
    p.add_argument("host")
    p.add_argument("argv", nargs=argparse.REMAINDER)
    for name, help_ in (("link", "shape the links between hosts A and hosts B (comma lists)"), ("port", "shape a host's own port")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("id")
        p.add_argument("a")
        if name == "link":
            p.add_argument("b")
        p.add_argument("--rate-mbit", type=float, default=None)
        p.add_argument("--delay-ms", type=float, default=0.0)
        p.add_argument("--loss-pct", type=float, default=0.0)
    p = sub.add_parser("cpu", help="limit a host to CORES CPUs (`none` = no limit)")
    p.add_argument("id")
    p.add_argument("host")
    p.add_argument("cores")
    for name in ("measure", "rtt"):
        p = sub.add_parser(name, help="MB/s of a TCP stream A -> B" if name == "measure" else "median TCP round trip A -> B")
        p.add_argument("id")
        p.add_argument("a")
        p.add_argument("b")
        p.add_argument("--mb", type=float, default=8.0)
    for name in ("_watch", "_sink", "_echo", "_send", "_ping", "_connect"):
        sub.add_parser(name).add_argument("args", nargs="*")
    a = ap.parse_args(argv)
    internal = {"_watch": lambda t, o: _watch(t, int(o)), "_sink": _sink, "_echo": _echo,
                "_send": lambda h, p, n: _send(h, int(p), int(n)), "_ping": lambda h, p, c: _ping(h, int(p), int(c)),
                "_connect": lambda h, p, t: _connect(h, int(p), float(t))}
    if a.cmd in internal:
        internal[a.cmd](*a.args)
        return 0
    if a.cmd == "up":
        tb = Testbed(a.hosts, a.root, owner=False)
        print(_describe(tb))
        print(f"rendezvous: --rdzv-endpoint {tb.rdzv_endpoint()}; remove with: python tests/cluster.py down {tb.id}")
        return 0
    if a.cmd == "status":
        for tid in a.id or testbeds():
            print(_describe(Testbed.attach(tid)) if State.path(tid).exists() else f"{tid}: leftovers without a record")
        return 0
    if a.cmd == "down":
        gone = a.id or (testbeds() if a.all else [])
        for tid in gone:
            _destroy(tid, State.load(tid) if State.path(tid).exists() else None)
        gone = gone or reap()
        print(f"removed: {', '.join(gone) or 'nothing'}")
        return 0
    tb = Testbed.attach(a.id)
    if a.cmd == "run":
        argv = a.argv[1:] if a.argv[:1] == ["--"] else a.argv
        return tb.popen(a.host, argv, stdin=None, start_new_session=False).wait()
    if a.cmd == "launch":
        p = tb.launch(a.host, *(a.argv[1:] if a.argv[:1] == ["--"] else a.argv))
        print(f"pid {p.pid} on {tb.host(a.host).name}; output: {tb.log(a.host)}")
        return 0
    hosts = lambda s: [tb.host(x).index for x in s.split(",")]
    actions = {"kill": lambda: tb.kill(a.host), "replace": lambda: tb.replace(a.host),
               "partition": lambda: tb.partition(a.host), "heal": lambda: tb.heal(a.host),
               "link": lambda: tb.link(hosts(a.a), hosts(a.b), a.rate_mbit, a.delay_ms, a.loss_pct),
               "port": lambda: tb.port(a.a, a.rate_mbit, a.delay_ms, a.loss_pct),
               "cpu": lambda: tb.slow_cpu(a.host, None if a.cores == "none" else float(a.cores)),
               "measure": lambda: print(f"{tb.measure(a.a, a.b, a.mb):.1f} MB/s (measured)"),
               "rtt": lambda: print(f"{tb.rtt(a.a, a.b) * 1e3:.3f} ms (measured, median of 5)")}
    actions[a.cmd]()
    if a.cmd not in ("measure", "rtt"):
        print(_describe(tb))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (Unavailable, KeyError) as e:
        print(f"cluster.py: {e.args[0] if e.args else e}", file=sys.stderr)
        sys.exit(2)
