"""Ingress sockets, opened by the privileged supervisor and passed to workers.

- :func:`open_packet`: ``AF_PACKET``/``SOCK_DGRAM`` bound to one interface index
  and one network protocol, own transmissions ignored, in a ``PACKET_FANOUT``
  hash group so several workers share one input with each flow kept in order.
- :func:`open_udp_input`: socket mode, a UDP socket bound to (group, port) on
  the interface, joined there itself, and with ``IP_MULTICAST_ALL`` off so it
  receives only what it joined.
- :func:`open_port_holder`: a bound, never-read UDP socket on a unicast packet
  mode input, so the host does not answer with ICMP port-unreachable.

Constants from ``linux/if_packet.h``, ``linux/if_ether.h``, ``linux/in.h``,
``linux/in6.h``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct

from mcrelay.net import bpf
from mcrelay.net.mcast import join

SOL_PACKET = 263
PACKET_FANOUT = 18
PACKET_STATISTICS = 6
PACKET_IGNORE_OUTGOING = 23
PACKET_FANOUT_HASH = 0
PACKET_FANOUT_FLAG_UNIQUEID = 0x2000
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
SO_RCVBUFFORCE = 33
SO_BINDTODEVICE = 25
IP_ADD_MEMBERSHIP = 35
IP_MULTICAST_ALL = 49
IPV6_MULTICAST_ALL = 29

INGRESS_RCVBUF = 8 * 1024 * 1024

_libc = ctypes.CDLL(None, use_errno=True)


def _bind_ll(sock: socket.socket, ifindex: int, proto: int) -> None:
    # struct sockaddr_ll { u16 family; be16 protocol; int ifindex; u16 hatype;
    #                      u8 pkttype; u8 halen; u8 addr[8]; }
    sll = struct.pack("=H", socket.AF_PACKET) + struct.pack("!H", proto)
    sll += struct.pack("=iHBB8s", ifindex, 0, 0, 0, bytes(8))
    if _libc.bind(sock.fileno(), sll, len(sll)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bind AF_PACKET to ifindex {ifindex}: {os.strerror(err)}")


def open_packet(
    ifindex: int, family: int, fanout_id: int | None, prog: bpf.Program
) -> tuple[socket.socket, int]:
    """An AF_PACKET input on ``ifindex`` for one family; returns (socket, fanout id).

    ``fanout_id`` None creates a new fanout group with a kernel-chosen unique id
    (``PACKET_FANOUT_FLAG_UNIQUEID``); pass the returned id for the other workers.
    """
    # Protocol 0 at creation receives nothing until bind, so no packet from
    # another interface slips in before the filter and the bind are in place.
    s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
    try:
        bpf.attach(s, prog)
        s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        try:
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, INGRESS_RCVBUF)
        except PermissionError:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, INGRESS_RCVBUF)
        _bind_ll(s, ifindex, ETH_P_IP if family == 4 else ETH_P_IPV6)
        if fanout_id is None:
            s.setsockopt(SOL_PACKET, PACKET_FANOUT, (PACKET_FANOUT_FLAG_UNIQUEID << 16))
            fanout_id = s.getsockopt(SOL_PACKET, PACKET_FANOUT) & 0xFFFF
        else:
            s.setsockopt(SOL_PACKET, PACKET_FANOUT, fanout_id | (PACKET_FANOUT_HASH << 16))
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s, fanout_id


def packet_stats(sock: socket.socket) -> tuple[int, int]:
    """(packets, drops) since the last call (PACKET_STATISTICS resets on read)."""
    raw = sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)  # struct tpacket_stats
    packets, drops = struct.unpack("=II", raw)
    return packets, drops


def open_udp_input(
    ifname: str,
    ifindex: int,
    family: int,
    address: str,
    port: int,
    sources: tuple[str, ...],
    multicast: bool,
) -> socket.socket:
    """Socket mode: UDP bound to (address, port) on the interface, joined if multicast."""
    fam = socket.AF_INET if family == 4 else socket.AF_INET6
    s = socket.socket(fam, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, ifname.encode())
        try:
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, INGRESS_RCVBUF)
        except PermissionError:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, INGRESS_RCVBUF)
        if family == 4:
            s.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
            s.bind((address, port))
        else:
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_MULTICAST_ALL, 0)
            s.bind((address, port, 0, ifindex if multicast else 0))
        if multicast:
            for src in sources or (None,):
                join(s, family, ifindex, address, src)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def open_port_holder(ifname: str, family: int, address: str, port: int) -> socket.socket | None:
    """A bound UDP socket that is never read; None when the address is not (yet) local."""
    fam = socket.AF_INET if family == 4 else socket.AF_INET6
    s = socket.socket(fam, socket.SOCK_DGRAM)
    try:
        bpf.attach(s, bpf.drop_all())
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, ifname.encode())
        s.bind((address, port))
    except OSError as exc:
        s.close()
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EADDRINUSE, errno.ENODEV):
            return None
        raise
    return s
