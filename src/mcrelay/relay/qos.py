"""Egress send queues and the per-worker DSCP-priority backlog.

:class:`SendQueue` batches the messages of one egress socket into a
:class:`~mcrelay.relay.mmsg.SendVec` whose iovecs point into the receive
buffer, and sends them with one ``sendmmsg``. Counters are credited per
message just before the send and corrected on failure, so the success path
touches them once per message, not once per payload.

When a socket would block, the unsent payloads are copied into the worker's
:class:`Backlog` (the only copy on any path), one FIFO per DSCP value. When a
socket becomes writable the highest class is sent first; when the backlog is
full the lowest class is dropped first. Drops are counted as ``queue`` on the
relay.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from array import array
from collections import deque
from typing import Any

from mcrelay.relay.messages import NO_BUFFER, QUEUE, SEND_ERROR
from mcrelay.relay.mmsg import SendVec

BACKLOG_LIMIT = 4096

# UDP GSO: on unless MCRELAY_GSO=0 (kept for measuring; see README "Performance").
GSO = os.environ.get("MCRELAY_GSO", "1") != "0"
GSO_SEGMENTS = 64  # the kernel's UDP_MAX_SEGMENTS is 64 (128 since 6.x)
GSO_BYTES = 65507 - 8  # one IPv4 UDP datagram's worth of payload
# errnos of a GSO send the path cannot do (MTU below the segment, no csum offload, xfrm)
_GSO_REFUSED = frozenset({errno.EINVAL, errno.EIO, errno.EMSGSIZE, errno.EOPNOTSUPP})


_LENGTHS: dict[int, array[int]] = {}


def _lengths(length: int, count: int) -> memoryview:
    """``count`` copies of ``length`` as a ``'Q'`` buffer (cached per length)."""
    a = _LENGTHS.get(length)
    if a is None or len(a) < count:
        if len(_LENGTHS) > 256:
            _LENGTHS.clear()
        a = _LENGTHS[length] = array("Q", [length]) * max(count, 64)
    return memoryview(a)[:count]


class Output:
    """One relay output bound to its send queue; ``oc`` = [packets, bytes, errors, relay]."""

    __slots__ = ("dest", "dscp", "name_addr", "name_len", "oc", "pyaddr", "sq")

    def __init__(self, sq: SendQueue, dest: Any, dscp: int, oc: list[Any]) -> None:
        self.sq = sq
        self.dest = dest  # keeps the sockaddr buffer alive
        self.name_addr: int = dest.addr
        self.name_len: int = dest.len
        self.pyaddr: tuple[Any, ...] = dest.pyaddr
        self.dscp = dscp
        self.oc = oc


def _uncount(out: Output, length: int, reason: int) -> None:
    oc = out.oc
    oc[0] -= 1
    oc[1] -= length
    oc[2] += 1
    oc[3][reason] += 1


class Backlog:
    """Packets that found their socket full, by DSCP class (0..63)."""

    def __init__(self, limit: int = BACKLOG_LIMIT) -> None:
        self.limit = limit
        self.classes: list[deque[tuple[Output, bytes]]] = [deque() for _ in range(64)]
        self.size = 0
        self.blocked: dict[int, SendQueue] = {}  # fd -> queue waiting for POLLOUT

    def enqueue(self, out: Output, payload: bytes) -> None:
        if self.size >= self.limit:
            low = next((d for d in range(64) if self.classes[d]), 64)
            if out.dscp <= low:
                _uncount(out, len(payload), QUEUE)
                return
            victim, vpay = self.classes[low].popleft()
            victim.sq.pending -= 1
            _uncount(victim, len(vpay), QUEUE)
            self.size -= 1
            if victim.sq.pending == 0:
                victim.sq.blocked = False
                self.blocked.pop(victim.sq.fd, None)
        self.classes[out.dscp].append((out, payload))
        out.sq.pending += 1
        self.size += 1
        out.sq.blocked = True
        self.blocked[out.sq.fd] = out.sq

    def drain(self) -> None:
        """Send what the sockets accept now, highest class first, FIFO per socket."""
        stuck: set[SendQueue] = set()
        for d in range(63, -1, -1):
            q = self.classes[d]
            if not q:
                continue
            keep: deque[tuple[Output, bytes]] = deque()
            while q:
                out, payload = q.popleft()
                sq = out.sq
                if sq in stuck or sq.closed:
                    if sq.closed:
                        self.size -= 1
                        continue
                    keep.append((out, payload))
                    continue
                try:
                    sq.sock.sendto(payload, out.pyaddr)
                except BlockingIOError:
                    stuck.add(sq)
                    keep.append((out, payload))
                    continue
                except OSError as exc:
                    reason = NO_BUFFER if exc.errno == errno.ENOBUFS else SEND_ERROR
                    _uncount(out, len(payload), reason)
                sq.pending -= 1
                self.size -= 1
            self.classes[d] = keep
        for fd, sq in list(self.blocked.items()):
            if sq.pending <= 0 or sq.closed:
                sq.pending = 0
                sq.blocked = False
                del self.blocked[fd]

    def forget(self, sq: SendQueue) -> None:
        """A socket is being closed: drop its queued packets."""
        for d, q in enumerate(self.classes):
            if any(o.sq is sq for o, _ in q):
                kept = deque((o, p) for o, p in q if o.sq is not sq)
                self.size -= len(q) - len(kept)
                self.classes[d] = kept
        self.blocked.pop(sq.fd, None)


class SendQueue:
    """Messages for one egress socket, sent with sendmmsg when full or at batch end.

    Consecutive payloads of the same size for the same output are gathered
    into one message with a ``UDP_SEGMENT`` cmsg (UDP GSO): the kernel builds
    one super-packet and cuts it into datagrams as late as it can, so a batch
    costs one trip through the IP stack instead of one per packet. A socket
    whose GSO send is refused (path MTU below the size, no checksum offload)
    falls back to one message per payload for good.
    """

    def __init__(
        self,
        sock: socket.socket,
        vlen: int,
        backlog: Backlog,
        dirty: list[SendQueue],
        gso: bool | None = None,
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.vlen = vlen
        self.sv = SendVec(vlen)
        self.iq = self.sv.iq
        self.n = 0  # payloads queued
        self.m = 0  # messages closed
        self.outs: list[Output | None] = [None] * vlen  # per message
        self.lens = [0] * vlen  # per message: every payload of a message has one size
        self.first = [0] * (vlen + 1)  # first payload of each message
        self.cur: Output | None = None  # output and size of the open message
        self.cur_len = -1
        self.cur_left = 0  # payloads the open message may still take
        self.gso = GSO if gso is None else gso
        self.backlog = backlog
        self.dirty = dirty
        self.blocked = False
        self.closed = False
        self.pending = 0

    def add(self, out: Output, data_addr: int, length: int) -> None:
        """Queue one payload (an address in the receive buffer) for ``out``.

        This runs once per packet and output, so it does the least it can: two
        iovec words and, when the payload joins the open GSO message (the common
        case), one decrement. Output and size are kept per message, not per
        payload, since a message has one of each; counters are credited per
        message in :meth:`flush`, which always runs before anyone reads them.
        """
        if self.blocked:
            oc = out.oc
            oc[0] += 1
            oc[1] += length
            self.backlog.enqueue(out, ctypes.string_at(data_addr, length))
            return
        i = self.n
        iq = self.iq
        iq[2 * i] = data_addr
        iq[2 * i + 1] = length
        self.n = i + 1
        # cur is None while the queue is empty, so the first payload opens a message.
        if out is self.cur and length == self.cur_len and self.cur_left:
            self.cur_left -= 1
        else:
            if i:
                m = self.m = self.m + 1  # close the open message (payloads first[m] .. i-1)
            else:
                m = self.m = 0
                self.dirty.append(self)
            self.sv.start(m, out.name_addr, out.name_len, i)
            self.first[m] = i
            self.outs[m] = out
            self.lens[m] = length
            self.cur = out
            self.cur_len = length
            self.cur_left = min(GSO_SEGMENTS, GSO_BYTES // max(length, 1)) - 1 if self.gso else 0
        if i + 1 == self.vlen:
            self.flush()
            self.dirty.remove(self)

    def add_run(self, out: Output, addrs: memoryview, length: int) -> None:
        """Queue ``len(addrs)`` payloads of one size for ``out``, as ``add`` would one by one.

        The worker's uniform-batch path calls this once per batch instead of
        ``add`` once per packet: the iovec words are written with two strided
        slice assignments and the Python work is per message, not per payload.
        ``addrs`` is a ``'Q'`` memoryview of payload addresses.
        """
        k = len(addrs)
        per = min(GSO_SEGMENTS, GSO_BYTES // max(length, 1)) if self.gso else 1
        iq = self.iq
        sv = self.sv
        first = self.first
        done = 0
        while done < k:
            if self.blocked:  # earlier payloads wait in the backlog: keep the order
                for a in addrs[done:]:
                    self.add(out, a, length)
                return
            i = self.n
            take = min(k - done, self.vlen - i)
            iq[2 * i : 2 * (i + take) : 2] = addrs[done : done + take]
            iq[2 * i + 1 : 2 * (i + take) : 2] = _lengths(length, take)
            j = 0
            if i and out is self.cur and length == self.cur_len and self.cur_left:
                j = min(self.cur_left, take)
                self.cur_left -= j
            elif not i:
                self.dirty.append(self)
            while j < take:
                m = self.m = self.m + 1 if i + j else 0
                sv.start(m, out.name_addr, out.name_len, i + j)
                first[m] = i + j
                self.outs[m] = out
                self.lens[m] = length
                t = min(per, take - j)
                j += t
                self.cur_left = per - t
            self.cur = out
            self.cur_len = length
            self.n = i + take
            done += take
            if self.n == self.vlen:
                self.flush()
                self.dirty.remove(self)

    def flush(self) -> None:
        """Send everything queued; failures are counted, would-block goes to the backlog."""
        n = self.n
        if not n:
            return
        self.m += 1  # close the open message
        nm = self.m
        first = self.first
        first[nm] = n
        sv = self.sv
        lens = self.lens
        outs = self.outs
        for k in range(nm):
            segs = first[k + 1] - first[k]
            ln = lens[k]
            sv.finish(k, segs, ln if segs > 1 else 0)
            oc = outs[k].oc  # type: ignore[union-attr]
            oc[0] += segs
            oc[1] += segs * ln
        self.n = self.m = 0
        self.cur = None
        off = 0
        while off < nm:
            r = sv.send(self.fd, off, nm - off)
            if r > 0:
                off += r
                continue
            err = -r
            if err == errno.EINTR:
                continue
            if err in (errno.EAGAIN, errno.EWOULDBLOCK):
                iq = self.iq
                for k in range(off, nm):
                    o = outs[k]
                    assert o is not None
                    for j in range(first[k], first[k + 1]):
                        self.backlog.enqueue(o, ctypes.string_at(iq[2 * j], lens[k]))
                break
            o = outs[off]
            assert o is not None
            a, b = first[off], first[off + 1]
            if b - a > 1 and err in _GSO_REFUSED:
                self.gso = False  # this path cannot segment: one datagram per message from now
                self._send_each(o, a, b, lens[off])
            else:
                for _ in range(a, b):
                    _uncount(o, lens[off], NO_BUFFER if err == errno.ENOBUFS else SEND_ERROR)
            off += 1

    def _send_each(self, o: Output, a: int, b: int, length: int) -> None:
        """Send payloads [a, b) of one message one sendto each (after a refused GSO message)."""
        iq = self.iq
        for j in range(a, b):
            try:
                self.sock.sendto(ctypes.string_at(iq[2 * j], length), o.pyaddr)
            except BlockingIOError:
                self.backlog.enqueue(o, ctypes.string_at(iq[2 * j], length))
            except OSError as exc:
                reason = NO_BUFFER if exc.errno == errno.ENOBUFS else SEND_ERROR
                _uncount(o, length, reason)

    def close(self) -> None:
        self.closed = True
        self.backlog.forget(self)
        self.sock.close()
