"""Send and receive real UDP (multicast or unicast) test traffic.

Used by the netns tests, the demo and the benchmarks to prove that packets
really cross the lab: every payload carries a magic, a stream id and a
sequence number followed by a deterministic pattern, so a receiver can tell
byte-identical delivery (``intact``) from corruption, count losses and
duplicates, and report the TTL/hop limit and TOS/traffic class each packet
arrived with.

Runnable inside a namespace::

    ip netns exec NS python -m mcrelay.lab.traffic send 239.1.1.1 5000 --iface veth0 --count 10
    ip netns exec NS python -m mcrelay.lab.traffic recv 239.1.1.1 5000 --iface veth0 --count 10

``recv`` prints exactly one JSON object on stdout (``ReceiveResult``); it
writes the line ``READY_LINE`` on stderr once the socket is bound and joined,
so a caller knows when sending can start. SIGTERM/SIGINT end reception early
and still print the result. ``send`` prints one JSON object (``SendResult``).

Importable as well: ``send(...)`` and ``receive(...)`` run in-process (in the
caller's network namespace; see ``Lab.in_ns`` to run them in another one).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import ipaddress
import json
import select
import signal
import socket
import struct
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

# Option numbers from /usr/include/linux/in.h and in6.h that Python's socket
# module does not export on every build.
IP_PKTINFO = 8
IP_RECVTTL = 12
IP_RECVTOS = 13
IP_TTL = 2
IP_TOS = 1
IP_MULTICAST_ALL = 49
MCAST_JOIN_GROUP = 42
MCAST_JOIN_SOURCE_GROUP = 46
IPV6_MULTICAST_ALL = 29
IPV6_RECVPKTINFO = 49
IPV6_PKTINFO = 50
IPV6_RECVHOPLIMIT = 51
IPV6_HOPLIMIT = 52
IPV6_RECVTCLASS = 66
IPV6_TCLASS = 67

MAGIC = b"MCRT"
VERSION = 1
# magic, version, flags, stream id, sequence number, payload length, CRC-32
HEADER = struct.Struct("!4sBBHIII")
MIN_SIZE = HEADER.size
MAX_SIZE = 65507
DEFAULT_SIZE = 64
_PATTERN = bytes(i & 0xFF for i in range(MAX_SIZE + 256))
PROBE_STREAM = 0xFFFF
"""Stream id of probe packets (see ``Lab.probe_until_forwarded``); receivers
count them under ``probes``, never under ``count``."""

READY_LINE = "mcrelay-traffic: ready"
MAX_RECORDS = 1000
"""Default bound on per-packet records kept in a ``ReceiveResult``."""

_SOCKADDR_STORAGE = 128


class TrafficError(Exception):
    """Bad arguments or a socket operation that failed, with the reason."""


# --------------------------------------------------------------------------
# payload format


def make_payload(seq: int, size: int = DEFAULT_SIZE, stream: int = 0) -> bytes:
    """The exact bytes datagram ``seq`` of ``stream`` carries.

    Header (magic, version, flags, stream, seq, size, CRC-32 over everything
    else) then a byte pattern whose phase depends on seq: a shifted,
    truncated or altered payload never passes ``parse_payload`` as intact.
    """
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise TrafficError(f"size {size} outside {MIN_SIZE}..{MAX_SIZE}")
    if not 0 <= stream <= 0xFFFF:
        raise TrafficError(f"stream {stream} outside 0..65535")
    seq &= 0xFFFFFFFF
    start = (seq * 7) & 0xFF
    pattern = _PATTERN[start : start + size - MIN_SIZE]
    head = HEADER.pack(MAGIC, VERSION, 0, stream, seq, size, 0)[:-4]
    crc = zlib.crc32(pattern, zlib.crc32(head))
    return head + struct.pack("!I", crc) + pattern


@dataclass(frozen=True)
class PayloadInfo:
    """What a received payload says about itself."""

    stream: int
    seq: int
    size: int
    intact: bool


def parse_payload(data: bytes) -> PayloadInfo | None:
    """Decode a payload made by ``make_payload``; None if it is not ours.

    ``intact`` is true only if the bytes equal what the sender generated.
    """
    if len(data) < MIN_SIZE:
        return None
    magic, version, _flags, stream, seq, size, _crc = HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        return None
    intact = size == len(data) and data == make_payload(seq, size, stream)
    return PayloadInfo(stream=stream, seq=seq, size=size, intact=intact)


# --------------------------------------------------------------------------
# addresses and socket options


def _ip(addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(addr)
    except ValueError as exc:
        raise TrafficError(f"not an IP address: {addr!r}") from exc


def family_of(addr: str) -> int:
    """socket.AF_INET or AF_INET6 for an address string."""
    return socket.AF_INET if _ip(addr).version == 4 else socket.AF_INET6


def ifindex(name: str) -> int:
    """Index of interface ``name`` in the calling thread's network namespace."""
    try:
        return socket.if_nametoindex(name)
    except OSError as exc:
        raise TrafficError(f"no interface {name!r} here: {exc.strerror}") from exc


def _sockaddr_storage(addr: str) -> bytes:
    """A ``struct __kernel_sockaddr_storage`` (128 bytes) holding addr."""
    ip = _ip(addr)
    if ip.version == 4:
        raw = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 0) + ip.packed
    else:
        raw = struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", 0, 0) + ip.packed
        raw += struct.pack("=I", 0)
    return raw.ljust(_SOCKADDR_STORAGE, b"\0")


def group_req(index: int, group: str) -> bytes:
    """``struct group_req`` for MCAST_JOIN_GROUP (u32 + pad to 8, storage)."""
    return struct.pack("=I4x", index) + _sockaddr_storage(group)


def group_source_req(index: int, group: str, source: str) -> bytes:
    """``struct group_source_req`` for MCAST_JOIN_SOURCE_GROUP."""
    return struct.pack("=I4x", index) + _sockaddr_storage(group) + _sockaddr_storage(source)


def _level(family: int) -> int:
    return socket.IPPROTO_IP if family == socket.AF_INET else socket.IPPROTO_IPV6


def _sockaddr(addr: str, port: int, scope: int = 0) -> tuple[Any, ...]:
    if family_of(addr) == socket.AF_INET:
        return (addr, port)
    return (addr, port, 0, scope)


# --------------------------------------------------------------------------
# sending


@dataclass(frozen=True)
class SendResult:
    """What ``send`` did: datagrams and bytes handed to the kernel, failures."""

    dest: str
    port: int
    sent: int
    bytes: int
    errors: int
    duration: float
    first_seq: int
    stream: int
    size: int
    last_error: str | None = None

    def to_json(self) -> str:
        """One line of JSON."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SendResult:
        """Inverse of ``asdict``."""
        return cls(**raw)


def open_sender(
    dest: str,
    *,
    iface: str | None = None,
    ttl: int | None = None,
    tos: int | None = None,
    source: str | None = None,
    sport: int = 0,
    loop: bool = False,
) -> socket.socket:
    """A UDP socket set up to send to ``dest`` (multicast or unicast).

    Multicast leaves through ``iface`` (IP_MULTICAST_IF / IPV6_MULTICAST_IF,
    required); unicast is bound to ``iface`` with SO_BINDTODEVICE if given.
    ``ttl`` sets the multicast TTL/hop limit (default 1, as the kernel) or the
    unicast one; ``tos`` sets IP_TOS / IPV6_TCLASS (DSCP << 2 | ECN).
    """
    ip = _ip(dest)
    fam = family_of(dest)
    if source is not None and family_of(source) != fam:
        raise TrafficError(f"source {source} and destination {dest} differ in family")
    if ttl is not None and not 0 <= ttl <= 255:
        raise TrafficError(f"ttl {ttl} outside 0..255")
    if tos is not None and not 0 <= tos <= 255:
        raise TrafficError(f"tos {tos} outside 0..255")
    if ip.is_multicast and not iface:
        raise TrafficError(f"multicast destination {dest} needs an interface (--iface)")
    sock = socket.socket(fam, socket.SOCK_DGRAM)
    try:
        lvl = _level(fam)
        if ip.is_multicast:
            assert iface is not None
            idx = ifindex(iface)
            if fam == socket.AF_INET:
                mreqn = struct.pack("=4s4si", b"\0" * 4, b"\0" * 4, idx)
                sock.setsockopt(lvl, socket.IP_MULTICAST_IF, mreqn)
                sock.setsockopt(lvl, socket.IP_MULTICAST_LOOP, int(loop))
                if ttl is not None:
                    sock.setsockopt(lvl, socket.IP_MULTICAST_TTL, ttl)
            else:
                sock.setsockopt(lvl, socket.IPV6_MULTICAST_IF, idx)
                sock.setsockopt(lvl, socket.IPV6_MULTICAST_LOOP, int(loop))
                if ttl is not None:
                    sock.setsockopt(lvl, socket.IPV6_MULTICAST_HOPS, ttl)
        else:
            if iface:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.encode())
            if ttl is not None:
                opt = IP_TTL if fam == socket.AF_INET else socket.IPV6_UNICAST_HOPS
                sock.setsockopt(lvl, opt, ttl)
        if tos is not None:
            sock.setsockopt(lvl, IP_TOS if fam == socket.AF_INET else IPV6_TCLASS, tos)
        if source is not None or sport:
            any_addr = "0.0.0.0" if fam == socket.AF_INET else "::"
            sock.bind(_sockaddr(source or any_addr, sport))
    except OSError as exc:
        sock.close()
        raise TrafficError(f"cannot set up sender to {dest}: {exc}") from exc
    except BaseException:
        sock.close()
        raise
    return sock


def send(
    dest: str,
    port: int,
    *,
    iface: str | None = None,
    count: int = 1,
    size: int = DEFAULT_SIZE,
    ttl: int | None = None,
    tos: int | None = None,
    source: str | None = None,
    sport: int = 0,
    rate: float | None = None,
    stream: int = 0,
    first_seq: int = 0,
    loop: bool = False,
    sock: socket.socket | None = None,
) -> SendResult:
    """Send ``count`` datagrams (seq first_seq..) to dest:port; return totals.

    ``rate`` in packets per second paces the stream on an absolute schedule
    (no drift); None sends as fast as the socket accepts. ENOBUFS/EAGAIN are
    retried briefly, other errors are counted and the last one reported.
    An already prepared ``sock`` (from ``open_sender``) may be passed in.
    """
    if not 1 <= port <= 65535:
        raise TrafficError(f"port {port} outside 1..65535")
    if count < 0:
        raise TrafficError("count must be >= 0")
    if rate is not None and rate <= 0:
        raise TrafficError("rate must be > 0 packets per second")
    own = sock is None
    if sock is None:
        sock = open_sender(
            dest, iface=iface, ttl=ttl, tos=tos, source=source, sport=sport, loop=loop
        )
    addr = _sockaddr(dest, port)
    sent = nbytes = errors = 0
    last_error: str | None = None
    interval = 1.0 / rate if rate else 0.0
    start = time.monotonic()
    try:
        for i in range(count):
            if interval:
                delay = start + i * interval - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            payload = make_payload(first_seq + i, size, stream)
            for attempt in range(50):
                try:
                    nbytes += sock.sendto(payload, addr)
                    sent += 1
                    break
                except OSError as exc:
                    if exc.errno in (errno.ENOBUFS, errno.EAGAIN) and attempt < 49:
                        time.sleep(0.001)
                        continue
                    errors += 1
                    last_error = f"{errno.errorcode.get(exc.errno or 0, '?')}: {exc.strerror}"
                    break
    finally:
        if own:
            sock.close()
    return SendResult(
        dest=dest,
        port=port,
        sent=sent,
        bytes=nbytes,
        errors=errors,
        duration=round(time.monotonic() - start, 6),
        first_seq=first_seq,
        stream=stream,
        size=size,
        last_error=last_error,
    )


# --------------------------------------------------------------------------
# receiving


@dataclass(frozen=True)
class PacketRecord:
    """One received datagram, as the receiving socket saw it."""

    seq: int | None
    stream: int | None
    src: str
    sport: int
    dst: str | None
    ifindex: int | None
    ttl: int | None
    tos: int | None
    len: int
    intact: bool
    sha256: str
    time: float


@dataclass(frozen=True)
class ReceiveResult:
    """Everything ``receive`` saw; serialised as the one JSON object of ``recv``.

    ``count`` counts our datagrams (probe stream excluded), ``foreign`` those
    that did not carry our header, ``intact`` those byte-identical to what the
    sender generated, ``duplicates`` repeated (stream, seq) pairs,
    ``reordered`` datagrams whose seq was below the highest already seen in
    their stream. ``ttls``/``toss`` map each TTL/TOS value to its packet
    count (JSON keys are strings). ``packets`` holds at most ``max_records``
    records, in arrival order.
    """

    address: str
    port: int
    iface: str | None
    count: int
    bytes: int
    intact: int
    foreign: int
    probes: int
    duplicates: int
    reordered: int
    ttls: dict[str, int]
    toss: dict[str, int]
    sources: dict[str, int]
    seqs_missing: int
    first_seq: int | None
    last_seq: int | None
    duration: float
    reason: str
    truncated: bool
    packets: list[PacketRecord] = field(default_factory=list)

    def to_json(self) -> str:
        """One line of JSON."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ReceiveResult:
        """Rebuild from the JSON object ``recv`` printed."""
        data = dict(raw)
        data["packets"] = [PacketRecord(**p) for p in data.get("packets", [])]
        return cls(**data)

    @property
    def seqs(self) -> list[int]:
        """Sequence numbers of the recorded packets, in arrival order."""
        return [p.seq for p in self.packets if p.seq is not None]

    @property
    def ttl_values(self) -> set[int]:
        """Distinct TTL / hop-limit values seen."""
        return {int(k) for k in self.ttls}

    @property
    def tos_values(self) -> set[int]:
        """Distinct TOS / traffic-class values seen."""
        return {int(k) for k in self.toss}


def open_receiver(
    address: str,
    port: int,
    *,
    iface: str | None = None,
    sources: Sequence[str] = (),
    rcvbuf: int | None = None,
) -> socket.socket:
    """A UDP socket bound to address:port that reports TTL, TOS and dst.

    For a multicast ``address`` it joins the group on ``iface`` (any-source,
    or source-specific for each of ``sources``), binds to the group and sets
    IP_MULTICAST_ALL=0 so it never sees groups joined by other sockets. For a
    unicast or wildcard address it just binds (to ``iface`` too, if given).
    """
    ip = _ip(address)
    fam = family_of(address)
    if not 0 <= port <= 65535:
        raise TrafficError(f"port {port} outside 0..65535")
    if ip.is_multicast and not iface:
        raise TrafficError(f"joining {address} needs an interface (--iface)")
    for src in sources:
        if family_of(src) != fam:
            raise TrafficError(f"source {src} and group {address} differ in family")
    sock = socket.socket(fam, socket.SOCK_DGRAM)
    try:
        lvl = _level(fam)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if fam == socket.AF_INET:
            sock.setsockopt(lvl, IP_RECVTTL, 1)
            sock.setsockopt(lvl, IP_RECVTOS, 1)
            sock.setsockopt(lvl, IP_PKTINFO, 1)
        else:
            sock.setsockopt(lvl, IPV6_RECVHOPLIMIT, 1)
            sock.setsockopt(lvl, IPV6_RECVTCLASS, 1)
            sock.setsockopt(lvl, IPV6_RECVPKTINFO, 1)
            sock.setsockopt(lvl, socket.IPV6_V6ONLY, 1)
        scope = 0
        if ip.is_multicast:
            assert iface is not None
            idx = ifindex(iface)
            sock.setsockopt(
                lvl, IP_MULTICAST_ALL if fam == socket.AF_INET else IPV6_MULTICAST_ALL, 0
            )
            if fam == socket.AF_INET6 and (
                ip.is_link_local or address.lower().startswith(("ff01", "ff02"))
            ):
                scope = idx
            if sources:
                for src in sources:
                    sock.setsockopt(
                        lvl, MCAST_JOIN_SOURCE_GROUP, group_source_req(idx, address, src)
                    )
            else:
                sock.setsockopt(lvl, MCAST_JOIN_GROUP, group_req(idx, address))
        elif iface:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.encode())
        sock.bind(_sockaddr(address, port, scope))
    except OSError as exc:
        sock.close()
        raise TrafficError(f"cannot receive on {address}:{port} ({iface}): {exc}") from exc
    except BaseException:
        sock.close()
        raise
    return sock


def _parse_cmsgs(
    fam: int, ancdata: list[tuple[int, int, bytes]]
) -> tuple[int | None, int | None, str | None, int | None]:
    """(ttl, tos, destination address, ifindex) from recvmsg ancillary data."""
    ttl = tos = idx = None
    dst = None
    for level, ctype, data in ancdata:
        if level == socket.IPPROTO_IP:
            if ctype == IP_TTL and len(data) >= 4:
                ttl = struct.unpack("=i", data[:4])[0]
            elif ctype == IP_TOS and len(data) >= 1:
                tos = data[0]
            elif ctype == IP_PKTINFO and len(data) >= 12:
                idx = struct.unpack("=i", data[:4])[0]
                dst = socket.inet_ntop(socket.AF_INET, data[8:12])
        elif level == socket.IPPROTO_IPV6:
            if ctype == IPV6_HOPLIMIT and len(data) >= 4:
                ttl = struct.unpack("=i", data[:4])[0]
            elif ctype == IPV6_TCLASS and len(data) >= 4:
                tos = struct.unpack("=i", data[:4])[0]
            elif ctype == IPV6_PKTINFO and len(data) >= 20:
                dst = socket.inet_ntop(socket.AF_INET6, data[:16])
                idx = struct.unpack("=i", data[16:20])[0]
    del fam
    return ttl, tos, dst, idx


_STOP_REQUESTS: list[str] = []
"""Names of signals received inside ``stop_on_signals`` (checked by receive)."""


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """While active, SIGTERM and SIGINT end a running ``receive`` cleanly.

    The handler only records the signal; ``receive`` notices within 100 ms,
    drains what is already queued and returns, so no datagram is half-counted.
    """

    def handler(signum: int, frame: object) -> None:
        _STOP_REQUESTS.append(signal.Signals(signum).name)

    _STOP_REQUESTS.clear()
    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _STOP_REQUESTS.clear()


class _Tally:
    """Running totals of one reception; cheap per packet, bounded records."""

    def __init__(self, fam: int, start: float, max_records: int) -> None:
        self.fam = fam
        self.start = start
        self.max_records = max_records
        self.n = self.nbytes = self.intact = self.foreign = self.probes = 0
        self.dups = self.reordered = 0
        self.ttls: dict[str, int] = {}
        self.toss: dict[str, int] = {}
        self.srcs: dict[str, int] = {}
        self.seen: dict[int, bytearray] = {}  # stream -> bitmap of seqs
        self.highest: dict[int, int] = {}
        self.lowest: dict[int, int] = {}
        self.records: list[PacketRecord] = []
        self.first_seq: int | None = None
        self.last_seq: int | None = None
        self.truncated = False

    def add(self, data: bytes, anc: list[tuple[int, int, bytes]], addr: Any, now: float) -> None:
        """Account for one datagram."""
        info = parse_payload(data)
        if info is not None and info.stream == PROBE_STREAM:
            self.probes += 1
            return
        ttl, tos, dst, idx = _parse_cmsgs(self.fam, anc)
        src = str(addr[0])
        self.n += 1
        self.nbytes += len(data)
        if ttl is not None:
            self.ttls[str(ttl)] = self.ttls.get(str(ttl), 0) + 1
        if tos is not None:
            self.toss[str(tos)] = self.toss.get(str(tos), 0) + 1
        self.srcs[src] = self.srcs.get(src, 0) + 1
        seq = stream = None
        ok = False
        if info is None:
            self.foreign += 1
        else:
            seq, stream, ok = info.seq, info.stream, info.intact
            self.intact += ok
            bitmap = self.seen.setdefault(stream, bytearray())
            byte, bit = divmod(seq, 8)
            if byte >= len(bitmap):
                bitmap.extend(bytes(byte + 1 - len(bitmap)))
            if bitmap[byte] & (1 << bit):
                self.dups += 1
            bitmap[byte] |= 1 << bit
            if seq < self.highest.get(stream, -1):
                self.reordered += 1
            self.highest[stream] = max(self.highest.get(stream, -1), seq)
            self.lowest[stream] = min(self.lowest.get(stream, seq), seq)
            self.first_seq = seq if self.first_seq is None else self.first_seq
            self.last_seq = seq
        if len(self.records) < self.max_records:
            self.records.append(
                PacketRecord(
                    seq=seq,
                    stream=stream,
                    src=src,
                    sport=int(addr[1]),
                    dst=dst,
                    ifindex=idx,
                    ttl=ttl,
                    tos=tos,
                    len=len(data),
                    intact=ok,
                    sha256=hashlib.sha256(data).hexdigest(),
                    time=round(now - self.start, 6),
                )
            )
        else:
            self.truncated = True

    def missing(self) -> int:
        """Sequence numbers absent between each stream's lowest and highest."""
        total = 0
        for stream_id, bitmap in self.seen.items():
            have = sum(bin(b).count("1") for b in bitmap)
            total += self.highest[stream_id] - self.lowest[stream_id] + 1 - have
        return total


def receive(
    address: str,
    port: int,
    *,
    iface: str | None = None,
    sources: Sequence[str] = (),
    count: int | None = None,
    duration: float = 5.0,
    idle: float | None = None,
    max_records: int = MAX_RECORDS,
    rcvbuf: int | None = None,
    sock: socket.socket | None = None,
    ready: Callable[[], None] | None = None,
) -> ReceiveResult:
    """Receive on address:port until ``count`` datagrams, ``duration`` s or idle.

    Stops at the first of: ``count`` of our (non-probe) datagrams received,
    ``duration`` seconds elapsed, ``idle`` seconds without a datagram after
    the first one, or SIGTERM/SIGINT inside ``stop_on_signals`` (datagrams
    already queued on the socket are still counted). ``ready`` is called once
    the socket is joined (the CLI prints ``READY_LINE``). Pass ``sock`` from
    ``open_receiver`` to reuse one.
    """
    own = sock is None
    if sock is None:
        sock = open_receiver(address, port, iface=iface, sources=sources, rcvbuf=rcvbuf)
    start = time.monotonic()
    tally = _Tally(sock.family, start, max_records)
    reason = "duration"
    deadline = start + duration
    last_rx: float | None = None
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    try:
        if ready is not None:
            ready()
        while True:
            if count is not None and tally.n >= count:
                reason = "count"
                break
            if _STOP_REQUESTS:
                reason = f"signal {_STOP_REQUESTS[0]}"
                while count is None or tally.n < count:  # drain what already arrived
                    try:
                        data, anc, _flags, addr = sock.recvmsg(65535, 256, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        break
                    tally.add(data, anc, addr, time.monotonic())
                break
            now = time.monotonic()
            wait = deadline - now
            if idle is not None and last_rx is not None:
                wait = min(wait, last_rx + idle - now)
            if wait <= 0:
                reason = "duration" if now >= deadline else "idle"
                break
            if not poller.poll(max(1, int(min(wait, 0.1) * 1000))):
                continue
            try:
                data, anc, _flags, addr = sock.recvmsg(65535, 256, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            last_rx = time.monotonic()
            tally.add(data, anc, addr, last_rx)
    finally:
        if own:
            sock.close()
    return ReceiveResult(
        address=address,
        port=port,
        iface=iface,
        count=tally.n,
        bytes=tally.nbytes,
        intact=tally.intact,
        foreign=tally.foreign,
        probes=tally.probes,
        duplicates=tally.dups,
        reordered=tally.reordered,
        ttls=tally.ttls,
        toss=tally.toss,
        sources=tally.srcs,
        seqs_missing=tally.missing(),
        first_seq=tally.first_seq,
        last_seq=tally.last_seq,
        duration=round(time.monotonic() - start, 6),
        reason=reason,
        truncated=tally.truncated,
        packets=tally.records,
    )


# --------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m mcrelay.lab.traffic`` argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m mcrelay.lab.traffic",
        description="Send or receive numbered UDP test datagrams; prints one JSON object.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("send", help="send COUNT datagrams to DEST:PORT")
    s.add_argument("dest")
    s.add_argument("port", type=int)
    s.add_argument("--iface", help="egress interface (required for multicast)")
    s.add_argument("--count", type=int, default=1)
    s.add_argument("--size", type=int, default=DEFAULT_SIZE, help="UDP payload bytes")
    s.add_argument("--ttl", type=int, help="TTL / hop limit")
    s.add_argument("--tos", type=lambda v: int(v, 0), help="IP TOS / IPv6 traffic class byte")
    s.add_argument("--source", help="bind to this source address")
    s.add_argument("--sport", type=int, default=0, help="bind to this source port")
    s.add_argument("--rate", type=float, help="packets per second (default: as fast as possible)")
    s.add_argument("--stream", type=int, default=0, help="stream id 0..65534")
    s.add_argument("--first-seq", type=int, default=0)
    s.add_argument("--loop", action="store_true", help="loop multicast back to local sockets")
    r = sub.add_parser("recv", help="receive on ADDRESS:PORT (join if multicast)")
    r.add_argument("address")
    r.add_argument("port", type=int)
    r.add_argument("--iface", help="interface to join on (required for multicast)")
    r.add_argument("--source", action="append", default=[], help="source-specific join (repeat)")
    r.add_argument("--count", type=int, help="stop after this many datagrams")
    r.add_argument("--duration", type=float, default=5.0, help="stop after this many seconds")
    r.add_argument("--idle", type=float, help="stop this long after the last datagram")
    r.add_argument("--max-records", type=int, default=MAX_RECORDS)
    r.add_argument("--rcvbuf", type=int)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: 0 on success, 2 on bad arguments or socket errors."""
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "send":
            res: SendResult | ReceiveResult = send(
                args.dest,
                args.port,
                iface=args.iface,
                count=args.count,
                size=args.size,
                ttl=args.ttl,
                tos=args.tos,
                source=args.source,
                sport=args.sport,
                rate=args.rate,
                stream=args.stream,
                first_seq=args.first_seq,
                loop=args.loop,
            )
        else:

            def ready() -> None:
                print(READY_LINE, file=sys.stderr, flush=True)

            with stop_on_signals():
                res = receive(
                    args.address,
                    args.port,
                    iface=args.iface,
                    sources=args.source,
                    count=args.count,
                    duration=args.duration,
                    idle=args.idle,
                    max_records=args.max_records,
                    rcvbuf=args.rcvbuf,
                    ready=ready,
                )
    except TrafficError as exc:
        print(f"mcrelay-traffic: {exc}", file=sys.stderr)
        return 2
    print(res.to_json(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
