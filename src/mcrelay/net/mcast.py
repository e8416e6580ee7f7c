"""Group membership socket options (MCAST_JOIN_GROUP and friends), for any socket.

Used by the supervisor's membership sockets and by socket-mode relay inputs.
Constants from ``linux/in.h``; ``struct group_req`` and
``struct group_source_req`` from ``linux/in.h`` as well.
"""

from __future__ import annotations

import socket
import struct

MCAST_JOIN_GROUP = 42
MCAST_LEAVE_GROUP = 45
MCAST_JOIN_SOURCE_GROUP = 46
MCAST_LEAVE_SOURCE_GROUP = 47


def group_req(family: int, ifindex: int, group: str, source: str | None) -> bytes:
    """struct group_req / group_source_req: u32 index, then sockaddr_storage(s) (128 bytes)."""

    def storage(addr: str) -> bytes:
        if family == 4:
            sa = struct.pack("=H", socket.AF_INET) + bytes(2) + socket.inet_aton(addr)
        else:
            sa = struct.pack("=H", socket.AF_INET6) + bytes(6)
            sa += socket.inet_pton(socket.AF_INET6, addr) + bytes(4)
        return sa + bytes(128 - len(sa))

    # sockaddr_storage is 8-byte aligned, so 4 bytes of padding follow the index.
    head = struct.pack("=I", ifindex) + bytes(4)
    return head + storage(group) + (storage(source) if source else b"")


def join(
    sock: socket.socket, family: int, ifindex: int, group: str, source: str | None = None
) -> None:
    """Join ``group`` (from ``source`` when given) on ``ifindex`` with MCAST_JOIN_*."""
    level = socket.IPPROTO_IP if family == 4 else socket.IPPROTO_IPV6
    opt = MCAST_JOIN_SOURCE_GROUP if source else MCAST_JOIN_GROUP
    sock.setsockopt(level, opt, group_req(family, ifindex, group, source))


def leave(
    sock: socket.socket, family: int, ifindex: int, group: str, source: str | None = None
) -> None:
    """Undo :func:`join`."""
    level = socket.IPPROTO_IP if family == 4 else socket.IPPROTO_IPV6
    opt = MCAST_LEAVE_SOURCE_GROUP if source else MCAST_LEAVE_GROUP
    sock.setsockopt(level, opt, group_req(family, ifindex, group, source))
