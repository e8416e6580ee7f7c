"""Egress UDP sockets, one per (family, oif, ttl, dscp), and prebuilt destination sockaddrs.

Workers open these themselves after dropping privileges: choosing the outgoing
interface by index (``IP_MULTICAST_IF`` with ``struct ip_mreqn``,
``IPV6_MULTICAST_IF``, ``IP_UNICAST_IF``) needs no capability, unlike
``SO_BINDTODEVICE``.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from typing import NamedTuple

# linux/in.h, linux/in6.h
IP_TOS = 1
IP_TTL = 2
IP_MULTICAST_IF = 32
IP_MULTICAST_TTL = 33
IP_MULTICAST_LOOP = 34
IP_UNICAST_IF = 50
IPV6_UNICAST_HOPS = 16
IPV6_MULTICAST_IF = 17
IPV6_MULTICAST_HOPS = 18
IPV6_MULTICAST_LOOP = 19
IPV6_TCLASS = 67
IPV6_UNICAST_IF = 76

SNDBUF = 4 * 1024 * 1024


class EgressKey(NamedTuple):
    """What distinguishes two egress sockets; ifindex 0 = unicast by routing table."""

    family: int
    ifindex: int
    ttl: int
    dscp: int


def open_egress(key: EgressKey) -> socket.socket:
    """A non-blocking UDP socket that sends with the key's interface, TTL and DSCP."""
    fam = socket.AF_INET if key.family == 4 else socket.AF_INET6
    s = socket.socket(fam, socket.SOCK_DGRAM)
    try:
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
        tos = key.dscp << 2
        if key.family == 4:
            # Outputs to 255.255.255.255 or a directed broadcast: refused (EACCES) without.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            s.setsockopt(socket.IPPROTO_IP, IP_TOS, tos)
            s.setsockopt(socket.IPPROTO_IP, IP_TTL, key.ttl)
            s.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_TTL, key.ttl)
            s.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_LOOP, 0)
            if key.ifindex > 0:
                # struct ip_mreqn { in_addr multiaddr; in_addr address; int ifindex; }
                mreqn = struct.pack("=4s4si", bytes(4), bytes(4), key.ifindex)
                s.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_IF, mreqn)
                # IP_UNICAST_IF takes the index in network byte order (kernel quirk).
                s.setsockopt(socket.IPPROTO_IP, IP_UNICAST_IF, socket.htonl(key.ifindex))
        else:
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_TCLASS, tos)
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_UNICAST_HOPS, key.ttl)
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_MULTICAST_HOPS, key.ttl)
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_MULTICAST_LOOP, 0)
            if key.ifindex > 0:
                s.setsockopt(socket.IPPROTO_IPV6, IPV6_MULTICAST_IF, key.ifindex)
                s.setsockopt(socket.IPPROTO_IPV6, IPV6_UNICAST_IF, socket.htonl(key.ifindex))
    except BaseException:
        s.close()
        raise
    return s


class Dest:
    """A destination sockaddr kept in C memory, so messages can point at it."""

    def __init__(self, family: int, address: str, port: int, ifindex: int) -> None:
        if family == 4:
            # struct sockaddr_in { sa_family_t; in_port_t (be); struct in_addr; zero[8] }
            raw = struct.pack("=H", socket.AF_INET) + struct.pack("!H", port)
            raw += socket.inet_pton(socket.AF_INET, address) + bytes(8)
            self.pyaddr: tuple[str, int] | tuple[str, int, int, int] = (address, port)
        else:
            # struct sockaddr_in6 { family; port (be); flowinfo (be32); in6_addr; scope_id }
            scope = ifindex if ifindex > 0 and address.lower().startswith("ff") else 0
            raw = struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", port, 0)
            raw += socket.inet_pton(socket.AF_INET6, address) + struct.pack("=I", scope)
            self.pyaddr = (address, port, 0, scope)
        self.buf = ctypes.create_string_buffer(raw, len(raw))
        self.addr = ctypes.addressof(self.buf)
        self.len = len(raw)
