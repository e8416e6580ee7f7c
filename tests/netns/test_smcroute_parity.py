"""What smcroute users rely on, with the real kernel: prefix routes, stop filters,
extending a route, interface wildcards, group ranges.

Topology (tests/netns/conftest.py `lab`):  src --up0 [router] dn1-- rcv1
                                                           dn2-- rcv2
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from mcrelay.lab import StandardLab, wait_for
from mcrelay.lab.daemon import DaemonProcess
from mcrelay.lab.netns import python_env

SRC4 = "192.0.2.2"
PORT = 5000


def arrives(lab: StandardLab, group: str, rcv: str = "rcv1", timeout: float = 3.0) -> bool:
    """True if a probe to group from src reaches rcv (within timeout)."""
    try:
        lab.probe_until_forwarded("src", group, PORT, "veth0", rcv, "veth0", timeout=timeout)
    except TimeoutError:
        return False
    return True


def test_star_g_prefix_forwards_every_group_in_range(
    lab: StandardLab, daemon: DaemonProcess
) -> None:
    daemon.cli("route", "add", "up0", "225.1.2.3/24", "dn1", check=True)
    (route,) = daemon.cli_json("show", "routes")["routes"]
    assert route["group"] == "225.1.2.0/24" and route["source"] == "*"
    assert arrives(lab, "225.1.2.3") and arrives(lab, "225.1.2.200")
    assert not arrives(lab, "225.1.3.1", timeout=1.0), "225.1.3.1 is outside the /24"
    (route,) = daemon.cli_json("show", "routes")["routes"]
    assert {e["group"] for e in route["learned"]} == {"225.1.2.3", "225.1.2.200"}


def test_source_prefix_route_forwards_its_sources_only(
    lab: StandardLab, daemon: DaemonProcess
) -> None:
    daemon.cli("route", "add", "up0", "192.0.2.0/24", "225.3.0.0/16", "dn2", check=True)
    daemon.cli("route", "add", "up0", "198.18.0.0/15", "225.4.0.0/16", "dn2", check=True)
    assert arrives(lab, "225.3.7.7", "rcv2")
    assert not arrives(lab, "225.4.7.7", "rcv2", timeout=1.0), "src is not in 198.18.0.0/15"


def test_a_stop_filter_blocks_one_source_a_prefix_route_would_forward(
    lab: StandardLab, daemon: DaemonProcess
) -> None:
    daemon.cli("route", "add", "up0", "225.1.2.0/24", "dn1", check=True)
    res = daemon.cli("route", "add", "up0", SRC4, "225.1.2.9")
    assert res.returncode == 0, res.stderr
    assert arrives(lab, "225.1.2.8")
    assert not arrives(lab, "225.1.2.9", timeout=1.0), "the stop filter must block it"
    stop = next(r for r in daemon.cli_json("show", "routes")["routes"] if r["source"] == SRC4)
    assert stop["oifs"] == [] and stop["state"] == "active"


def test_route_add_of_an_existing_sg_with_new_outputs_extends_it(
    lab: StandardLab, daemon: DaemonProcess
) -> None:
    daemon.cli("route", "add", "up0", SRC4, "239.1.7.7", "dn1", check=True)
    assert arrives(lab, "239.1.7.7", "rcv1")
    assert not arrives(lab, "239.1.7.7", "rcv2", timeout=1.0)
    res = daemon.cli("route", "add", "up0", SRC4, "239.1.7.7", "dn2")
    assert res.returncode == 0, res.stderr
    assert arrives(lab, "239.1.7.7", "rcv1") and arrives(lab, "239.1.7.7", "rcv2")
    (route,) = daemon.cli_json("show", "routes")["routes"]
    assert [o["name"] for o in route["oifs"]] == ["dn1", "dn2"]
    again = daemon.cli("route", "add", "up0", SRC4, "239.1.7.7", "dn2")
    assert again.returncode == 1 and "already exists" in again.stderr


def test_wildcard_outputs_cover_every_matching_interface(
    lab: StandardLab, daemon: DaemonProcess
) -> None:
    daemon.cli("route", "add", "up0", SRC4, "239.1.8.8", "dn+", check=True)
    assert arrives(lab, "239.1.8.8", "rcv1") and arrives(lab, "239.1.8.8", "rcv2")


def test_ipv6_group_prefix_route(lab: StandardLab, daemon: DaemonProcess) -> None:
    daemon.cli("route", "add", "up0", "ff3e::100/120", "dn1", check=True)
    assert arrives(lab, "ff3e::105", timeout=5.0)
    assert not arrives(lab, "ff3e::205", timeout=1.0)


def joined(lab: StandardLab, iface: str) -> set[str]:
    res = lab.ip("router", "-4", "maddr", "show", "dev", iface, check=False)
    return {line.split()[1] for line in res.stdout.splitlines() if "inet " in line}


def test_group_join_of_a_range_joins_every_group_and_refuses_huge_ranges(
    lab: StandardLab, daemon: DaemonProcess
) -> None:
    daemon.cli("group", "join", "dn1", "239.80.0.0/30", check=True)
    assert {"239.80.0.0", "239.80.0.1", "239.80.0.2", "239.80.0.3"} <= joined(lab, "dn1")
    huge = daemon.cli("group", "join", "dn1", "239.81.0.0/20")
    assert huge.returncode == 1 and "at most 1024" in huge.stderr
    daemon.cli("group", "leave", "dn1", "239.80.0.0/30", check=True)
    assert not {"239.80.0.0", "239.80.0.3"} & joined(lab, "dn1")


# ---------------------------------------------------------------- rule files


def steady(lab: StandardLab, group: str, rcv: str, count: int, rate: int = 500) -> Any:
    """A numbered stream from src; returns (receiver, sender process)."""
    rx = lab.receiver(rcv, group, PORT, "veth0", count=count, duration=count / rate + 15, idle=3)
    argv = lab.traffic_argv(
        "send", group, str(PORT), "--iface", "veth0", "--ttl", "8",
        "--count", str(count), "--rate", str(rate),
    )  # fmt: skip
    return rx, lab.popen("src", argv, stdout=subprocess.DEVNULL, env=python_env())


def test_sighup_rereads_rule_files_without_loss(lab: StandardLab, tmp_path: Path) -> None:
    rules = tmp_path / "rules.d"
    rules.mkdir()
    conf = rules / "tv.conf"
    conf.write_text(f"# smcroute syntax\nmroute from up0 source {SRC4} group 239.1.9.1 to dn1\n")
    d = DaemonProcess(lab, "router", config=f'rules = ["{rules}/*.conf"]\n')
    try:
        d.start()
        assert arrives(lab, "239.1.9.1")
        (route,) = d.cli_json("show", "routes")["routes"]
        assert route["origin"] == f"{conf}:2"
        refused = d.cli("route", "del", "up0", SRC4, "239.1.9.1")
        assert refused.returncode == 1 and f"defined in {conf}:2" in refused.stderr
        rx, tx = steady(lab, "239.1.9.1", "rcv1", count=3000)
        time.sleep(1.0)
        conf.write_text(
            f"mroute from up0 source {SRC4} group 239.1.9.1 to dn1\n"
            f"mroute from up0 source {SRC4} group 239.1.9.2 to dn2\n"
        )
        os.kill(d.pid, signal.SIGHUP)
        wait_for(lambda: len(d.call("route.list")["routes"]) == 2, timeout=5, what="reload")
        assert arrives(lab, "239.1.9.2", "rcv2")
        assert tx.wait(timeout=60) == 0
        got = rx.result(timeout=60)
        assert got.count == 3000, f"the kept route lost {3000 - got.count} packets on reload"
        conf.write_text(f"mroute from up0 source {SRC4} group 239.1.9.1 to dn1\n")
        os.kill(d.pid, signal.SIGHUP)
        wait_for(lambda: len(d.call("route.list")["routes"]) == 1, timeout=5, what="removed")
        assert not arrives(lab, "239.1.9.2", "rcv2", timeout=1.0)
        assert "Traceback" not in d.log()
    finally:
        d.close()


def test_two_instances_on_their_own_tables_forward_the_same_group_differently(
    lab: StandardLab,
) -> None:
    # iproute2 6.1 cannot parse "mrule ... from PREFIX", so tables are chosen by iif.
    lab.ip("router", "mrule", "add", "iif", "up0", "lookup", "100")
    lab.ip("router", "mrule", "add", "iif", "dn2", "lookup", "200")
    a = DaemonProcess(lab, "router", args=("--table", "100"))
    b = DaemonProcess(lab, "router", args=("--table", "200"))
    try:
        a.start()
        b.start()
        a.cli("route", "add", "up0", "239.3.3.3", "dn1", check=True)
        b.cli("route", "add", "up0", "239.3.3.3", "dn2", check=True)  # never consulted for up0
        b.cli("route", "add", "dn2", "239.3.3.3", "dn1", check=True)
        assert arrives(lab, "239.3.3.3", "rcv1"), "instance A (table 100) forwards up0 -> dn1"
        assert not arrives(lab, "239.3.3.3", "rcv2", timeout=1.0), "table 200 never sees up0"
        lab.probe_until_forwarded("rcv2", "239.3.3.3", PORT, "veth0", "rcv1", "veth0", timeout=5)
        (ra,) = a.cli_json("show", "routes")["routes"]
        assert ra["packets"] > 0
        up0_b = next(r for r in b.cli_json("show", "routes")["routes"] if r["iif"] == "up0")
        assert up0_b["packets"] == 0
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------- router discovery


def capture_igmp(seconds: float) -> list[bytes]:
    """IPv4 IGMP datagrams (IP header included) seen on veth0 for a while (run in a namespace)."""
    import socket as so
    import struct as st

    s = so.socket(so.AF_INET, so.SOCK_RAW, so.IPPROTO_IGMP)
    try:
        mreq = st.pack("=4s4si", so.inet_aton("224.0.0.106"), bytes(4), so.if_nametoindex("veth0"))
        s.setsockopt(so.IPPROTO_IP, so.IP_ADD_MEMBERSHIP, mreq)
        s.settimeout(0.2)
        out = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                out.append(s.recv(2048))
            except TimeoutError:
                continue
        return out
    finally:
        s.close()


def test_mrdisc_announces_the_router_on_interfaces_that_enable_it(
    lab: StandardLab, tmp_path: Path
) -> None:
    conf = tmp_path / "smcroute.conf"
    conf.write_text("phyint dn1 mrdisc\nmroute from up0 group 239.4.4.4 to dn1\n")
    d = DaemonProcess(lab, "router", config=f'rules = ["{conf}"]\nmrdisc_interval = 4\n')
    try:
        d.start()
        seen = lab.in_ns("rcv1", capture_igmp, 6.0)
        other = lab.in_ns("rcv2", capture_igmp, 0.5)
    finally:
        d.close()
    ads = [p for p in seen if p[(p[0] & 0xF) * 4] == 0x30]
    assert len(ads) >= 3, f"expected the initial burst of 3 advertisements, got {len(ads)}"
    packet = ads[0]
    ihl = (packet[0] & 0xF) * 4
    assert packet[8] == 1, "TTL 1"
    assert packet[16:20] == bytes([224, 0, 0, 106]), "to All-Snoopers"
    assert packet[20:24] == b"\x94\x04\x00\x00", "with the Router Alert option"
    igmp = packet[ihl : ihl + 8]
    assert igmp[1] == 4, "the advertisement interval"
    assert int.from_bytes(igmp[4:6], "big") == 125 and int.from_bytes(igmp[6:8], "big") == 2
    total = sum(int.from_bytes(igmp[i : i + 2], "big") for i in range(0, 8, 2))
    assert (total & 0xFFFF) + (total >> 16) == 0xFFFF, "IGMP checksum"
    assert not [p for p in other if p[(p[0] & 0xF) * 4] == 0x30], "dn2 does not enable mrdisc"


def test_a_wildcard_group_join_holds_every_matching_interface_now_and_later(
    lab: StandardLab, daemon: DaemonProcess
) -> None:
    lab.ip_batch("router", ["link add lt0 type veth peer name lp0", "link set lt0 up",
                            "link set lp0 up"])  # fmt: skip
    daemon.cli("group", "join", "lt+", "239.70.0.10", check=True)
    wait_for(lambda: "239.70.0.10" in joined(lab, "lt0"), timeout=3, what="joined on lt0")
    lab.ip_batch("router", ["link add lt1 type veth peer name lp1", "link set lt1 up",
                            "link set lp1 up"])  # fmt: skip
    wait_for(lambda: "239.70.0.10" in joined(lab, "lt1"), timeout=3, what="joined on lt1 too")
    assert "239.70.0.10" not in joined(lab, "lp0"), "lp0 does not match lt+"
    daemon.cli("group", "leave", "lt+", "239.70.0.10", check=True)
    assert "239.70.0.10" not in joined(lab, "lt0") | joined(lab, "lt1")
