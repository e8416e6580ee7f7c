"""Fuzzing a real mcrelayd over its control socket.

Thousands of malformed requests (random bytes, wrong types, huge numbers,
unicode, path-like names, deep nesting, oversize lines, structure-aware
mutations of valid requests) are sent to a daemon that holds a few rules.
Every request that expects an answer must get a JSON-RPC error object; after
the run the daemon still answers ``daemon.status``, its control process never
crashed, and the rule set and the kernel MFC are exactly as before.

Requests are pipelined in batches over one connection so the run takes seconds.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "netns"))

from conftest import require_netns  # type: ignore[import-not-found]
from test_fuzz_protocol import JSON_VALUES, TEXT, VALID, mutated_params

from mcrelay.errors import McrelayError
from mcrelay.lab import Lab
from mcrelay.lab.daemon import DaemonProcess
from mcrelay.protocol import METHODS, parse_command, parse_request

MAX_LINE = 8192
BATCH = 10
RULES = {
    "routes": [
        {"iif": "up0", "source": "192.0.2.2", "group": "239.1.1.1", "oifs": ["dn1"]},
        {"iif": "up0", "group": "ff3e::1", "oifs": ["dn2"]},
    ],
    "groups": [{"iface": "dn1", "group": "239.5.5.5"}],
}


class Conn:
    """One pipelining connection to the daemon; reconnects when the daemon closes it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self.buf = b""
        self.replies = 0

    def _open(self) -> socket.socket:
        if self.sock is None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(10)
            self.sock.connect(self.path)
            self.buf = b""
        return self.sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def exchange(self, lines: list[bytes]) -> list[dict[str, Any]]:
        """Send the lines at once; return one reply per line (each expects one)."""
        sock = self._open()
        sock.sendall(b"".join(line + b"\n" for line in lines))
        replies = []
        while len(replies) < len(lines):
            while b"\n" not in self.buf:
                chunk = sock.recv(1 << 16)
                assert chunk, f"daemon closed the connection after {len(replies)} replies"
                self.buf += chunk
            line, self.buf = self.buf.split(b"\n", 1)
            replies.append(json.loads(line))
        self.replies += len(replies)
        return replies


def is_refused_locally(line: bytes) -> bool:
    """True if the control process must refuse this line (so the rules cannot change)."""
    try:
        req = parse_request(line)
        if req.is_notification:
            return False
        parse_command(req.method, req.params)
    except McrelayError:
        return True
    except Exception:  # a parser bug: the daemon must still answer with an error
        return True
    return False


def assert_error(reply: dict[str, Any], line: bytes) -> None:
    assert reply.get("jsonrpc") == "2.0", (line[:200], reply)
    assert "result" not in reply, (line[:200], reply)
    err = reply["error"]
    assert isinstance(err["code"], int) and err["code"] < 0
    assert isinstance(err["message"], str) and err["message"]


@pytest.fixture(scope="module")
def fuzz_daemon() -> Iterator[tuple[Lab, DaemonProcess]]:
    require_netns()
    lab = Lab.standard()
    d = DaemonProcess(lab, "router", config=f"max_line = {MAX_LINE}\nmax_connections = 8\n")
    try:
        d.start()
        d.call("config.apply", rules=RULES)
        yield lab, d
    finally:
        d.close()
        lab.cleanup()


def envelope(rid: int, method: Any, params: Any) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params}).encode()


@st.composite
def bad_lines(draw: st.DrawFn) -> bytes:
    """One malformed request line that expects an answer (no notifications)."""
    kind = draw(st.integers(0, 5))
    rid = draw(st.integers(1, 2**31))
    if kind == 0:  # random bytes without a newline
        raw = draw(st.binary(min_size=1, max_size=200)).replace(b"\n", b" ")
        return raw if raw.strip() else b"?"
    if kind == 1:  # random parameters for a real method
        return envelope(
            rid, draw(st.sampled_from(sorted(METHODS))), draw(st.dictionaries(TEXT, JSON_VALUES))
        )
    if kind == 2:  # a valid request with one field broken
        method, params = draw(mutated_params())
        return envelope(rid, method, params)
    if kind == 3:  # broken envelopes
        return json.dumps(
            {
                "jsonrpc": draw(st.sampled_from(["2.0", "1.0", 2, None])),
                "id": rid,
                "method": draw(st.one_of(TEXT, JSON_VALUES)),
                "params": draw(JSON_VALUES),
            }
        ).encode()
    if kind == 4:  # deep nesting (built as text: json.loads would recurse here too)
        depth = draw(st.integers(33, 3000))
        return (
            b'{"jsonrpc":"2.0","id":%d,"method":"route.add","params":{"iif":' % rid
            + b"[" * depth
            + b"]" * depth
            + b"}}"
        )
    # huge numbers, unicode and path-like names in one field of a valid request
    method, field = draw(
        st.sampled_from(
            [
                ("route.add", "iif"),
                ("route.add", "group"),
                ("route.del", "source"),
                ("relay.del", "name"),
                ("group.join", "iface"),
                ("trace.read", "cursor"),
            ]
        )
    )
    value = draw(
        st.sampled_from(
            [10**300, -(2**63), 1e308, "../../../etc/shadow", "\u202e", "\ud800", "²", "9" * 4000]
        )
    )
    return envelope(rid, method, {**VALID[method], field: value})


def test_thousands_of_malformed_requests_get_errors_and_change_nothing(
    fuzz_daemon: tuple[Lab, DaemonProcess],
) -> None:
    lab, d = fuzz_daemon
    rules_before = d.call("config.export")
    mfc_before = lab.run("router", "cat", "/proc/net/ip_mr_cache").stdout.splitlines()[1:]
    mfc_before = [line.split()[:3] for line in mfc_before]
    conn = Conn(d.socket)
    sent = 0

    @settings(
        max_examples=300,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(st.lists(bad_lines(), min_size=BATCH, max_size=BATCH))
    def run(lines: list[bytes]) -> None:
        nonlocal sent
        lines = [line for line in lines if len(line) <= MAX_LINE and is_refused_locally(line)] or [
            b"{"
        ]
        for line, reply in zip(lines, conn.exchange(lines), strict=True):
            assert_error(reply, line)
        sent += len(lines)

    try:
        run()
        # Oversize lines: an error, then the connection is closed; the next one works.
        for size in (MAX_LINE + 1, 10 * MAX_LINE, 1 << 20):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(d.socket)
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    s.sendall(b"[" * size + b"\n")
                reply = json.loads(s.recv(1 << 16).split(b"\n")[0])
                assert_error(reply, b"oversize")
                assert "longer than" in reply["error"]["message"]
            sent += 1
    finally:
        conn.close()

    assert sent >= 2000, f"only {sent} requests were sent"
    status = d.call("daemon.status")
    assert status["routes"] == 2 and status["groups"] == 1
    assert status["control_restarts"] == 0, "the control process must never crash"
    assert d.call("config.export") == rules_before
    mfc_after = lab.run("router", "cat", "/proc/net/ip_mr_cache").stdout.splitlines()[1:]
    assert [line.split()[:3] for line in mfc_after] == mfc_before
    assert d.proc is not None and d.proc.poll() is None
    assert "Traceback" not in d.log()
