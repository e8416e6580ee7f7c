"""Signals and sd_notify on a real daemon, with the test's own datagram socket as NOTIFY_SOCKET."""

from __future__ import annotations

import itertools
import json
import signal
import socket
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mcrelay.lab import Lab, StandardLab
from mcrelay.lab.daemon import DaemonProcess

SRC4 = "192.0.2.2"


def mfc_v4(lab: Lab) -> set[tuple[str, str]]:
    out = set()
    for line in lab.run("router", "cat", "/proc/net/ip_mr_cache").stdout.splitlines()[1:]:
        g, o = line.split()[:2]
        out.add(tuple(socket.inet_ntoa(struct.pack("<I", int(x, 16))) for x in (g, o)))
    return out  # type: ignore[return-value]


class NotifySocket:
    """What systemd would receive: every datagram, with its arrival time."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="mcrelay-notify-")
        self.path = str(Path(self._dir.name) / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def wait_for(self, key: str, value: str | None = None, timeout: float = 20) -> dict[str, str]:
        """Read datagrams until one has key (=value); returns it."""
        deadline = time.monotonic() + timeout
        for _, msg in self.messages:
            if key in msg and (value is None or msg[key] == value):
                return msg
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                break
            msg = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), msg))
            if key in msg and (value is None or msg[key] == value):
                return msg
        raise AssertionError(f"no {key}={value} within {timeout}s; got {self.messages}")

    def drain(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.sock.settimeout(max(0.01, end - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return
            msg = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), msg))

    def values(self, key: str) -> list[str]:
        return [m[key] for _, m in self.messages if key in m]

    def close(self) -> None:
        self.sock.close()
        self._dir.cleanup()


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    n = NotifySocket()
    try:
        yield n
    finally:
        n.close()


def test_ready_is_sent_once_rules_are_applied_and_the_socket_answers(
    lab: StandardLab, notify: NotifySocket
) -> None:
    with DaemonProcess(lab, "router", env={"NOTIFY_SOCKET": notify.path}) as d:
        Path(d.state).write_text(
            json.dumps(
                {
                    "version": 1,
                    "routes": [
                        {"iif": "up0", "source": SRC4, "group": "239.1.1.1", "oifs": ["dn1"]}
                    ],
                }
            )
        )
        d.start(wait=False)
        notify.wait_for("READY", "1")
        # At the moment READY=1 arrives, both promises already hold.
        assert ("239.1.1.1", SRC4) in mfc_v4(lab)
        assert d.call("daemon.status")["routes"] == 1
        notify.wait_for("STATUS", "1 route(s), 0 relay(s), 0 group(s)")

        d.cli("route", "add", "up0", SRC4, "239.1.1.2", "dn2", check=True)
        notify.wait_for("STATUS", "2 route(s), 0 relay(s), 0 group(s)")

        assert d.stop(signal.SIGTERM) == 0
        notify.wait_for("STOPPING", "1", timeout=5)
        assert mfc_v4(lab) == set()


def test_watchdog_pings_at_half_the_watchdog_interval(
    lab: StandardLab, notify: NotifySocket
) -> None:
    env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "2000000"}
    with DaemonProcess(lab, "router", env=env) as d:
        d.start(wait=False)
        notify.wait_for("READY", "1")
        notify.drain(4.5)
        pings = [t for t, m in notify.messages if m.get("WATCHDOG") == "1"]
        assert 3 <= len(pings) <= 7, pings
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert max(gaps) < 2.0, f"a ping came late: {gaps}"


def test_no_watchdog_pings_unless_asked(lab: StandardLab, notify: NotifySocket) -> None:
    with DaemonProcess(lab, "router", env={"NOTIFY_SOCKET": notify.path}) as d:
        d.start(wait=False)
        notify.wait_for("READY", "1")
        notify.drain(2)
        assert notify.values("WATCHDOG") == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_shut_down_cleanly_with_exit_0_and_an_empty_mfc(
    lab: StandardLab, sig: signal.Signals
) -> None:
    with DaemonProcess(lab, "router", workers=2) as d:
        d.start()
        d.cli("route", "add", "up0", SRC4, "239.1.1.3", "dn1", check=True)
        d.cli("route", "add", "up0", "239.1.1.4", "dn1", "dn2", check=True)
        d.cli("route", "add", "up0", "2001:db8:1::2", "ff3e::3", "dn1", check=True)
        children = d.children()
        assert len(children) >= 3  # control process + 2 workers
        lab.probe_until_forwarded("src", "239.1.1.4", 5000, "veth0", "rcv1", "veth0", timeout=10)
        assert len(mfc_v4(lab)) == 2

        assert d.stop(sig) == 0

        assert mfc_v4(lab) == set()
        assert lab.run("router", "cat", "/proc/net/ip6_mr_cache").stdout.count("\n") <= 1
        assert lab.run("router", "cat", "/proc/net/ip_mr_vif").stdout.count("\n") <= 1
        assert all(not Path(f"/proc/{pid}").exists() for pid in children)
        assert not Path(d.socket).exists()
        # The rules stay in the state file for the next start.
        assert len(json.loads(Path(d.state).read_text())["routes"]) == 3
