"""The userspace relay engine on a real kernel, with real packets (issue 4, item 7).

Each test runs a RelayManager (through relay_driver.py) in the lab's router
namespace: src -- router(up0 | dn1, dn2) -- rcv1, rcv2.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from relay_driver import Driver

from mcrelay.lab import StandardLab

pytestmark = pytest.mark.netns

RCVBUF = 8 << 20  # bursts of a few hundred datagrams must not overflow the receiver


@pytest.fixture
def drv(lab: StandardLab) -> Iterator[Driver]:
    d = Driver(lab, "router", workers=2)
    try:
        d.wait_workers(2)
        yield d
    finally:
        d.close()


def relay(name: str, iif: str, group: str, port: int, *outs: dict[str, Any], **kw: Any) -> Any:
    inp: dict[str, Any] = {"iif": iif, "group": group, "port": port}
    if "sources" in kw:
        inp["sources"] = kw.pop("sources")
    return {"name": name, "input": inp, "outputs": list(outs), **kw}


def out(address: str, port: int, oif: str | None = None, **kw: Any) -> dict[str, Any]:
    return {"address": address, "port": port, "oif": oif, **kw}


def test_translation_two_outputs_payload_ttl_dscp(lab: StandardLab, drv: Driver) -> None:
    drv.call(
        "add",
        relay=relay(
            "tv",
            "up0",
            "239.1.1.1",
            5000,
            out("239.2.2.2", 6000, "dn1", ttl=7, dscp="EF"),
            out("239.3.3.3", 7000, "dn2", ttl=33, dscp="AF41"),
        ),
    )
    r1 = lab.receiver("rcv1", "239.2.2.2", 6000, "veth0", count=200, duration=5, rcvbuf=RCVBUF)
    r2 = lab.receiver("rcv2", "239.3.3.3", 7000, "veth0", count=200, duration=5, rcvbuf=RCVBUF)
    sent = lab.send("src", "239.1.1.1", 5000, iface="veth0", count=200, size=1200, ttl=1)
    assert sent.sent == 200
    a, b = r1.result(), r2.result()
    # Every datagram arrived once, byte for byte, with the output's TTL and DSCP.
    assert (a.count, a.intact, a.duplicates) == (200, 200, 0)
    assert (b.count, b.intact, b.duplicates) == (200, 200, 0)
    assert a.ttls == {"7": 200} and a.toss == {str(46 << 2): 200}
    assert b.ttls == {"33": 200} and b.toss == {str(34 << 2): 200}
    # One listing, no waiting: it pulls the workers' counters before answering.
    st = drv.relay("tv")
    assert (st["packets"], st["bytes"]) == (200, 200 * 1200)
    assert [(o["packets"], o["bytes"], o["errors"]) for o in st["outputs"]] == [
        (200, 240000, 0),
        (200, 240000, 0),
    ]
    assert drv.call("groups") == [
        {"iface": "up0", "group": "239.1.1.1", "source": "*", "refs": 1, "state": "joined"}
    ]


def test_multicast_to_unicast_and_unicast_to_multicast(lab: StandardLab, drv: Driver) -> None:
    drv.call("add", relay=relay("m2u", "up0", "239.5.5.5", 5000, out("198.51.100.2", 7000)))
    # A unicast address of the router itself, republished as multicast on dn2.
    drv.call(
        "add", relay=relay("u2m", "up0", "192.0.2.1", 5001, out("239.6.6.6", 6001, "dn2", ttl=3))
    )
    r1 = lab.receiver("rcv1", "198.51.100.2", 7000, count=50, duration=5, rcvbuf=RCVBUF)
    r2 = lab.receiver("rcv2", "239.6.6.6", 6001, "veth0", count=50, duration=5, rcvbuf=RCVBUF)
    lab.send("src", "239.5.5.5", 5000, iface="veth0", count=50)
    s = lab.send("src", "192.0.2.1", 5001, count=50)
    a, b = r1.result(), r2.result()
    assert (a.count, a.intact) == (50, 50)
    assert (b.count, b.intact) == (50, 50) and b.ttls == {"3": 50}
    # The port holder keeps the host from answering ICMP port-unreachable,
    # which would show up as send errors on the source's connected path.
    assert s.errors == 0
    assert drv.wait_counter("u2m", 50)["packets"] == 50


def test_foreign_source_with_rp_filter_relayed_in_packet_mode(
    lab: StandardLab, drv: Driver
) -> None:
    lab.set_rp_filter("router", 1)
    lab.ip("src", "addr", "add", "10.77.0.5/32", "dev", "veth0")
    drv.call("add", relay=relay("rp", "up0", "239.7.7.7", 5000, out("239.7.7.8", 5000, "dn1")))
    drv.call(
        "add",
        relay=relay("rps", "up0", "239.7.7.9", 5000, out("239.7.7.10", 5000, "dn1"), mode="socket"),
    )
    rcv = lab.receiver("rcv1", "239.7.7.8", 5000, "veth0", count=30, duration=5, rcvbuf=RCVBUF)
    lab.send("src", "239.7.7.7", 5000, iface="veth0", count=30, source="10.77.0.5")
    res = rcv.result()
    assert (res.count, res.intact) == (30, 30)
    assert res.sources == {"198.51.100.1": 30}  # re-sent by the router
    warns = drv.call("warnings")
    assert any("rps" in w and "rp_filter=1" in w for w in warns), warns


@pytest.mark.parametrize(
    ("group", "port", "ttl", "out_ttl", "out_sport"),
    [("239.255.255.250", 1900, 1, "1", None), ("224.0.0.251", 5353, 255, "255", 5353)],
    ids=["ssdp-ttl1", "mdns"],
)
def test_link_local_and_ttl1_relayed(
    lab: StandardLab, drv: Driver, group: str, port: int, ttl: int, out_ttl: str,
    out_sport: int | None,
) -> None:  # fmt: skip
    """Relayed mDNS leaves with TTL 255 from port 5353 whatever the output says (RFC 6762
    section 11: Avahi drops anything else); other outputs keep their TTL."""
    drv.call("add", relay=relay("ll", "up0", group, port, out(group, port, "dn1", ttl=1)))
    rcv = lab.receiver("rcv1", group, port, "veth0", count=20, duration=5, rcvbuf=RCVBUF)
    lab.send("src", group, port, iface="veth0", count=20, ttl=ttl, sport=40000)
    res = rcv.result()
    assert (res.count, res.intact, res.ttls) == (20, 20, {out_ttl: 20})
    if out_sport is not None:
        assert {p.sport for p in res.packets} == {out_sport}


def test_ipv6_relay(lab: StandardLab, drv: Driver) -> None:
    drv.call(
        "add",
        relay=relay(
            "v6",
            "up0",
            "ff3e::1:1",
            5000,
            out("ff3e::2:2", 6000, "dn1", ttl=9, dscp=10),
            out("2001:db8:12::2", 6001),
        ),
    )
    drv.call("add", relay=relay("mdns6", "up0", "ff02::fb", 5353, out("ff02::fb", 5353, "dn2")))
    r1 = lab.receiver("rcv1", "ff3e::2:2", 6000, "veth0", count=40, duration=5, rcvbuf=RCVBUF)
    r2 = lab.receiver("rcv2", "2001:db8:12::2", 6001, count=40, duration=5, rcvbuf=RCVBUF)
    lab.send("src", "ff3e::1:1", 5000, iface="veth0", count=40, size=700, ttl=1)
    a, b = r1.result(), r2.result()
    assert (a.count, a.intact, a.ttls, a.toss) == (40, 40, {"9": 40}, {"40": 40})
    assert (b.count, b.intact) == (40, 40)
    r3 = lab.receiver("rcv2", "ff02::fb", 5353, "veth0", count=10, duration=5, rcvbuf=RCVBUF)
    lab.send("src", "ff02::fb", 5353, iface="veth0", count=10, ttl=255)
    assert r3.result().intact == 10


def test_workers_unprivileged(drv: Driver) -> None:
    ws = drv.wait_workers(2)
    for w in ws:
        assert w["user"] == "nobody"
        status = Path(f"/proc/{w['pid']}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        assert fields["Uid"].split() == ["65534"] * 4
        assert fields["Groups"].strip() == ""
        assert fields["NoNewPrivs"].strip() == "1"
        assert fields["CapEff"].strip() == "0000000000000000"
        # Only what it was given: /dev/null, the log, its channel (no rules yet).
        fds = {
            int(f): os.readlink(f"/proc/{w['pid']}/fd/{f}")
            for f in os.listdir(f"/proc/{w['pid']}/fd")
        }
        assert fds[0] == "/dev/null" and fds[1] == fds[2]
        extra = [v for k, v in fds.items() if k > 2]
        sockets = [v for v in extra if v.startswith("socket:")]
        assert len(sockets) == 1, "the channel only"
        assert set(extra) - set(sockets) <= {"anon_inode:[eventpoll]"}


def test_sigkill_every_worker_traffic_resumes(lab: StandardLab, drv: Driver) -> None:
    drv.call("add", relay=relay("k", "up0", "239.8.8.8", 5000, out("239.8.8.9", 5000, "dn1")))
    before = drv.wait_workers(2)
    killed = drv.call("kill_workers")
    assert sorted(killed) == sorted(w["pid"] for w in before)
    t0 = time.monotonic()
    rcv = lab.receiver("rcv1", "239.8.8.9", 5000, "veth0", count=1, duration=5, rcvbuf=RCVBUF)
    seq = 0
    while rcv.running and time.monotonic() - t0 < 5:
        lab.send("src", "239.8.8.8", 5000, iface="veth0", count=1, first_seq=seq, sport=40000 + seq)
        seq += 1
        time.sleep(0.02)
    res = rcv.result()
    elapsed = time.monotonic() - t0
    assert res.count == 1 and elapsed < 2.0, f"traffic resumed after {elapsed:.2f}s"
    after = drv.wait_workers(2)
    assert [w["restarts"] for w in after] == [1, 1]
    assert not {w["pid"] for w in after} & set(killed)


def test_two_workers_share_input_exactly_once(lab: StandardLab, drv: Driver) -> None:
    drv.call("add", relay=relay("fan", "up0", "239.9.9.9", 5000, out("239.9.9.10", 5000, "dn1")))
    rcv = lab.receiver(
        "rcv1", "239.9.9.10", 5000, "veth0", count=64 * 20, duration=8, rcvbuf=RCVBUF
    )
    for flow in range(64):  # 64 source ports = 64 flows hashed over the fanout group
        lab.send(
            "src",
            "239.9.9.9",
            5000,
            iface="veth0",
            count=20,
            sport=20000 + flow,
            stream=flow,
            rate=20000,
        )
    res = rcv.result()
    assert res.count == 64 * 20 and res.duplicates == 0 and res.intact == 64 * 20
    assert res.reordered == 0  # each flow stays on one worker, in order
    drv.wait_counter("fan", 64 * 20)
    got = [w["received"] for w in drv.call("workers")]
    assert sum(got) == 64 * 20 and all(g > 0 for g in got), got


def test_rule_changes_reach_running_workers(lab: StandardLab, drv: Driver) -> None:
    pids = [w["pid"] for w in drv.wait_workers(2)]
    drv.call("add", relay=relay("a", "up0", "239.10.0.1", 5000, out("239.10.0.2", 5000, "dn1")))
    rcv = lab.receiver("rcv1", "239.10.0.2", 5000, "veth0", count=10, duration=5, rcvbuf=RCVBUF)
    lab.send("src", "239.10.0.1", 5000, iface="veth0", count=10)
    assert rcv.result().count == 10
    diff = drv.call(
        "replace",
        relays=[
            relay("b", "up0", "239.10.0.3", 5000, out("239.10.0.4", 5000, "dn2")),
            relay("s", "up0", "239.10.0.5", 5000, out("239.10.0.6", 5000, "dn2"), mode="socket"),
        ],
    )
    assert diff == {"added": ["b", "s"], "removed": ["a"], "changed": []}
    r2 = lab.receiver("rcv2", "239.10.0.4", 5000, "veth0", count=10, duration=5, rcvbuf=RCVBUF)
    r3 = lab.receiver("rcv2", "239.10.0.6", 5000, "veth0", count=10, duration=5, rcvbuf=RCVBUF)
    lab.send("src", "239.10.0.3", 5000, iface="veth0", count=10)
    lab.send("src", "239.10.0.5", 5000, iface="veth0", count=10)
    assert r2.result().intact == 10 and r3.result().intact == 10
    assert [w["pid"] for w in drv.call("workers")] == pids
    assert [g["group"] for g in drv.call("groups")] == ["239.10.0.3", "239.10.0.5"]


def test_drops_counted_fragment_and_filtered(lab: StandardLab, drv: Driver) -> None:
    drv.call(
        "add",
        relay=relay(
            "f", "up0", "239.11.0.1", 5000, out("239.11.0.2", 5000, "dn1"), sources=["192.0.2.2"]
        ),
    )
    lab.ip("src", "addr", "add", "192.0.2.99/24", "dev", "veth0")
    lab.send("src", "239.11.0.1", 5000, iface="veth0", count=5, size=3000)  # fragmented
    lab.send("src", "239.11.0.1", 5000, iface="veth0", count=7, source="192.0.2.99")
    lab.send("src", "239.11.0.1", 5000, iface="veth0", count=3)
    deadline = time.monotonic() + 5
    while True:
        st = drv.relay("f")
        if (st["packets"] >= 3 and st["drops"]["fragment"] >= 5) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert st["packets"] == 3
    assert st["drops"]["fragment"] == 5
    assert st["drops"]["filtered"] == 7


def test_trace_records_packets(lab: StandardLab, drv: Driver) -> None:
    drv.call("add", relay=relay("t", "up0", "239.12.0.1", 5000, out("239.12.0.2", 5000, "dn1")))
    drv.call("trace_start", name="t")
    time.sleep(0.2)
    lab.send("src", "239.12.0.1", 5000, iface="veth0", count=5, size=100, sport=4321)
    deadline = time.monotonic() + 5
    recs: list[dict[str, Any]] = []
    cursor = 0
    while len(recs) < 5 and time.monotonic() < deadline:
        got = drv.call("trace_read", name="t", cursor=cursor)
        recs += got["records"]
        cursor = got["cursor"]
        time.sleep(0.1)
    assert len(recs) == 5
    assert {r["source"] for r in recs} == {"192.0.2.2:4321"}
    assert {r["size"] for r in recs} == {100}
    assert {r["result"] for r in recs} == {"relayed"}
    assert recs[0]["outputs"] == ["239.12.0.2:5000"]
    drv.call("trace_stop", name="t")


def test_input_interface_vanishes_and_returns(lab: StandardLab, drv: Driver) -> None:
    drv.call("add", relay=relay("w", "up0", "239.13.0.1", 5000, out("239.13.0.2", 5000, "dn1")))
    lab.ip("router", "link", "del", "up0")
    drv.call("iface", name="up0")
    st = drv.relay("w")
    assert st["state"] == "waiting"
    assert drv.call("groups")[0]["state"] == "waiting"
    lab.add_link("router", "up0", "src", "veth0", v4_a="192.0.2.1/24", v4_b="192.0.2.2/24")
    drv.call("iface", name="up0")
    assert drv.relay("w")["state"] == "active"
    assert drv.call("groups")[0]["state"] == "joined"
    rcv = lab.receiver("rcv1", "239.13.0.2", 5000, "veth0", count=10, duration=5, rcvbuf=RCVBUF)
    lab.send("src", "239.13.0.1", 5000, iface="veth0", count=10)
    assert rcv.result().intact == 10
