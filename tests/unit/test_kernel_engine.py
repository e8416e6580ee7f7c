"""KernelEngine against a fake kernel: transactions, VIF accounting, (*,G) learning."""

from __future__ import annotations

import copy
import errno
from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest

from mcrelay.errors import KernelRefused, NoSuchRule, RuleExists, Unavailable, VifTableFull
from mcrelay.kernel.engine import KernelEngine, RouteDiff
from mcrelay.kernel.mroute import Upcall, UpcallKind
from mcrelay.kernel.structs import SgCount
from mcrelay.model import Oif, Route, RouteKey

# ---------------------------------------------------------------- fake kernel


@dataclass
class FamilyTables:
    """The kernel's per-family multicast routing state, as the fake models it."""

    vifs: dict[int, int] = field(default_factory=dict)  # slot -> ifindex
    mfc: dict[tuple[str, str], tuple[int, dict[int, int]]] = field(default_factory=dict)
    counts: dict[tuple[str, str], SgCount] = field(default_factory=dict)


class FakeKernel:
    """Enough of ipmr/ip6mr to check what the engine does, with failure injection.

    ``fail_at = n`` makes the n-th mutating call (0-based, counted from when
    it was set) raise KernelRefused(ENOBUFS); later calls succeed, so the
    engine's rollback runs against a working kernel.
    """

    def __init__(self) -> None:
        self.tables = {4: FamilyTables(), 6: FamilyTables()}
        self.fail_at: int | None = None
        self.calls = 0
        self.log: list[str] = []
        self.upcalls: dict[int, list[Upcall]] = {4: [], 6: []}
        self.closed: list[int] = []

    def snapshot(self) -> dict[int, FamilyTables]:
        return copy.deepcopy(self.tables)

    def mutate(self, what: str) -> None:
        if self.fail_at is not None:
            if self.calls == self.fail_at:
                self.calls += 1
                self.fail_at = None
                raise KernelRefused(what, errno.ENOBUFS, "injected")
            self.calls += 1
        self.log.append(what)

    def arm(self, n: int) -> None:
        self.fail_at = n
        self.calls = 0

    def unregister(self, ifindex: int) -> None:
        """What the kernel does when a netdev goes away: its VIFs vanish."""
        for t in self.tables.values():
            for slot in [s for s, i in t.vifs.items() if i == ifindex]:
                del t.vifs[slot]

    def socket(self, family: int) -> FakeSocket:
        return FakeSocket(self, family)


class FakeSocket:
    def __init__(self, kernel: FakeKernel, family: int) -> None:
        self.k = kernel
        self._family = family
        self.t = kernel.tables[family]

    @property
    def family(self) -> int:
        return self._family

    def fileno(self) -> int:
        return 100 + self._family

    def add_vif(self, slot: int, ifindex: int) -> None:
        self.k.mutate(f"add_vif{self._family} {slot}")
        if slot in self.t.vifs:
            raise KernelRefused("MRT_ADD_VIF", errno.EADDRINUSE)
        self.t.vifs[slot] = ifindex

    def del_vif(self, slot: int) -> None:
        self.k.mutate(f"del_vif{self._family} {slot}")
        if slot not in self.t.vifs:
            raise KernelRefused("MRT_DEL_VIF", errno.EADDRNOTAVAIL)
        del self.t.vifs[slot]

    def add_mfc(self, source: str, group: str, parent: int, oifs: Mapping[int, int]) -> None:
        self.k.mutate(f"add_mfc{self._family} {source} {group}")
        self.t.mfc[(source, group)] = (parent, dict(oifs))
        self.t.counts.setdefault((source, group), SgCount(0, 0, 0))

    def del_mfc(self, source: str, group: str) -> None:
        self.k.mutate(f"del_mfc{self._family} {source} {group}")
        if (source, group) not in self.t.mfc:
            raise KernelRefused("MRT_DEL_MFC", errno.ENOENT)
        del self.t.mfc[(source, group)]
        del self.t.counts[(source, group)]

    def sg_count(self, source: str, group: str) -> SgCount | None:
        return self.t.counts.get((source, group))

    def read_upcalls(self) -> list[Upcall]:
        out, self.k.upcalls[self._family] = self.k.upcalls[self._family], []
        return out

    def close(self) -> None:
        self.k.closed.append(self._family)


class Links:
    """Interface name -> index, changeable by tests."""

    def __init__(self, **links: int) -> None:
        self.idx = dict(links)

    def __call__(self, name: str) -> int | None:
        return self.idx.get(name)


def make(links: Links | None = None, expiry: float = 60.0) -> tuple[KernelEngine, FakeKernel]:
    kernel = FakeKernel()
    links = links or Links()
    eng = KernelEngine(
        links, learned_expiry=expiry, socket_factory=kernel.socket, names=lambda: list(links.idx)
    )
    eng.open()
    return eng, kernel


def std_links(n: int = 40) -> Links:
    links = Links(eth1=11, eth2=12, eth3=13, eth4=14)
    for i in range(n):
        links.idx[f"o{i}"] = 100 + i
    return links


def r(iif: str, source: str | None, group: str, *oifs: str | tuple[str, int]) -> Route:
    return Route(
        iif,
        source,
        group,
        tuple(Oif(o) if isinstance(o, str) else Oif(o[0], o[1]) for o in oifs),
    )


def state(eng: KernelEngine) -> list[dict[str, object]]:
    return [s.to_dict() for s in eng.routes()]


# ---------------------------------------------------------------- basics


def test_sg_route_programs_vifs_and_mfc() -> None:
    eng, k = make(std_links())
    eng.add_route(r("eth1", "192.0.2.1", "239.1.1.1", "eth2", ("eth3", 8)))
    t = k.tables[4]
    assert t.vifs == {0: 11, 1: 12, 2: 13}
    assert t.mfc == {("192.0.2.1", "239.1.1.1"): (0, {1: 1, 2: 8})}
    assert k.tables[6].vifs == {}
    [st] = eng.routes()
    assert st.state == "active"


def test_ipv6_route_uses_mif_table() -> None:
    eng, k = make(std_links())
    eng.add_route(r("eth1", "2001:db8::1", "ff3e::10", "eth2"))
    assert k.tables[6].vifs == {0: 11, 1: 12}
    assert k.tables[6].mfc == {("2001:db8::1", "ff3e::10"): (0, {1: 1})}
    assert k.tables[4].vifs == {}


def test_counters_come_from_kernel() -> None:
    eng, k = make(std_links())
    eng.add_route(r("eth1", "192.0.2.1", "239.1.1.1", "eth2"))
    k.tables[4].counts[("192.0.2.1", "239.1.1.1")] = SgCount(7, 700, 2)
    d = eng.routes()[0].to_dict()
    since = d.pop("counters_since")
    assert isinstance(since, float) and since > 0
    assert d == {
        "iif": "eth1",
        "source": "192.0.2.1",
        "group": "239.1.1.1",
        "oifs": [{"name": "eth2", "ttl": 1, "state": "active"}],
        "family": 4,
        "state": "active",
        "packets": 7,
        "bytes": 700,
        "wrong_if": 2,
        "learned": [],
        "counter_resets": 0,
        "bytes_counted": "ip_packet",
    }


def test_duplicate_and_unknown() -> None:
    eng, k = make(std_links())
    route = r("eth1", "192.0.2.1", "239.1.1.1", "eth2")
    eng.add_route(route)
    with pytest.raises(RuleExists):
        eng.add_route(r("eth1", "192.0.2.1", "239.1.1.1", "eth3"))
    # The kernel keys MFC entries on (S,G) only: a second iif is a conflict.
    with pytest.raises(RuleExists):
        eng.add_route(r("eth3", "192.0.2.1", "239.1.1.1", "eth2"))
    with pytest.raises(NoSuchRule):
        eng.del_route(RouteKey("eth1", None, "239.1.1.1"))
    assert len(k.tables[4].mfc) == 1


def test_not_open_is_unavailable() -> None:
    eng = KernelEngine(std_links(), socket_factory=FakeKernel().socket)
    with pytest.raises(Unavailable):
        eng.add_route(r("eth1", None, "239.1.1.1", "eth2"))


def test_vif_refcount_and_free() -> None:
    eng, k = make(std_links())
    a = r("eth1", "192.0.2.1", "239.1.1.1", "eth2")
    b = r("eth1", "192.0.2.2", "239.1.1.1", "eth3")
    eng.add_route(a)
    eng.add_route(b)
    assert k.tables[4].vifs == {0: 11, 1: 12, 2: 13}
    vt = eng.vifs(4)
    assert [(v.name, v.refs) for v in vt] == [("eth1", 2), ("eth2", 1), ("eth3", 1)]
    eng.del_route(a.key)
    assert k.tables[4].vifs == {0: 11, 2: 13}  # eth2 freed, eth1 still used by b
    assert list(k.tables[4].mfc) == [("192.0.2.2", "239.1.1.1")]
    # A new interface takes the lowest free slot.
    eng.add_route(r("eth1", "192.0.2.3", "239.1.1.1", "eth4"))
    assert k.tables[4].vifs == {0: 11, 1: 14, 2: 13}
    eng.del_route(b.key)
    eng.del_route(RouteKey("eth1", "192.0.2.3", "239.1.1.1"))
    assert k.tables[4].vifs == {}
    assert k.tables[4].mfc == {}


# ---------------------------------------------------------------- VIF table limit


def test_32_interfaces_fit_33rd_refused_and_nothing_stays() -> None:
    eng, k = make(std_links())
    # iif + 31 oifs = 32 interfaces: exactly the table.
    eng.add_route(r("o0", "192.0.2.1", "239.1.1.1", *[f"o{i}" for i in range(1, 32)]))
    assert len(k.tables[4].vifs) == 32
    before = k.snapshot()
    before_state = state(eng)
    new = r("eth1", "192.0.2.2", "239.1.1.2", "o1")
    with pytest.raises(VifTableFull) as info:
        eng.add_route(new, dry_run=True)
    with pytest.raises(VifTableFull) as info:
        eng.add_route(new)
    assert "eth1" in str(info.value) and "32" in str(info.value) and "IPv4" in str(info.value)
    assert info.value.data["interface"] == "eth1"
    assert k.snapshot() == before
    assert state(eng) == before_state
    # The IPv6 MIF table is separate and still empty.
    eng.add_route(r("eth1", "2001:db8::1", "ff3e::1", "o1"))
    assert len(k.tables[6].vifs) == 2
    # Freeing one interface makes room.
    eng.del_route(RouteKey("o0", "192.0.2.1", "239.1.1.1"))
    eng.add_route(new)
    assert k.tables[4].vifs == {0: 11, 1: 101}


def test_replace_over_32_is_refused_whole() -> None:
    eng, k = make(std_links())
    eng.add_route(r("eth1", "192.0.2.1", "239.1.1.1", "eth2"))
    before = k.snapshot()
    routes = [r("eth1", f"192.0.2.{i + 1}", "239.1.1.1", f"o{i}") for i in range(31)]
    routes.append(r("eth1", "192.0.2.100", "239.1.1.1", "o31"))  # 33rd interface
    with pytest.raises(VifTableFull) as info:
        eng.replace(routes)
    assert info.value.data["interface"] == "o31"
    assert k.snapshot() == before
    assert [s.route.key for s in eng.routes()] == [RouteKey("eth1", "192.0.2.1", "239.1.1.1")]


# ---------------------------------------------------------------- transactions


def _rollback_at_every_step(
    setup: list[Route], op: str, arg: object, expect_steps: int
) -> tuple[KernelEngine, FakeKernel]:
    """Fail call n for n = 0, 1, ... until the op succeeds; check each rollback."""
    links = std_links()
    n = 0
    while True:
        eng, k = make(links)
        for route in setup:
            eng.add_route(route)
        before, before_state = k.snapshot(), state(eng)
        k.arm(n)
        try:
            getattr(eng, op)(arg)
        except KernelRefused as exc:
            assert exc.errno == errno.ENOBUFS
            assert k.snapshot() == before, f"kernel not restored after failure at step {n}"
            assert state(eng) == before_state
            n += 1
            continue
        assert n >= expect_steps, f"only {n} kernel steps"
        return eng, k


def test_add_rolls_back_at_every_step() -> None:
    setup = [r("eth1", "192.0.2.1", "239.1.1.1", "eth2")]
    new = r("eth1", "192.0.2.9", "239.9.9.9", "eth3", "eth4")
    eng, k = _rollback_at_every_step(setup, "add_route", new, expect_steps=3)
    assert [st.route for st in eng.routes()] == [*setup, new]
    assert k.tables[4].mfc[("192.0.2.9", "239.9.9.9")] == (0, {2: 1, 3: 1})


def test_del_rolls_back_at_every_step() -> None:
    setup = [
        r("eth1", "192.0.2.1", "239.1.1.1", "eth2"),
        r("eth3", "192.0.2.2", "239.1.1.2", "eth4"),
    ]
    eng, k = _rollback_at_every_step(setup, "del_route", setup[1].key, expect_steps=3)
    assert [st.route for st in eng.routes()] == setup[:1]
    assert k.tables[4].vifs == {0: 11, 1: 12}


def test_replace_is_one_transaction() -> None:
    setup = [
        r("eth1", "192.0.2.1", "239.1.1.1", "eth2"),
        r("eth3", "192.0.2.2", "239.1.1.2", "eth4"),
        r("eth1", "2001:db8::1", "ff3e::1", "eth2"),
    ]
    new = [
        r("eth1", "192.0.2.1", "239.1.1.1", "eth2", "o5"),  # changed
        r("o1", None, "239.5.5.5", "o2"),  # added
        r("eth1", "2001:db8::1", "ff3e::1", "eth2"),  # unchanged
    ]
    eng, k = _rollback_at_every_step(setup, "replace", new, expect_steps=6)
    assert [st.route for st in eng.routes()] == new
    assert k.tables[4].mfc == {("192.0.2.1", "239.1.1.1"): (0, {1: 1, 2: 1})}
    assert sorted(k.tables[4].vifs.values()) == [11, 12, 101, 102, 105]


def test_replace_diff_and_dry_run() -> None:
    eng, k = make(std_links())
    a = r("eth1", "192.0.2.1", "239.1.1.1", "eth2")
    b = r("eth3", "192.0.2.2", "239.1.1.2", "eth4")
    eng.add_route(a)
    eng.add_route(b)
    a2 = r("eth1", "192.0.2.1", "239.1.1.1", "eth2", "eth3")
    c = r("eth1", None, "239.7.7.7", "eth4")
    before = k.snapshot()
    k.log.clear()
    diff = eng.replace([a2, c], dry_run=True)
    assert k.log == [] and k.snapshot() == before
    assert diff == RouteDiff(added=(c,), removed=(b,), changed=(a2,))
    assert diff.to_dict()["removed"][0]["source"] == "192.0.2.2"
    assert diff.to_dict()["added"][0]["source"] == "*"
    assert eng.replace([a2, c]) == diff
    assert [s.route for s in eng.routes()] == [a2, c]
    assert eng.replace([a2, c]).empty
    with pytest.raises(RuleExists):
        eng.replace([a2, a2])


def test_dry_run_add_and_del_change_nothing() -> None:
    eng, k = make(std_links())
    a = r("eth1", "192.0.2.1", "239.1.1.1", "eth2")
    eng.add_route(a, dry_run=True)
    assert k.log == [] and eng.routes() == []
    eng.add_route(a)
    k.log.clear()
    eng.del_route(a.key, dry_run=True)
    assert k.log == [] and len(eng.routes()) == 1


# ---------------------------------------------------------------- interfaces


def test_missing_iif_waits_and_missing_oif_is_left_out() -> None:
    links = std_links()
    eng, k = make(links)
    eng.add_route(r("late0", "192.0.2.1", "239.1.1.1", "eth2"))
    eng.add_route(r("eth1", "192.0.2.2", "239.1.1.2", "eth2", "late1"))
    assert [s.state for s in eng.routes()] == ["waiting", "partial"]
    assert k.tables[4].mfc == {("192.0.2.2", "239.1.1.2"): (0, {1: 1})}
    assert k.tables[4].vifs == {0: 11, 1: 12}

    links.idx["late0"] = 50
    eng.interface_changed("late0", 50)
    assert [s.state for s in eng.routes()] == ["active", "partial"]
    assert k.tables[4].mfc[("192.0.2.1", "239.1.1.1")] == (2, {1: 1})

    links.idx["late1"] = 51
    eng.interface_changed("late1", 51)
    assert k.tables[4].mfc[("192.0.2.2", "239.1.1.2")] == (0, {1: 1, 3: 1})
    # Interfaces nobody uses are ignored.
    eng.interface_changed("unrelated", 99)
    assert len(k.tables[4].vifs) == 4


def test_iif_vanishes_and_returns_with_new_index() -> None:
    links = std_links()
    eng, k = make(links)
    eng.add_route(r("eth1", "192.0.2.1", "239.1.1.1", "eth2"))
    eng.add_route(r("eth1", "2001:db8::1", "ff3e::1", "eth2"))
    # The kernel drops the VIFs of an unregistered device by itself; the
    # engine's own delete then finds them gone, which is fine.
    k.unregister(11)
    del links.idx["eth1"]
    eng.interface_changed("eth1", None)
    assert [s.state for s in eng.routes()] == ["waiting", "waiting"]
    assert k.tables[4].mfc == {} and k.tables[6].mfc == {}
    assert k.tables[4].vifs == {} and k.tables[6].vifs == {}
    assert len(eng.routes()) == 2  # never dropped
    links.idx["eth1"] = 77
    eng.interface_changed("eth1", 77)
    assert [s.state for s in eng.routes()] == ["active", "active"]
    assert k.tables[4].vifs == {0: 77, 1: 12}
    assert k.tables[4].mfc == {("192.0.2.1", "239.1.1.1"): (0, {1: 1})}


def test_oif_recreated_rewrites_vif_and_mfc() -> None:
    links = std_links()
    eng, k = make(links)
    eng.add_route(r("eth1", "192.0.2.1", "239.1.1.1", "eth2", "eth3"))
    k.unregister(12)
    k.log.clear()
    eng.interface_changed("eth2", 88)
    assert k.tables[4].vifs == {0: 11, 1: 88, 2: 13}
    assert k.log[-1] == "add_mfc4 192.0.2.1 239.1.1.1"
    # vanishing oif: left out of the entry
    k.unregister(88)
    eng.interface_changed("eth2", None)
    assert k.tables[4].mfc[("192.0.2.1", "239.1.1.1")] == (0, {2: 1})
    assert eng.routes()[0].state == "partial"


def test_interface_change_failure_rolls_back_then_converges() -> None:
    links = std_links()
    eng, k = make(links)
    eng.add_route(r("eth1", "192.0.2.1", "239.1.1.1", "eth2", "late"))
    before = k.snapshot()
    k.arm(1)  # add vif ok, then add_mfc fails
    with pytest.raises(KernelRefused):
        eng.interface_changed("late", 60)
    assert k.snapshot() == before
    assert eng.needs_resync
    eng.resync()
    assert not eng.needs_resync
    assert k.tables[4].mfc[("192.0.2.1", "239.1.1.1")] == (0, {1: 1, 2: 1})
    # A repeated notification also retries while dirty.
    k.arm(0)
    with pytest.raises(KernelRefused):
        eng.interface_changed("late", 61)
    eng.interface_changed("late", 61)
    assert k.tables[4].vifs[2] == 61


def test_interfaces_appearing_beyond_32_leave_route_waiting() -> None:
    links = Links(eth1=1)
    eng, k = make(links)
    eng.add_route(r("eth1", "192.0.2.1", "239.1.1.1", *[f"o{i}" for i in range(31)]))
    eng.add_route(r("x0", "192.0.2.2", "239.1.1.2", "x1"))
    for i in range(31):
        links.idx[f"o{i}"] = 100 + i
        eng.interface_changed(f"o{i}", 100 + i)
    assert len(k.tables[4].vifs) == 32
    eng.interface_changed("x0", 200)  # no room: stays waiting, no exception
    assert [s.state for s in eng.routes()] == ["active", "waiting"]
    assert len(k.tables[4].vifs) == 32


# ---------------------------------------------------------------- (*,G) learning


def nocache(family: int, vif: int, source: str, group: str) -> Upcall:
    return Upcall(family, UpcallKind.NOCACHE, vif, source, group)


def test_star_g_learns_sources_and_expires_idle_ones() -> None:
    eng, k = make(std_links(), expiry=60.0)
    star = r("eth1", None, "239.5.5.5", "eth2", ("eth3", 4))
    eng.add_route(star)
    assert k.tables[4].mfc == {}
    k.upcalls[4] += [
        nocache(4, 0, "192.0.2.10", "239.5.5.5"),
        nocache(4, 0, "192.0.2.11", "239.5.5.5"),
        nocache(4, 0, "192.0.2.12", "239.6.6.6"),  # no route for this group
        nocache(4, 1, "192.0.2.13", "239.5.5.5"),  # arrived on eth2, not the iif
        Upcall(4, UpcallKind.WRONGVIF, 0, "192.0.2.14", "239.5.5.5"),
    ]
    eng.handle_readable(104, now=0.0)
    assert k.tables[4].mfc == {
        ("192.0.2.10", "239.5.5.5"): (0, {1: 1, 2: 4}),
        ("192.0.2.11", "239.5.5.5"): (0, {1: 1, 2: 4}),
    }
    k.tables[4].counts[("192.0.2.10", "239.5.5.5")] = SgCount(5, 500, 0)
    k.tables[4].counts[("192.0.2.11", "239.5.5.5")] = SgCount(1, 100, 0)
    st = eng.routes()[0].to_dict()
    assert st["packets"] == 6 and st["bytes"] == 600
    assert st["learned"] == [
        {"source": "192.0.2.10", "group": "239.5.5.5", "iif": "eth1", "packets": 5, "bytes": 500},
        {"source": "192.0.2.11", "group": "239.5.5.5", "iif": "eth1", "packets": 1, "bytes": 100},
    ]
    assert eng.expire(30.0) == []  # counters moved: both active at t=30
    k.tables[4].counts[("192.0.2.10", "239.5.5.5")] = SgCount(9, 900, 0)
    assert eng.expire(80.0) == []  # .10 moved again; .11 idle for 50 s only
    assert eng.expire(91.0) == [(star.key, "192.0.2.11")]
    assert list(k.tables[4].mfc) == [("192.0.2.10", "239.5.5.5")]
    assert [ls.source for ls in eng.routes()[0].learned] == ["192.0.2.10"]
    # The source comes back: learned again.
    k.upcalls[4].append(nocache(4, 0, "192.0.2.11", "239.5.5.5"))
    eng.handle_readable(104, now=100.0)
    assert len(k.tables[4].mfc) == 2


def test_star_g_v6_and_explicit_sg_wins() -> None:
    eng, k = make(std_links())
    eng.add_route(r("eth1", None, "ff3e::5", "eth2"))
    k.upcalls[6].append(nocache(6, 0, "2001:db8:0:0::10", "ff3e:0::5"))
    eng.handle_readable(106, now=0.0)
    assert k.tables[6].mfc == {("2001:db8::10", "ff3e::5"): (0, {1: 1})}
    # An explicit (S,G) for a learned source takes over its kernel entry...
    eng.add_route(r("eth1", "2001:db8::10", "ff3e::5", "eth3"))
    assert k.tables[6].mfc == {("2001:db8::10", "ff3e::5"): (0, {2: 1})}
    # ...and deleting it gives the entry back to the (*,G) route.
    eng.del_route(RouteKey("eth1", "2001:db8::10", "ff3e::5"))
    assert k.tables[6].mfc == {("2001:db8::10", "ff3e::5"): (0, {1: 1})}


def test_star_g_route_change_and_delete_follow_learned_entries() -> None:
    eng, k = make(std_links())
    star = r("eth1", None, "239.5.5.5", "eth2")
    eng.add_route(star)
    k.upcalls[4].append(nocache(4, 0, "192.0.2.10", "239.5.5.5"))
    eng.handle_readable(104, now=0.0)
    eng.replace([r("eth1", None, "239.5.5.5", "eth3")])
    assert k.tables[4].mfc == {("192.0.2.10", "239.5.5.5"): (0, {1: 1})}
    assert k.tables[4].vifs == {0: 11, 1: 13}
    eng.del_route(star.key)
    assert k.tables[4].mfc == {} and k.tables[4].vifs == {}
    assert eng.expire(1000.0) == []


# ---------------------------------------------------------------- lifecycle


def test_close_removes_everything_and_reopen_reinstalls() -> None:
    eng, k = make(std_links())
    eng.add_route(r("eth1", "192.0.2.1", "239.1.1.1", "eth2"))
    eng.add_route(r("eth1", None, "ff3e::5", "eth2"))
    k.upcalls[6].append(nocache(6, 0, "2001:db8::10", "ff3e::5"))
    eng.handle_readable(106, now=0.0)
    assert sorted(eng.fds()) == [104, 106]
    eng.close()
    assert k.tables[4] == FamilyTables() and k.tables[6].vifs == {} and k.tables[6].mfc == {}
    assert sorted(k.closed) == [4, 6]
    assert eng.fds() == []
    eng.open()
    assert k.tables[4].mfc == {("192.0.2.1", "239.1.1.1"): (0, {1: 1})}
    assert k.tables[6].mfc == {("2001:db8::10", "ff3e::5"): (0, {1: 1})}


def test_ipv6_unavailable_runs_ipv4_only() -> None:
    kernel = FakeKernel()

    def factory(family: int) -> FakeSocket:
        if family == 6:
            raise KernelRefused("MRT6_INIT", errno.EOPNOTSUPP)
        return kernel.socket(family)

    eng = KernelEngine(std_links(), socket_factory=factory)
    eng.open()
    assert eng.families() == [4] and eng.fds() == [104]
    eng.add_route(r("eth1", "192.0.2.1", "239.1.1.1", "eth2"))
    with pytest.raises(KernelRefused) as info:
        eng.add_route(r("eth1", "2001:db8::1", "ff3e::1", "eth2"))
    assert info.value.errno == errno.EOPNOTSUPP
    with pytest.raises(KernelRefused):
        eng.replace([r("eth1", "2001:db8::1", "ff3e::1", "eth2")])
    assert len(eng.routes()) == 1


# ---------------------------------------------------------------- templates (smcroute parity)


def test_star_g_prefix_installs_each_group_in_range_and_nothing_outside() -> None:
    eng, k = make(std_links())
    eng.add_route(r("eth1", None, "225.1.2.0/24", "eth2"))
    k.upcalls[4] += [
        nocache(4, 0, "192.0.2.10", "225.1.2.3"),
        nocache(4, 0, "192.0.2.10", "225.1.2.200"),
        nocache(4, 0, "192.0.2.10", "225.1.3.1"),  # outside the /24
    ]
    eng.handle_readable(104, now=0.0)
    assert set(k.tables[4].mfc) == {("192.0.2.10", "225.1.2.3"), ("192.0.2.10", "225.1.2.200")}
    learned = state(eng)[0]["learned"]
    assert {entry["group"] for entry in learned} == {"225.1.2.3", "225.1.2.200"}


def test_the_most_specific_template_wins_and_exact_beats_every_template() -> None:
    eng, k = make(std_links())
    eng.add_route(r("eth1", None, "225.1.0.0/16", "eth2"))
    eng.add_route(r("eth1", "192.0.2.0/24", "225.1.0.0/16", "eth3"))
    eng.add_route(r("eth1", "192.0.2.10", "225.1.2.3", "eth4"))  # exact: in the kernel at once
    k.upcalls[4] += [
        nocache(4, 0, "198.51.100.7", "225.1.9.9"),  # only the (*,G/16) matches
        nocache(4, 0, "192.0.2.99", "225.1.9.9"),  # (S/24,G/16) is more specific
    ]
    eng.handle_readable(104, now=0.0)
    slot = {name: v.slot for name in ("eth2", "eth3", "eth4") if (v := eng.vifs(4).get(name))}
    assert k.tables[4].mfc[("198.51.100.7", "225.1.9.9")][1] == {slot["eth2"]: 1}
    assert k.tables[4].mfc[("192.0.2.99", "225.1.9.9")][1] == {slot["eth3"]: 1}
    assert k.tables[4].mfc[("192.0.2.10", "225.1.2.3")][1] == {slot["eth4"]: 1}


def test_a_stop_filter_blocks_a_source_a_wider_template_would_forward() -> None:
    eng, k = make(std_links())
    eng.add_route(r("eth1", None, "225.1.2.0/24", "eth2"))
    eng.add_route(r("eth1", "192.0.2.66", "225.1.2.3"))  # no outputs: poison
    assert k.tables[4].mfc[("192.0.2.66", "225.1.2.3")] == (0, {})
    k.upcalls[4].append(nocache(4, 0, "192.0.2.66", "225.1.2.3"))
    eng.handle_readable(104, now=0.0)
    assert k.tables[4].mfc[("192.0.2.66", "225.1.2.3")] == (0, {})
    assert [s["state"] for s in state(eng)] == ["active", "active"]


def test_removing_a_template_removes_what_it_installed_and_nothing_else() -> None:
    eng, k = make(std_links())
    eng.add_route(r("eth1", None, "225.9.0.0/16", "eth2"))
    narrow = r("eth1", None, "225.1.2.0/24", "eth3")
    eng.add_route(narrow)
    eng.add_route(r("eth1", "192.0.2.10", "225.1.2.77", "eth4"))
    k.upcalls[4] += [
        nocache(4, 0, "192.0.2.10", "225.1.2.3"),
        nocache(4, 0, "192.0.2.10", "225.9.9.9"),
    ]
    eng.handle_readable(104, now=0.0)
    eng.del_route(narrow.key)
    assert set(k.tables[4].mfc) == {("192.0.2.10", "225.9.9.9"), ("192.0.2.10", "225.1.2.77")}


def test_a_source_of_a_removed_template_follows_the_next_matching_one() -> None:
    eng, k = make(std_links())
    eng.add_route(r("eth1", None, "225.1.0.0/16", "eth2"))
    narrow = r("eth1", None, "225.1.2.0/24", "eth3")
    eng.add_route(narrow)
    k.upcalls[4].append(nocache(4, 0, "192.0.2.10", "225.1.2.3"))
    eng.handle_readable(104, now=0.0)
    eth2 = eng.vifs(4).get("eth2")
    assert eth2 is not None
    eng.del_route(narrow.key)
    assert k.tables[4].mfc[("192.0.2.10", "225.1.2.3")][1] == {eth2.slot: 1}
    (wide,) = state(eng)
    assert [e["group"] for e in wide["learned"]] == ["225.1.2.3"]


def test_wildcard_interfaces_cover_every_match_now_and_later() -> None:
    links = Links(eth1=11, eth2=12, up0=20)
    eng, k = make(links)
    eng.add_route(r("up0", "192.0.2.10", "239.7.7.7", "eth+"))
    slots = {v.name for v in eng.vifs(4)}
    assert slots == {"up0", "eth1", "eth2"}
    links.idx["eth3"] = 13  # appears later
    eng.reconcile()
    assert {v.name for v in eng.vifs(4)} == {"up0", "eth1", "eth2", "eth3"}
    assert len(k.tables[4].mfc[("192.0.2.10", "239.7.7.7")][1]) == 3


def test_a_wildcard_input_learns_on_the_interface_the_stream_arrives_on() -> None:
    links = Links(eth1=11, eth2=12, dn1=30)
    eng, k = make(links)
    eng.add_route(r("eth+", None, "239.8.8.8", "dn1", "eth+"))
    eth2 = eng.vifs(4).get("eth2")
    assert eth2 is not None
    k.upcalls[4].append(nocache(4, eth2.slot, "192.0.2.10", "239.8.8.8"))
    eng.handle_readable(104, now=0.0)
    parent, oifs = k.tables[4].mfc[("192.0.2.10", "239.8.8.8")]
    names = {v.slot: v.name for v in eng.vifs(4)}
    assert names[parent] == "eth2"
    assert {names[s] for s in oifs} == {"dn1", "eth1"}, "never back out of its own input"


# ---------------------------------------------------------------- states and counters


def test_each_output_has_a_state_and_a_rule_says_why_it_is_not_active() -> None:
    links = std_links()
    why = {"gone0": "interface missing", "dn9": "interface down", "old1": "interface renamed to x"}
    kernel = FakeKernel()
    eng = KernelEngine(
        links, socket_factory=kernel.socket, names=lambda: list(links.idx), explain=why.get
    )
    eng.open()
    eng.add_route(r("eth1", "192.0.2.1", "239.1.1.1", "eth2", "dn9", "old1"))
    eng.add_route(r("gone0", "192.0.2.2", "239.1.1.2", "eth2"))
    eng.add_route(r("eth1", "192.0.2.3", "239.1.1.3", "eth3", "eth+"))
    eng.add_route(r("eth1", "192.0.2.4", "239.1.1.4", "zz+"))  # a wildcard matching nothing
    st = {str(s.route.group): s.to_dict() for s in eng.routes()}
    one = st["239.1.1.1"]
    assert one["state"] == "partial"
    assert one["reason"] == "dn9 interface down; old1 interface renamed to x"
    assert [(o["name"], o["state"], o.get("reason")) for o in one["oifs"]] == [
        ("eth2", "active", None),
        ("dn9", "waiting", "interface down"),
        ("old1", "waiting", "interface renamed to x"),
    ]
    assert st["239.1.1.2"]["state"] == "waiting"
    assert st["239.1.1.2"]["reason"] == "input interface missing"
    assert st["239.1.1.3"]["state"] == "active" and "reason" not in st["239.1.1.3"]
    assert st["239.1.1.3"]["oifs"][1]["matches"][:2] == ["eth1", "eth2"]
    assert st["239.1.1.4"]["state"] == "active"  # nothing to wait for
    assert st["239.1.1.4"]["oifs"] == [{"name": "zz+", "ttl": 1, "state": "active", "matches": []}]
    assert eng.warnings() == [
        "route (192.0.2.1, 239.1.1.1) on eth1: output dn9 interface down; "
        "old1 interface renamed to x",
        "route (192.0.2.2, 239.1.1.2) on gone0 waits: input interface missing",
    ]


def test_a_route_that_does_not_fit_the_vif_table_says_so() -> None:
    links = std_links(40)
    eng, _k = make(links)
    for i in range(31):  # o0..o31: 32 VIFs
        eng.add_route(r(f"o{i}", "192.0.2.1", f"239.1.1.{i}", f"o{i + 1}"))
    # late33 appears: the route naming it waits with a reason (the table is full)
    eng.add_route(r("late33", "192.0.2.9", "239.1.2.1", "eth1"))
    links.idx["late33"] = 233
    eng.interface_changed("late33", 233)
    last = eng.get(RouteKey("late33", "192.0.2.9", "239.1.2.1"))
    assert (last.state, last.reason) == ("waiting", "IPv4 VIF table full")
    assert "route (192.0.2.9, 239.1.2.1) on late33 waits: IPv4 VIF table full" in eng.warnings()


def test_counters_survive_an_input_flap_and_an_output_recreation() -> None:
    links = std_links()
    eng, k = make(links)
    eng.add_route(r("eth1", "192.0.2.1", "239.1.1.1", "eth2"))
    sg = ("192.0.2.1", "239.1.1.1")
    k.tables[4].counts[sg] = SgCount(400, 40000, 3)
    since = eng.routes()[0].counters_since
    # the input goes down: the engine removes the entry (the kernel forgets 400)
    del links.idx["eth1"]
    eng.interface_changed("eth1", None)
    st = eng.routes()[0]
    assert (st.state, st.packets, st.bytes, st.wrong_if) == ("waiting", 400, 40000, 3)
    links.idx["eth1"] = 11
    eng.interface_changed("eth1", 11)
    assert k.tables[4].counts[sg] == SgCount(0, 0, 0)  # the kernel's new entry
    k.tables[4].counts[sg] = SgCount(5, 500, 0)
    st = eng.routes()[0]
    assert (st.state, st.packets, st.bytes, st.counter_resets) == ("active", 405, 40500, 1)
    assert st.counters_since == since
    # the only output gone: nothing is forwarded (waiting), the entry still counts
    eng.interface_changed("eth2", None)
    st = eng.routes()[0]
    assert (st.state, st.reason, st.packets) == ("waiting", "eth2 interface missing", 405)
    # an output re-created: the entry is rewritten in place, nothing is lost or doubled
    eng.interface_changed("eth2", 88)
    k.tables[4].counts[sg] = SgCount(7, 700, 0)
    assert eng.routes()[0].packets == 407
    # a route removed and added again starts from zero
    eng.del_route(RouteKey("eth1", "192.0.2.1", "239.1.1.1"))
    eng.add_route(r("eth1", "192.0.2.1", "239.1.1.1", "eth2"))
    assert (eng.routes()[0].packets, eng.routes()[0].counter_resets) == (0, 0)


def test_a_template_keeps_what_expired_and_flapped_sources_counted() -> None:
    links = std_links()
    eng, k = make(links, expiry=10.0)
    eng.add_route(r("eth1", None, "239.1.1.1", "eth2"))
    k.upcalls[4].append(Upcall(4, UpcallKind.NOCACHE, 0, "192.0.2.7", "239.1.1.1"))
    eng.handle_readable(104, 0.0)
    k.tables[4].counts[("192.0.2.7", "239.1.1.1")] = SgCount(50, 5000, 0)
    eng.expire(1.0)  # seen moving
    eng.expire(20.0)  # idle since: expired
    assert ("192.0.2.7", "239.1.1.1") not in k.tables[4].mfc
    st = eng.routes()[0]
    assert (st.packets, st.bytes, st.learned) == (50, 5000, ())
