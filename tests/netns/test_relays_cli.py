"""Relays through the whole product: the mcrelay CLI, the daemon, its workers, real packets.

The relay engine itself is exercised in depth by test_relay_engine.py; these
tests show what a user does: `relay add` with SPECs, `show relays`,
`show workers`, refusals, and relays surviving a restart.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from mcrelay.lab import StandardLab, wait_for
from mcrelay.lab.daemon import CLI, DaemonProcess
from mcrelay.lab.netns import python_env


def relay_path(lab: StandardLab, group: str, port: int, out: str, out_port: int, rcv: str) -> None:
    """Probe until the relay delivers group:port from src as out:out_port at rcv."""
    lab.probe_until_forwarded(
        "src", group, port, "veth0", rcv, "veth0", recv_address=out, recv_port=out_port, timeout=10
    )


def test_relay_add_translates_group_and_port_and_counts_it(
    lab: StandardLab, daemon: DaemonProcess
) -> None:
    res = daemon.cli(
        "relay", "add", "iptv", "--in", "239.1.1.1:5000@up0",
        "--out", "239.9.9.9:6000@dn1,ttl=5,dscp=AF41",
        "--out", "203.0.113.2:7000",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    relay_path(lab, "239.1.1.1", 5000, "239.9.9.9", 6000, "rcv1")
    before = daemon.cli_json("show", "relays")["relays"][0]["packets"]

    r1 = lab.receiver("rcv1", "239.9.9.9", 6000, "veth0", count=100, duration=5, idle=1.5)
    r2 = lab.receiver("rcv2", "203.0.113.2", 7000, None, count=100, duration=5, idle=1.5)
    lab.send("src", "239.1.1.1", 5000, iface="veth0", count=100, size=1316, ttl=1, rate=5000)
    got1, got2 = r1.result(), r2.result()

    assert got1.count == 100 and got1.intact == 100, "byte-identical after translation"
    assert got1.ttls == {"5": 100} and got1.toss == {str(34 << 2): 100}  # AF41 = 34
    assert got2.count == 100 and got2.intact == 100, "multicast to unicast"

    def counted() -> bool:
        relay = daemon.cli_json("show", "relays")["relays"][0]
        return bool(relay["packets"] - before >= 100)

    wait_for(counted, timeout=5, what="relay counters to include the stream")
    (relay,) = daemon.cli_json("show", "relays")["relays"]
    assert relay["name"] == "iptv" and relay["state"] == "active"
    assert [o["packets"] >= 100 for o in relay["outputs"]] == [True, True]
    table = daemon.cli("show", "relays").stdout
    assert "iptv" in table and "239.9.9.9:6000" in table

    daemon.cli("relay", "del", "iptv", check=True)
    assert daemon.cli_json("show", "relays")["relays"] == []
    r1 = lab.receiver("rcv1", "239.9.9.9", 6000, "veth0", count=20, duration=2, idle=1)
    lab.send("src", "239.1.1.1", 5000, iface="veth0", count=20, rate=2000)
    assert r1.result().count == 0, "a deleted relay forwards nothing"


def test_relay_refusals_name_the_field_and_change_nothing(
    lab: StandardLab, daemon: DaemonProcess
) -> None:
    daemon.cli("relay", "add", "a", "--in", "239.1.1.1:5000@up0", "--out", "239.2.2.2:5000@dn1",
               check=True)  # fmt: skip
    many = [x for i in range(33) for x in ("--out", f"239.3.3.{i + 1}:5000@dn1")]
    cases = {
        ("relay", "add", "loop", "--in", "239.4.4.4:5000@up0", "--out", "239.4.4.4:5000@up0"): (
            "loop"
        ),
        ("relay", "add", "a", "--in", "239.5.5.5:5000@up0", "--out", "239.2.2.2:5000@dn1"): (
            "already exists"
        ),
        ("relay", "add", "b", "--in", "239.1.1.1:5000@up0", "--out", "239.6.6.6:5000@dn1"): (
            "used by relay 'a'"
        ),
        ("relay", "add", "c", "--in", "239.1.1.1:70000@up0", "--out", "239.6.6.6:5000@dn1"): (
            "1-65535"
        ),
        ("relay", "add", "c", "--in", "239.1.1.7:5000@up0", "--out", "239.6.6.6:0@dn1"): (
            "1-65535"
        ),
        ("relay", "add", "c", "--in", "239.1.1.7:5000@up0", "--out", "239.6.6.6:5000"): (
            "needs an interface"
        ),
        ("relay", "add", "c", "--in", "239.1.1.7:5000@up0", "--out", "239.6.6.6:5@dn1,dscp=XX"): (
            "DSCP"
        ),
        ("relay", "add", "c", "--in", "239.1.1.7:5000@up0", "--out", "239.6.6.6:5@dn1,dscp=64"): (
            "0-63"
        ),
        ("relay", "add", "c", "--in", "239.1.1.7:5000@up0", "--out", "239.6.6.6:5@dn1,ttl=0"): (
            "1-255"
        ),
        ("relay", "add", "c", "--in", "239.1.1.7:5000@up0", *many): "at most 32",
        ("relay", "del", "nope"): "no such rule",
    }
    for argv, expected in cases.items():
        res = daemon.cli(*argv)
        assert res.returncode == 1, (argv, res.stdout, res.stderr)
        assert expected in res.stderr, (argv, res.stderr)
    assert [r["name"] for r in daemon.cli_json("show", "relays")["relays"]] == ["a"]
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_relays_survive_a_restart_and_workers_restart_after_sigkill(lab: StandardLab) -> None:
    with DaemonProcess(lab, "router", workers=2) as d:
        d.start()
        d.cli("relay", "add", "feed", "--in", "239.1.1.2:5000@up0", "--out", "239.8.8.8:6000@dn2",
              check=True)  # fmt: skip
        d.cli("relay", "add", "sock", "--mode", "socket", "--in", "239.1.1.3:5000@up0",
              "--out", "239.8.8.9:6000@dn2", check=True)  # fmt: skip
        assert d.stop() == 0

        d.start()
        names = [r["name"] for r in d.cli_json("show", "relays")["relays"]]
        assert sorted(names) == ["feed", "sock"]
        relay_path(lab, "239.1.1.2", 5000, "239.8.8.8", 6000, "rcv2")

        workers = d.cli_json("show", "workers")["workers"]
        assert len(workers) == 2 and all(w["restarts"] == 0 for w in workers)
        for w in workers:
            os.kill(w["pid"], signal.SIGKILL)
        start = time.monotonic()
        relay_path(lab, "239.1.1.2", 5000, "239.8.8.8", 6000, "rcv2")
        relay_path(lab, "239.1.1.3", 5000, "239.8.8.9", 6000, "rcv2")
        assert time.monotonic() - start < 5

        def restarted() -> bool:
            now = d.cli_json("show", "workers")["workers"]
            return all(w["restarts"] == 1 and w["state"] == "running" for w in now)

        wait_for(restarted, timeout=5, what="both workers restarted and counted")
        assert "restart" in d.log()


def test_mcrelay_trace_shows_each_relayed_packet(lab: StandardLab, daemon: DaemonProcess) -> None:
    daemon.cli("relay", "add", "t", "--in", "239.1.1.4:5000@up0", "--out", "239.7.7.7:6000@dn1",
               check=True)  # fmt: skip
    relay_path(lab, "239.1.1.4", 5000, "239.7.7.7", 6000, "rcv1")
    trace = subprocess.Popen(
        [*CLI, "--socket", daemon.socket, "trace", "t", "--count", "5", "--duration", "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=python_env(),
    )
    try:
        wait_for(
            lambda: daemon.call("relay.list")["relays"][0].get("traced"),
            timeout=10,
            what="tracing to start",
        )
        lab.send("src", "239.1.1.4", 5000, iface="veth0", count=5, size=300, rate=100)
        out, err = trace.communicate(timeout=20)
    finally:
        if trace.poll() is None:
            trace.kill()
    lines = out.splitlines()
    assert trace.returncode == 0, err
    assert len(lines) == 5
    assert all("192.0.2.2" in line and "300" in line for line in lines), lines
    assert "5 packets traced" in err
    assert not daemon.call("relay.list")["relays"][0].get("traced"), "trace stopped after"


def test_apply_and_export_carry_relays(
    lab: StandardLab, daemon: DaemonProcess, tmp_path: Path
) -> None:
    rules = {
        "version": 1,
        "routes": [{"iif": "up0", "source": "192.0.2.2", "group": "239.1.1.1", "oifs": ["dn1"]}],
        "relays": [
            {
                "name": "ssdp",
                "input": {"iif": "up0", "group": "239.255.255.250", "port": 1900},
                "outputs": [{"address": "239.255.255.250", "port": 1900, "oif": "dn2", "ttl": 1}],
            },
            {
                "name": "feed",
                "mode": "socket",
                "input": {"iif": "up0", "group": "239.1.1.5", "port": 5000},
                "outputs": [{"address": "198.51.100.2", "port": 7000}],
            },
        ],
    }
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(rules))
    res = daemon.cli("apply", str(path))
    assert res.returncode == 0, res.stderr
    assert "+ relay ssdp" in res.stdout and "+ relay feed" in res.stdout, res.stdout

    relay_path(lab, "239.255.255.250", 1900, "239.255.255.250", 1900, "rcv2")
    receiver = lab.receiver("rcv2", "239.255.255.250", 1900, "veth0", count=10, duration=3)
    lab.send("src", "239.255.255.250", 1900, iface="veth0", count=10, ttl=1, rate=200)
    got = receiver.result()
    assert got.count == 10 and got.ttls == {"1": 10}, "TTL-1 SSDP relayed to the other segment"

    exported = daemon.cli_json("export")
    assert sorted(r["name"] for r in exported["relays"]) == ["feed", "ssdp"]
    path.write_text(json.dumps(exported))
    res = daemon.cli("apply", str(path))
    assert res.returncode == 0 and "no changes" in res.stdout, res.stdout
    assert daemon.cli_json("export") == exported
