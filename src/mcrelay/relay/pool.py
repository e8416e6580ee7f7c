"""The relay worker processes: spawn, restart, liveness, channels. Nothing about rules.

The pool lives in the privileged supervisor and never waits on a worker. Every
message to a worker is queued on its channel and sent as the socket takes it
(:meth:`WorkerPool.watches` tells the supervisor's selector when a channel
wants writing), so a worker that hangs (SIGSTOP, a livelock) costs the
supervisor nothing: it stops answering pings, is killed after
:data:`DEAD_AFTER` seconds of silence and restarted with the shared back-off
(:mod:`mcrelay.children`).

What a worker is told is the owner's business: the pool asks its
:class:`PoolHooks` for the messages a fresh worker needs and hands every
message a worker sends back to them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mcrelay.children import Backoff, describe_status, reap
from mcrelay.ipc import Channel, Ping, Pong, ProtocolViolation
from mcrelay.relay import messages as m

PING_INTERVAL = 1.0
DEAD_AFTER = 3.0  # no message from a running worker for this long: kill it
START_TIMEOUT = 10.0
MAX_QUEUED_FRAMES = 4096  # a worker this far behind is as good as hung
CHANNEL_BUFFER = 4 * 1024 * 1024

_SRC_DIR = str(Path(__file__).resolve().parents[2])

Handler = Callable[[int, float], None]  # (selector event mask, now)


class PoolHooks(Protocol):
    """What the pool's owner (the relay manager) provides."""

    def initial_messages(self, index: int) -> list[tuple[Any, Sequence[int]]]:
        """Everything a fresh worker needs before ``Start`` (descriptors attached)."""
        ...

    def on_message(self, index: int, msg: Any, now: float) -> None:
        """A message from worker ``index`` (Stats and anything the pool does not handle)."""
        ...

    def on_gone(self, index: int) -> None:
        """Worker ``index`` died or was killed (its counters must be kept)."""
        ...


def spawn_worker(child_fd: int) -> int:
    """Start ``python -m mcrelay.relay.worker --fd N``; return its pid."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_SRC_DIR, env.get("PYTHONPATH", "")) if p)
    argv = [sys.executable, "-m", "mcrelay.relay.worker", "--fd", str(child_fd)]
    return os.posix_spawn(
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


@dataclass
class WorkerSlot:
    """One worker position: its current process, if any, and its history."""

    index: int
    state: str = "stopped"  # starting | running | backoff | stopped
    pid: int | None = None
    chan: Channel | None = None
    restarts: int = 0
    backoff: Backoff = field(default_factory=Backoff)
    next_start: float = 0.0
    started: float = 0.0
    last_seen: float = 0.0
    last_ping: float = 0.0
    ping_seq: int = 0
    pong_seq: int = 0
    stats_seq: int = 0  # last StatsRequest sent
    stats_answered: int = 0  # seq of the last Stats received
    stats_time: float = 0.0  # when that Stats arrived
    uid: int | None = None
    old_pids: set[int] = field(default_factory=set)
    last_exit: str = ""


class WorkerPool:
    """``size`` relay workers running as ``user``; see the module docstring."""

    def __init__(
        self,
        size: int,
        user: str,
        hooks: PoolHooks,
        log: logging.Logger,
        *,
        spawn: Callable[[int], int] = spawn_worker,
    ) -> None:
        self.size = max(1, size)
        self.user = user
        self.slots = [WorkerSlot(i) for i in range(self.size)]
        self._hooks = hooks
        self._log = log
        self._spawn_process = spawn
        self._started = False
        self._stopping = False

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Spawn the workers (idempotent)."""
        if self._started:
            return
        self._started, self._stopping = True, False
        now = time.monotonic()
        for slot in self.slots:
            self._spawn(slot, now)

    def stop(self) -> None:
        """Ask every worker to stop, SIGKILL what is left after a second, reap them all."""
        self._stopping = True
        pids = []
        for slot in self.slots:
            if slot.chan is not None:
                with contextlib.suppress(OSError):
                    slot.chan.post(m.Stop())
            if slot.pid is not None:
                pids.append(slot.pid)
            pids.extend(slot.old_pids)
        deadline = time.monotonic() + 1.0
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if not reap(p)]
            if pids:
                time.sleep(0.02)
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(p, 0)
        for slot in self.slots:
            if slot.chan is not None:
                slot.chan.close()
                slot.chan = None
            slot.state, slot.pid = "stopped", None
            slot.old_pids.clear()
        self._started = False

    def tick(self, now: float) -> None:
        """Restarts due, start timeouts, liveness pings and the silent-worker check."""
        if not self._started or self._stopping:
            return
        for slot in self.slots:
            if slot.state == "backoff" and now >= slot.next_start:
                self._spawn(slot, now)
            elif slot.state == "starting" and now - slot.started > START_TIMEOUT:
                self.kill(slot.index, now, "did not become ready")
            elif slot.state == "running":
                if now - slot.last_seen > DEAD_AFTER:
                    self.kill(slot.index, now, f"silent for {DEAD_AFTER:.0f} s (hung?)")
                elif now - slot.last_ping >= PING_INTERVAL and slot.pong_seq == slot.ping_seq:
                    slot.last_ping = now
                    slot.ping_seq += 1
                    self.send(slot.index, Ping(slot.ping_seq), now=now)

    def child_exited(self, pid: int, status: int) -> bool:
        """The supervisor reaped ``pid``; True if it was one of ours."""
        for slot in self.slots:
            if pid in slot.old_pids:
                slot.old_pids.discard(pid)
                return True
            if slot.pid == pid:
                self._gone(slot, time.monotonic(), describe_status(status), reaped=True)
                return True
        return False

    # ------------------------------------------------------------ messages

    def running(self, index: int) -> bool:
        slot = self.slots[index]
        return slot.state == "running" and slot.chan is not None

    def send(self, index: int, msg: Any, fds: Sequence[int] = (), *, now: float) -> bool:
        """Queue ``msg`` for worker ``index``; False if it has no channel (it gets it on start)."""
        slot = self.slots[index]
        if slot.chan is None:
            return False
        try:
            slot.chan.post(msg, list(fds))
        except OSError as exc:
            self.kill(index, now, f"send failed: {exc}")
            return False
        if slot.chan.queued > MAX_QUEUED_FRAMES:
            self.kill(index, now, f"{slot.chan.queued} messages unread")
            return False
        return True

    def broadcast(self, msg: Any, now: float) -> None:
        for slot in self.slots:
            if slot.chan is not None:
                self.send(slot.index, msg, now=now)

    def request_stats(self, now: float) -> dict[int, int]:
        """Ask every running worker for its counters; return whom to wait for, with the seq.

        A worker that has not answered its previous request yet (busy, or
        hung) is not asked again and not waited for: a listing then shows its
        last counters, and their age says how old they are.
        """
        asked = {}
        for slot in self.slots:
            if not self.running(slot.index) or slot.stats_answered < slot.stats_seq:
                continue
            slot.stats_seq += 1
            if self.send(slot.index, m.StatsRequest(slot.stats_seq), now=now):
                asked[slot.index] = slot.stats_seq
        return asked

    def answered(self, asked: dict[int, int]) -> bool:
        """True when every worker of ``asked`` answered, or is no longer running."""
        return all(
            not self.running(i) or self.slots[i].stats_answered >= seq for i, seq in asked.items()
        )

    def stats_age(self, now: float) -> float | None:
        """Seconds since the oldest running worker's last Stats (None: no worker reported)."""
        times = [s.stats_time for s in self.slots if self.running(s.index) and s.stats_time]
        return round(now - min(times), 3) if times else None

    # ------------------------------------------------------------ selector

    def watches(self) -> dict[int, tuple[int, Handler]]:
        """fd -> (events, handler) for every worker channel, as the selector should watch it."""
        out: dict[int, tuple[int, Handler]] = {}
        for slot in self.slots:
            chan = slot.chan
            if chan is None:
                continue
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if chan.wants_write else 0)
            out[chan.fileno()] = (events, self._handler(slot, chan))
        return out

    def _handler(self, slot: WorkerSlot, chan: Channel) -> Handler:
        def handle(mask: int, now: float) -> None:
            if slot.chan is not chan:
                return
            if mask & selectors.EVENT_WRITE:
                try:
                    chan.flush()
                except OSError as exc:
                    self._gone(slot, now, f"channel: {exc}")
                    return
            if mask & selectors.EVENT_READ:
                self._read(slot, chan, now)

        return handle

    def _read(self, slot: WorkerSlot, chan: Channel, now: float) -> None:
        try:
            while slot.chan is chan:
                try:
                    got = chan.recv()
                except BlockingIOError:
                    return
                if got is None:
                    continue
                msg, fds = got
                for f in fds:
                    os.close(f)
                self._on_message(slot, msg, now)
        except (EOFError, ProtocolViolation, OSError) as exc:
            self._gone(slot, now, f"channel: {exc}")

    def _on_message(self, slot: WorkerSlot, msg: Any, now: float) -> None:
        slot.last_seen = now
        if isinstance(msg, Pong):
            slot.pong_seq = max(slot.pong_seq, msg.seq)
            return
        if isinstance(msg, m.Ready):
            slot.state, slot.uid = "running", msg.uid
            self._log.info("relay worker %d ready (pid %d, uid %d)", slot.index, msg.pid, msg.uid)
            return
        if isinstance(msg, m.Stats):
            slot.stats_answered = max(slot.stats_answered, msg.seq)
            slot.stats_time = now
        self._hooks.on_message(slot.index, msg, now)

    # ------------------------------------------------------------ processes

    def kill(self, index: int, now: float, why: str) -> None:
        slot = self.slots[index]
        if slot.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(slot.pid, signal.SIGKILL)
        self._gone(slot, now, why)

    def _spawn(self, slot: WorkerSlot, now: float) -> None:
        parent, child = Channel.pair()
        try:
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                parent.sock.setsockopt(socket.SOL_SOCKET, opt, CHANNEL_BUFFER)
            os.set_inheritable(child.fileno(), True)
            pid = self._spawn_process(child.fileno())
        except OSError as exc:
            parent.close()
            child.close()
            self._log.error("cannot start relay worker %d: %s", slot.index, exc)
            self._schedule(slot, now, 0.0)
            return
        child.close()
        parent.sock.setblocking(False)
        slot.pid, slot.chan, slot.state = pid, parent, "starting"
        slot.started = slot.last_seen = slot.last_ping = now
        slot.ping_seq = slot.pong_seq = slot.stats_seq = slot.stats_answered = 0
        slot.stats_time, slot.uid = 0.0, None
        self._log.info("relay worker %d started (pid %d)", slot.index, pid)
        self.send(slot.index, m.Setup(slot.index, self.user), now=now)
        for msg, fds in self._hooks.initial_messages(slot.index):
            if not self.send(slot.index, msg, fds, now=now):
                return
        self.send(slot.index, m.Start(), now=now)

    def _gone(self, slot: WorkerSlot, now: float, why: str, reaped: bool = False) -> None:
        if slot.chan is None and slot.state in ("backoff", "stopped"):
            return
        if slot.chan is not None:
            slot.chan.close()
            slot.chan = None
        if slot.pid is not None and not reaped:
            slot.old_pids.add(slot.pid)
        self._hooks.on_gone(slot.index)
        if self._stopping:
            slot.state, slot.pid = "stopped", None
            return
        slot.restarts += 1
        slot.last_exit = why
        ran_for = now - slot.started if slot.state == "running" else 0.0
        delay = self._schedule(slot, now, ran_for)
        self._log.warning(
            "relay worker %d (pid %s) exited: %s; restart #%d in %.1f s",
            slot.index,
            slot.pid,
            why,
            slot.restarts,
            delay,
        )
        slot.pid = None

    def _schedule(self, slot: WorkerSlot, now: float, ran_for: float) -> float:
        delay = slot.backoff.next_delay(ran_for)
        slot.state = "backoff"
        slot.next_start = now + delay
        return delay

    # ------------------------------------------------------------ status

    def describe(self, index: int) -> dict[str, Any]:
        """The process side of ``show workers`` for one slot."""
        s = self.slots[index]
        user = None
        if s.uid is not None:
            try:
                user = pwd.getpwuid(s.uid).pw_name
            except KeyError:
                user = str(s.uid)
        d: dict[str, Any] = {
            "index": s.index,
            "pid": s.pid,
            "state": s.state,
            "restarts": s.restarts,
            "user": user,
        }
        if s.last_exit:
            d["last_exit"] = s.last_exit
        return d
