"""Standing group memberships (`mcrelay group join|leave`) on a real daemon and kernel.

The kernel's own view is checked: /proc/net/igmp and /proc/net/mcfilter for
IPv4, /proc/net/igmp6 and /proc/net/mcfilter6 for IPv6, in the router namespace.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
from pathlib import Path

from mcrelay.lab import Lab, StandardLab
from mcrelay.lab.daemon import DaemonProcess


def igmp(lab: Lab, iface: str) -> set[str]:
    """IPv4 groups the router's kernel has joined on iface."""
    groups, current = set(), None
    for line in lab.run("router", "cat", "/proc/net/igmp").stdout.splitlines()[1:]:
        if not line[:1].isspace():
            current = line.split()[1].rstrip(":")
        elif current == iface:
            groups.add(socket.inet_ntoa(struct.pack("<I", int(line.split()[0], 16))))
    return groups


def mcfilter(lab: Lab, iface: str) -> set[tuple[str, str]]:
    """(group, source) source filters on iface (/proc/net/mcfilter, INCLUDE mode)."""
    out = set()
    for line in lab.run("router", "cat", "/proc/net/mcfilter").stdout.splitlines()[1:]:
        f = line.split()
        if f[1] == iface:
            out.add(tuple(str(ipaddress.IPv4Address(int(x, 16))) for x in (f[2], f[3])))
    return out  # type: ignore[return-value]


def igmp6(lab: Lab, iface: str) -> set[str]:
    out = set()
    for line in lab.run("router", "cat", "/proc/net/igmp6").stdout.splitlines():
        f = line.split()
        if f[1] == iface:
            out.add(str(ipaddress.IPv6Address(bytes.fromhex(f[2]))))
    return out


def mcfilter6(lab: Lab, iface: str) -> set[tuple[str, str]]:
    out = set()
    for line in lab.run("router", "cat", "/proc/net/mcfilter6").stdout.splitlines()[1:]:
        f = line.split()
        if f[1] == iface:
            out.add(
                (
                    str(ipaddress.IPv6Address(bytes.fromhex(f[2]))),
                    str(ipaddress.IPv6Address(bytes.fromhex(f[3]))),
                )
            )
    return out


def test_asm_and_ssm_joins_on_ipv4_and_ipv6_reach_the_kernel_and_leave_again(
    lab: StandardLab, daemon: DaemonProcess
) -> None:
    daemon.cli("group", "join", "dn1", "239.10.0.1", check=True)  # ASM v4
    daemon.cli("group", "join", "dn1", "232.10.0.2", "198.51.100.2", check=True)  # SSM v4
    daemon.cli("group", "join", "dn2", "ff3e::10:1", check=True)  # ASM v6
    daemon.cli("group", "join", "dn2", "ff3e::10:2", "2001:db8:12::2", check=True)  # SSM v6

    assert {"239.10.0.1", "232.10.0.2"} <= igmp(lab, "dn1")
    assert ("232.10.0.2", "198.51.100.2") in mcfilter(lab, "dn1")
    assert {"ff3e::10:1", "ff3e::10:2"} <= igmp6(lab, "dn2")
    assert ("ff3e::10:2", "2001:db8:12::2") in mcfilter6(lab, "dn2")

    shown = daemon.cli_json("show", "groups")["groups"]
    assert {(g["iface"], g["group"], g["source"], g["state"]) for g in shown} == {
        ("dn1", "239.10.0.1", "*", "joined"),
        ("dn1", "232.10.0.2", "198.51.100.2", "joined"),
        ("dn2", "ff3e::10:1", "*", "joined"),
        ("dn2", "ff3e::10:2", "2001:db8:12::2", "joined"),
    }
    table = daemon.cli("show", "groups", check=True).stdout
    assert "232.10.0.2" in table and "198.51.100.2" in table

    saved = json.loads(Path(daemon.state).read_text())["groups"]
    assert len(saved) == 4, "memberships are persisted like rules"

    daemon.cli("group", "leave", "dn1", "232.10.0.2", "198.51.100.2", check=True)
    daemon.cli("group", "leave", "dn2", "ff3e::10:1", check=True)
    assert "232.10.0.2" not in igmp(lab, "dn1")
    assert ("232.10.0.2", "198.51.100.2") not in mcfilter(lab, "dn1")
    assert "ff3e::10:1" not in igmp6(lab, "dn2")
    assert "239.10.0.1" in igmp(lab, "dn1") and "ff3e::10:2" in igmp6(lab, "dn2")
    assert len(json.loads(Path(daemon.state).read_text())["groups"]) == 2

    res = daemon.cli("group", "leave", "dn2", "ff3e::10:1")
    assert res.returncode == 1 and "no such rule" in res.stderr
    res = daemon.cli("group", "join", "dn1", "239.10.0.1")
    assert res.returncode == 1 and "already exists" in res.stderr


def test_twenty_five_groups_on_one_interface_are_all_joined(
    lab: StandardLab, daemon: DaemonProcess
) -> None:
    limit = lab.run("router", "sysctl", "-n", "net.ipv4.igmp_max_memberships").stdout.strip()
    assert limit == "20", "the point of this test is going past the per-socket default"
    groups = [f"239.20.0.{i}" for i in range(1, 26)]
    for g in groups:
        res = daemon.cli("group", "join", "dn1", g)
        assert res.returncode == 0, (g, res.stderr)
    sources = [f"192.0.2.{i}" for i in range(100, 125)]
    for s in sources:  # 25 SSM joins of one group, with different sources
        daemon.cli("group", "join", "dn2", "232.20.0.1", s, check=True)

    assert set(groups) <= igmp(lab, "dn1")
    assert {("232.20.0.1", s) for s in sources} <= mcfilter(lab, "dn2")
    shown = daemon.cli_json("show", "groups")["groups"]
    assert len(shown) == 50
    assert all(g["state"] == "joined" for g in shown), [g for g in shown if g["state"] != "joined"]


def test_memberships_come_back_after_kill_9_and_restart(
    lab: StandardLab, daemon: DaemonProcess
) -> None:
    daemon.cli("group", "join", "dn1", "239.30.0.1", check=True)
    daemon.cli("group", "join", "dn2", "ff3e::30:1", "2001:db8:12::2", check=True)
    daemon.kill_all()
    assert "239.30.0.1" not in igmp(lab, "dn1")  # the kernel dropped them with the sockets

    daemon.start()

    assert "239.30.0.1" in igmp(lab, "dn1")
    assert ("ff3e::30:1", "2001:db8:12::2") in mcfilter6(lab, "dn2")
    assert len(daemon.cli_json("show", "groups")["groups"]) == 2
