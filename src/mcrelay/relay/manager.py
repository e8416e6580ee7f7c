"""Supervisor side of the relay engine: rules, ingress sockets, workers, counters.

The RelayManager lives in the privileged supervisor, which owns the event loop:
it polls :meth:`RelayManager.fds` (re-read every iteration: restarts change
them), calls :meth:`handle_readable` for a readable one, :meth:`tick` a few
times a second, and :meth:`child_exited` for every child it reaps. All times
(``now``) are ``time.monotonic()``.

Sockets are created here and passed to workers:

- per (input interface, family) with packet-mode relays, one AF_PACKET socket
  per worker slot, all in one PACKET_FANOUT hash group. The manager keeps its
  own reference, so a restarted worker gets the same socket back (its fanout
  share and queued packets included), and a rule change only re-attaches the
  BPF filter to the manager's copies (the same open sockets the workers read);
- per socket-mode relay, one UDP socket, given to one worker chosen by a hash
  of the relay's input key (so each stream stays in order);
- per unicast packet-mode input, a bound never-read UDP socket (no ICMP
  port-unreachable from the host).

Every worker gets the whole table; rule changes are a new ``SetTable`` and, for
a new input, an ``AddIngress`` with the new sockets. Workers are never restarted
for a rule change.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pwd
import select
import signal
import socket
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcrelay.errors import KernelRefused, McrelayError, NoSuchRule, RuleExists
from mcrelay.ipc import Channel, Ping, Pong, ProtocolViolation
from mcrelay.membership import Membership
from mcrelay.model import Relay
from mcrelay.relay import bpf, ingress
from mcrelay.relay import messages as m
from mcrelay.relay.trace import MANAGER_RING, Ring

STATS_INTERVAL = 0.5
REFRESH_TIMEOUT = 0.25  # longest a listing waits for fresh worker counters
PING_INTERVAL = 2.0
DEAD_AFTER = 10.0  # no message from a worker for this long: kill it
START_TIMEOUT = 10.0
BACKOFF_START = 0.1
BACKOFF_CAP = 5.0
STABLE_AFTER = 30.0  # a worker up this long resets the back-off
SEND_TIMEOUT = 5.0
FDS_PER_MESSAGE = 200

_SRC_DIR = str(Path(__file__).resolve().parents[2])


@dataclass
class _Rec:
    relay: Relay
    id: int
    joins: list[tuple[str, str, str | None]] = field(default_factory=list)


@dataclass
class _PacketIn:
    id: int
    iif: str
    family: int
    ifindex: int
    fanout: int
    socks: list[socket.socket]
    keys: frozenset[tuple[str, int]]
    tier: str
    packets: int = 0
    drops: int = 0


@dataclass
class _SocketIn:
    id: int
    relay_id: int
    iif: str
    ifindex: int
    sock: socket.socket
    worker: int


@dataclass
class _Slot:
    index: int
    state: str = "stopped"  # starting | running | backoff | stopped
    pid: int | None = None
    chan: Channel | None = None
    restarts: int = 0
    streak: int = 0
    next_start: float = 0.0
    started: float = 0.0
    last_seen: float = 0.0
    last_stats: float = 0.0
    last_ping: float = 0.0
    seq: int = 0
    stats_seq: int = 0  # seq of the last Stats received
    uid: int | None = None
    cpu: float = 0.0
    cpu_base: float = 0.0
    stats: dict[int, m.RelayStats] = field(default_factory=dict)
    wstats: dict[str, int] = field(default_factory=dict)
    old_pids: set[int] = field(default_factory=set)


def _add(acc: list[int], vals: Sequence[int]) -> None:
    for i, v in enumerate(vals):
        acc[i] += v


class RelayManager:
    """The supervisor-side API of the userspace relay engine."""

    def __init__(
        self,
        *,
        workers: int,
        user: str,
        ifindex_of: Callable[[str], int | None],
        membership: Membership,
        log: logging.Logger,
    ) -> None:
        self.nworkers = max(1, workers)
        self.user = user
        self._ifindex_of = ifindex_of
        self._membership = membership
        self._log = log
        self._relays: dict[str, _Rec] = {}
        self._next_id = 1
        self._slots = [_Slot(i) for i in range(self.nworkers)]
        self._pin: dict[tuple[str, int], _PacketIn] = {}
        self._sin: dict[int, _SocketIn] = {}  # by relay id
        self._holders: dict[tuple[str, str, int], socket.socket | None] = {}
        self._retired: dict[int, tuple[list[int], list[list[int]]]] = {}
        self._traced: set[int] = set()
        self._rings: dict[int, Ring] = {}
        self._errors: dict[str, str] = {}  # relay name -> why its input is not open
        self._version = 0
        self._started = False
        self._stopping = False
        self._last_pstats = 0.0

    # ------------------------------------------------------------ processes

    def start(self) -> None:
        """Spawn the workers (idempotent)."""
        if self._started:
            return
        self._started = True
        now = time.monotonic()
        for slot in self._slots:
            self._spawn(slot, now)

    def fds(self) -> list[int]:
        """Channel descriptors to poll for reading (changes when workers restart)."""
        return [s.chan.fileno() for s in self._slots if s.chan is not None]

    def handle_readable(self, fd: int, now: float) -> None:
        """Read what a worker sent (one or more frames) and act on it."""
        slot = next((s for s in self._slots if s.chan and s.chan.fileno() == fd), None)
        if slot is None or slot.chan is None:
            return
        chan = slot.chan
        try:
            chan.sock.settimeout(0)
            while True:
                try:
                    got = chan.recv()
                except BlockingIOError:
                    break
                if got is not None:
                    msg, fds = got
                    for f in fds:
                        os.close(f)
                    self._on_message(slot, msg, now)
        except (EOFError, ProtocolViolation, OSError) as exc:
            self._gone(slot, now, f"channel: {exc}")
            return
        finally:
            if slot.chan is chan:
                chan.sock.settimeout(SEND_TIMEOUT)

    def tick(self, now: float) -> None:
        """Restarts due, liveness pings, stats pulls, ingress drop counters."""
        if not self._started or self._stopping:
            return
        for slot in self._slots:
            if slot.state == "backoff" and now >= slot.next_start:
                self._spawn(slot, now)
            elif slot.state == "starting" and now - slot.started > START_TIMEOUT:
                self._kill(slot, now, "did not become ready")
            elif slot.state == "running":
                if now - slot.last_seen > DEAD_AFTER:
                    self._kill(slot, now, f"silent for {DEAD_AFTER:.0f} s")
                    continue
                if now - slot.last_stats >= STATS_INTERVAL:
                    slot.last_stats = now
                    slot.seq += 1
                    self._send(slot, m.StatsRequest(slot.seq), now=now)
                if now - slot.last_ping >= PING_INTERVAL:
                    slot.last_ping = now
                    self._send(slot, Ping(slot.seq), now=now)
        if now - self._last_pstats >= 1.0:
            self._last_pstats = now
            self._poll_packet_stats()

    def child_exited(self, pid: int, status: int) -> bool:
        """The supervisor reaped ``pid``; True if it was one of our workers."""
        for slot in self._slots:
            if pid in slot.old_pids:
                slot.old_pids.discard(pid)
                return True
            if slot.pid == pid:
                self._gone(slot, time.monotonic(), _describe_status(status), reaped=True)
                return True
        return False

    def _spawn(self, slot: _Slot, now: float) -> None:
        parent, child = Channel.pair()
        try:
            for s, opt in ((parent.sock, socket.SO_SNDBUF), (parent.sock, socket.SO_RCVBUF)):
                s.setsockopt(socket.SOL_SOCKET, opt, 4 * 1024 * 1024)
            child_fd = child.fileno()
            os.set_inheritable(child_fd, True)
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (_SRC_DIR, env.get("PYTHONPATH", "")) if p
            )
            argv = [sys.executable, "-m", "mcrelay.relay.worker", "--fd", str(child_fd)]
            pid = os.posix_spawn(
                sys.executable,
                argv,
                env,
                setsigdef=(signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD),
                setsigmask=(),
                # stdin from /dev/null, stdout to the supervisor's stderr (the log):
                # a worker must not hold or write the supervisor's stdin/stdout.
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, 2, 1),
                ],
            )
        except OSError as exc:
            parent.close()
            child.close()
            self._log.error("cannot start relay worker %d: %s", slot.index, exc)
            self._backoff(slot, now)
            return
        child.close()
        parent.sock.settimeout(SEND_TIMEOUT)
        slot.pid, slot.chan, slot.state = pid, parent, "starting"
        slot.started = slot.last_seen = slot.last_stats = slot.last_ping = now
        slot.stats, slot.wstats, slot.uid = {}, {}, None
        self._log.info("relay worker %d started (pid %d)", slot.index, pid)
        ok = self._send(slot, m.Setup(slot.index, self.user), now=now)
        specs: list[tuple[m.IngressSpec, int]] = []
        for pin in self._pin.values():
            specs.append(
                (
                    m.IngressSpec(pin.id, "packet", pin.family, pin.ifindex),
                    pin.socks[slot.index].fileno(),
                )
            )
        for sin in self._sin.values():
            if sin.worker == slot.index:
                fam = 6 if sin.sock.family == socket.AF_INET6 else 4
                specs.append((m.IngressSpec(sin.id, "socket", fam, sin.ifindex), sin.sock.fileno()))
        ok = ok and self._send_ingress(slot, specs, now)
        ok = ok and self._send(slot, self._table(), now=now)
        ok = ok and self._send(slot, m.SetTrace(tuple(sorted(self._traced))), now=now)
        if ok:
            self._send(slot, m.Start(), now=now)

    def _send_ingress(
        self, slot: _Slot, specs: list[tuple[m.IngressSpec, int]], now: float
    ) -> bool:
        for i in range(0, len(specs), FDS_PER_MESSAGE):
            chunk = specs[i : i + FDS_PER_MESSAGE]
            msg = m.AddIngress(tuple(s for s, _ in chunk))
            if not self._send(slot, msg, [fd for _, fd in chunk], now=now):
                return False
        return True

    def _send(self, slot: _Slot, msg: Any, fds: Sequence[int] = (), *, now: float) -> bool:
        if slot.chan is None:
            return False
        try:
            slot.chan.send(msg, list(fds))
        except OSError as exc:
            self._kill(slot, now, f"send failed: {exc}")
            return False
        return True

    def _broadcast(self, msg: Any, now: float) -> None:
        for slot in self._slots:
            if slot.chan is not None:
                self._send(slot, msg, now=now)

    def _kill(self, slot: _Slot, now: float, why: str) -> None:
        if slot.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(slot.pid, signal.SIGKILL)
        self._gone(slot, now, why)

    def _gone(self, slot: _Slot, now: float, why: str, reaped: bool = False) -> None:
        """A worker died or was killed: keep its counts, schedule its restart."""
        if slot.state in ("backoff", "stopped") and slot.chan is None:
            return
        for rid, st in slot.stats.items():
            self._retire(rid, st)
        slot.stats = {}
        slot.cpu_base += slot.cpu
        slot.cpu = 0.0
        if slot.chan is not None:
            slot.chan.close()
            slot.chan = None
        if slot.pid is not None and not reaped:
            slot.old_pids.add(slot.pid)
        if self._stopping:
            slot.state, slot.pid = "stopped", None
            return
        if slot.state == "running" and now - slot.started > STABLE_AFTER:
            slot.streak = 0
        slot.restarts += 1
        self._log.warning(
            "relay worker %d (pid %s) exited: %s; restart %d",
            slot.index,
            slot.pid,
            why,
            slot.restarts,
        )
        slot.pid = None
        self._backoff(slot, now)

    def _backoff(self, slot: _Slot, now: float) -> None:
        delay = min(BACKOFF_CAP, BACKOFF_START * (2**slot.streak))
        slot.streak += 1
        slot.state = "backoff"
        slot.next_start = now + delay

    def _retire(self, rid: int, st: m.RelayStats) -> None:
        acc = self._retired.get(rid)
        if acc is None:
            acc = self._retired[rid] = ([0] * m.N_COUNTERS, [])
        _add(acc[0], st.counters)
        while len(acc[1]) < len(st.outputs):
            acc[1].append([0, 0, 0])
        for i, o in enumerate(st.outputs):
            _add(acc[1][i], o)

    def _on_message(self, slot: _Slot, msg: Any, now: float) -> None:
        slot.last_seen = now
        if isinstance(msg, m.Stats):
            slot.stats_seq = msg.seq
            # Stats carries changes only (see m.Stats): merge, then drop what is gone.
            slot.stats.update((rs.id, rs) for rs in msg.relays)
            for gone_id in msg.gone:
                slot.stats.pop(gone_id, None)
            slot.wstats = msg.worker
            slot.cpu = msg.cpu
            for rid, recs in msg.traces.items():
                ring = self._rings.get(int(rid))
                if ring is not None:
                    for r in recs:
                        ring.add(r)
        elif isinstance(msg, m.Ready):
            slot.state, slot.uid = "running", msg.uid
            self._log.info("relay worker %d ready (pid %d, uid %d)", slot.index, msg.pid, msg.uid)
        elif isinstance(msg, Pong):
            pass
        else:
            self._log.warning("relay worker %d sent unexpected %s", slot.index, type(msg).__name__)

    def stop(self) -> None:
        """Stop the workers (Stop, then SIGKILL after a second) and close every socket."""
        self._stopping = True
        now = time.monotonic()
        pids = []
        for slot in self._slots:
            if slot.chan is not None:
                self._send(slot, m.Stop(), now=now)
            if slot.pid is not None:
                pids.append(slot.pid)
            pids.extend(slot.old_pids)
        deadline = time.monotonic() + 1.0
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if not _reap(p)]
            if pids:
                time.sleep(0.02)
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(p, 0)
        for slot in self._slots:
            if slot.chan is not None:
                slot.chan.close()
                slot.chan = None
            slot.state, slot.pid = "stopped", None
            slot.old_pids.clear()
        for key in list(self._pin):
            self._close_pin(key, tell=False)
        for rid in list(self._sin):
            self._close_sin(rid, tell=False)
        for h in self._holders.values():
            if h is not None:
                h.close()
        self._holders.clear()
        for rec in self._relays.values():
            self._leave(rec)
        self._started = False

    # ------------------------------------------------------------ rules

    def add(self, relay: Relay, dry_run: bool = False) -> None:
        """Install a relay; RuleExists on the same name or the same input key."""
        self._check_new(relay, self._relays.values())
        if dry_run:
            return
        rec = _Rec(relay, self._new_id())
        try:
            self._join(rec)
            self._relays[relay.name] = rec
            self._sync()
        except Exception as exc:
            self._relays.pop(relay.name, None)
            self._leave(rec)
            self._sync()
            if isinstance(exc, McrelayError):
                raise
            if isinstance(exc, OSError):
                raise KernelRefused(f"relay {relay.name}", exc.errno or 0, str(exc)) from exc
            raise

    def delete(self, name: str, dry_run: bool = False) -> None:
        """Remove a relay; NoSuchRule if there is none of that name."""
        rec = self._relays.get(name)
        if rec is None:
            raise NoSuchRule(f"relay {name}")
        if dry_run:
            return
        self._remove(rec)
        self._sync()

    def replace(self, relays: Sequence[Relay], dry_run: bool = False) -> dict[str, list[Any]]:
        """Make the relay set exactly ``relays``; returns the names added, removed, changed."""
        names: dict[str, Relay] = {}
        keys: dict[tuple[str, str, int], str] = {}
        for r in relays:
            if r.name in names:
                raise RuleExists(f"relay {r.name}")
            if r.input.key in keys:
                raise RuleExists(
                    f"relay input {_key_text(r)} (relays {keys[r.input.key]} and {r.name})"
                )
            names[r.name] = r
            keys[r.input.key] = r.name
        added = sorted(n for n in names if n not in self._relays)
        removed = sorted(n for n in self._relays if n not in names)
        changed = sorted(
            n for n in names if n in self._relays and self._relays[n].relay != names[n]
        )
        diff: dict[str, list[Any]] = {"added": added, "removed": removed, "changed": changed}
        if dry_run or not (added or removed or changed):
            return diff
        old = dict(self._relays)
        for n in removed + changed:
            self._remove(self._relays[n])
        done: list[_Rec] = []
        try:
            for n in added + changed:
                rec = _Rec(names[n], self._new_id())
                self._join(rec)
                self._relays[n] = rec
                done.append(rec)
            self._sync()
        except Exception as exc:
            for rec in done:
                self._relays.pop(rec.relay.name, None)
                self._leave(rec)
            for n in removed + changed:
                rec = old[n]
                self._join(rec)
                self._relays[n] = rec
            self._sync()
            if isinstance(exc, OSError):
                raise KernelRefused("apply relays", exc.errno or 0, str(exc)) from exc
            raise
        return diff

    def refresh(self, timeout: float = REFRESH_TIMEOUT) -> None:
        """Pull every running worker's counters now and wait (bounded) for them.

        Between pulls the counters are up to STATS_INTERVAL old: an engineer who
        has just sent 200 packets and lists the relays expects to see 200, as
        the kernel's own counters would show. A worker that does not answer
        within ``timeout`` keeps its last counters.
        """
        now = time.monotonic()
        waiting = []
        for slot in self._slots:
            if slot.state == "running" and slot.chan is not None:
                slot.seq += 1
                slot.last_stats = now
                if self._send(slot, m.StatsRequest(slot.seq), now=now):
                    waiting.append(slot)
        deadline = now + timeout
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            fds = [s.chan.fileno() for s in waiting if s.chan is not None]
            ready, _, _ = select.select(fds, [], [], left)
            for fd in ready:
                self.handle_readable(fd, time.monotonic())
            waiting = [
                s
                for s in waiting
                if s.state == "running" and s.chan is not None and s.stats_seq < s.seq
            ]

    def relays(self) -> list[dict[str, Any]]:
        """Every relay: its rule, state, and counters summed over workers past and present."""
        self.refresh()
        out = []
        for name in sorted(self._relays):
            rec = self._relays[name]
            r = rec.relay
            d = r.to_dict()
            c = [0] * m.N_COUNTERS
            outs = [[0, 0, 0] for _ in r.outputs]
            acc = self._retired.get(rec.id)
            if acc is not None:
                _add(c, acc[0])
                for i, o in enumerate(acc[1][: len(outs)]):
                    _add(outs[i], o)
            for slot in self._slots:
                st = slot.stats.get(rec.id)
                if st is not None:
                    _add(c, st.counters)
                    for i, so in enumerate(st.outputs[: len(outs)]):
                        _add(outs[i], so)
            present = self._ifindex_of(r.input.iif) is not None
            d["state"] = "active" if present and name not in self._errors else "waiting"
            if name in self._errors:
                d["error"] = self._errors[name]
            d["packets"], d["bytes"] = c[m.PACKETS], c[m.BYTES]
            d["drops"] = {k: c[m.NO_BUFFER + i] for i, k in enumerate(m.DROP_NAMES)}
            for od, oc, spec in zip(d["outputs"], outs, r.outputs, strict=True):
                od["packets"], od["bytes"], od["errors"] = oc
                if spec.oif is not None and self._ifindex_of(spec.oif) is None:
                    od["state"] = "waiting"
                else:
                    od["state"] = "active"
            pin = self._pin.get((r.input.iif, r.input.family)) if r.mode == "packet" else None
            if pin is not None:
                d["input_drops"] = pin.drops
            d["traced"] = rec.id in self._traced
            out.append(d)
        return out

    def workers(self) -> list[dict[str, Any]]:
        out = []
        for s in self._slots:
            user = None
            if s.uid is not None:
                try:
                    user = pwd.getpwuid(s.uid).pw_name
                except KeyError:
                    user = str(s.uid)
            out.append(
                {
                    "index": s.index,
                    "pid": s.pid,
                    "state": s.state,
                    "restarts": s.restarts,
                    "cpu_seconds": round(s.cpu_base + s.cpu, 3),
                    "user": user,
                    "received": s.wstats.get("received", 0),
                    "unmatched": s.wstats.get("unmatched", 0),
                    "malformed": s.wstats.get("malformed", 0),
                }
            )
        return out

    # ------------------------------------------------------------ tracing

    def trace_start(self, name: str) -> None:
        rec = self._rec(name)
        self._traced.add(rec.id)
        self._rings.setdefault(rec.id, Ring(MANAGER_RING))
        self._broadcast(m.SetTrace(tuple(sorted(self._traced))), time.monotonic())

    def trace_stop(self, name: str) -> None:
        rec = self._rec(name)
        self._traced.discard(rec.id)
        self._broadcast(m.SetTrace(tuple(sorted(self._traced))), time.monotonic())

    def trace_read(self, name: str, cursor: int) -> tuple[list[dict[str, Any]], int]:
        """Records from ``cursor`` on (start at 0) and the cursor to pass next time."""
        rec = self._rec(name)
        ring = self._rings.get(rec.id)
        if ring is None:
            return [], cursor
        return ring.read(cursor)

    # ------------------------------------------------------------ interfaces

    def interface_changed(self, name: str, ifindex: int | None) -> None:
        """An interface appeared, vanished or got a new index: rebuild what uses it."""
        uses = any(
            r.relay.input.iif == name or any(o.oif == name for o in r.relay.outputs)
            for r in self._relays.values()
        )
        if any(k[0] == name for k in self._pin) or any(s.iif == name for s in self._sin.values()):
            uses = True
        if not uses:
            return
        if ifindex is None:
            self._membership.drop(name)
        else:
            self._membership.rejoin(name, ifindex)
        self._sync()

    def warnings(self) -> list[str]:
        """Things that will silently lose traffic: rp_filter on socket-mode inputs, missing oifs."""
        out = []
        for name in sorted(self._relays):
            r = self._relays[name].relay
            if r.mode == "socket" and r.input.family == 4:
                rp = _rp_filter(r.input.iif)
                if rp:
                    out.append(
                        f"relay {name}: socket mode on {r.input.iif} with rp_filter={rp}: packets "
                        f"from sources not routed via {r.input.iif} are dropped before the relay "
                        "sees them; use --mode packet or set rp_filter=0"
                    )
            for o in r.outputs:
                if o.oif is not None and self._ifindex_of(o.oif) is None:
                    out.append(f"relay {name}: output interface {o.oif} does not exist")
            if name in self._errors:
                out.append(f"relay {name}: input not open: {self._errors[name]}")
        return out

    # ------------------------------------------------------------ internals

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def _rec(self, name: str) -> _Rec:
        rec = self._relays.get(name)
        if rec is None:
            raise NoSuchRule(f"relay {name}")
        return rec

    def _check_new(self, relay: Relay, existing: Any) -> None:
        if relay.name in self._relays:
            raise RuleExists(f"relay {relay.name}")
        for rec in existing:
            if rec.relay.input.key == relay.input.key:
                raise RuleExists(f"relay input {_key_text(relay)} (used by relay {rec.relay.name})")

    def _join(self, rec: _Rec) -> None:
        inp = rec.relay.input
        if not inp.is_multicast:
            return
        for src in inp.sources or (None,):
            self._membership.join(inp.iif, inp.group, src)
            rec.joins.append((inp.iif, inp.group, src))

    def _leave(self, rec: _Rec) -> None:
        for iif, group, src in rec.joins:
            self._membership.leave(iif, group, src)
        rec.joins.clear()

    def _remove(self, rec: _Rec) -> None:
        self._leave(rec)
        del self._relays[rec.relay.name]
        self._retired.pop(rec.id, None)
        self._rings.pop(rec.id, None)
        self._traced.discard(rec.id)
        self._errors.pop(rec.relay.name, None)

    def _sync(self) -> None:
        """Bring sockets, BPF filters and the workers' table in line with the rules."""
        now = time.monotonic()
        idx: dict[str, int | None] = {}

        def ifindex(name: str) -> int | None:
            if name not in idx:
                idx[name] = self._ifindex_of(name)
            return idx[name]

        # packet-mode inputs, per (iif, family)
        want: dict[tuple[str, int], set[tuple[str, int]]] = {}
        for rec in self._relays.values():
            r = rec.relay
            if r.mode == "packet" and ifindex(r.input.iif) is not None:
                want.setdefault((r.input.iif, r.input.family), set()).add(
                    (r.input.group, r.input.port)
                )
        for key, pin in list(self._pin.items()):
            if key not in want or ifindex(key[0]) != pin.ifindex:
                self._close_pin(key)
        for key, keyset in want.items():
            have = self._pin.get(key)
            frozen = frozenset(keyset)
            if have is None:
                self._open_pin(key, frozen, ifindex(key[0]) or 0, now)
            elif have.keys != frozen:
                prog = bpf.compile_filter(key[1], frozen)
                for s in have.socks:
                    bpf.attach(s, prog)
                have.keys, have.tier = frozen, prog.tier
        # socket-mode inputs, per relay
        by_id = {rec.id: rec for rec in self._relays.values()}
        for rid, sin in list(self._sin.items()):
            if by_id.get(rid) is None or ifindex(sin.iif) != sin.ifindex:
                self._close_sin(rid)
        for rec in self._relays.values():
            r = rec.relay
            if r.mode != "socket" or rec.id in self._sin:
                continue
            ix = ifindex(r.input.iif)
            if ix is not None:
                self._open_sin(rec, ix, now)
        # port holders for unicast packet-mode inputs
        holders = {
            (rec.relay.input.iif, rec.relay.input.group, rec.relay.input.port)
            for rec in self._relays.values()
            if rec.relay.mode == "packet"
            and not rec.relay.input.is_multicast
            and ifindex(rec.relay.input.iif) is not None
        }
        for hk in list(self._holders):
            h = self._holders[hk]
            if hk not in holders or h is None:
                if h is not None:
                    h.close()
                del self._holders[hk]
        for hk in holders - set(self._holders):
            fam = 6 if ":" in hk[1] else 4
            self._holders[hk] = ingress.open_port_holder(hk[0], fam, hk[1], hk[2])
        for name in list(self._errors):
            rec0 = self._relays.get(name)
            if rec0 is None or ifindex(rec0.relay.input.iif) is None:
                self._errors.pop(name, None)
        self._broadcast(self._table(idx), now)

    def _open_pin(
        self, key: tuple[str, int], keys: frozenset[tuple[str, int]], ix: int, now: float
    ) -> None:
        iif, fam = key
        prog = bpf.compile_filter(fam, keys)
        socks: list[socket.socket] = []
        fanout: int | None = None
        try:
            for _ in range(self.nworkers):
                s, fanout = ingress.open_packet(ix, fam, fanout, prog)
                socks.append(s)
        except OSError as exc:
            for s in socks:
                s.close()
            if exc.errno in (errno.ENODEV, errno.ENXIO, errno.ENETDOWN):
                self._log.warning("input %s went away while opening: %s", iif, exc)
                return
            raise
        assert fanout is not None
        pin = _PacketIn(self._new_id(), iif, fam, ix, fanout, socks, keys, prog.tier)
        self._pin[key] = pin
        self._log.info(
            "packet input %s IPv%d ifindex %d fanout %d (%s filter, %d insns)",
            iif,
            fam,
            ix,
            fanout,
            prog.tier,
            len(prog),
        )
        spec = m.IngressSpec(pin.id, "packet", fam, ix)
        for slot in self._slots:
            if slot.chan is not None:
                self._send(slot, m.AddIngress((spec,)), [socks[slot.index].fileno()], now=now)

    def _close_pin(self, key: tuple[str, int], tell: bool = True) -> None:
        pin = self._pin.pop(key)
        if tell:
            self._broadcast(m.RemoveIngress((pin.id,)), time.monotonic())
        for s in pin.socks:
            s.close()

    def _open_sin(self, rec: _Rec, ix: int, now: float) -> None:
        r = rec.relay
        try:
            s = ingress.open_udp_input(
                r.input.iif,
                ix,
                r.input.family,
                r.input.group,
                r.input.port,
                r.input.sources,
                r.input.is_multicast,
            )
        except OSError as exc:
            self._errors[r.name] = str(exc)
            self._log.warning("relay %s: cannot open socket input: %s", r.name, exc)
            return
        self._errors.pop(r.name, None)
        worker = zlib.crc32(_key_text(r).encode()) % self.nworkers
        sin = _SocketIn(self._new_id(), rec.id, r.input.iif, ix, s, worker)
        self._sin[rec.id] = sin
        slot = self._slots[worker]
        if slot.chan is not None:
            spec = m.IngressSpec(sin.id, "socket", r.input.family, ix)
            self._send(slot, m.AddIngress((spec,)), [s.fileno()], now=now)

    def _close_sin(self, rid: int, tell: bool = True) -> None:
        sin = self._sin.pop(rid)
        slot = self._slots[sin.worker]
        if tell and slot.chan is not None:
            self._send(slot, m.RemoveIngress((sin.id,)), now=time.monotonic())
        sin.sock.close()

    def _table(self, idx: dict[str, int | None] | None = None) -> m.SetTable:
        cache = idx if idx is not None else {}

        def ifindex(name: str) -> int | None:
            if name not in cache:
                cache[name] = self._ifindex_of(name)
            return cache[name]

        entries = []
        for rec in self._relays.values():
            r = rec.relay
            if r.mode == "packet":
                pin = self._pin.get((r.input.iif, r.input.family))
                ing = pin.id if pin is not None else None
            else:
                sin = self._sin.get(rec.id)
                ing = sin.id if sin is not None else None
            if ing is None:
                continue
            outs = []
            for o in r.outputs:
                ix = 0 if o.oif is None else (ifindex(o.oif) or -1)
                outs.append(m.OutputSpec(o.address, o.port, ix, o.ttl, o.dscp))
            entries.append(
                m.TableEntry(
                    rec.id, r.name, ing, r.input.group, r.input.port, r.input.sources, tuple(outs)
                )
            )
        self._version += 1
        return m.SetTable(self._version, tuple(entries))

    def _poll_packet_stats(self) -> None:
        for pin in self._pin.values():
            for s in pin.socks:
                try:
                    p, d = ingress.packet_stats(s)
                except OSError:
                    continue
                pin.packets += p
                pin.drops += d


def _key_text(r: Relay) -> str:
    host = f"[{r.input.group}]" if r.input.family == 6 else r.input.group
    return f"{host}:{r.input.port}@{r.input.iif}"


def _reap(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done == pid


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    if os.WIFEXITED(status):
        return f"exit status {os.WEXITSTATUS(status)}"
    return f"status {status}"


def _rp_filter(iif: str) -> int:
    values = []
    for name in ("all", iif):
        with contextlib.suppress(OSError, ValueError):
            values.append(int(Path(f"/proc/sys/net/ipv4/conf/{name}/rp_filter").read_text()))
    return max(values, default=0)
