"""Membership on a real kernel: more than 20 groups on one interface, IPv6, SSM."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from mcrelay.lab import StandardLab
from mcrelay.membership import Membership

pytestmark = pytest.mark.netns


def _ifindex(name: str) -> int | None:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


def _kernel_groups(iface: str) -> tuple[set[str], set[str]]:
    """Groups the kernel has joined on iface, from /proc/thread-self/net/igmp{,6}.

    thread-self, not self: lab.in_ns runs us in a thread inside the namespace.
    """
    v4: set[str] = set()
    current = None
    for line in Path("/proc/thread-self/net/igmp").read_text().splitlines()[1:]:
        if not line.startswith("\t"):
            current = line.split()[1]
            continue
        if current == iface:
            raw = bytes.fromhex(line.split()[0])[::-1]  # host-order hex
            v4.add(socket.inet_ntoa(raw))
    v6 = set()
    for line in Path("/proc/thread-self/net/igmp6").read_text().splitlines():
        f = line.split()
        if f[1] == iface:
            v6.add(socket.inet_ntop(socket.AF_INET6, bytes.fromhex(f[2])))
    return v4, v6


def _scenario() -> dict[str, object]:
    mb = Membership(_ifindex, logging.getLogger("test"))
    groups = [f"239.20.0.{i}" for i in range(1, 46)]
    for g in groups:
        mb.join("up0", g)
    mb.join("up0", "232.1.1.1", "192.0.2.2")
    mb.join("up0", "ff3e::20")
    joined_v4, joined_v6 = _kernel_groups("up0")
    sockets = mb.sockets()
    states = {e["state"] for e in mb.list()}
    for g in groups:
        mb.leave("up0", g)
    mb.leave("up0", "232.1.1.1", "192.0.2.2")
    mb.leave("up0", "ff3e::20")
    left_v4, left_v6 = _kernel_groups("up0")
    mb.close()
    return {
        "wanted": set(groups) | {"232.1.1.1"},
        "joined_v4": joined_v4,
        "joined_v6": joined_v6,
        "sockets": sockets,
        "states": states,
        "left_v4": left_v4,
        "left_v6": left_v6,
    }


def test_many_groups_ssm_and_ipv6_join_and_leave(lab: StandardLab) -> None:
    r = lab.in_ns("router", _scenario)
    wanted = r["wanted"]
    assert isinstance(wanted, set)
    assert wanted <= r["joined_v4"]  # type: ignore[operator]
    assert "ff3e::20" in r["joined_v6"]  # type: ignore[operator]
    assert r["states"] == {"joined"}
    assert r["sockets"] == 3 + 1  # 45 IPv4 groups (+ the SSM one) over 3 sockets; one for v6
    assert not (wanted & r["left_v4"])  # type: ignore[operator]
    assert "ff3e::20" not in r["left_v6"]  # type: ignore[operator]
