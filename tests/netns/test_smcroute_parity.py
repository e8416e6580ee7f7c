"""What smcroute users rely on, with the real kernel: prefix routes, stop filters,
extending a route, interface wildcards, group ranges.

Topology (tests/netns/conftest.py `lab`):  src --up0 [router] dn1-- rcv1
                                                           dn2-- rcv2
"""

from __future__ import annotations

from mcrelay.lab import StandardLab
from mcrelay.lab.daemon import DaemonProcess

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
