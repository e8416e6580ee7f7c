"""What the daemon says about its rules is true (issue 14): states, counters, traces.

The real daemon in the standard lab (``src -- up0 [router] dn1, dn2 -- rcv1,
rcv2``): each output says whether it forwards and why not; counters survive
an input flap (the kernel's MFC counters and the AF_PACKET input start again
at 0 then); a unicast relay input waits until the host has its address; a
trace shows only packets received after it started, each with its own time.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from typing import Any

from mcrelay.lab import StandardLab, wait_for
from mcrelay.lab.daemon import DaemonProcess

SRC4 = "192.0.2.2"
G, RELAY_IN, RELAY_OUT = "239.80.0.1", "239.80.0.2", "239.81.0.2"
PORT, OUT_PORT = 5000, 6000


def route(d: DaemonProcess, group: str = G) -> dict[str, Any]:
    return next(r for r in d.call("route.list")["routes"] if r["group"] == group)


def relay(d: DaemonProcess, name: str) -> dict[str, Any]:
    return next(r for r in d.call("relay.list")["relays"] if r["name"] == name)


def oif_reasons(rule: dict[str, Any]) -> dict[str, str | None]:
    return {o["name"]: o.get("reason") for o in rule["oifs"]}


def test_every_output_says_whether_it_forwards_and_why_not(
    lab: StandardLab, daemon: DaemonProcess
) -> None:
    daemon.cli("route", "add", "up0", SRC4, G, "dn1", "dn9", check=True)
    daemon.cli(
        "relay", "add", "tv", "--in", f"{RELAY_IN}:{PORT}@up0",
        "--out", f"{RELAY_OUT}:{OUT_PORT}@dn1", "--out", f"{RELAY_OUT}:{OUT_PORT}@dn9",
        check=True,
    )  # fmt: skip
    r = route(daemon)
    assert (r["state"], r["reason"]) == ("partial", "dn9 interface missing")
    assert oif_reasons(r) == {"dn1": None, "dn9": "interface missing"}
    assert relay(daemon, "tv")["state"] == "partial"
    table = daemon.cli("show", "routes", check=True).stdout
    assert "dn1,dn9(missing)" in table and "partial" in table

    lab.ip("router", "link", "set", "dn1", "down")
    wait_for(lambda: oif_reasons(route(daemon))["dn1"] == "interface down", timeout=3,
             interval=0.02, what="dn1 down")  # fmt: skip
    r = route(daemon)  # no output can forward: the route waits, saying why
    assert (r["state"], r["reason"]) == ("waiting", "dn1 interface down; dn9 interface missing")
    outs = {o["oif"]: o.get("reason") for o in relay(daemon, "tv")["outputs"]}
    assert outs == {"dn1": "interface down", "dn9": "interface missing"}
    assert relay(daemon, "tv")["state"] == "waiting"  # no output can send

    lab.ip_batch("router", ["link set dn1 name dnx", "link set dnx up"])
    wait_for(lambda: oif_reasons(route(daemon))["dn1"] == "interface renamed to dnx", timeout=3,
             interval=0.02, what="dn1 renamed")  # fmt: skip
    warnings = daemon.call("daemon.status")["warnings"]
    assert f"route ({SRC4}, {G}) on up0 waits: dn1 interface renamed to dnx; dn9 interface " \
        "missing" in warnings  # fmt: skip
    assert "relay tv: output dn1 waits: interface renamed to dnx" in warnings

    lab.ip("router", "link", "set", "up0", "down")
    wait_for(lambda: route(daemon)["reason"] == "input interface down", timeout=3, interval=0.02,
             what="the input down")  # fmt: skip
    assert route(daemon)["state"] == "waiting"
    assert relay(daemon, "tv")["reason"] == "input interface down"
    assert any("waits: input interface down" in w for w in daemon.call("daemon.status")["warnings"])

    lab.ip_batch("router", ["link set up0 up", "link set dnx down", "link set dnx name dn1",
                            "link set dn1 up", "link add dn9 type veth peer name dn9p",
                            "link set dn9 up", "link set dn9p up"])  # fmt: skip
    wait_for(lambda: route(daemon)["state"] == "active", timeout=3, interval=0.02, what="active")
    assert relay(daemon, "tv")["state"] == "active"
    assert daemon.call("daemon.status")["warnings"] == []


def test_counters_survive_an_input_flap_for_routes_and_relays(
    lab: StandardLab, daemon: DaemonProcess
) -> None:
    daemon.cli("route", "add", "up0", SRC4, G, "dn1", check=True)
    daemon.cli("relay", "add", "tv", "--in", f"{RELAY_IN}:{PORT}@up0",
               "--out", f"{RELAY_OUT}:{OUT_PORT}@dn1", check=True)  # fmt: skip
    for group, out, out_port in ((G, G, PORT), (RELAY_IN, RELAY_OUT, OUT_PORT)):
        lab.probe_until_forwarded("src", group, PORT, "veth0", "rcv1", "veth0",
                                  recv_address=out, recv_port=out_port)  # fmt: skip
    since = route(daemon)["counters_since"]
    for group in (G, RELAY_IN):
        assert lab.send("src", group, PORT, iface="veth0", ttl=8, count=400, rate=4000).sent == 400

    def counted() -> tuple[int, int]:
        return route(daemon)["packets"], relay(daemon, "tv")["packets"]

    wait_for(lambda: min(counted()) >= 400, timeout=5, interval=0.05, what="400 counted")
    before = counted()
    lab.ip("router", "link", "set", "up0", "down")
    wait_for(lambda: route(daemon)["state"] == "waiting", timeout=3, interval=0.02, what="down")
    assert route(daemon)["packets"] == before[0]  # kept while the route waits
    lab.ip("router", "link", "set", "up0", "up")
    for group, out, out_port in ((G, G, PORT), (RELAY_IN, RELAY_OUT, OUT_PORT)):
        lab.probe_until_forwarded("src", group, PORT, "veth0", "rcv1", "veth0",
                                  recv_address=out, recv_port=out_port)  # fmt: skip
    for group in (G, RELAY_IN):
        assert lab.send("src", group, PORT, iface="veth0", ttl=8, count=100, rate=4000).sent == 100
    wait_for(lambda: all(c >= b + 100 for c, b in zip(counted(), before, strict=True)),
             timeout=5, interval=0.05, what=f"counters go on from {before}")  # fmt: skip
    r = route(daemon)
    assert r["counter_resets"] == 1 and r["counters_since"] == since
    assert r["bytes"] >= r["packets"] * 28  # IP bytes: headers counted
    tv = relay(daemon, "tv")
    assert tv["counters_since"] <= time.time() and tv["input_drops"] == 0


def test_a_unicast_input_waits_for_its_address_and_relays_once_the_host_has_it(
    lab: StandardLab, daemon: DaemonProcess
) -> None:
    daemon.cli("relay", "add", "feed", "--in", f"192.0.2.77:{PORT}@up0",
               "--out", f"{RELAY_OUT}:{OUT_PORT}@dn1", check=True)  # fmt: skip
    feed = relay(daemon, "feed")
    assert (feed["state"], feed["reason"]) == ("waiting", "input address not on this host")
    assert (
        "relay feed waits: input address not on this host"
        in daemon.call("daemon.status")["warnings"]
    )
    assert "waiting: input address not on this host" in daemon.cli("show", "relays").stdout
    lab.ip("router", "addr", "add", "192.0.2.77/32", "dev", "up0")  # a DHCP lease, say
    wait_for(lambda: relay(daemon, "feed")["state"] == "active", timeout=3, interval=0.02,
             what="the input opens when the address appears")  # fmt: skip
    lab.probe_until_forwarded("src", "192.0.2.77", PORT, "veth0", "rcv1", "veth0",
                              recv_address=RELAY_OUT, recv_port=OUT_PORT)  # fmt: skip
    lab.ip("router", "addr", "del", "192.0.2.77/32", "dev", "up0")
    wait_for(lambda: relay(daemon, "feed")["state"] == "waiting", timeout=3, interval=0.02,
             what="the input waits again when the address goes")  # fmt: skip


def test_a_trace_shows_only_its_own_packets_each_with_its_receive_time(
    lab: StandardLab, daemon: DaemonProcess
) -> None:
    daemon.cli("relay", "add", "tv", "--in", f"{RELAY_IN}:{PORT}@up0",
               "--out", f"{RELAY_OUT}:{OUT_PORT}@dn1", check=True)  # fmt: skip
    lab.probe_until_forwarded("src", RELAY_IN, PORT, "veth0", "rcv1", "veth0",
                              recv_address=RELAY_OUT, recv_port=OUT_PORT)  # fmt: skip
    c = daemon.client()  # a trace is leased to its connection: one for the whole test
    # an earlier trace fills the ring
    first = c.trace_start("tv")["cursor"]
    time.sleep(0.3)  # the workers have been told
    lab.send("src", RELAY_IN, PORT, iface="veth0", ttl=8, count=5)
    wait_for(lambda: len(c.trace_read("tv", first)["records"]) == 5, timeout=5, interval=0.05,
             what="5 traced")  # fmt: skip
    c.trace_stop("tv")
    # a new trace with no traffic shows nothing (it used to replay those 5)
    quiet = daemon.cli("trace", "tv", "--duration", "1.0", check=True)
    assert quiet.stdout == "" and "0 packets traced" in quiet.stderr

    cursor = c.trace_start("tv")["cursor"]
    assert cursor == first + 5
    time.sleep(0.3)
    # The worker is stopped while 4 packets arrive 100 ms apart, so it reads them
    # in one batch after it resumes: only a per-packet time tells them apart.
    (worker,) = daemon.call("worker.list")["workers"]
    os.kill(worker["pid"], signal.SIGSTOP)
    try:
        started = time.time()
        lab.send("src", RELAY_IN, PORT, iface="veth0", ttl=8, count=4, rate=10)
        time.sleep(0.2)
        resumed = time.time()
    finally:
        os.kill(worker["pid"], signal.SIGCONT)

    def records() -> list[dict[str, Any]]:
        return list(c.trace_read("tv", cursor)["records"])

    wait_for(lambda: len(records()) == 4, timeout=5, interval=0.05, what="4 traced")
    got = records()
    c.trace_stop("tv")
    c.close()
    times = [r["time"] for r in got]
    assert started <= times[0] and times == sorted(times) and times[-1] < resumed
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(0.07 <= g <= 0.13 for g in gaps), gaps  # each its own time, not its batch's
    assert got[0]["destination"] == f"{RELAY_IN}:{PORT}" and got[0]["source"].startswith(SRC4)
