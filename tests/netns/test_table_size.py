"""Relay tables of any size on one interface (issue 12, point 3).

The 281st packet-mode relay added on one interface used to fail with ENOMEM:
the exact BPF filter grew past what the socket's option memory could hold
while SO_ATTACH_FILTER replaced the old one. Here 600 packet-mode relays are
added one by one, one request each over the Python client, to a real daemon,
and the first and the last still relay a packet.
"""

from __future__ import annotations

import pytest

from mcrelay.client import Client
from mcrelay.lab import StandardLab
from mcrelay.lab.daemon import DaemonProcess

pytestmark = pytest.mark.netns

COUNT = 600


def group(i: int) -> str:
    return f"239.100.{i // 250}.{i % 250 + 1}"


def test_600_packet_mode_relays_added_one_by_one(lab: StandardLab, daemon: DaemonProcess) -> None:
    with Client(daemon.socket, timeout=60) as c:
        for i in range(COUNT):
            c.relay_add(
                f"r{i}",
                {"iif": "up0", "group": group(i), "port": 5000},
                [{"address": "239.2.2.2", "port": 6000 + i % 2, "oif": "dn1", "ttl": 8}],
            )
        relays = c.relays()
        assert len(relays) == COUNT
        assert not [r for r in relays if r.get("error")], relays[:3]
    for i in (0, COUNT - 1):
        lab.probe_until_forwarded(
            "src",
            group(i),
            5000,
            "veth0",
            "rcv1",
            "veth0",
            recv_address="239.2.2.2",
            recv_port=6000 + i % 2,
            timeout=10,
        )
    assert "Cannot allocate memory" not in daemon.log()
