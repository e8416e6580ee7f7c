"""Multicast Router Discovery (RFC 4286): tell snooping switches where the router is.

An IGMP/MLD snooping switch forwards a group only to ports where it heard a
member, and to *router ports*. Without a querier on the segment it may never
learn that mcrelayd's port is one, and streams the router should receive stop
at the switch. MRD fixes that: the router periodically sends a Multicast
Router Advertisement to the All-Snoopers group on each interface that enables
it, with TTL 1 and the Router Alert option, as RFC 4286 section 4 lays out.

Message (both families; IGMP type 0x30 / ICMPv6 type 151)::

    0       8       16              31
    | Type  | AdvInt| Checksum      |
    | Query Interval| Robustness Var|

After an interface comes up, :data:`INITIAL_ADVERTISEMENTS` go out at random
delays of up to :data:`MAX_INITIAL_INTERVAL` seconds, then one every
``interval`` seconds. Solicitations (0x31/152) are not answered: the periodic
advertisements make snoopers learn within one interval.
"""

from __future__ import annotations

import logging
import random
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..model import ifname_matches

IGMP_MRD_ADVERTISEMENT = 0x30
ICMPV6_MRD_ADVERTISEMENT = 151
ALL_SNOOPERS = {4: "224.0.0.106", 6: "ff02::6a"}
QUERY_INTERVAL = 125  # IGMP/MLD default query interval (RFC 3376, RFC 3810)
ROBUSTNESS = 2
INITIAL_ADVERTISEMENTS = 3
MAX_INITIAL_INTERVAL = 2.0
IP_ROUTER_ALERT = b"\x94\x04\x00\x00"  # IPv4 option 148, length 4, value 0
# IPv6 hop-by-hop header: next header (the kernel fills it), length 0 (8
# bytes), Router Alert (type 5, length 2, value 0: MLD), PadN of 0 bytes.
IPV6_HBH_ROUTER_ALERT = b"\x00\x00\x05\x02\x00\x00\x01\x00"
IPV6_HOPOPTS = 54

log = logging.getLogger(__name__)


def _checksum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def advertisement(family: int, interval: int) -> bytes:
    """One Multicast Router Advertisement (the IPv6 checksum is the kernel's job)."""
    kind = IGMP_MRD_ADVERTISEMENT if family == 4 else ICMPV6_MRD_ADVERTISEMENT
    body = struct.pack("!BBHHH", kind, interval, 0, QUERY_INTERVAL, ROBUSTNESS)
    if family == 6:
        return body
    return body[:2] + struct.pack("!H", _checksum(body)) + body[4:]


def open_sender(family: int) -> socket.socket:
    """A raw IGMP (4) or ICMPv6 (6) socket set up for link-local router advertisements."""
    if family == 4:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_IGMP)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, IP_ROUTER_ALERT)
    else:
        s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 1)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
        s.setsockopt(socket.IPPROTO_IPV6, IPV6_HOPOPTS, IPV6_HBH_ROUTER_ALERT)
    s.setblocking(False)
    return s


@dataclass
class _Schedule:
    ifindex: int
    next_at: float
    initial_left: int


class Advertiser:
    """Sends advertisements on every present interface matching the configured names.

    ``interfaces`` lists the (name, ifindex) of usable interfaces now;
    ``opener`` makes the sending socket of a family (tests pass a fake).
    """

    def __init__(
        self,
        interfaces: Callable[[], Iterable[tuple[str, int]]],
        opener: Callable[[int], socket.socket] = open_sender,
    ) -> None:
        self._interfaces = interfaces
        self._opener = opener
        self._socks: dict[int, socket.socket | None] = {}
        self._due: dict[str, _Schedule] = {}
        self.patterns: tuple[str, ...] = ()
        self.interval = 20
        self.sent = 0

    def configure(self, patterns: Iterable[str], interval: int) -> None:
        self.patterns, self.interval = tuple(dict.fromkeys(patterns)), interval

    def tick(self, now: float) -> None:
        """Send what is due; start the initial burst on interfaces that just appeared."""
        if not self.patterns:
            self._due.clear()
            return
        present = {
            name: ix
            for name, ix in self._interfaces()
            if any(ifname_matches(p, name) for p in self.patterns)
        }
        for name in list(self._due):
            if present.get(name) != self._due[name].ifindex:
                del self._due[name]  # gone or re-created: starts over with a new burst
        for name, ix in present.items():
            sched = self._due.get(name)
            if sched is None:
                delay = random.uniform(0, MAX_INITIAL_INTERVAL)
                self._due[name] = _Schedule(ix, now + delay, INITIAL_ADVERTISEMENTS)
                continue
            if now < sched.next_at:
                continue
            self._send(name, ix)
            if sched.initial_left > 1:
                sched.initial_left -= 1
                sched.next_at = now + random.uniform(0, MAX_INITIAL_INTERVAL)
            else:
                sched.initial_left = 0
                sched.next_at = now + self.interval

    def next_due(self) -> float | None:
        return min((s.next_at for s in self._due.values()), default=None)

    def _sock(self, family: int) -> socket.socket | None:
        if family not in self._socks:
            try:
                self._socks[family] = self._opener(family)
            except OSError as exc:
                log.warning("router discovery over IPv%d unavailable: %s", family, exc)
                self._socks[family] = None
        return self._socks[family]

    def _send(self, name: str, ifindex: int) -> None:
        for family in (4, 6):
            sock = self._sock(family)
            if sock is None:
                continue
            try:
                if family == 4:
                    mreqn = struct.pack("=4s4si", bytes(4), bytes(4), ifindex)
                    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
                    sock.sendto(advertisement(4, self.interval), (ALL_SNOOPERS[4], 0))
                else:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
                    sock.sendto(advertisement(6, self.interval), (ALL_SNOOPERS[6], 0, 0, ifindex))
                self.sent += 1
            except OSError as exc:  # no address yet, link down: the next round retries
                log.debug("router advertisement on %s (IPv%d): %s", name, family, exc)

    def close(self) -> None:
        for sock in self._socks.values():
            if sock is not None:
                sock.close()
        self._socks.clear()
