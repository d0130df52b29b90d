"""Which TCP ports a process tree listens on, read from /proc (Linux), like `ss -ltnp`.

Used by the security tests to prove what Ray binds to. No psutil: /proc/net/tcp{,6} lists every
listening socket with its inode, and /proc/<pid>/fd links sockets to processes.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass

_LISTEN = "0A"  # TCP state code of a listening socket in /proc/net/tcp


@dataclass(frozen=True)
class Listener:
    pid: int
    process: str
    ip: str
    port: int

    @property
    def loopback(self) -> bool:
        """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback (::ffff:127.0.0.1)."""
        address = ipaddress.ip_address(self.ip)
        mapped = getattr(address, "ipv4_mapped", None)
        return (mapped or address).is_loopback


def _decode(hex_address: str, ipv6: bool) -> tuple[str, int]:
    ip_hex, port_hex = hex_address.split(":")
    raw = bytes.fromhex(ip_hex)
    if ipv6:  # four little-endian 32-bit words
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
        return socket.inet_ntop(socket.AF_INET6, raw), int(port_hex, 16)
    return socket.inet_ntoa(raw[::-1]), int(port_hex, 16)


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (children of children included)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        parent = int(stat[stat.rfind(")") + 2 :].split()[1])
        children.setdefault(parent, []).append(int(entry))
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, []))
    return tree


def _process_name(pid: int) -> str:
    """The executable's file name, then the command line (cut to 80 characters).

    The executable comes first because command lines are long and cut: under a deep install path,
    ".../ray/core/src/ray/gcs/gcs_server ..." loses its last word (seen in CI).
    """
    try:
        executable = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        executable = "?"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:80]
    except OSError:
        command = "?"
    return f"{executable}: {command}"


def listeners(pids: list[int]) -> list[Listener]:
    """Every listening TCP socket (IPv4 and IPv6) owned by one of `pids`, sorted by port."""
    owner: dict[str, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                owner[target[8:-1]] = pid
    found = []
    for table, ipv6 in (("tcp", False), ("tcp6", True)):
        with open(f"/proc/net/{table}") as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == _LISTEN and fields[9] in owner:
                    ip, port = _decode(fields[1], ipv6)
                    pid = owner[fields[9]]
                    found.append(Listener(pid, _process_name(pid), ip, port))
    return sorted(found, key=lambda item: item.port)
