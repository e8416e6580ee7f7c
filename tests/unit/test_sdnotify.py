"""sd_notify: real datagrams on a real AF_UNIX socket."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from mcrelay.sdnotify import Notifier


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    yield sock, path
    sock.close()


def receive(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_noop_without_notify_socket() -> None:
    n = Notifier({})
    assert not n.enabled
    assert n.ready() is False
    assert n.status("x") is False
    assert n.stopping() is False
    assert n.watchdog() is False
    assert n.watchdog_interval() is None


def test_messages_arrive(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("3 routes, 2 relays") is True
    assert receive(sock) == ["READY=1", "STATUS=3 routes, 2 relays"]
    assert n.status("two\nlines") is True
    assert receive(sock) == ["STATUS=two lines"]
    assert n.reloading() is True
    lines = receive(sock)
    assert lines[0] == "RELOADING=1"
    assert lines[1].startswith("MONOTONIC_USEC=") and int(lines[1].split("=")[1]) > 0
    assert n.stopping() is True
    assert receive(sock) == ["STOPPING=1"]


def test_abstract_socket_name() -> None:
    name = f"mcrelay-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(2)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready() is True
        assert sock.recv(100) == b"READY=1"


def test_watchdog(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000"})
    assert n.watchdog_interval() == 15.0
    assert n.watchdog() is True
    assert receive(sock) == ["WATCHDOG=1"]


def test_watchdog_for_another_pid_is_ignored(listener: tuple[socket.socket, str]) -> None:
    _, path = listener
    other = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval() is None
    assert other.watchdog() is False
    mine = Notifier(
        {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}
    )
    assert mine.watchdog_interval() == 0.5


def test_watchdog_without_socket_or_with_garbage(tmp_path: Path) -> None:
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval() is None
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "x"), "WATCHDOG_USEC": "soon"})
    assert n.watchdog_interval() is None


def test_unreachable_socket_does_not_raise(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert n.enabled
    assert n.ready() is False


def test_reads_os_environ(
    monkeypatch: pytest.MonkeyPatch, listener: tuple[socket.socket, str]
) -> None:
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert Notifier().ready() is True
    assert receive(sock) == ["READY=1"]
