"""IPv4/IPv6 + UDP packets as an ``AF_PACKET``/``SOCK_DGRAM`` socket hands them over.

For feeding the relay worker synthetic batches (unit tests, the hot-path
benchmark) without a network. Checksums are left zero: nothing on that path
reads them.
"""

from __future__ import annotations

import socket
import struct


def ipv4_udp(src: str, dst: str, dport: int, payload: bytes, frag: int = 0) -> bytes:
    """An IPv4 header (IHL 5, TTL 1, id 0), a UDP header from port 999, then ``payload``."""
    hdr = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        28 + len(payload),
        0,
        frag,
        1,
        17,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    return hdr + struct.pack("!HHHH", 999, dport, 8 + len(payload), 0) + payload


def ipv6_udp(dst: str, dport: int, payload: bytes, src: str = "2001:db8::2") -> bytes:
    """An IPv6 header (hop limit 1), a UDP header from port 999, then ``payload``."""
    hdr = struct.pack("!IHBB", 6 << 28, 8 + len(payload), 17, 1)
    hdr += socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
    return hdr + struct.pack("!HHHH", 999, dport, 8 + len(payload), 0) + payload
