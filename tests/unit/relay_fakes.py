"""Fakes for the relay manager's unit tests: a worker pool, socket openers, a membership.

Like ``FakeKernel`` for the kernel engine, they record what the manager asks
for, so a test can state what the workers would have been told and which
sockets would be open, without processes or a kernel.
"""

from __future__ import annotations

import errno
import itertools
import logging
from collections.abc import Sequence
from typing import Any

from mcrelay.model import Relay
from mcrelay.net import bpf
from mcrelay.relay.pool import Handler, PoolHooks

_fds = itertools.count(1000)


class FakeSocket:
    """A descriptor number that knows whether it was closed."""

    def __init__(self, what: str) -> None:
        self.fd = next(_fds)
        self.what = what
        self.closed = False
        self.prog: bpf.Program | None = None

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        self.closed = True


class FakeOpeners:
    """Opens fake sockets; ``fail`` maps an interface index to the errno opening it gives."""

    def __init__(self) -> None:
        self.fail: dict[int, int] = {}
        self.opened: list[FakeSocket] = []

    def _open(self, what: str, ifindex: int) -> FakeSocket:
        if ifindex in self.fail:
            raise OSError(self.fail[ifindex], f"fake failure on ifindex {ifindex}")
        s = FakeSocket(what)
        self.opened.append(s)
        return s

    def packet(
        self, ifindex: int, family: int, fanout: int | None, prog: bpf.Program
    ) -> tuple[FakeSocket, int]:
        s = self._open(f"packet {ifindex}", ifindex)
        s.prog = prog
        return s, fanout if fanout is not None else 77

    def udp(self, relay: Relay, ifindex: int) -> FakeSocket:
        return self._open(f"udp {relay.name} {ifindex}", ifindex)

    def holder(self, iif: str, family: int, address: str, port: int) -> FakeSocket | None:
        return FakeSocket(f"holder {address}:{port}")

    def attach(self, sock: Any, prog: bpf.Program) -> None:
        sock.prog = prog

    def packet_stats(self, sock: Any) -> tuple[int, int]:
        return 0, 0

    def raw(self, family: int) -> FakeSocket:
        s = FakeSocket(f"raw {family}")
        self.opened.append(s)
        return s

    def open_now(self) -> list[FakeSocket]:
        return [s for s in self.opened if not s.closed]


class FakePool:
    """Records every message per worker slot; all workers 'running'."""

    def __init__(self, size: int, user: str, hooks: PoolHooks, log: logging.Logger) -> None:
        self.size = size
        self.hooks = hooks
        self.sent: list[list[tuple[Any, tuple[int, ...]]]] = [[] for _ in range(size)]
        self.started = False
        self.stats_seq = 0

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.started = False

    def tick(self, now: float) -> None:
        pass

    def child_exited(self, pid: int, status: int) -> bool:
        return False

    def send(self, index: int, msg: Any, fds: Sequence[int] = (), *, now: float) -> bool:
        self.sent[index].append((msg, tuple(fds)))
        return True

    def broadcast(self, msg: Any, now: float) -> None:
        for i in range(self.size):
            self.send(i, msg, now=now)

    def request_stats(self, now: float) -> dict[int, int]:
        self.stats_seq += 1
        return {i: self.stats_seq for i in range(self.size)}

    def answered(self, asked: dict[int, int]) -> bool:
        return True

    def stats_age(self, now: float) -> float | None:
        return 0.0

    def watches(self) -> dict[int, tuple[int, Handler]]:
        return {}

    def describe(self, index: int) -> dict[str, Any]:
        return {"index": index, "pid": 100 + index, "state": "running", "restarts": 0}

    # -- for tests

    def of_type(self, index: int, cls: type[Any]) -> list[tuple[Any, tuple[int, ...]]]:
        return [(msg, fds) for msg, fds in self.sent[index] if isinstance(msg, cls)]

    def clear(self) -> None:
        for box in self.sent:
            box.clear()


class FakeMembership:
    """Reference-counted joins, no sockets."""

    def __init__(self) -> None:
        self.refs: dict[tuple[str, str, str | None], int] = {}

    def join(self, iface: str, group: str, source: str | None = None) -> None:
        key = (iface, group, source)
        self.refs[key] = self.refs.get(key, 0) + 1

    def leave(self, iface: str, group: str, source: str | None = None) -> bool:
        key = (iface, group, source)
        if key not in self.refs:
            return False
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
        return True


GONE = errno.ENODEV
