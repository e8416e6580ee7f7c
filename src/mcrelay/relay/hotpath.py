"""The worker's hot path: one received batch in, payloads queued on egress sockets.

Three ways through a batch; every output of every relay must send the same
payloads in the same order whichever is taken (tests/unit/test_relay_bulk.py):

- *per packet* (``_each_v4``, ``_each_v6``, ``_each_socket``): parse, look up,
  filter and queue one packet at a time. This is the reference, and the path
  of anything unusual.
- *whole run* (``run_v4``, ``run_v6``, ``run_socket``): a run of consecutive
  packets of one flow (same addresses, ports, lengths and flags; only the IP
  id and checksums differ) is checked and queued as a block. Each header field
  of all packets of the run is read with one strided slice of the receive
  buffer, and a field is the same throughout when the slice over slots
  a..b-2 equals the one over a+1..b-1, a comparison done in C. The relay is
  looked up once and the payload iovecs are written with two slice
  assignments (:meth:`SendQueue.add_run`), so the Python work is per run, not
  per packet.
- *held* (``_each_v4``/``_each_v6`` with a ``Held``): flows interleaved too
  finely for runs are checked packet by packet, but queued relay by relay at
  the end of the batch, so that each output's payloads still lie together and
  go as one UDP GSO message.

A batch is cut into runs on the destination address and ports; runs shorter
than ``BULK_MIN`` packets, or that fail a check, go packet by packet. One
stream alone gives one run per batch; interleaved streams give as many runs
as their packets are bunched, or none (then *held*).
"""

from __future__ import annotations

import os
import struct
from array import array
from collections.abc import Callable
from itertools import compress, islice, pairwise
from operator import ne, sub
from typing import TYPE_CHECKING

from mcrelay.relay import messages as m
from mcrelay.relay.mmsg import I_FLAGS, I_LEN, I_STRIDE, MSG_TRUNC, RecvVec

if TYPE_CHECKING:
    from mcrelay.relay import table as tbl

BULK_MIN = 5  # shorter runs are cheaper one packet at a time (bench/hot_path.py)

# IPv4 header + UDP ports/length, assuming IHL 5 (otherwise re-read the UDP part):
# vihl, flags|frag, src, dst, dport, ulen
_V4 = struct.Struct("!B5xH4x4s4s2xHH")
# IPv6 fixed header + UDP: payload length, next header, src, dst, dport, ulen
_V6 = struct.Struct("!4xHBx16s16s2xHH")
_UDP = struct.Struct("!2xHH")

Span = tuple[int, int]  # slots [a, b) of a batch


class Ingress:
    """An ingress socket as the hot path sees it: its lookup table or single relay."""

    __slots__ = ("family", "fd", "kind", "single", "table", "traced")

    def __init__(self, kind: str, family: int, fd: int) -> None:
        self.fd = fd
        self.kind = kind
        self.family = family
        self.table: dict[tbl.Key, tbl.Entry] = {}
        self.single: tbl.Entry | None = None
        self.traced = False


def runs(keys: list[int], n: int) -> list[Span]:
    """Maximal spans of equal consecutive keys among the first n.

    [] when none reaches BULK_MIN, or when there is only one (the caller has
    already tried the whole batch as one run). The cuts are found in C
    (``map``/``compress``), so a batch of flows interleaved packet by packet
    costs about a microsecond here before going the per-packet way.
    """
    cuts = list(compress(range(1, n), map(ne, keys, islice(keys, 1, n))))
    if not cuts or len(cuts) > n - BULK_MIN:  # one run, or every run too short
        return []
    edges = [0, *cuts, n]
    if max(map(sub, islice(edges, 1, None), edges)) < BULK_MIN:
        return []
    return list(pairwise(edges))


# Payload addresses and lengths per relay, in arrival order, for a batch of
# finely interleaved flows: queued relay by relay at the end of the batch, so
# each output's payloads lie together and UDP GSO can send them as one message.
# Each output keeps its own order; only different relays' packets are reordered
# against each other, as any two independent streams may be.
Held = dict["tbl.Entry", tuple[list[int], list[int]]]


def _hold(held: Held, e: tbl.Entry, plen: int, paddr: int) -> None:
    h = held.get(e)
    if h is None:
        held[e] = ([paddr], [plen])
    else:
        h[0].append(paddr)
        h[1].append(plen)


def _release(held: Held) -> None:
    for e, (addrs, lens) in held.items():
        mv = memoryview(array("Q", addrs))
        k = len(lens)
        first = lens[0]
        if lens.count(first) == k:
            for o in e.outs:
                o.sq.add_run(o, mv, first)
            continue
        a = 0
        for i in range(1, k + 1):  # one add_run per stretch of one length, in order
            if i == k or lens[i] != lens[a]:
                for o in e.outs:
                    o.sq.add_run(o, mv[a:i], lens[a])
                a = i


def _same(view: memoryview, word: int, a: int, b: int, stride: int) -> bool:
    """Word ``word`` of the header is equal in slots a..b-1 (``stride`` words a slot).

    The slice over slots a..b-2 against the one over a+1..b-1: one comparison in C.
    """
    lo = a * stride + word
    hi = b * stride + word
    return view[lo : hi - stride : stride] == view[lo + stride : hi : stride]


def _queue_run(e: tbl.Entry, rv: RecvVec, a: int, b: int, header: int, plen: int) -> None:
    """Count slots [a, b) on relay ``e`` and queue their payloads (after ``header`` bytes)."""
    c = e.c
    c[0] += b - a
    c[1] += (b - a) * plen
    addrs = rv.payload_addrs(header)[a:b]
    for o in e.outs:
        o.sq.add_run(o, addrs, plen)


class HotPath:
    """Batch handling of a worker; the worker holds the tables and the counters."""

    unmatched: int
    malformed: int

    def __init__(self) -> None:
        self.unmatched = 0
        self.malformed = 0
        # MCRELAY_BULK=0 keeps every packet on the per-packet path, for A/B runs.
        self.bulk = os.environ.get("MCRELAY_BULK", "1") != "0"

    # ------------------------------------------------------------ per batch

    def batch_v4(self, inn: Ingress, rv: RecvVec, n: int) -> None:
        if n >= BULK_MIN and self.bulk:
            self._batch_ip(inn, rv, n, 2, self.run_v4, self._each_v4)  # destination, ports
        else:
            self._each_v4(inn, rv, 0, n)

    def batch_v6(self, inn: Ingress, rv: RecvVec, n: int) -> None:
        if n >= BULK_MIN and self.bulk:
            self._batch_ip(inn, rv, n, 4, self.run_v6, self._each_v6)  # destination, low half
        else:
            self._each_v6(inn, rv, 0, n)

    def _batch_ip(
        self,
        inn: Ingress,
        rv: RecvVec,
        n: int,
        key_word: int,
        run: Callable[[Ingress, RecvVec, int, int], bool],
        each: Callable[[Ingress, RecvVec, int, int, Held | None], None],
    ) -> None:
        """The whole batch as one run, else its runs, else packet by packet but held.

        ``key_word`` is the 8-byte word of the header that cuts the batch into runs.
        """
        if run(inn, rv, 0, n):
            return
        s64 = rv.size >> 3
        spans = runs(rv.v64[key_word : n * s64 : s64].tolist(), n)
        if spans:
            for a, b in spans:
                if b - a < BULK_MIN or not run(inn, rv, a, b):
                    each(inn, rv, a, b, None)
            return
        held: Held = {}
        each(inn, rv, 0, n, held)
        _release(held)

    def batch_socket(self, inn: Ingress, rv: RecvVec, n: int) -> None:
        e = inn.single
        if e is None:
            self.unmatched += n
            return
        if n >= BULK_MIN and self.bulk:
            if self.run_socket(e, rv, 0, n):
                return
            spans = runs(rv.u32[I_LEN : n * I_STRIDE : I_STRIDE].tolist(), n)  # lengths
            if spans:
                for a, b in spans:
                    if b - a < BULK_MIN or not self.run_socket(e, rv, a, b):
                        self._each_socket(e, rv, a, b)
                return
        self._each_socket(e, rv, 0, n)

    # ------------------------------------------------------------ whole runs

    def run_v4(self, inn: Ingress, rv: RecvVec, a: int, b: int) -> bool:
        """Relay slots [a, b) as one flow; False (nothing done) if they are not one."""
        w64, w32, w16 = rv.size >> 3, rv.size >> 2, rv.size >> 1  # words per slot
        off = a * rv.size
        if not (
            _same(rv.v64, 2, a, b, w64)  # destination, ports
            and _same(rv.v32, 0, a, b, w32)  # version/IHL, TOS, total length
            and rv.view[off] == 0x45
            and _same(rv.v16, 3, a, b, w16)  # flags, fragment offset
            and _same(rv.v16, 12, a, b, w16)  # UDP length
        ):
            return False
        _vihl, frag, src, dst, dport, ulen = _V4.unpack_from(rv.buf, off)
        if ulen < 8 or 20 + ulen > min(rv.u32[a * I_STRIDE + I_LEN : b * I_STRIDE : I_STRIDE]):
            return False
        e = inn.table.get((dst, dport))
        if e is None:
            self.unmatched += b - a
            return True
        if frag & 0x3FFF:
            e.c[m.FRAGMENT] += b - a
            return True
        if e.sources is not None:
            if not _same(rv.v32, 3, a, b, w32):  # source
                return False
            if src not in e.sources:
                e.c[m.FILTERED] += b - a
                return True
        _queue_run(e, rv, a, b, 28, ulen - 8)
        return True

    def run_v6(self, inn: Ingress, rv: RecvVec, a: int, b: int) -> bool:
        """Relay slots [a, b) as one flow; False (nothing done) if they are not one."""
        w64, w32, w16 = rv.size >> 3, rv.size >> 2, rv.size >> 1
        if not (
            _same(rv.v64, 3, a, b, w64)  # destination
            and _same(rv.v64, 4, a, b, w64)
            and _same(rv.v32, 10, a, b, w32)  # ports
            and _same(rv.v32, 0, a, b, w32)  # version, class, flow label
            and _same(rv.v32, 1, a, b, w32)  # payload length, next header, hop limit
            and _same(rv.v16, 22, a, b, w16)  # UDP length
        ):
            return False
        _plen, nh, src, dst, dport, ulen = _V6.unpack_from(rv.buf, a * rv.size)
        lens = rv.u32[a * I_STRIDE + I_LEN : b * I_STRIDE : I_STRIDE]
        if nh != 17 or ulen < 8 or 40 + ulen > min(lens):
            return False
        e = inn.table.get((dst, dport))
        if e is None:
            self.unmatched += b - a
            return True
        if e.sources is not None:
            if not (_same(rv.v64, 1, a, b, w64) and _same(rv.v64, 2, a, b, w64)):  # source
                return False
            if src not in e.sources:
                e.c[m.FILTERED] += b - a
                return True
        _queue_run(e, rv, a, b, 48, ulen - 8)
        return True

    def run_socket(self, e: tbl.Entry, rv: RecvVec, a: int, b: int) -> bool:
        """Relay slots [a, b) of one length and no flags; False (nothing done) otherwise."""
        u = rv.u32
        lo, hi = a * I_STRIDE, b * I_STRIDE
        lens = u[lo + I_LEN : hi : I_STRIDE]
        if lens[:-1] != lens[1:] or any(u[lo + I_FLAGS : hi : I_STRIDE]):
            return False
        _queue_run(e, rv, a, b, 0, lens[0])
        return True

    # ------------------------------------------------------------ per packet
    # Locals only, no objects created per packet beyond what unpack_from returns.

    def _each_v4(self, inn: Ingress, rv: RecvVec, a: int, b: int, held: Held | None = None) -> None:
        table = inn.table
        u = rv.u32
        buf = rv.buf
        size = rv.size
        base = rv.buf_addr
        unpack = _V4.unpack_from
        stride = I_STRIDE  # module globals cost a dict lookup per use
        i_len = I_LEN
        for i in range(a, b):
            off = i * size
            ln = u[i * stride + i_len]
            if ln < 28:
                self.malformed += 1
                continue
            vihl, frag, src, dst, dport, ulen = unpack(buf, off)
            ihl = 20
            if vihl != 0x45:
                ihl = (vihl & 15) * 4
                if ihl < 20 or ln < ihl + 8:
                    self.malformed += 1
                    continue
                dport, ulen = _UDP.unpack_from(buf, off + ihl)
            e = table.get((dst, dport))
            if e is None:
                self.unmatched += 1
                continue
            c = e.c
            if frag & 0x3FFF:
                c[m.FRAGMENT] += 1
                continue
            if e.sources is not None and src not in e.sources:
                c[m.FILTERED] += 1
                continue
            plen = ulen - 8
            if plen < 0 or ihl + ulen > ln:
                self.malformed += 1
                continue
            c[0] += 1
            c[1] += plen
            if held is not None:
                _hold(held, e, plen, base + off + ihl + 8)
                continue
            o = e.out1
            if o is not None:
                e.add1(o, base + off + ihl + 8, plen)  # type: ignore[misc]
            else:
                paddr = base + off + ihl + 8
                for o in e.outs:
                    o.sq.add(o, paddr, plen)

    def _each_v6(self, inn: Ingress, rv: RecvVec, a: int, b: int, held: Held | None = None) -> None:
        table = inn.table
        u = rv.u32
        buf = rv.buf
        size = rv.size
        base = rv.buf_addr
        unpack = _V6.unpack_from
        stride = I_STRIDE
        i_len = I_LEN
        for i in range(a, b):
            off = i * size
            ln = u[i * stride + i_len]
            if ln < 48:
                self.malformed += 1
                continue
            _plen, nh, src, dst, dport, ulen = unpack(buf, off)
            if nh != 17:
                if nh == 44 and ln >= 56:  # first fragment: UDP follows the 8-byte header
                    dport = _UDP.unpack_from(buf, off + 48)[0]
                    e = table.get((dst, dport))
                    if e is not None:
                        e.c[m.FRAGMENT] += 1
                        continue
                self.unmatched += 1
                continue
            e = table.get((dst, dport))
            if e is None:
                self.unmatched += 1
                continue
            c = e.c
            if e.sources is not None and src not in e.sources:
                c[m.FILTERED] += 1
                continue
            plen = ulen - 8
            if plen < 0 or 40 + ulen > ln:
                self.malformed += 1
                continue
            c[0] += 1
            c[1] += plen
            if held is not None:
                _hold(held, e, plen, base + off + 48)
                continue
            o = e.out1
            if o is not None:
                e.add1(o, base + off + 48, plen)  # type: ignore[misc]
            else:
                paddr = base + off + 48
                for o in e.outs:
                    o.sq.add(o, paddr, plen)

    def _each_socket(self, e: tbl.Entry, rv: RecvVec, a: int, b: int) -> None:
        u = rv.u32
        size = rv.size
        base = rv.buf_addr
        c = e.c
        outs = e.outs
        for i in range(a, b):
            ln = u[i * I_STRIDE + I_LEN]
            if u[i * I_STRIDE + I_FLAGS] & MSG_TRUNC:
                self.malformed += 1
                continue
            c[0] += 1
            c[1] += ln
            paddr = base + i * size
            for o in outs:
                o.sq.add(o, paddr, ln)
