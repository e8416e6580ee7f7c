"""Level-triggered convergence: the reconciler, the interface table, memberships.

The interface table is fed a fake kernel dump; the reconciler fake parts that
fail on demand; memberships join through a recording stand-in for the socket
option, so nothing here touches a real network.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from mcrelay import membership as membership_mod
from mcrelay.errors import KernelRefused
from mcrelay.membership import Membership
from mcrelay.netlink import InterfaceTable
from mcrelay.reconcile import RETRY_CAP, Reconciler


class Msg(dict[str, Any]):
    """A pyroute2-like message: fields by key, attributes by get_attr."""

    def __init__(self, attrs: dict[str, Any], **fields: Any) -> None:
        super().__init__(fields)
        self.attrs = attrs

    def get_attr(self, name: str) -> Any:
        return self.attrs.get(name)


class FakeKernel:
    def __init__(self) -> None:
        self.links: dict[int, tuple[str, bool]] = {}

    def dump(self) -> tuple[list[Any], list[Any]]:
        links = [
            Msg({"IFLA_IFNAME": name}, index=ix, flags=1 if up else 0)
            for ix, (name, up) in self.links.items()
        ]
        return links, []


@pytest.fixture
def kernel() -> FakeKernel:
    k = FakeKernel()
    k.links = {1: ("lo", True), 5: ("dn1", True)}
    return k


def table(kernel: FakeKernel) -> InterfaceTable:
    return InterfaceTable(kernel.dump, doorbell=False)


def test_a_rename_changes_both_names_and_the_generation(kernel: FakeKernel) -> None:
    t = table(kernel)
    gen = t.generation
    kernel.links[5] = ("dnaway", True)
    assert t.refresh() == {"dn1", "dnaway"}
    assert t.ifindex_of("dn1") is None and t.ifindex_of("dnaway") == 5
    assert t.generation == gen + 1


def test_recreated_under_the_same_name_is_a_change(kernel: FakeKernel) -> None:
    t = table(kernel)
    del kernel.links[5]
    kernel.links[9] = ("dn1", True)
    assert t.refresh() == {"dn1"}
    assert t.ifindex_of("dn1") == 9


def test_a_down_interface_is_present_but_not_usable(kernel: FakeKernel) -> None:
    t = table(kernel)
    kernel.links[5] = ("dn1", False)
    assert t.refresh() == {"dn1"}
    assert t.ifindex_of("dn1") is None and t.get("dn1") is not None


def test_nothing_moved_means_no_change_and_the_same_generation(kernel: FakeKernel) -> None:
    t = table(kernel)
    gen = t.generation
    assert t.refresh() == frozenset()
    assert t.generation == gen


class Flaky:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise KernelRefused("MRT_ADD_VIF", 99, "Cannot assign requested address")


def test_a_part_runs_only_when_interfaces_moved() -> None:
    part = Flaky(0)
    r = Reconciler([("kernel routes", part)])
    r.run(0.0, generation=1)
    r.run(1.0, generation=1)
    assert part.calls == 1
    r.run(2.0, generation=2)
    assert part.calls == 2


def test_a_failing_part_is_retried_with_back_off_until_it_converges(
    caplog: pytest.LogCaptureFixture,
) -> None:
    part = Flaky(3)
    r = Reconciler([("kernel routes", part)])
    now = 0.0
    with caplog.at_level(logging.INFO, logger="mcrelay.reconcile"):
        r.run(now, generation=1)
        assert r.warnings() and "not converged" in r.warnings()[0]
        r.run(now, generation=1)  # not due yet
        assert part.calls == 1
        delays = []
        while r.warnings():
            due = r.parts[0].retry_at
            delays.append(due - now)
            now = due
            r.run(now, generation=1)
    assert part.calls == 4
    assert delays == sorted(delays) and max(delays) <= RETRY_CAP
    warnings = [rec for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 1, "the same failure is logged once, not per retry"
    assert not any(rec.exc_info for rec in caplog.records), "no traceback for a kernel refusal"
    assert "converged again" in caplog.text


def test_a_bug_in_a_part_is_logged_once_and_the_others_still_converge() -> None:
    def broken() -> None:
        raise RuntimeError("bug")

    other = Flaky(0)
    r = Reconciler([("relays", broken), ("kernel routes", other)])
    r.run(0.0, generation=1)
    assert other.calls == 1
    assert "internal error" in r.warnings()[0]


class Joins:
    """Stand-in for the MCAST_JOIN_GROUP socket option: records (ifindex, group)."""

    def __init__(self) -> None:
        self.joined: set[tuple[int, str]] = set()
        self.fail_on: set[int] = set()

    def join(self, sock: Any, family: int, ifindex: int, group: str, source: Any = None) -> None:
        if ifindex in self.fail_on:
            raise OSError(19, "No such device")
        self.joined.add((ifindex, group))

    def leave(self, sock: Any, family: int, ifindex: int, group: str, source: Any = None) -> None:
        self.joined.discard((ifindex, group))


@pytest.fixture
def joins(monkeypatch: pytest.MonkeyPatch) -> Joins:
    j = Joins()
    monkeypatch.setattr(membership_mod, "mcast_join", j.join)
    monkeypatch.setattr(membership_mod, "mcast_leave", j.leave)
    return j


def test_a_join_waits_for_its_interface_and_follows_it_when_recreated(joins: Joins) -> None:
    ifaces: dict[str, int] = {}
    memb = Membership(ifaces.get, logging.getLogger("test"))
    memb.join("late0", "239.70.0.9")
    assert memb.list()[0]["state"] == "waiting"
    ifaces["late0"] = 40
    memb.reconcile()
    assert memb.list()[0]["state"] == "joined" and (40, "239.70.0.9") in joins.joined
    ifaces["late0"] = 41  # deleted and created again
    memb.reconcile()
    assert memb.list()[0]["state"] == "joined"
    assert memb.sockets() == 1
    del ifaces["late0"]
    memb.reconcile()
    assert memb.list()[0]["state"] == "waiting" and memb.sockets() == 0
    memb.close()


def test_a_refused_join_is_reported_so_the_reconciler_retries(joins: Joins) -> None:
    ifaces = {"dn1": 5}
    memb = Membership(ifaces.get, logging.getLogger("test"))
    joins.fail_on.add(6)
    memb.join("dn1", "239.70.0.1")
    ifaces["dn1"] = 6
    with pytest.raises(KernelRefused):
        memb.reconcile()
    joins.fail_on.clear()
    memb.reconcile()
    assert memb.list()[0]["state"] == "joined"
    memb.close()


def test_a_wildcard_join_follows_matching_interfaces_as_they_come_and_go(joins: Joins) -> None:
    from mcrelay.membership import GroupJoins
    from mcrelay.model import GroupJoin

    ifaces = {"vlan10": 10, "eth0": 2}
    memb = Membership(ifaces.get, logging.getLogger("test"))
    rules = GroupJoins(memb, lambda: list(ifaces))
    rule = GroupJoin("vlan+", "239.70.0.10")
    rules.join(rule)
    memb.reconcile()
    assert joins.joined == {(10, "239.70.0.10")}
    ifaces["vlan20"] = 20
    rules.reconcile()
    memb.reconcile()
    assert joins.joined == {(10, "239.70.0.10"), (20, "239.70.0.10")}
    del ifaces["vlan10"]
    rules.reconcile()
    assert {(j["iface"], j["state"]) for j in rules.list()} == {("vlan20", "joined")}
    rules.leave(rule)
    assert rules.list() == []
    memb.close()
