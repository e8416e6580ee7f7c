"""Membership bookkeeping: refcounts, >20 groups per interface, waiting and rejoin.

The kernel calls are replaced by a recorder here; tests/netns/test_relay_membership.py
does the real joins.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import pytest

from mcrelay import membership as mod
from mcrelay.errors import KernelRefused
from mcrelay.membership import GROUPS_PER_SOCKET, Membership


class Kernel:
    def __init__(self) -> None:
        self.joined: dict[int, set[tuple[int, str, str | None]]] = {}
        self.fail: set[str] = set()

    def join(self, sock: socket.socket, family: int, ifindex: int, group: str, source: Any) -> None:
        if group in self.fail:
            raise OSError(105, "No buffer space available")
        per = self.joined.setdefault(sock.fileno(), set())
        if len({g for _, g, _ in per}) >= GROUPS_PER_SOCKET:
            raise OSError(105, "No buffer space available")  # igmp_max_memberships
        per.add((ifindex, group, source))

    def leave(
        self, sock: socket.socket, family: int, ifindex: int, group: str, source: Any
    ) -> None:
        self.joined[sock.fileno()].discard((ifindex, group, source))


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Kernel:
    k = Kernel()
    monkeypatch.setattr(mod, "mcast_join", k.join)
    monkeypatch.setattr(mod, "mcast_leave", k.leave)
    return k


def test_refcount_and_many_groups(kernel: Kernel) -> None:
    idx = {"eth1": 3}
    mb = Membership(idx.get, logging.getLogger("t"))
    groups = [f"239.1.0.{i}" for i in range(45)]
    for g in groups:
        mb.join("eth1", g)
    mb.join("eth1", groups[0])  # a second user of the same group
    assert mb.sockets() == 3  # 20 + 20 + 5
    assert all(e["state"] == "joined" for e in mb.list())
    assert mb.refs("eth1", groups[0]) == 2
    assert mb.leave("eth1", groups[0])
    assert mb.refs("eth1", groups[0]) == 1
    assert mb.leave("eth1", groups[0])
    assert mb.refs("eth1", groups[0]) == 0
    assert not mb.leave("eth1", groups[0])
    for g in groups[1:]:
        mb.leave("eth1", g)
    assert mb.sockets() == 0 and mb.list() == []


def test_asm_and_ssm_of_one_group_use_different_sockets(kernel: Kernel) -> None:
    mb = Membership({"eth1": 3}.get, logging.getLogger("t"))
    mb.join("eth1", "232.1.1.1", "192.0.2.2")
    mb.join("eth1", "232.1.1.1", "192.0.2.3")
    mb.join("eth1", "232.1.1.1")
    assert mb.sockets() == 3
    assert [e["source"] for e in mb.list()] == ["*", "192.0.2.2", "192.0.2.3"]


def test_waiting_then_rejoin_and_drop(kernel: Kernel) -> None:
    idx: dict[str, int] = {}
    mb = Membership(idx.get, logging.getLogger("t"))
    mb.join("wg0", "ff3e::1")
    assert mb.list()[0]["state"] == "waiting" and mb.sockets() == 0
    idx["wg0"] = 9
    mb.rejoin("wg0", 9)
    assert mb.list()[0]["state"] == "joined"
    assert any((9, "ff3e::1", None) in s for s in kernel.joined.values())
    mb.drop("wg0")
    assert mb.list()[0]["state"] == "waiting" and mb.sockets() == 0
    mb.rejoin("wg0", 12)  # re-created with a new index
    assert any((12, "ff3e::1", None) in s for s in kernel.joined.values())
    mb.close()


def test_refused_join_raises_and_takes_no_reference(kernel: Kernel) -> None:
    kernel.fail.add("239.9.9.9")
    mb = Membership({"eth1": 3}.get, logging.getLogger("t"))
    with pytest.raises(KernelRefused):
        mb.join("eth1", "239.9.9.9")
    assert mb.list() == [] and mb.sockets() == 0
