"""Relay worker process: receives its sockets, drops privileges, runs the hot loop.

Started by the RelayManager as ``python -m mcrelay.relay.worker --fd N`` where N
is its end of the supervisor socketpair. See :mod:`mcrelay.relay.messages` for
the conversation. The loop polls the ingress sockets and the channel, reads
batches with recvmmsg, hands each to :mod:`mcrelay.relay.hotpath` (lookup,
payloads queued by address, no copy, on the egress socket of each output), then
sends each egress socket's batch with one sendmmsg.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import gc
import logging
import os
import resource
import select
import signal
import socket
import struct
import sys
import time
from typing import Any

from mcrelay.children import EXIT_CONFIG
from mcrelay.ipc import Channel, Ping, Pong
from mcrelay.logsetup import configure
from mcrelay.privileges import PrivilegeDropFailed, become_unprivileged
from mcrelay.relay import messages as m
from mcrelay.relay import table as tbl
from mcrelay.relay.egress import Dest, EgressKey, open_egress
from mcrelay.relay.hotpath import HotPath, Ingress
from mcrelay.relay.mmsg import (
    I_FLAGS,
    I_LEN,
    I_STRIDE,
    MSG_TRUNC,
    SO_TIMESTAMPNS,
    SOL_SOCKET,
    RecvVec,
)
from mcrelay.relay.qos import Backlog, Output, SendQueue
from mcrelay.relay.reflect import (
    RawDest,
    RawQueue,
    RawSender,
    ReflectQueue,
    ReflectState,
    Sources,
    fan_output,
)
from mcrelay.relay.trace import WORKER_RING, Ring, record

VLEN = 64  # messages per recvmmsg/sendmmsg
SLOT = 65536  # bytes per receive slot
BATCHES_PER_WAKEUP = 16  # then let other sockets and the channel have a turn

_SPORT = struct.Struct("!H")

log = logging.getLogger("mcrelay.worker")


class _Ingress(Ingress):
    __slots__ = ("sock", "spec")

    def __init__(self, spec: m.IngressSpec, sock: socket.socket) -> None:
        super().__init__(spec.kind, spec.family, sock.fileno())
        self.spec = spec
        self.sock = sock


class Worker(HotPath):
    """State of one worker process (all of it lives in this single thread)."""

    def __init__(self, chan: Channel) -> None:
        super().__init__()
        self.chan = chan
        self.index = 0
        self.user = "nobody"
        self.ingress: dict[int, _Ingress] = {}
        self.by_fd: dict[int, _Ingress] = {}
        self.specs: tuple[m.TableEntry, ...] = ()
        self.traced: set[int] = set()
        self.counters: dict[int, list[int]] = {}
        self.prune_counters = False  # a rebuild may have left counters of removed relays
        self.out_counters: dict[tuple[int, int], list[Any]] = {}
        self.egress: dict[EgressKey, SendQueue] = {}
        self.dirty: list[SendQueue] = []
        self.backlog = Backlog()
        self.rings: dict[int, Ring] = {}
        self.table = tbl.Table()
        self.rv_packet = RecvVec(VLEN, SLOT)
        self.rv_socket = RecvVec(VLEN, SLOT, namelen=28)  # sizeof(struct sockaddr_in6)
        self.rv_packet.with_timestamps()  # traced packets carry the kernel's receive time
        self.rv_socket.with_timestamps()
        # Relay counters and output count as the last Stats sent them, per relay id.
        self.reported: dict[int, tuple[list[int], int]] = {}
        self.received = 0
        self.poller = select.epoll()  # poll() rescans every fd per wake-up: 10,000 relays
        self.polled_out: set[int] = set()
        self.running = False
        # Raw sockets from the supervisor (keep-source outputs, reflectors), by family.
        self.raw: dict[int, RawSender] = {}
        self.sources = Sources()
        self.reflect_states: dict[int, ReflectState] = {}

    # ------------------------------------------------------------ control

    def handle(self, msg: Any, fds: list[int]) -> bool:
        """Apply one message; False when the worker should exit."""
        if isinstance(msg, m.AddIngress):
            for spec, fd in zip(msg.specs, fds, strict=False):
                self._add_ingress(spec, fd)
            for fd in fds[len(msg.specs) :]:
                os.close(fd)
            return True
        if isinstance(msg, m.AddRaw):
            for fam, fd in zip(msg.families, fds, strict=False):
                old = self.raw.pop(fam, None)
                if old is not None:
                    old.sock.close()
                sock = socket.socket(
                    socket.AF_INET if fam == 4 else socket.AF_INET6, socket.SOCK_RAW, fileno=fd
                )
                self.raw[fam] = RawSender(sock, fam, self.sources)
            for fd in fds[len(msg.families) :]:
                os.close(fd)
            if self.running:
                self.rebuild()
            return True
        for fd in fds:
            os.close(fd)
        if isinstance(msg, Ping):
            self.chan.send(Pong(msg.seq))
        elif isinstance(msg, m.StatsRequest):
            self.chan.send(self.stats(msg.seq))
        elif isinstance(msg, m.SetTable):
            self.specs = msg.entries
            if self.running:
                self.rebuild()
        elif isinstance(msg, m.SetTrace):
            self.traced = set(msg.ids)
            for i in list(self.rings):
                if i not in self.traced:
                    del self.rings[i]
            if self.running:
                self.rebuild()
        elif isinstance(msg, m.RemoveIngress):
            for i in msg.ids:
                self._remove_ingress(i)
            if self.running:
                self.rebuild()
        elif isinstance(msg, m.Setup):
            self.index, self.user = msg.index, msg.user
        elif isinstance(msg, m.Stop):
            return False
        return True

    def _add_ingress(self, spec: m.IngressSpec, fd: int) -> None:
        self._remove_ingress(spec.id)
        fam = (
            socket.AF_PACKET
            if spec.kind == "packet"
            else (socket.AF_INET if spec.family == 4 else socket.AF_INET6)
        )
        sock = socket.socket(fam, socket.SOCK_DGRAM, fileno=fd)
        sock.setblocking(False)
        inn = _Ingress(spec, sock)
        self.ingress[spec.id] = inn
        self.by_fd[inn.fd] = inn
        if self.running:
            self.poller.register(inn.fd, select.EPOLLIN)

    def _remove_ingress(self, ingress_id: int) -> None:
        inn = self.ingress.pop(ingress_id, None)
        if inn is None:
            return
        del self.by_fd[inn.fd]
        if self.running:
            self.poller.unregister(inn.fd)
        inn.sock.close()

    def rebuild(self) -> None:
        """Resolve the table against held sockets; open/close egress sockets as needed."""
        # Counters of relays no longer in the table are dropped by the next
        # stats(), after it reported them: a relay whose input comes back
        # before then (an interface flap) goes on counting where it was.
        self.prune_counters = True
        wanted: set[EgressKey] = set()

        def kind_of(ingress_id: int) -> str | None:
            inn = self.ingress.get(ingress_id)
            return None if inn is None else inn.kind

        def make_outputs(spec: m.TableEntry, c: list[int]) -> list[Output]:
            outs: list[Output] = []
            for idx, o in enumerate(spec.outputs):
                oc = self.out_counters.get((spec.id, idx))
                if oc is None or oc[3] is not c:
                    oc = self.out_counters[(spec.id, idx)] = [0, 0, 0, c]
                if o.ifindex < 0:
                    continue  # output interface missing: nothing to send on
                fam = 6 if ":" in o.address else 4
                if o.src != m.SRC_OWN:
                    sender = self.raw.get(fam)
                    if sender is None:
                        continue  # no raw socket (yet): the supervisor sends one
                    dest = RawDest(fam, o.address, o.port, o.ifindex, o.ttl, -1, o.src)
                    if spec.reflect is None:
                        dest.tos = o.dscp << 2
                        outs.append(Output(RawQueue(sender, self.rv_packet), dest, o.dscp, oc))
                    else:
                        outs.append(Output(RawQueue(sender, self.rv_packet), dest, 0, oc))
                    continue
                key = EgressKey(fam, o.ifindex, o.ttl, o.dscp)
                sq = self.egress.get(key)
                if sq is None:
                    try:
                        sq = SendQueue(open_egress(key), VLEN, self.backlog, self.dirty)
                    except OSError as exc:
                        log.warning("worker %d: egress %s: %s", self.index, key, exc)
                        continue
                    self.egress[key] = sq
                wanted.add(key)
                outs.append(Output(sq, Dest(fam, o.address, o.port, o.ifindex), o.dscp, oc))
            return outs

        def make_entry_outputs(spec: m.TableEntry, c: list[int]) -> list[Output]:
            outs = make_outputs(spec, c)
            r = spec.reflect
            if r is None:
                return outs
            fam = 6 if ":" in spec.group else 4
            sender = self.raw.get(fam)
            inn = self.ingress.get(spec.ingress)
            if sender is None or inn is None:
                return []
            state = self.reflect_states.setdefault(r.rule, ReflectState())
            q = ReflectQueue(sender, self.rv_packet, state, outs, r.allow, inn.spec.ifindex)
            return [fan_output(q, c, spec.name)]

        for sq in self.dirty:
            sq.flush()
        self.dirty.clear()
        self.table = tbl.build(self.specs, kind_of, make_entry_outputs, self.counters, self.traced)
        rules = {s.reflect.rule for s in self.specs if s.reflect is not None}
        for gone in [r for r in self.reflect_states if r not in rules]:
            del self.reflect_states[gone]
        for key in [k for k in self.egress if k not in wanted]:
            sq = self.egress.pop(key)
            if sq.fd in self.polled_out:
                self.poller.unregister(sq.fd)
                self.polled_out.discard(sq.fd)
            sq.close()
        for inn in self.ingress.values():
            inn.table = self.table.packet.get(inn.spec.id, {})
            inn.single = self.table.single.get(inn.spec.id)
            entries = inn.table.values() if inn.kind == "packet" else [inn.single]
            traced = any(e is not None and e.traced for e in entries)
            if traced != inn.traced:
                _timestamps(inn.sock, traced)
            inn.traced = traced
        for i in self.traced:
            self.rings.setdefault(i, Ring(WORKER_RING))
        # The table lives until the next rebuild: keep the cycle collector from
        # walking it. The hot path allocates only short-lived objects, but those
        # trigger collections, and at 10,000 relays the older-generation passes
        # over the table cost the relay about a tenth of its rate (README
        # "Performance"). Unfreeze and collect first, so that whatever the old
        # table left in cycles is freed rather than frozen (about 15 ms at
        # 10,000 relays, once per rule change).
        gc.unfreeze()
        gc.collect()
        gc.freeze()

    def stats(self, seq: int) -> m.Stats:
        """Counters of the relays that changed since the last Stats, and those now gone.

        The supervisor pulls every 0.5 s; sending every relay each time cost, at
        10,000 relays, tens of ms of JSON per pull in both processes on the
        relay's CPU, which halved the sustainable rate (see README
        "Performance"). Idle relays are now sent once, and an unchanged relay
        costs one list comparison: no objects are built for it, since 10,000
        snapshots per pull kept the garbage collector busy (25 ms a pull).
        An output's counters never move without its relay's (a send failure
        or queue drop also counts on the relay), so the relay's list decides.
        """
        relays = []
        last = self.reported
        entries = self.table.entries
        for e in entries:
            c = e.c
            nout = len(e.spec.outputs)
            prev = last.get(e.id)
            if prev is not None and prev[1] == nout and prev[0] == c:
                continue
            last[e.id] = (c.copy(), nout)
            outs = []
            for idx in range(nout):
                oc = self.out_counters.get((e.id, idx))
                outs.append((oc[0], oc[1], oc[2]) if oc else (0, 0, 0))
            relays.append(m.RelayStats(e.id, tuple(c), tuple(outs)))
        held = {e.id for e in entries}
        gone = tuple(rid for rid in last if rid not in held)
        for rid in gone:
            final = self.counters.get(rid)
            if final is not None and final != last[rid][0]:  # the last counts before it went
                outs = []
                for idx in range(last[rid][1]):
                    oc = self.out_counters.get((rid, idx))
                    outs.append((oc[0], oc[1], oc[2]) if oc else (0, 0, 0))
                relays.append(m.RelayStats(rid, tuple(final), tuple(outs)))
            del last[rid]
        if self.prune_counters:
            self.prune_counters = False
            for rid in [i for i in self.counters if i not in held]:
                del self.counters[rid]
            for okey in [k for k in self.out_counters if k[0] not in held]:
                del self.out_counters[okey]
        ru = resource.getrusage(resource.RUSAGE_SELF)
        traces = {str(i): r.take() for i, r in self.rings.items() if r.records}
        worker = {
            "received": self.received,
            "unmatched": self.unmatched,
            "malformed": self.malformed,
            "backlog": self.backlog.size,
            "egress_sockets": len(self.egress),
            "uid": os.getuid(),
        }
        return m.Stats(seq, tuple(relays), worker, ru.ru_utime + ru.ru_stime, traces, gone)

    # ------------------------------------------------------------ run

    def run(self) -> int:
        """Bootstrap until Start, drop privileges, then loop until Stop or EOF."""
        while True:
            msg, fds = self.chan.recv_message()
            if isinstance(msg, m.Start):
                break
            if not self.handle(msg, fds):
                return 0
        uid, gid = become_unprivileged(self.user)
        try:
            cpus = sorted(os.sched_getaffinity(0))
            os.sched_setaffinity(0, {cpus[self.index % len(cpus)]})
        except OSError:
            pass
        self.chan.send(m.Ready(os.getpid(), uid, gid))
        self.running = True
        self.poller.register(self.chan.fileno(), select.EPOLLIN)
        for inn in self.ingress.values():
            self.poller.register(inn.fd, select.EPOLLIN)
        self.rebuild()
        return self.loop()

    def loop(self) -> int:
        chan_fd = self.chan.fileno()
        poll = self.poller.poll
        by_fd = self.by_fd
        while True:
            events = poll(1.0 if self.backlog.size else -1)
            for fd, ev in events:
                if fd == chan_fd:
                    try:
                        got = self.chan.recv()
                    except EOFError:
                        return 0
                    if got is not None and not self.handle(*got):
                        return 0
                    continue
                inn = by_fd.get(fd)
                if inn is not None:
                    self.drain(inn)
                elif ev & select.EPOLLOUT:
                    self.backlog.drain()
            if self.backlog.size or self.polled_out:
                self.backlog.drain()
                self._sync_pollout()

    def _sync_pollout(self) -> None:
        want = set(self.backlog.blocked)
        for fd in want - self.polled_out:
            self.poller.register(fd, select.EPOLLOUT)
        for fd in self.polled_out - want:
            self.poller.unregister(fd)
        self.polled_out = want

    def drain(self, inn: _Ingress) -> None:
        """Read up to BATCHES_PER_WAKEUP batches from one ingress socket and relay them."""
        packet = inn.kind == "packet"
        rv = self.rv_packet if packet else self.rv_socket
        for _ in range(BATCHES_PER_WAKEUP):
            if inn.traced:
                rv.arm_timestamps(rv.n)
                if not packet:
                    rv.reset_names(rv.n)
            try:
                n = rv.recv(inn.fd)
            except OSError as exc:
                if exc.errno in (errno.ENETDOWN, errno.ENXIO, errno.ENODEV):
                    return
                raise
            if n == 0:
                break
            self.received += n
            if inn.traced:
                self.batch_traced(inn, rv, n)
            elif not packet:
                self.batch_socket(inn, rv, n)
            elif inn.family == 4:
                self.batch_v4(inn, rv, n)
            else:
                self.batch_v6(inn, rv, n)
            for sq in self.dirty:
                sq.flush()
            self.dirty.clear()
            if n < rv.n:
                break
        if self.backlog.size:
            self._sync_pollout()

    def batch_traced(self, inn: _Ingress, rv: RecvVec, n: int) -> None:
        """Like the batch functions above, one packet at a time, recording each result.

        Each record has its packet's own receive time: the kernel's
        (SO_TIMESTAMPNS, set while the ingress is traced), else the time now.
        """
        for i in range(n):
            t = rv.timestamp(i) or time.time()
            e, src, size, result = self._one_traced(inn, rv, i)
            if e is None or not e.traced:
                continue
            ring = self.rings.get(e.id)
            if ring is None:
                continue
            sent = e.outs
            fan = e.outs[0].sq if e.outs else None
            if isinstance(fan, ReflectQueue) and result == "relayed":
                result, sent = fan.last, fan.members  # a reflector's own verdict
            outs = [_endpoint(*o.pyaddr[:2]) for o in sent] if result == "relayed" else []
            dst = _endpoint(e.spec.group, e.spec.port)
            ring.add(record(t, src, size, outs, result, self.index, dst))

    def _one_traced(
        self, inn: _Ingress, rv: RecvVec, i: int
    ) -> tuple[tbl.Entry | None, str, int, str]:
        u = rv.u32
        off = i * rv.size
        ln = u[i * I_STRIDE + I_LEN]
        data = bytes(rv.view[off : off + ln])
        if inn.kind == "socket":
            e = inn.single
            name = ctypes.string_at(rv.names_addr + i * rv.namelen, rv.namelen)
            src = _sockaddr_text(name)
            if e is None:
                self.unmatched += 1
                return None, src, ln, "unmatched"
            if u[i * I_STRIDE + I_FLAGS] & MSG_TRUNC:
                self.malformed += 1
                return e, src, ln, "truncated"
            self._send_one(e, rv.buf_addr + off, ln)
            return e, src, ln, "relayed"
        if inn.family == 4:
            if ln < 28:
                self.malformed += 1
                return None, "?", ln, "malformed"
            ihl = (data[0] & 15) * 4
            frag = struct.unpack_from("!H", data, 6)[0]
            src_b, dst_b = data[12:16], data[16:20]
            sport, dport, ulen = (
                struct.unpack_from("!HHH", data, ihl) if ln >= ihl + 8 else (0,) * 3
            )
            src = f"{socket.inet_ntop(socket.AF_INET, src_b)}:{sport}"
            l4 = ihl
        else:
            if ln < 48:
                self.malformed += 1
                return None, "?", ln, "malformed"
            nh = data[6]
            src_b, dst_b = data[8:24], data[24:40]
            l4 = 48 if nh == 44 else 40
            frag = 0x2000 if nh == 44 else 0
            sport, dport, ulen = struct.unpack_from("!HHH", data, l4) if ln >= l4 + 8 else (0,) * 3
            src = f"[{socket.inet_ntop(socket.AF_INET6, src_b)}]:{sport}"
        e = inn.table.get((dst_b, dport))
        if e is None:
            self.unmatched += 1
            return None, src, ln, "unmatched"
        if frag & 0x3FFF:
            e.c[m.FRAGMENT] += 1
            return e, src, ln, "fragment"
        if e.sources is not None and src_b not in e.sources:
            e.c[m.FILTERED] += 1
            return e, src, ulen - 8, "filtered"
        if ulen < 8 or l4 + ulen > ln:
            self.malformed += 1
            return e, src, ln, "malformed"
        self._send_one(e, rv.buf_addr + off + l4 + 8, ulen - 8)
        return e, src, ulen - 8, "relayed"

    @staticmethod
    def _send_one(e: tbl.Entry, paddr: int, plen: int) -> None:
        e.c[0] += 1
        e.c[1] += plen
        for o in e.outs:
            o.sq.add(o, paddr, plen)


def _endpoint(host: str, port: int) -> str:
    """``239.1.1.1:5000`` or ``[ff3e::1]:5000``: the spelling trace records use."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _timestamps(sock: socket.socket, on: bool) -> None:
    """Ask the kernel for each packet's receive time on a traced ingress (off again after)."""
    with contextlib.suppress(OSError):  # if refused, records carry the worker's time
        sock.setsockopt(SOL_SOCKET, SO_TIMESTAMPNS, 1 if on else 0)


def _sockaddr_text(name: bytes) -> str:
    fam = struct.unpack_from("=H", name)[0]
    if fam == socket.AF_INET:
        port = _SPORT.unpack_from(name, 2)[0]
        return f"{socket.inet_ntop(socket.AF_INET, name[4:8])}:{port}"
    if fam == socket.AF_INET6:
        port = _SPORT.unpack_from(name, 2)[0]
        return f"[{socket.inet_ntop(socket.AF_INET6, name[8:24])}]:{port}"
    return "?"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m mcrelay.relay.worker --fd N``."""
    ap = argparse.ArgumentParser(prog="mcrelay-worker")
    ap.add_argument("--fd", type=int, required=True)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure(f"mcrelay-worker[{os.getpid()}]", logging.INFO)  # journald priorities
    chan = Channel(socket.socket(fileno=args.fd))
    w = Worker(chan)
    try:
        return w.run()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return 0
    except PrivilegeDropFailed as exc:
        # One line, no traceback: the supervisor logs the exit and restarts us
        # with back-off; a traceback per restart would flood the journal.
        log.critical("%s", exc)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
