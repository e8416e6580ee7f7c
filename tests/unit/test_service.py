"""The rule service's transactions: engines first, then the state file, rollback on failure.

The engines and the store are fakes that keep what they hold in plain dicts, so
each test can check the one promise that matters: after any refused change the
"kernel", the relay engine, the memberships and the state file hold exactly
what they held before, and after an accepted change all of them hold the new
rule set.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from mcrelay.errors import KernelRefused, NoSuchRule, RuleExists, StateWriteFailed
from mcrelay.model import GroupJoin, Relay, Route, RouteKey, RuleSet, parse_ruleset
from mcrelay.protocol import parse_command
from mcrelay.service import RuleService
from mcrelay.state import export_dict, rules_from_export

RULES: dict[str, Any] = {
    "routes": [
        {"iif": "up0", "source": "192.0.2.2", "group": "239.1.1.1", "oifs": ["dn1"]},
        {"iif": "up0", "group": "ff3e::1", "oifs": ["dn2"]},
    ],
    "relays": [
        {
            "name": "feed",
            "input": {"iif": "up0", "group": "239.9.9.9", "port": 5000},
            "outputs": [{"address": "239.2.2.2", "port": 6000, "oif": "dn1"}],
        }
    ],
    "groups": [
        {"iface": "dn1", "group": "239.5.5.5"},
        {"iface": "dn2", "group": "232.5.5.5", "source": "203.0.113.9"},
    ],
}


@dataclass(frozen=True)
class FakeDiff:
    """What the kernel engine's RouteDiff offers the service."""

    diff: dict[str, list[Any]]

    def to_dict(self) -> dict[str, list[Any]]:
        return self.diff


class Refused(KernelRefused):
    def __init__(self, op: str) -> None:
        super().__init__(op, errno.EPERM)


class FakeKernel:
    """Routes by key, like the MFC; ``fail_on`` makes the next matching call refuse."""

    def __init__(self) -> None:
        self.installed: dict[RouteKey, Route] = {}
        self.fail_on: set[str] = set()

    def _maybe_fail(self, op: str) -> None:
        if op in self.fail_on:
            raise Refused(op)

    def add_route(self, route: Route, dry_run: bool = False) -> None:
        self._maybe_fail("add")
        if route.key in self.installed:
            raise RuleExists(str(route.key))
        if not dry_run:
            self.installed[route.key] = route

    def update_route(self, route: Route, dry_run: bool = False) -> None:
        self._maybe_fail("update")
        if route.key not in self.installed:
            raise NoSuchRule(str(route.key))
        if not dry_run:
            self.installed[route.key] = route

    def del_route(self, key: RouteKey, dry_run: bool = False) -> None:
        self._maybe_fail("del")
        if key not in self.installed:
            raise NoSuchRule(str(key))
        if not dry_run:
            del self.installed[key]

    def replace(self, routes: Sequence[Route], dry_run: bool = False) -> FakeDiff:
        self._maybe_fail("replace")
        new = {r.key: r for r in routes}
        diff = {
            "added": [r.to_dict() for k, r in new.items() if k not in self.installed],
            "removed": [r.to_dict() for k, r in self.installed.items() if k not in new],
            "changed": [
                r.to_dict()
                for k, r in new.items()
                if k in self.installed and self.installed[k] != r
            ],
        }
        if not dry_run:
            self.installed = new
        return FakeDiff(diff)

    def routes(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self.installed.values()]


class FakeRelays:
    def __init__(self) -> None:
        self.installed: dict[str, Relay] = {}
        self.fail_on: set[str] = set()

    def _maybe_fail(self, op: str) -> None:
        if op in self.fail_on:
            raise Refused(f"relay {op}")

    def add(self, relay: Relay, dry_run: bool = False) -> None:
        self._maybe_fail("add")
        if not dry_run:
            self.installed[relay.name] = relay

    def delete(self, name: str, dry_run: bool = False) -> None:
        self._maybe_fail("delete")
        if not dry_run:
            del self.installed[name]

    def replace(self, relays: Sequence[Relay], dry_run: bool = False) -> dict[str, list[Any]]:
        self._maybe_fail("replace")
        new = {r.name: r for r in relays}
        diff = {
            "added": sorted(n for n in new if n not in self.installed),
            "removed": sorted(n for n in self.installed if n not in new),
            "changed": [],
        }
        if not dry_run:
            self.installed = new
        return diff

    def relays(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self.installed.values()]

    def workers(self) -> list[dict[str, Any]]:
        return [{"id": 0, "state": "running", "restarts": 0}]

    def warnings(self) -> list[str]:
        return []

    def trace_start(self, name: str) -> None: ...

    def trace_stop(self, name: str) -> None: ...

    def trace_read(self, name: str, cursor: int) -> tuple[list[dict[str, Any]], int]:
        return [], cursor


class FakeGroups:
    def __init__(self) -> None:
        self.joined: list[GroupJoin] = []
        self.fail_join: GroupJoin | None = None

    def join(self, join: GroupJoin) -> None:
        if join == self.fail_join:
            raise Refused(f"join {join}")
        assert join not in self.joined, "joined twice"
        self.joined.append(join)

    def leave(self, join: GroupJoin) -> None:
        self.joined.remove(join)

    def list(self) -> list[dict[str, Any]]:
        return [g.to_dict() for g in self.joined]


class FakeStore:
    """Keeps the last saved rule set; ``broken`` makes saves fail like a full disk."""

    def __init__(self) -> None:
        self.saved: RuleSet | None = None
        self.saves = 0
        self.broken = False

    def save(self, rules: RuleSet) -> None:
        if self.broken:
            raise StateWriteFailed(
                "cannot save rules to /var/lib/mcrelay/state.json: ENOSPC (No space left on device)"
            )
        self.saves += 1
        self.saved = rules


class World:
    """A service wired to fakes, plus one-line views of everything it drives."""

    def __init__(self) -> None:
        self.kernel = FakeKernel()
        self.relays = FakeRelays()
        self.groups = FakeGroups()
        self.store = FakeStore()
        self.service = RuleService(self.kernel, self.relays, self.groups, self.store)

    def run(self, method: str, **params: Any) -> Any:
        return self.service.execute(parse_command(method, params))

    def snapshot(self) -> tuple[Any, ...]:
        saved = self.store.saved
        return (
            dict(self.kernel.installed),
            dict(self.relays.installed),
            sorted(self.groups.joined, key=str),
            export_dict(self.service.rules),
            None if saved is None else export_dict(saved),
        )

    def assert_consistent(self) -> None:
        """Every engine and the state file hold exactly the service's rule set."""
        rules = self.service.rules
        assert set(self.kernel.installed.values()) == set(rules.routes)
        assert set(self.relays.installed.values()) == set(rules.relays)
        assert set(self.groups.joined) == set(rules.groups)
        if self.store.saved is not None:
            assert export_dict(self.store.saved) == export_dict(rules)


@pytest.fixture
def world() -> World:
    w = World()
    w.run("config.apply", rules=RULES)
    w.assert_consistent()
    return w


# ---------------------------------------------------------------- accepted changes


def test_every_accepted_change_is_saved_and_installed(world: World) -> None:
    saves = world.store.saves
    world.run("route.add", iif="up0", source="192.0.2.2", group="239.1.1.7", oifs=["dn2"])
    world.run("relay.del", name="feed")
    world.run("group.join", iface="dn1", group="ff3e::77")
    world.run("route.del", iif="up0", group="ff3e::1")
    assert world.store.saves == saves + 4
    world.assert_consistent()
    assert RouteKey("up0", "192.0.2.2", "239.1.1.7") in world.kernel.installed
    assert RouteKey("up0", None, "ff3e::1") not in world.kernel.installed
    assert world.relays.installed == {}
    assert GroupJoin("dn1", "ff3e::77") in world.groups.joined


def test_dry_runs_change_nothing_and_write_nothing(world: World) -> None:
    before, saves = world.snapshot(), world.store.saves
    world.run("route.add", iif="up0", group="239.1.1.8", oifs=["dn1"], dry_run=True)
    world.run("route.del", iif="up0", source="192.0.2.2", group="239.1.1.1", dry_run=True)
    world.run("relay.del", name="feed", dry_run=True)
    world.run("group.join", iface="dn1", group="239.6.6.6", dry_run=True)
    world.run("group.leave", iface="dn1", group="239.5.5.5", dry_run=True)
    result = world.run("config.apply", rules={}, dry_run=True)
    assert result["dry_run"] is True
    assert len(result["diff"]["routes"]["removed"]) == 2
    assert world.snapshot() == before and world.store.saves == saves


# ---------------------------------------------------------------- state write failures


STATE_FAILURES: list[tuple[str, dict[str, Any]]] = [
    ("route.add", {"iif": "up0", "source": "192.0.2.2", "group": "239.1.1.9", "oifs": ["dn2"]}),
    ("route.del", {"iif": "up0", "source": "192.0.2.2", "group": "239.1.1.1"}),
    (
        "relay.add",
        {
            "name": "second",
            "input": {"iif": "up0", "group": "239.9.9.10", "port": 5000},
            "outputs": [{"address": "198.51.100.2", "port": 7000}],
        },
    ),
    ("relay.del", {"name": "feed"}),
    ("group.join", {"iface": "dn1", "group": "239.6.6.6"}),
    ("group.leave", {"iface": "dn2", "group": "232.5.5.5", "source": "203.0.113.9"}),
    ("config.apply", {"rules": {}}),
    (
        "config.apply",
        {
            "rules": {
                "routes": [RULES["routes"][0]],
                "groups": [{"iface": "up0", "group": "239.7.7.7"}],
            }
        },
    ),
]


@pytest.mark.parametrize(("method", "params"), STATE_FAILURES, ids=lambda p: str(p)[:30])
def test_a_change_whose_state_cannot_be_written_is_refused_and_rolled_back(
    world: World, method: str, params: dict[str, Any]
) -> None:
    before = world.snapshot()
    world.store.broken = True

    with pytest.raises(StateWriteFailed, match="ENOSPC"):
        world.run(method, **params)

    assert world.snapshot() == before, "kernel, relays, groups and state must be unchanged"
    world.assert_consistent()
    # Once the disk is fixed the same change goes through.
    world.store.broken = False
    world.run(method, **params)
    world.assert_consistent()
    assert world.snapshot() != before


# ---------------------------------------------------------------- apply half-way failures


def test_apply_failing_in_the_relay_engine_restores_the_previous_routes(world: World) -> None:
    before, saves = world.snapshot(), world.store.saves
    new = {"routes": [{"iif": "up0", "group": "239.3.3.3", "oifs": ["dn1"]}], "relays": []}
    real_replace = world.relays.replace
    calls: list[int] = []

    def refuse_first_call(relays: Sequence[Relay], dry_run: bool = False) -> Any:
        # The kernel routes were already replaced when the relay engine refuses;
        # the rollback's own replace (back to the old relays) then works.
        calls.append(len(relays))
        if len(calls) == 1:
            raise Refused("relay replace")
        return real_replace(relays, dry_run)

    world.relays.replace = refuse_first_call  # type: ignore[method-assign]
    with pytest.raises(KernelRefused):
        world.run("config.apply", rules=new)

    assert world.snapshot() == before and world.store.saves == saves


def test_apply_failing_on_a_group_join_leaves_every_earlier_step_undone(world: World) -> None:
    before = world.snapshot()
    bad = GroupJoin("dn2", "239.8.8.8")
    world.groups.fail_join = bad
    new = {
        "routes": [{"iif": "up0", "group": "239.3.3.3", "oifs": ["dn1"]}],
        "groups": [{"iface": "up0", "group": "239.4.4.4"}, bad.to_dict()],
    }
    with pytest.raises(KernelRefused):
        world.run("config.apply", rules=new)
    assert world.snapshot() == before
    world.assert_consistent()


def test_a_refused_kernel_step_writes_no_state(world: World) -> None:
    before, saves = world.snapshot(), world.store.saves
    world.kernel.fail_on.add("add")
    with pytest.raises(KernelRefused):
        world.run("route.add", iif="up0", group="239.1.1.10", oifs=["dn1"])
    assert world.snapshot() == before and world.store.saves == saves


# ---------------------------------------------------------------- refusals before any step


def test_duplicates_and_unknown_rules_are_refused_without_touching_anything(world: World) -> None:
    before, saves = world.snapshot(), world.store.saves
    with pytest.raises(RuleExists):
        world.run("route.add", **RULES["routes"][0])
    with pytest.raises(RuleExists):
        world.run("group.join", iface="dn1", group="239.5.5.5")
    with pytest.raises(RuleExists, match="used by relay 'feed'"):
        world.run(
            "relay.add",
            name="other",
            input={"iif": "up0", "group": "239.9.9.9", "port": 5000},
            outputs=[{"address": "198.51.100.2", "port": 1}],
        )
    with pytest.raises(NoSuchRule):
        world.run("route.del", iif="up0", group="239.99.99.99")
    with pytest.raises(NoSuchRule):
        world.run("group.leave", iface="dn1", group="239.99.99.99")
    with pytest.raises(NoSuchRule):
        world.run("relay.del", name="nope")
    assert world.snapshot() == before and world.store.saves == saves


# ---------------------------------------------------------------- export / apply / restore


def test_export_is_the_state_format_and_applying_it_changes_nothing(world: World) -> None:
    # Added last, sorts first: export is in the state file's stable order.
    world.run("route.add", iif="up0", group="239.0.0.5", oifs=["dn1"])
    exported = world.run("config.export")
    assert exported["routes"][0]["group"] == "239.0.0.5"
    assert exported == export_dict(world.service.rules), "export prints the state file format"
    assert rules_from_export(exported, require_version=True) is not None

    body = {k: v for k, v in exported.items() if k != "version"}
    before, saves = world.snapshot(), world.store.saves
    result = world.run("config.apply", rules=body)

    for part in ("routes", "relays", "groups"):
        assert result["diff"][part] == {"added": [], "removed": [], "changed": []}, part
    assert world.snapshot()[:4] == before[:4]
    assert world.store.saves == saves + 1


def test_apply_reports_what_it_adds_and_removes(world: World) -> None:
    new = {
        "routes": [RULES["routes"][0], {"iif": "up0", "group": "239.3.3.3", "oifs": ["dn1"]}],
        "groups": [RULES["groups"][0]],
    }
    diff = world.run("config.apply", rules=new)["diff"]
    assert [r["group"] for r in diff["routes"]["added"]] == ["239.3.3.3"]
    assert [r["group"] for r in diff["routes"]["removed"]] == ["ff3e::1"]
    assert [r["name"] for r in diff["relays"]["removed"]] == ["feed"]
    assert diff["groups"]["removed"] == [
        {"iface": "dn2", "group": "232.5.5.5", "source": "203.0.113.9"}
    ]
    world.assert_consistent()


def test_restore_installs_the_saved_rules_without_rewriting_the_state_file() -> None:
    w = World()
    w.service.restore(parse_ruleset(RULES))
    assert w.store.saves == 0
    w.assert_consistent()
    assert len(w.kernel.installed) == 2 and len(w.groups.joined) == 2


def test_restore_that_fails_leaves_nothing_installed() -> None:
    w = World()
    w.groups.fail_join = GroupJoin("dn2", "232.5.5.5", "203.0.113.9")
    with pytest.raises(KernelRefused):
        w.service.restore(parse_ruleset(RULES))
    assert w.kernel.installed == {} and w.relays.installed == {} and w.groups.joined == []
    assert w.service.rules == RuleSet()
