"""The control socket of a real daemon: ownership, who may do what, limits, isolation.

Non-root peers are real processes run as ``nobody`` (uid 65534) with existing
system groups: ``nogroup`` is the socket group and ``staff`` the admin group of
these daemons. Nothing is added to the machine.
"""

from __future__ import annotations

import grp
import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mcrelay.lab import StandardLab
from mcrelay.lab.daemon import DaemonProcess
from mcrelay.lab.netns import python_env

SRC4 = "192.0.2.2"
SOCKET_GROUP, ADMIN_GROUP, OTHER_GROUP = "nogroup", "staff", "users"
MAX_LINE, MAX_CONNECTIONS, IDLE = 4096, 4, 2

CONFIG = f"""
socket_group = "{SOCKET_GROUP}"
admin_group = "{ADMIN_GROUP}"
max_line = {MAX_LINE}
max_connections = {MAX_CONNECTIONS}
idle_timeout = {IDLE}
"""

# One JSON-RPC exchange over a raw socket, run as another user: prints the reply line.
RAW_CALL = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print(json.dumps({"connect_error": e.strerror}))
    sys.exit(0)
s.sendall(sys.argv[2].encode() + b"\\n")
buf = b""
while not buf.endswith(b"\\n"):
    chunk = s.recv(65536)
    if not chunk:
        break
    buf += chunk
print(buf.decode().strip())
"""


@pytest.fixture
def daemon(lab: StandardLab) -> Iterator[DaemonProcess]:
    d = DaemonProcess(lab, "router", config=CONFIG)
    try:
        d.start()
        yield d
    finally:
        d.close()


def raw_call_as(
    d: DaemonProcess, method: str, params: dict[str, Any] | None = None, **who: Any
) -> dict[str, Any]:
    line = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}})
    res = subprocess.run(
        [sys.executable, "-c", RAW_CALL, d.socket, line],
        capture_output=True,
        text=True,
        env=python_env(),
        timeout=30,
        **who,
    )
    assert res.returncode == 0, res.stderr
    reply: dict[str, Any] = json.loads(res.stdout)
    return reply


NOBODY_READER = {"user": "nobody", "group": SOCKET_GROUP, "extra_groups": []}
NOBODY_ADMIN = {"user": "nobody", "group": SOCKET_GROUP, "extra_groups": [ADMIN_GROUP]}
NOBODY_STRANGER = {"user": "nobody", "group": OTHER_GROUP, "extra_groups": []}


def test_the_socket_is_0660_root_and_the_configured_group(daemon: DaemonProcess) -> None:
    st = os.stat(daemon.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_uid == 0
    assert st.st_gid == grp.getgrnam(SOCKET_GROUP).gr_gid


def test_the_files_the_client_needs_are_readable_by_nobody() -> None:
    # Otherwise the non-root tests below would fail for the wrong reason.
    res = subprocess.run(
        [sys.executable, "-c", "import mcrelay.cli, mcrelay.client"],
        capture_output=True,
        text=True,
        env=python_env(),
        user="nobody",
        group="nogroup",
        extra_groups=[],
    )
    assert res.returncode == 0, res.stderr


def test_socket_group_members_may_read_but_not_change_rules(daemon: DaemonProcess) -> None:
    daemon.cli("route", "add", "up0", SRC4, "239.1.1.1", "dn1", check=True)  # root may

    status = daemon.cli("--output", "json", "status", **NOBODY_READER)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["routes"] == 1
    routes = daemon.cli("--output", "json", "show", "routes", **NOBODY_READER)
    assert routes.returncode == 0 and "239.1.1.1" in routes.stdout

    for argv in (
        ("route", "add", "up0", SRC4, "239.1.1.2", "dn1"),
        ("route", "del", "up0", SRC4, "239.1.1.1"),
        ("group", "join", "dn1", "239.5.5.5"),
        ("--dry-run", "route", "del", "up0", SRC4, "239.1.1.1"),
    ):
        res = daemon.cli(*argv, **NOBODY_READER)
        assert res.returncode == 1, (argv, res.stdout)
        assert "permission denied" in res.stderr, (argv, res.stderr)

    reply = raw_call_as(daemon, "route.del", {"iif": "up0", "group": "239.1.1.1"}, **NOBODY_READER)
    assert reply["error"]["code"] == -32006
    assert "permission denied" in reply["error"]["message"]
    assert "result" not in reply
    assert [r["group"] for r in daemon.cli_json("show", "routes")["routes"]] == ["239.1.1.1"]


def test_admin_group_members_may_change_rules(daemon: DaemonProcess) -> None:
    res = daemon.cli("route", "add", "up0", SRC4, "239.1.1.3", "dn2", **NOBODY_ADMIN)
    assert res.returncode == 0, res.stderr
    res = daemon.cli("group", "join", "dn2", "239.5.5.6", **NOBODY_ADMIN)
    assert res.returncode == 0, res.stderr
    assert daemon.cli_json("status")["routes"] == 1
    assert "uid 65534: route.add" in daemon.log(), "mutations are logged with the peer's uid"


def test_others_cannot_even_connect(daemon: DaemonProcess) -> None:
    reply = raw_call_as(daemon, "daemon.status", **NOBODY_STRANGER)
    assert reply == {"connect_error": "Permission denied"}
    res = daemon.cli("status", **NOBODY_STRANGER)
    assert res.returncode == 2 and "ermission denied" in res.stderr


def test_the_daemon_checks_credentials_itself_even_if_the_socket_mode_is_loosened(
    daemon: DaemonProcess,
) -> None:
    os.chmod(daemon.socket, 0o666)  # an admin's mistake: the file no longer protects
    reply = raw_call_as(daemon, "daemon.status", **NOBODY_STRANGER)
    assert reply["error"]["code"] == -32006
    assert "permission denied" in reply["error"]["message"]
    reply = raw_call_as(
        daemon,
        "route.add",
        {"iif": "up0", "group": "239.1.1.4", "oifs": ["dn1"]},
        **NOBODY_STRANGER,
    )
    assert reply["error"]["code"] == -32006
    assert daemon.cli_json("status")["routes"] == 0


def test_root_may_do_everything(daemon: DaemonProcess) -> None:
    daemon.cli("route", "add", "up0", SRC4, "239.1.1.5", "dn1", check=True)
    daemon.cli("group", "join", "dn1", "239.5.5.7", check=True)
    daemon.cli("route", "del", "up0", SRC4, "239.1.1.5", check=True)
    assert daemon.cli_json("export")["groups"] == [
        {"iface": "dn1", "group": "239.5.5.7", "source": "*"}
    ]


# ---------------------------------------------------------------- limits


def connect(d: DaemonProcess) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(d.socket)
    return s


def ask(s: socket.socket, method: str, rid: int = 1) -> dict[str, Any]:
    s.sendall(json.dumps({"jsonrpc": "2.0", "id": rid, "method": method}).encode() + b"\n")
    return read_line(s)


def read_line(s: socket.socket) -> dict[str, Any]:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed by the daemon after {buf!r}")
        buf += chunk
    reply: dict[str, Any] = json.loads(buf)
    return reply


def closed_by_daemon(s: socket.socket, within: float) -> bool:
    s.settimeout(within)
    try:
        while s.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def test_a_line_over_the_limit_gets_an_error_and_the_connection_is_closed(
    daemon: DaemonProcess,
) -> None:
    with connect(daemon) as s:
        s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"daemon.status","params":{"pad":"')
        s.sendall(b"x" * (MAX_LINE + 100))
        reply = read_line(s)
        assert reply["error"]["code"] == -32600
        assert f"longer than {MAX_LINE} bytes" in reply["error"]["message"]
        assert closed_by_daemon(s, 3)
    with connect(daemon) as s:  # a line just under the limit is fine
        line = json.dumps({"jsonrpc": "2.0", "id": 2, "method": "daemon.status"})
        s.sendall(line.encode() + b" " * (MAX_LINE - len(line) - 1) + b"\n")
        assert read_line(s)["result"]["pid"] > 0


def test_connections_over_the_limit_are_refused_with_a_reason(daemon: DaemonProcess) -> None:
    held = [connect(daemon) for _ in range(MAX_CONNECTIONS)]
    try:
        for i, s in enumerate(held):
            assert "result" in ask(s, "daemon.status", i)
        with connect(daemon) as extra:
            reply = read_line(extra)
            assert reply["error"]["code"] == -32008
            assert f"too many connections (limit {MAX_CONNECTIONS})" in reply["error"]["message"]
        held.pop().close()
        time.sleep(0.3)
        with connect(daemon) as s:
            assert "result" in ask(s, "daemon.status")
    finally:
        for s in held:
            s.close()


def test_idle_connections_are_closed_after_the_idle_timeout(daemon: DaemonProcess) -> None:
    with connect(daemon) as s:
        assert "result" in ask(s, "daemon.status")
        start = time.monotonic()
        assert closed_by_daemon(s, IDLE + 3)
        assert time.monotonic() - start >= IDLE * 0.9


def test_a_client_that_sends_half_a_line_and_stalls_never_delays_another(
    daemon: DaemonProcess,
) -> None:
    stalled = [connect(daemon) for _ in range(MAX_CONNECTIONS - 1)]
    try:
        for s in stalled:
            s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"route.ad')  # and nothing more
        slowest = 0.0
        with connect(daemon) as other:
            for i in range(50):
                start = time.monotonic()
                assert ask(other, "daemon.status", i)["id"] == i
                slowest = max(slowest, time.monotonic() - start)
        assert slowest < 0.5, f"a reply took {slowest:.2f}s"
        # The real CLI, as another user, is not delayed either.
        start = time.monotonic()
        res = daemon.cli("status", **NOBODY_READER)
        assert res.returncode == 0, res.stderr
        assert time.monotonic() - start < 5
    finally:
        for s in stalled:
            s.close()


def test_a_client_flooding_requests_without_reading_does_not_starve_others(
    daemon: DaemonProcess,
) -> None:
    hog = connect(daemon)
    try:
        hog.settimeout(0.2)
        line = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "route.list"}).encode() + b"\n"
        sent = 0
        try:
            while sent < 200_000:
                hog.sendall(line * 100)
                sent += 100
        except TimeoutError:
            pass  # the daemon stopped reading it: back-pressure, not a queue
        with connect(daemon) as other:
            start = time.monotonic()
            assert "result" in ask(other, "daemon.status")
            assert time.monotonic() - start < 1.0
    finally:
        hog.close()
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert daemon.cli_json("status")["control_restarts"] == 0


def test_control_socket_path_is_removed_on_clean_stop(daemon: DaemonProcess) -> None:
    assert Path(daemon.socket).exists()
    assert daemon.stop() == 0
    assert not Path(daemon.socket).exists()
