"""Sending UDP with a source address of our choosing: raw IP sockets and the headers on them.

A reflector that keeps the sender's address must write the IP header itself,
which only a raw socket allows, and opening one needs CAP_NET_RAW. So the
supervisor opens one ``IPPROTO_RAW`` socket per family (:func:`open_raw`) and
passes it to the workers, which fill in headers (:func:`udp4_header`,
:func:`udp6_header`) and send (:func:`send_raw`) without any privilege: the
capability is checked when a socket is created, not when it is used.

Layouts: RFC 791 (IPv4 header), RFC 8200 (IPv6 header), RFC 768 (UDP header and
its pseudo-header checksum; for IPv6, RFC 8200 section 8.1). Option numbers from
``linux/in.h`` and ``linux/in6.h``.
"""

from __future__ import annotations

import socket
import struct

IPPROTO_UDP = 17
IP_MULTICAST_LOOP = 34
IPV6_MULTICAST_LOOP = 19
IP_PKTINFO = 8
IPV6_PKTINFO = 50
SNDBUF = 1024 * 1024

# version/IHL, TOS, total length, id, flags/fragment, TTL, protocol, checksum, src, dst
_IP4 = struct.Struct("!BBHHHBBH4s4s")
# version/class/flow, payload length, next header, hop limit, src, dst
_IP6 = struct.Struct("!IHBB16s16s")
_UDP = struct.Struct("!HHHH")


def open_raw(family: int) -> socket.socket:
    """A non-blocking raw socket that sends whole IP packets (header included).

    For ``IPPROTO_RAW`` the kernel implies ``IP_HDRINCL`` (IPv4) and
    ``IPV6_HDRINCL`` (IPv6). Such a socket never receives anything. Multicast
    loopback is off, like on the UDP egress sockets; broadcast is allowed.
    """
    fam = socket.AF_INET if family == 4 else socket.AF_INET6
    s = socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
        if family == 4:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            s.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_LOOP, 0)
        else:
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_MULTICAST_LOOP, 0)
    except BaseException:
        s.close()
        raise
    return s


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``, as it goes into a header.

    The ones' complement sum of 16-bit words is the value of the whole buffer
    as one big number modulo 0xFFFF (2**16 = 1 modulo 0xFFFF), which Python's
    integers compute in C; a sum that is a multiple of 0xFFFF is 0xFFFF here,
    since nothing we sum is all zero.
    """
    if len(data) & 1:
        data += b"\0"
    rest = int.from_bytes(data, "big") % 0xFFFF
    total = rest or 0xFFFF
    return 0xFFFF - total


def _udp_checksum(pseudo: bytes, udp: bytes, payload: bytes) -> int:
    c = checksum(pseudo + udp + payload)
    return c or 0xFFFF  # a computed 0 is sent as 0xFFFF (0 means "none" in IPv4)


def udp4_header(
    src: bytes, dst: bytes, sport: int, dport: int, ttl: int, tos: int, payload: bytes
) -> bytes:
    """IPv4 + UDP headers (28 bytes) for ``payload``, both checksums filled in.

    ``src`` all zero means "no address yet" (the kernel then picks one and the
    UDP checksum is left 0, "none", which IPv4 allows). The IP id is 0 so the
    kernel chooses one; the kernel also recomputes the header checksum.
    """
    ulen = 8 + len(payload)
    udp = _UDP.pack(sport, dport, ulen, 0)
    ucsum = 0
    if src != bytes(4):
        pseudo = src + dst + struct.pack("!BBH", 0, IPPROTO_UDP, ulen)
        ucsum = _udp_checksum(pseudo, udp, payload)
    ip = _IP4.pack(0x45, tos, 20 + ulen, 0, 0, ttl, IPPROTO_UDP, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return ip + _UDP.pack(sport, dport, ulen, ucsum)


def udp6_header(
    src: bytes, dst: bytes, sport: int, dport: int, hops: int, tclass: int, payload: bytes
) -> bytes:
    """IPv6 + UDP headers (48 bytes) for ``payload``; the UDP checksum is mandatory in IPv6."""
    ulen = 8 + len(payload)
    udp = _UDP.pack(sport, dport, ulen, 0)
    pseudo = src + dst + struct.pack("!I3xB", ulen, IPPROTO_UDP)
    ucsum = _udp_checksum(pseudo, udp, payload)
    ip = _IP6.pack((6 << 28) | (tclass << 20), ulen, IPPROTO_UDP, hops, src, dst)
    return ip + _UDP.pack(sport, dport, ulen, ucsum)


def send_raw(
    sock: socket.socket, family: int, header: bytes, payload: bytes, dst: str, ifindex: int
) -> None:
    """Send one packet out of ``ifindex`` (0: wherever the routing table says).

    The interface goes in an ``IP_PKTINFO``/``IPV6_PKTINFO`` message, so one
    socket serves every interface; the destination's port field must be 0
    (for IPv6 raw sockets it names the protocol, which must be the socket's).
    """
    if family == 4:
        # struct in_pktinfo { int ipi_ifindex; in_addr ipi_spec_dst; in_addr ipi_addr; }
        anc = (
            [(socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=i4s4s", ifindex, bytes(4), bytes(4)))]
            if ifindex
            else []
        )
        sock.sendmsg([header, payload], anc, 0, (dst, 0))
    else:
        # struct in6_pktinfo { in6_addr ipi6_addr; int ipi6_ifindex; }
        anc = (
            [(socket.IPPROTO_IPV6, IPV6_PKTINFO, struct.pack("=16si", bytes(16), ifindex))]
            if ifindex
            else []
        )
        scope = ifindex if dst.lower().startswith(("ff", "fe8", "fe9", "fea", "feb")) else 0
        sock.sendmsg([header, payload], anc, 0, (dst, 0, 0, scope))


def local_source(family: int, ifindex: int) -> bytes | None:
    """The address the kernel would send from on ``ifindex`` (None: it has none).

    Found by connecting an unbound UDP socket to a link-local group through
    that interface and asking which source it got: no privilege and no
    netlink needed, and always the address the kernel itself prefers.
    """
    fam = socket.AF_INET if family == 4 else socket.AF_INET6
    try:
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            if family == 4:
                # struct ip_mreqn { in_addr multiaddr; in_addr address; int ifindex; }
                mreqn = struct.pack("=4s4si", bytes(4), bytes(4), ifindex)
                s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
                s.connect(("224.0.0.251", 9))
            else:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
                s.connect(("ff02::fb", 9, 0, ifindex))
            addr = s.getsockname()[0]
    except OSError:
        return None
    packed = socket.inet_pton(fam, addr.split("%")[0])
    return None if packed == bytes(len(packed)) else packed
