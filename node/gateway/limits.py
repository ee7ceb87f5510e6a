"""What one client may hold of the node's port: connection caps and the write-stall probe.

The HTTP server (node/gateway/httpd.py) asks `Admission` whether a new connection may
stay, and `delivery` how far a client has read what was sent to it: the kernel's count
of bytes the client acknowledged (TCP_INFO) only advances while the client reads, so
output pending with that count standing still is a client that stopped reading.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
from dataclasses import dataclass

_TCP_INFO_LEN = 128
_BYTES_ACKED = slice(120, 128)     # struct tcp_info's tcpi_bytes_acked (Linux >= 4.1)


@dataclass(frozen=True, slots=True)
class Limits:
    """The `[node]` limits the server enforces (defaults as documented in docs/security.md)."""

    max_body_bytes: int = 4 * 1024 * 1024
    request_timeout_s: float = 30.0
    keep_alive_s: float = 75.0
    write_stall_s: float = 60.0
    max_connections: int = 4096
    max_connections_per_ip: int = 256


class Admission:
    """Counts open connections, in all and per client address."""

    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self.max_total, self.max_per_ip = max_total, max_per_ip
        self.total = 0
        self.per_ip: dict[str, int] = {}
        self.refused = 0

    def enter(self, ip: str) -> bool:
        """Count a new connection in; False (and nothing counted) when it is over a cap."""
        held = self.per_ip.get(ip, 0)
        if self.total >= self.max_total or held >= self.max_per_ip:
            self.refused += 1
            return False
        self.total += 1
        self.per_ip[ip] = held + 1
        return True

    def leave(self, ip: str) -> None:
        self.total -= 1
        held = self.per_ip.get(ip, 1) - 1
        if held:
            self.per_ip[ip] = held
        else:
            self.per_ip.pop(ip, None)


def delivery(sock: socket.socket | None) -> tuple[int, int] | None:
    """(bytes the peer acknowledged, bytes still in the kernel's send queue); None off TCP/Linux."""
    if sock is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
        outq = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except (OSError, AttributeError, ValueError):
        return None
    if len(info) < _BYTES_ACKED.stop:
        return None
    return int.from_bytes(info[_BYTES_ACKED], "little"), outq
