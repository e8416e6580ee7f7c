"""The control server in-process: authorisation, limits and isolation between clients.

A real :class:`ControlServer` runs in a thread on a Unix socket in a temporary
directory; a fake supervisor answers every forwarded :class:`Call` on the other
end of the channel with what it was asked. Peers of other users are
simulated by giving :class:`Peer` objects other credentials (the namespace
tests do the same with real non-root processes).
"""

from __future__ import annotations

import grp
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mcrelay import protocol
from mcrelay.control import ControlServer, Peer, peer_credentials
from mcrelay.control_messages import Call, ControlSettings, Reply
from mcrelay.errors import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    LIMIT_EXCEEDED,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    PERMISSION_DENIED,
)
from mcrelay.ipc import Channel

SOCKET_GID = 4242
ADMIN_GID = 4343
SETTINGS = ControlSettings(
    socket_gid=SOCKET_GID,
    admin_gid=ADMIN_GID,
    max_line=4096,
    max_connections=4,
    idle_timeout=1.0,
    log_level="info",
)


class Harness:
    """A control server thread plus a fake supervisor thread."""

    def __init__(self, path: str, settings: ControlSettings) -> None:
        self.path = path
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(64)
        ours, theirs = Channel.pair()
        self.supervisor_side = ours
        self.calls: list[Call] = []
        self.server = ControlServer(listener, theirs, settings)
        self._threads = [
            threading.Thread(target=self.server.run, daemon=True),
            threading.Thread(target=self._supervise, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _supervise(self) -> None:
        while True:
            try:
                msg, _ = self.supervisor_side.recv_message()
            except (EOFError, OSError):
                return
            assert isinstance(msg, Call)
            self.calls.append(msg)
            self.supervisor_side.send(Reply(msg.seq, result={"method": msg.method}))

    def connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(self.path)
        return s

    def stop(self) -> None:
        self.server.running = False
        self._threads[0].join(5)
        self.server.channel.close()  # EOF wakes the fake supervisor
        self._threads[1].join(5)
        self.supervisor_side.close()
        self.server.listener.close()
        for p in list(self.server.peers.values()):
            p.sock.close()


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(str(tmp_path / "mcrelay.sock"), SETTINGS)
    try:
        yield h
    finally:
        h.stop()


def ask(sock: socket.socket, obj: Any) -> dict[str, Any]:
    line = obj if isinstance(obj, bytes) else json.dumps(obj).encode() + b"\n"
    sock.sendall(line)
    return read_reply(sock)


def read_reply(sock: socket.socket) -> dict[str, Any]:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {buf!r}")
        buf += chunk
    reply = json.loads(buf)
    assert isinstance(reply, dict) and reply["jsonrpc"] == "2.0"
    return reply


def closed_by_server(sock: socket.socket, timeout: float = 3.0) -> bool:
    sock.settimeout(timeout)
    try:
        while True:
            if sock.recv(65536) == b"":
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def req(method: str, rid: int = 1, **params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "method": method, "params": params}


# ---------------------------------------------------------------- who may do what


def peer(uid: int, gid: int, *groups: int) -> Peer:
    a, b = socket.socketpair()
    b.close()
    return Peer(a, uid, gid, frozenset(groups))


@pytest.mark.parametrize(
    ("uid", "gid", "groups", "read", "admin"),
    [
        (0, 0, (), True, True),  # root may do everything
        (1000, SOCKET_GID, (), True, False),  # primary group = socket group
        (1000, 1000, (SOCKET_GID,), True, False),  # supplementary socket group
        (1000, 1000, (ADMIN_GID,), True, True),  # admin group may read and change
        (1000, ADMIN_GID, (), True, True),
        (1000, 1000, (), False, False),  # anybody else: nothing
        (65534, 65534, (1, 2, 3), False, False),
    ],
)
def test_access_by_uid_and_groups(
    uid: int, gid: int, groups: tuple[int, ...], read: bool, admin: bool
) -> None:
    p = peer(uid, gid, *groups)
    try:
        assert p.may("read", SETTINGS) is read
        assert p.may("admin", SETTINGS) is admin
    finally:
        p.sock.close()


def test_without_an_admin_group_only_root_may_change_rules() -> None:
    settings = ControlSettings(SOCKET_GID, None, 4096, 4, 1.0, "info")
    for uid, gid, groups in [(1000, SOCKET_GID, ()), (1000, 1000, (SOCKET_GID, 0))]:
        p = peer(uid, gid, *groups)
        assert p.may("read", settings) and not p.may("admin", settings)
        p.sock.close()
    root = peer(0, 0)
    assert root.may("admin", settings)
    root.sock.close()


def test_a_refused_peer_gets_permission_denied_and_nothing_reaches_the_supervisor(
    tmp_path: Path,
) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "s"))
    supervisor, theirs = Channel.pair()
    server = ControlServer(listener, theirs, SETTINGS)  # not running: driven by hand
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        reader = Peer(a, 1000, SOCKET_GID, frozenset())
        server._handle_line(reader, json.dumps(req("route.del", 7, iif="up0")).encode())
        server._handle_line(reader, json.dumps(req("config.export", 8)).encode())
        stranger = Peer(a, 1001, 1001, frozenset())
        server._handle_line(stranger, json.dumps(req("daemon.status", 9)).encode())
        b.settimeout(5)
        buf = b""
        while buf.count(b"\n") < 2:
            buf += b.recv(65536)
        denied_write, denied_read = (json.loads(line) for line in buf.splitlines())
        supervisor.sock.settimeout(2)
        forwarded, _ = supervisor.recv_message()
        supervisor.sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            supervisor.recv_message()
    finally:
        for sock in (a, b, listener, supervisor.sock, theirs.sock):
            sock.close()
    assert denied_write["id"] == 7 and denied_write["error"]["code"] == PERMISSION_DENIED
    assert "permission denied" in denied_write["error"]["message"]
    assert "route.del" in denied_write["error"]["message"]
    assert denied_read["id"] == 9 and denied_read["error"]["code"] == PERMISSION_DENIED
    # Only config.export (read access, allowed to the socket group) was forwarded.
    assert isinstance(forwarded, Call) and forwarded.method == "config.export"
    assert forwarded.uid == 1000


def test_peer_credentials_are_those_of_the_connecting_process() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        pid, uid, gid, groups = peer_credentials(a)
    finally:
        a.close()
        b.close()
    assert (pid, uid, gid) == (os.getpid(), os.getuid(), os.getgid())
    assert set(os.getgroups()) <= groups | {gid}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a peer as another user")
def test_peer_credentials_include_the_supplementary_groups_of_another_user() -> None:
    # pytest's tmp_path is under a 0700 directory nobody cannot enter.
    workdir = tempfile.TemporaryDirectory(prefix="mcrelay-test-")
    os.chmod(workdir.name, 0o755)
    path = os.path.join(workdir.name, "s")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen()
    os.chmod(path, 0o666)
    staff = grp.getgrnam("staff").gr_gid
    client = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import socket,time; socket.socket(socket.AF_UNIX).connect({path!r}); time.sleep(2)",
        ],
        user="nobody",
        group="nogroup",
        extra_groups=[staff, "users"],
    )
    try:
        srv.settimeout(10)
        conn, _ = srv.accept()
        pid, uid, gid, groups = peer_credentials(conn)
        conn.close()
    finally:
        client.kill()
        client.wait()
        srv.close()
        workdir.cleanup()
    assert (pid, uid, gid) == (client.pid, 65534, grp.getgrnam("nogroup").gr_gid)
    assert groups == {staff, grp.getgrnam("users").gr_gid}
    admin = Peer(socket.socket(), uid, gid, groups)
    assert admin.may("admin", ControlSettings(gid, staff, 4096, 4, 1.0, "info"))
    admin.sock.close()


# ---------------------------------------------------------------- error replies


def test_bad_requests_get_json_rpc_errors_and_the_connection_stays_usable(
    harness: Harness,
) -> None:
    with harness.connect() as s:
        cases: list[tuple[bytes, int, Any]] = [
            (b"this is not json\n", PARSE_ERROR, None),
            (b"[1,2,3]\n", INVALID_REQUEST, None),
            (b'{"jsonrpc":"1.0","id":5,"method":"daemon.status"}\n', INVALID_REQUEST, 5),
            (b'{"jsonrpc":"2.0","id":"x","method":"no.such"}\n', METHOD_NOT_FOUND, "x"),
            (b'{"jsonrpc":"2.0","id":6,"method":"route.add","params":{}}\n', INVALID_PARAMS, 6),
            (b'{"jsonrpc":"2.0","id":7,"method":"daemon.status","params":[1]}\n', -32600, 7),
        ]
        for line, code, rid in cases:
            reply = ask(s, line)
            assert reply["error"]["code"] == code, (line, reply)
            assert reply["id"] == rid
            assert "result" not in reply
        assert ask(s, req("daemon.status", 99)) == {
            "jsonrpc": "2.0",
            "id": 99,
            "result": {"method": "daemon.status"},
        }


def test_notifications_get_no_reply(harness: Harness) -> None:
    with harness.connect() as s:
        s.sendall(b'{"jsonrpc":"2.0","method":"daemon.status"}\n')
        s.sendall(b'{"jsonrpc":"2.0","method":"no.such"}\n')
        reply = ask(s, req("route.list", 3))
        assert reply["id"] == 3 and reply["result"] == {"method": "route.list"}


def test_several_requests_in_one_write_are_all_answered_in_order(harness: Harness) -> None:
    with harness.connect() as s:
        s.sendall(b"".join(json.dumps(req("daemon.status", i)).encode() + b"\n" for i in range(50)))
        buf = b""
        while buf.count(b"\n") < 50:
            buf += s.recv(65536)
        ids = [json.loads(line)["id"] for line in buf.splitlines()]
        assert ids == list(range(50))


def test_thousands_of_pipelined_requests_are_all_answered(harness: Harness) -> None:
    """Calls and replies cross on the supervisor channel; neither side may wait for the other."""
    n = 5000
    with harness.connect() as s:
        s.settimeout(10)
        payload = b"".join(json.dumps(req("daemon.status", i)).encode() + b"\n" for i in range(n))
        sender = threading.Thread(target=s.sendall, args=(payload,))
        sender.start()
        buf = b""
        while buf.count(b"\n") < n:
            buf += s.recv(1 << 16)
        sender.join(10)
        assert [json.loads(line)["id"] for line in buf.splitlines()] == list(range(n))


# ---------------------------------------------------------------- limits


def test_an_overlong_line_is_refused_and_the_connection_closed(harness: Harness) -> None:
    with harness.connect() as s:
        s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"daemon.status","params":{"x":"')
        s.sendall(b"a" * (SETTINGS.max_line + 10))
        reply = read_reply(s)
        assert reply["error"]["code"] == INVALID_REQUEST
        assert f"longer than {SETTINGS.max_line} bytes" in reply["error"]["message"]
        assert closed_by_server(s)
    with harness.connect() as s:  # the server is fine
        assert "result" in ask(s, req("daemon.status"))


def test_an_overlong_line_with_its_newline_is_refused_too(harness: Harness) -> None:
    with harness.connect() as s:
        s.sendall(b"x" * (SETTINGS.max_line + 1) + b"\n")
        assert read_reply(s)["error"]["code"] == INVALID_REQUEST
        assert closed_by_server(s)


def test_connections_over_the_limit_are_told_why_and_closed(harness: Harness) -> None:
    held = [harness.connect() for _ in range(SETTINGS.max_connections)]
    try:
        for s in held:  # make sure each is accepted before the next one
            assert "result" in ask(s, req("daemon.status"))
        extra = harness.connect()
        reply = read_reply(extra)
        assert reply["error"]["code"] == LIMIT_EXCEEDED
        assert "too many connections" in reply["error"]["message"]
        assert closed_by_server(extra)
        extra.close()
        held.pop().close()
        time.sleep(0.2)
        with harness.connect() as again:
            assert "result" in ask(again, req("daemon.status"))
    finally:
        for s in held:
            s.close()


def test_an_idle_connection_is_closed_after_the_idle_timeout(harness: Harness) -> None:
    with harness.connect() as s:
        assert "result" in ask(s, req("daemon.status"))
        start = time.monotonic()
        assert closed_by_server(s, timeout=SETTINGS.idle_timeout + 3)
        assert time.monotonic() - start >= SETTINGS.idle_timeout * 0.9


def test_a_client_stalled_mid_line_never_delays_another(harness: Harness) -> None:
    stalled = harness.connect()
    try:
        stalled.sendall(b'{"jsonrpc":"2.0","id":1,"method":"daem')  # ...and nothing more
        with harness.connect() as other:
            for i in range(20):
                start = time.monotonic()
                assert ask(other, req("daemon.status", i))["id"] == i
                assert time.monotonic() - start < 0.5
    finally:
        stalled.close()


def test_a_client_that_never_reads_its_replies_does_not_block_others(harness: Harness) -> None:
    hog = harness.connect()
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        # Thousands of requests whose replies the hog never reads.
        line = json.dumps(req("daemon.status")).encode() + b"\n"
        hog.settimeout(0.5)
        try:
            for _ in range(2000):
                hog.sendall(line * 10)
        except TimeoutError:
            pass
        with harness.connect() as other:
            start = time.monotonic()
            assert "result" in ask(other, req("daemon.status", 5))
            assert time.monotonic() - start < 1.0
    finally:
        hog.close()


def test_new_settings_from_the_supervisor_take_effect(harness: Harness) -> None:
    tighter = ControlSettings(SOCKET_GID, ADMIN_GID, 1024, 4, 1.0, "info")
    harness.supervisor_side.send(tighter)
    time.sleep(0.3)
    with harness.connect() as s:
        s.sendall(b"y" * 2000)
        assert "longer than 1024 bytes" in read_reply(s)["error"]["message"]


def test_error_objects_survive_the_encoding_the_server_uses() -> None:
    # A method name with a lone surrogate is echoed in the error; it must still encode.
    from mcrelay.errors import McrelayError

    try:
        protocol.parse_command("\ud800", {})
    except McrelayError as exc:
        line = protocol.encode_line(protocol.error_response(1, exc.to_error()))
    assert json.loads(line)["error"]["code"] == METHOD_NOT_FOUND
