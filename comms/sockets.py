"""Which of this process's TCP connections the network has stopped carrying, and whether
this host's own network interface lost its link.

When traffic to a host is dropped (a partitioned host, a dead NIC or switch port), every
collective that needs it hangs with every member inside it: the collective trace says only
"the group". The kernel knows more: a connection whose data the peer has not acknowledged
and whose retransmission timer has expired repeatedly is one the network is not carrying
(per-connection evidence, as C4D uses). A peer that is merely slow to read (a stopped or
busy process) still has its kernel acknowledge what arrives, and a slow link delivers
late but delivers, so neither looks like this.

Read from ``/proc/self/net/tcp{,6}`` (this process's network namespace) for the sockets
this process holds (``/proc/self/fd``): gloo's and NCCL's socket transport connections, the
c10d store. A connection carries evidence only while it has data in flight (gloo sends a
payload once the receiver has asked for it), so a host cut off mid-step may leave stalled
connections with only some of its peers; its own interface having no carrier (a pulled
cable, a switch port turned off) says it whole. Linux only; elsewhere it finds nothing.
"""
from __future__ import annotations

import ipaddress
import os
import sys
import socket
from pathlib import Path

ESTABLISHED = "01"
# Expired retransmission timeouts without an acknowledgement: with the 200 ms minimum RTO
# and its doubling, 2 means at least 0.6 s of silence from the peer.
MIN_RETRANSMITS = 2


def stalled(min_retransmits: int = MIN_RETRANSMITS) -> dict[str, dict]:
    """Peer address -> {"unacked": bytes, "retransmits": n, "connections": n} for this
    process's established TCP connections with unacknowledged data and at least
    ``min_retransmits`` expired retransmission timeouts."""
    inodes = _socket_inodes()
    out: dict[str, dict] = {}
    if not inodes:
        return out
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/self/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) < 10 or f[3] != ESTABLISHED or f[9] not in inodes:
                continue
            unacked, retransmits = int(f[4].split(":")[0], 16), int(f[6], 16)
            if unacked and retransmits >= min_retransmits:
                peer = _address(f[2].split(":")[0])
                s = out.setdefault(peer, {"unacked": 0, "retransmits": 0, "connections": 0})
                s["unacked"] += unacked
                s["retransmits"] = max(s["retransmits"], retransmits)
                s["connections"] += 1
    return out


def nics_down() -> dict[str, str]:
    """This host's network interfaces that hold an address but have lost their link (no
    carrier: a pulled cable, a switch port turned off): name -> operstate."""
    out = {}
    try:
        import psutil

        with_addr = {name for name, addrs in psutil.net_if_addrs().items()
                     if any(a.family in (socket.AF_INET, socket.AF_INET6) for a in addrs)}
    except (ImportError, OSError):
        return out
    for name in sorted(with_addr - {"lo"}):
        d = Path("/sys/class/net") / name
        try:
            state = (d / "operstate").read_text().strip()
            carrier = (d / "carrier").read_text().strip()
        except OSError:  # carrier is unreadable while the interface is administratively down
            state, carrier = (d / "operstate").read_text().strip() if (d / "operstate").exists() else "", "0"
        if carrier == "0" or state in ("down", "lowerlayerdown"):
            out[name] = state or "down"
    return out


def local_addresses() -> list[str]:
    """This host's own non-loopback addresses (as peers see them in their connections)."""
    try:
        import psutil

        addrs = {a.address.split("%")[0] for nics in psutil.net_if_addrs().values() for a in nics
                 if a.family in (socket.AF_INET, socket.AF_INET6)}
    except (ImportError, OSError):
        return []
    return sorted(a for a in addrs if not ipaddress.ip_address(a).is_loopback and not ipaddress.ip_address(a).is_link_local)


def _socket_inodes() -> set[str]:
    out = set()
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[8:-1])
    return out


def _address(hexaddr: str) -> str:
    """The kernel's hex form of an address (32-bit words in host order) as text; IPv4-mapped
    IPv6 addresses as plain IPv4."""
    raw = bytes.fromhex(hexaddr)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)) if sys.byteorder == "little" else raw
    ip = ipaddress.ip_address(words)
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return str(ip)
