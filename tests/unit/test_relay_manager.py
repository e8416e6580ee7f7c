"""The relay manager against fakes: what workers are told and which sockets are open.

Interfaces are a dict the test edits (name -> index, or missing), as the
supervisor's interface table would be after netlink moved; ``reconcile`` is
what the supervisor calls then.
"""

from __future__ import annotations

import errno
import logging
from typing import Any

import pytest
from relay_fakes import FakeMembership, FakeOpeners, FakePool

from mcrelay.errors import KernelRefused
from mcrelay.model import Relay, RelayInput, RelayOutput
from mcrelay.relay import messages as m
from mcrelay.relay.manager import RelayManager

LOG = logging.getLogger("test")


class Setup:
    def __init__(self, workers: int = 2) -> None:
        self.ifaces: dict[str, int] = {"up0": 10, "dn1": 11}
        self.openers = FakeOpeners()
        self.membership = FakeMembership()
        self.mgr = RelayManager(
            workers=workers,
            user="nobody",
            ifindex_of=self.ifaces.get,
            membership=self.membership,  # type: ignore[arg-type]
            log=LOG,
            pool_factory=FakePool,  # type: ignore[arg-type]
            openers=self.openers,
        )
        self.pool: FakePool = self.mgr.pool  # type: ignore[assignment]

    def tables(self, worker: int = 0) -> list[m.SetTable]:
        return [msg for msg, _ in self.pool.of_type(worker, m.SetTable)]

    def last_table(self, worker: int = 0) -> m.SetTable:
        return self.tables(worker)[-1]


def relay(name: str = "tv", *, mode: str = "packet", oif: str = "dn1", port: int = 5000) -> Relay:
    return Relay(
        name,
        RelayInput("up0", "239.1.1.1", port),
        (RelayOutput("239.9.9.9", 6000, oif, 8),),
        mode,  # type: ignore[arg-type]
    )


@pytest.fixture
def s() -> Setup:
    return Setup()


def test_a_packet_relay_gives_each_worker_its_own_socket_of_one_fanout_group(s: Setup) -> None:
    s.mgr.add(relay())
    socks = s.openers.open_now()
    assert len(socks) == 2
    for worker in (0, 1):
        ((add, fds),) = s.pool.of_type(worker, m.AddIngress)
        assert add.specs[0].kind == "packet" and add.specs[0].ifindex == 10
        assert fds == (socks[worker].fd,)
        (entry,) = s.last_table(worker).entries
        assert entry.name == "tv" and entry.outputs[0].ifindex == 11
    assert s.membership.refs == {("up0", "239.1.1.1", None): 1}


def test_reconciling_with_nothing_changed_tells_the_workers_nothing(s: Setup) -> None:
    s.mgr.add(relay())
    s.pool.clear()
    s.mgr.reconcile()
    s.mgr.reconcile()
    assert s.pool.sent == [[], []]


def test_an_input_recreated_with_a_new_index_gets_fresh_sockets_and_a_new_table(s: Setup) -> None:
    s.mgr.add(relay())
    old = s.openers.open_now()
    s.pool.clear()
    s.ifaces["up0"] = 20  # deleted and created again
    s.mgr.reconcile()
    assert all(sock.closed for sock in old)
    new = s.openers.open_now()
    assert len(new) == 2
    ((removed, _),) = s.pool.of_type(0, m.RemoveIngress)
    ((added, fds),) = s.pool.of_type(0, m.AddIngress)
    assert added.specs[0].ifindex == 20 and fds == (new[0].fd,)
    assert removed.ids != added.specs[0].id
    assert s.last_table().entries[0].ingress == added.specs[0].id


def test_an_input_that_vanishes_waits_and_comes_back_without_losing_the_rule(s: Setup) -> None:
    s.mgr.add(relay())
    del s.ifaces["up0"]
    s.mgr.reconcile()
    assert s.openers.open_now() == []
    assert s.last_table().entries == ()
    (listed,) = s.mgr.relays()
    assert listed["state"] == "waiting"
    s.ifaces["up0"] = 30
    s.mgr.reconcile()
    assert len(s.openers.open_now()) == 2
    (listed,) = s.mgr.relays()
    assert listed["state"] == "active"
    assert s.last_table().entries[0].name == "tv"


def test_a_missing_output_is_marked_in_the_table_and_filled_in_when_it_appears(s: Setup) -> None:
    s.mgr.add(relay(oif="dn9"))
    assert s.last_table().entries[0].outputs[0].ifindex == -1
    assert s.mgr.relays()[0]["outputs"][0]["state"] == "waiting"
    s.ifaces["dn9"] = 19
    s.mgr.reconcile()
    assert s.last_table().entries[0].outputs[0].ifindex == 19
    assert s.mgr.relays()[0]["outputs"][0]["state"] == "active"


def test_a_socket_input_that_cannot_open_waits_with_its_reason_and_is_retried(s: Setup) -> None:
    s.openers.fail[10] = errno.EADDRINUSE
    s.mgr.add(relay(mode="socket"))  # kept: the input waits, as for a missing interface
    (listed,) = s.mgr.relays()
    assert listed["state"] == "waiting" and "cannot open socket input" in listed["error"]
    with pytest.raises(KernelRefused):
        s.mgr.reconcile()  # the supervisor retries while this raises
    del s.openers.fail[10]
    s.mgr.reconcile()
    (listed,) = s.mgr.relays()
    assert listed["state"] == "active" and "error" not in listed
    added = [a for w in (0, 1) for a, _ in s.pool.of_type(w, m.AddIngress)]
    assert len(added) == 1 and added[0].specs[0].kind == "socket"


def test_a_packet_input_the_kernel_refuses_is_refused_and_leaves_nothing(s: Setup) -> None:
    s.openers.fail[10] = errno.EPERM
    with pytest.raises(KernelRefused):
        s.mgr.add(relay())
    assert s.mgr.relays() == []
    assert s.membership.refs == {}
    assert s.openers.open_now() == []


def test_a_restarted_worker_gets_its_own_socket_the_table_and_the_traces(s: Setup) -> None:
    s.mgr.add(relay())
    s.mgr.trace_start("tv")
    msgs = s.mgr.initial_messages(1)
    kinds = [type(msg) for msg, _ in msgs]
    assert kinds == [m.AddIngress, m.SetTable, m.SetTrace]
    assert msgs[0][1] == [s.openers.open_now()[1].fd]
    table = msgs[1][0]
    assert isinstance(table, m.SetTable) and table.entries[0].name == "tv"
    traced = msgs[2][0]
    assert isinstance(traced, m.SetTrace) and traced.ids == (table.entries[0].id,)


def stats(rid: int, packets: int, seq: int = 1) -> m.Stats:
    counters = (packets, packets * 100, 0, 0, 0, 0, 0)
    return m.Stats(seq, (m.RelayStats(rid, counters, ((packets, packets * 100, 0),)),), {}, 0.1, {})


def test_counters_of_a_worker_that_died_are_kept(s: Setup) -> None:
    s.mgr.add(relay())
    rid = s.last_table().entries[0].id
    s.mgr.on_message(0, stats(rid, 40), 0.0)
    s.mgr.on_message(1, stats(rid, 2), 0.0)
    s.mgr.on_gone(0)
    s.mgr.on_message(0, stats(rid, 5), 0.0)  # the replacement starts from zero
    (listed,) = s.mgr.relays()
    assert listed["packets"] == 47
    assert listed["outputs"][0]["packets"] == 47


def test_tracing_stops_for_everyone_when_no_client_can_hold_it(s: Setup) -> None:
    s.mgr.add(relay())
    s.mgr.trace_start("tv")
    assert s.mgr.relays()[0]["traced"]
    s.mgr.trace_stop_all()
    assert not s.mgr.relays()[0]["traced"]
    last: Any = s.pool.of_type(0, m.SetTrace)[-1][0]
    assert last.ids == ()


def test_replace_rolls_back_to_the_old_relays_when_a_new_input_is_refused(s: Setup) -> None:
    s.mgr.add(relay("keep", port=5000))
    s.openers.fail[20] = errno.EPERM
    s.ifaces["up1"] = 20
    bad = Relay(
        "bad", RelayInput("up1", "239.1.1.2", 5000), (RelayOutput("239.9.9.8", 6000, "dn1", 8),)
    )
    with pytest.raises(KernelRefused):
        s.mgr.replace([relay("keep", port=5000), bad])
    assert [r["name"] for r in s.mgr.relays()] == ["keep"]
    assert s.membership.refs == {("up0", "239.1.1.1", None): 1}


class Host:
    """The interface table's answers the manager asks: reasons and addresses."""

    def __init__(self) -> None:
        self.why: dict[str, str] = {}
        self.addresses: set[str] = set()

    def why_unusable(self, name: str) -> str | None:
        return self.why.get(name)

    def receives_on(self, address: str) -> bool:
        return address in self.addresses


def with_host(workers: int = 2) -> tuple[Setup, Host]:
    s, host = Setup(workers), Host()
    s.mgr = RelayManager(
        workers=workers,
        user="nobody",
        ifindex_of=s.ifaces.get,
        membership=s.membership,  # type: ignore[arg-type]
        log=LOG,
        pool_factory=FakePool,  # type: ignore[arg-type]
        openers=s.openers,
        why_unusable=host.why_unusable,
        receives_on=host.receives_on,
    )
    s.pool = s.mgr.pool  # type: ignore[assignment]
    return s, host


def two_outputs(name: str = "tv") -> Relay:
    return Relay(
        name,
        RelayInput("up0", "239.1.1.1", 5000),
        (RelayOutput("239.9.9.9", 6000, "dn1", 8), RelayOutput("239.9.9.8", 6000, "dn9", 8)),
    )


def test_outputs_carry_their_reason_and_a_rule_with_some_waiting_is_partial() -> None:
    s, host = with_host()
    host.why["dn9"] = "interface down"
    s.mgr.add(two_outputs())
    (listed,) = s.mgr.relays()
    assert (listed["state"], listed["reason"]) == ("partial", "dn9 interface down")
    assert [(o["state"], o.get("reason")) for o in listed["outputs"]] == [
        ("active", None),
        ("waiting", "interface down"),
    ]
    assert "relay tv: output dn9 waits: interface down" in s.mgr.warnings()
    host.why["up0"] = "interface renamed to wan0"
    del s.ifaces["up0"]
    s.mgr.reconcile()
    (listed,) = s.mgr.relays()
    assert (listed["state"], listed["reason"]) == ("waiting", "input interface renamed to wan0")
    assert "relay tv waits: input interface renamed to wan0" in s.mgr.warnings()
    s.ifaces.update(up0=10, dn9=19)
    s.mgr.reconcile()
    (listed,) = s.mgr.relays()
    assert listed["state"] == "active" and "reason" not in listed


def unicast(mode: str = "packet") -> Relay:
    return Relay(
        "feed",
        RelayInput("up0", "198.51.100.1", 5000),
        (RelayOutput("239.9.9.9", 6000, "dn1", 8),),
        mode,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("mode", ["packet", "socket"])
def test_a_unicast_input_waits_until_the_host_has_its_address(mode: str) -> None:
    s, host = with_host()
    s.mgr.add(unicast(mode))  # accepted: DHCP or PPPoE may bring the address later
    (listed,) = s.mgr.relays()
    assert (listed["state"], listed["reason"]) == ("waiting", "input address not on this host")
    assert s.openers.open_now() == [] and s.last_table().entries == ()
    assert "relay feed waits: input address not on this host" in s.mgr.warnings()
    host.addresses.add("198.51.100.1")  # the address arrives (the interface generation moves)
    s.mgr.reconcile()
    (listed,) = s.mgr.relays()
    assert listed["state"] == "active"
    assert s.last_table().entries[0].name == "feed"
    host.addresses.clear()  # the lease ends: the input closes and waits again
    s.mgr.reconcile()
    assert s.mgr.relays()[0]["state"] == "waiting" and s.last_table().entries == ()


def test_input_drops_and_counters_survive_an_input_flap() -> None:
    s, _host = with_host()
    s.mgr.add(relay())
    since = s.mgr.relays()[0]["counters_since"]
    rid = s.last_table().entries[0].id
    s.mgr.on_message(0, stats(rid, 40), 0.0)
    s.openers.packet_stats = lambda sock: (10, 3)  # type: ignore[method-assign]
    s.mgr.inputs.poll_drops()
    assert s.mgr.relays()[0]["input_drops"] == 6
    s.ifaces["up0"] = 20  # re-created: fresh AF_PACKET sockets, the kernel's counts start at 0
    s.mgr.reconcile()
    s.openers.packet_stats = lambda sock: (1, 1)  # type: ignore[method-assign]
    s.mgr.inputs.poll_drops()
    (listed,) = s.mgr.relays()
    assert listed["input_drops"] == 8
    assert listed["packets"] == 40 and listed["counters_since"] == since
    assert listed["bytes_counted"] == "udp_payload"


def test_a_trace_starts_after_the_records_of_earlier_traces() -> None:
    s, _host = with_host()
    s.mgr.add(relay())
    rid = s.last_table().entries[0].id
    first = s.mgr.trace_start("tv")
    old = m.Stats(1, (), {}, 0.1, {str(rid): [{"time": 1.0, "size": 5}] * 3})
    s.mgr.on_message(0, old, 0.0)
    s.mgr.trace_stop("tv")
    cursor = s.mgr.trace_start("tv")
    assert (first, cursor) == (0, 3)
    assert s.mgr.trace_read("tv", cursor) == ([], 3)


def test_relay_counters_go_on_after_the_worker_let_go_of_a_waiting_input(s: Setup) -> None:
    s.mgr.add(relay())
    rid = s.last_table().entries[0].id
    s.mgr.on_message(0, stats(rid, 40), 0.0)
    del s.ifaces["up0"]  # the input waits: the workers' table loses the relay, and so
    s.mgr.reconcile()  # does each worker's counter list
    s.mgr.on_message(0, m.Stats(2, (), {}, 0.1, {}, (rid,)), 0.0)
    assert s.mgr.relays()[0]["packets"] == 40
    s.ifaces["up0"] = 30
    s.mgr.reconcile()
    s.mgr.on_message(0, stats(rid, 5, seq=3), 0.0)  # counted again from zero
    (listed,) = s.mgr.relays()
    assert listed["packets"] == 45 and listed["outputs"][0]["packets"] == 45
    s.mgr.delete("tv")
    s.mgr.on_message(0, m.Stats(4, (), {}, 0.1, {}, (rid,)), 0.0)
    assert s.mgr.counters.total(rid, 1)[0][m.PACKETS] == 0  # a removed rule keeps nothing
