"""Worker side of keep-source outputs and discovery reflectors.

The hot path (``relay/hotpath.py``) queues each payload by its address in the
receive buffer on ``out.sq``; for ordinary outputs that is a UDP
:class:`~mcrelay.relay.qos.SendQueue`. The queues here stand in its place for
outputs whose IP header the worker writes itself on the supervisor's raw
socket, so the hot path and its cost for plain relays stay exactly as they
were:

- :class:`RawQueue`: one output with ``src=keep`` (the original sender's
  address and port) or the router's address with a chosen source port and
  TTL (mDNS must leave from port 5353 with TTL 255, RFC 6762 section 11);
- :class:`ReflectQueue`: one reflector leg. Each packet is checked once —
  source in ``--allow``, not a packet this reflector sent (``loop``), not one
  it relayed in the last :data:`WINDOW` seconds (``duplicate``: two relay
  boxes on the same segments, or members bridged together) — and then sent
  to every other member through their :class:`RawQueue`.

Both find the packet's IP and UDP headers from the payload address: a packet
slot of the receive buffer starts with the IP header.

IPv6 link-local sources (fe80::/10) are only meaningful on the link they came
from, so a kept ``fe80::`` source would name a host the output's link cannot
reach: such packets leave with the router's own link-local address on the
output instead (the source port is still kept).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import time
from typing import Any

from mcrelay.model import is_mdns
from mcrelay.net import rawsend
from mcrelay.relay import messages as m
from mcrelay.relay.egress import Dest
from mcrelay.relay.mmsg import RecvVec
from mcrelay.relay.qos import Output, SendQueue

WINDOW = 2.0  # seconds a relayed or sent packet is remembered
MEMORY = 4096  # packets remembered per reflector and kind, at most
SOURCE_TTL = 5.0  # seconds an interface's own address is cached

MDNS_PORT = 5353


class RawDest(Dest):
    """A raw-socket destination: where, out of which interface, with what header."""

    def __init__(
        self, family: int, address: str, port: int, ifindex: int, ttl: int, tos: int, src: int
    ) -> None:
        super().__init__(family, address, port, ifindex)
        self.family = family
        self.address = address
        self.dst = socket.inet_pton(socket.AF_INET if family == 4 else socket.AF_INET6, address)
        self.port = port
        self.ifindex = ifindex
        self.ttl = ttl  # 0: as the packet arrived
        self.tos = tos  # -1: as the packet arrived
        self.keep = src == m.SRC_KEEP
        self.mdns = is_mdns(address, port)


class Sources:
    """Each interface's own address, looked up when needed and kept a few seconds."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, int], tuple[float, bytes | None]] = {}

    def get(self, family: int, ifindex: int, now: float) -> bytes | None:
        hit = self._cache.get((family, ifindex))
        if hit is not None and now - hit[0] < SOURCE_TTL:
            return hit[1]
        addr = rawsend.local_source(family, ifindex)
        self._cache[(family, ifindex)] = (now, addr)
        return addr


class Memory:
    """Packet digests seen in the last WINDOW seconds (insertion order = age order)."""

    def __init__(self) -> None:
        self._seen: dict[int, float] = {}

    def __contains__(self, key: int) -> bool:
        t = self._seen.get(key)
        return t is not None and time.monotonic() - t < WINDOW

    def add(self, key: int, now: float) -> None:
        seen = self._seen
        seen.pop(key, None)
        seen[key] = now
        if len(seen) > MEMORY or next(iter(seen.values())) < now - WINDOW:
            for k in list(seen):
                if len(seen) <= MEMORY and seen[k] >= now - WINDOW:
                    break
                del seen[k]


class ReflectState:
    """What one reflector sent and relayed recently, shared by all its legs in a worker."""

    def __init__(self) -> None:
        self.sent_kept = Memory()  # (dst, dport, src, sport, payload) as sent
        self.sent_own = Memory()  # (dst, dport, payload): our address was on it
        self.relayed = Memory()  # (dst, dport, src, sport, payload) as received


class Parsed:
    """The header fields a raw send needs, read once per packet."""

    __slots__ = ("dport", "dst", "payload", "sport", "src", "tos", "ttl")

    def __init__(
        self, src: bytes, dst: bytes, sport: int, dport: int, tos: int, ttl: int, payload: bytes
    ) -> None:
        self.src = src
        self.dst = dst
        self.sport = sport
        self.dport = dport
        self.tos = tos
        self.ttl = ttl
        self.payload = payload


def parse(rv: RecvVec, family: int, paddr: int, plen: int) -> Parsed:
    """The packet whose payload is at ``paddr``: its slot starts with the IP header."""
    rel = paddr - rv.buf_addr
    off = rel - rel % rv.size
    v = rv.view
    sport = (v[rel - 8] << 8) | v[rel - 7]
    dport = (v[rel - 6] << 8) | v[rel - 5]
    payload = bytes(v[rel : rel + plen])
    if family == 4:
        return Parsed(
            bytes(v[off + 12 : off + 16]),
            bytes(v[off + 16 : off + 20]),
            sport,
            dport,
            v[off + 1],
            v[off + 8],
            payload,
        )
    tclass = ((v[off] & 0x0F) << 4) | (v[off + 1] >> 4)
    return Parsed(
        bytes(v[off + 8 : off + 24]),
        bytes(v[off + 24 : off + 40]),
        sport,
        dport,
        tclass,
        v[off + 7],
        payload,
    )


class RawSender:
    """A worker's raw socket of one family, and the addresses of its interfaces."""

    def __init__(self, sock: socket.socket, family: int, sources: Sources) -> None:
        self.sock = sock
        self.family = family
        self.sources = sources

    def send(self, out: Output, p: Parsed, now: float) -> tuple[bytes, int] | None:
        """Send ``p`` to ``out``; (source, port) it left with, or None if it failed (counted)."""
        d: RawDest = out.dest
        sport = MDNS_PORT if d.mdns else p.sport
        src = p.src
        if not d.keep or (self.family == 6 and src[0] == 0xFE and src[1] & 0xC0 == 0x80):
            own = self.sources.get(self.family, d.ifindex, now)
            src = own if own is not None else bytes(len(src))
        ttl = d.ttl or p.ttl or 1
        tos = p.tos if d.tos < 0 else d.tos
        if self.family == 4:
            hdr = rawsend.udp4_header(src, d.dst, sport, d.port, ttl, tos, p.payload)
        else:
            if src == bytes(16):
                _count_error(out, len(p.payload), m.SEND_ERROR)
                return None
            hdr = rawsend.udp6_header(src, d.dst, sport, d.port, ttl, tos, p.payload)
        try:
            rawsend.send_raw(self.sock, self.family, hdr, p.payload, d.address, d.ifindex)
        except OSError as exc:
            reason = m.NO_BUFFER if exc.errno in (errno.ENOBUFS, errno.EAGAIN) else m.SEND_ERROR
            _count_error(out, len(p.payload), reason)
            return None
        oc = out.oc
        oc[0] += 1
        oc[1] += len(p.payload)
        return src, sport


def _count_error(out: Output, length: int, reason: int) -> None:
    out.oc[2] += 1
    out.oc[3][reason] += 1


class RawQueue(SendQueue):
    """Stands in for a UDP send queue on a raw-socket output: sends at once, nothing queued.

    Discovery traffic is a few packets a second, so there is no batching here;
    the plain relays' batches and GSO are untouched.
    """

    def __init__(self, sender: RawSender, rv: RecvVec) -> None:
        # Deliberately not SendQueue.__init__: no socket, iovecs or backlog.
        self.sender = sender
        self.rv = rv
        self.closed = False
        self.blocked = False

    def add(self, out: Output, data_addr: int, length: int) -> None:
        p = parse(self.rv, self.sender.family, data_addr, length)
        self.sender.send(out, p, time.monotonic())

    def add_run(self, out: Output, addrs: memoryview, length: int) -> None:
        for a in addrs:
            self.add(out, a, length)

    def flush(self) -> None:
        return

    def close(self) -> None:
        self.closed = True


class ReflectQueue(SendQueue):
    """One reflector leg: check each packet once, then send it to every other member."""

    def __init__(
        self,
        sender: RawSender,
        rv: RecvVec,
        state: ReflectState,
        members: list[Output],
        allow: tuple[str, ...],
        ifindex: int,
    ) -> None:
        # Deliberately not SendQueue.__init__ (see RawQueue).
        self.ifindex = ifindex  # the member this leg hears
        self.sender = sender
        self.rv = rv
        self.state = state
        self.members = members
        self.closed = False
        self.blocked = False
        nets = [ipaddress.ip_network(a) for a in allow]
        self.allow = [
            (int(n.network_address), int(n.netmask)) for n in nets if n.version == sender.family
        ]
        self.allow_all = not allow
        self.last = "relayed"  # what became of the last packet (for traces)

    def add(self, out: Output, data_addr: int, length: int) -> None:
        c = out.oc[3]
        p = parse(self.rv, self.sender.family, data_addr, length)
        if not self.allow_all:
            s = int.from_bytes(p.src, "big")
            if not any(s & mask == net for net, mask in self.allow):
                _uncount(c, length, m.FILTERED)
                self.last = "filtered"
                return
        st = self.state
        ix = self.ifindex
        # A loop: what we put on this very interface moments ago came back in
        # (through another relay box, or members bridged together).
        if (
            hash((ix, p.dst, p.dport, p.src, p.sport, p.payload)) in st.sent_kept
            or hash((ix, p.dst, p.dport, p.payload)) in st.sent_own
        ):
            _uncount(c, length, m.LOOP)
            self.last = "loop"
            return
        full = hash((p.dst, p.dport, p.src, p.sport, p.payload))
        if full in st.relayed:
            _uncount(c, length, m.DUPLICATE)
            self.last = "duplicate"
            return
        self.last = "relayed"
        now = time.monotonic()
        st.relayed.add(full, now)
        for o in self.members:
            sent = self.sender.send(o, p, now)
            if sent is None:
                continue
            d: RawDest = o.dest
            if d.keep and sent[0] == p.src:
                key = (d.ifindex, d.dst, d.port, sent[0], sent[1], p.payload)
                st.sent_kept.add(hash(key), now)
            else:
                st.sent_own.add(hash((d.ifindex, d.dst, d.port, p.payload)), now)

    def add_run(self, out: Output, addrs: memoryview, length: int) -> None:
        for a in addrs:
            self.add(out, a, length)

    def flush(self) -> None:
        return

    def close(self) -> None:
        self.closed = True


def _uncount(c: list[int], length: int, reason: int) -> None:
    """The hot path counted the packet as relayed before handing it over: undo, give why."""
    c[m.PACKETS] -= 1
    c[m.BYTES] -= length
    c[reason] += 1


def fan_output(queue: ReflectQueue, c: list[int], label: str) -> Output:
    """The single output a reflector leg's table entry holds (the hot path calls it)."""
    dest: Any = _Label(label)
    return Output(queue, dest, 0, [0, 0, 0, c])


class _Label:
    """A stand-in destination: traces print ``pyaddr``; nothing is sent to it directly."""

    def __init__(self, label: str) -> None:
        self.addr = 0
        self.len = 0
        self.pyaddr = (label, "members")
