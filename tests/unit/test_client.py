"""The Python client against a fake mcrelayd: a thread answering canned JSON-RPC on a Unix socket.

``FakeDaemon`` is also used by test_cli.py.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_daemon import FakeDaemon, RpcError, echo_route

from mcrelay.client import Client, DaemonUnreachable, ProtocolError, RemoteError
from mcrelay.errors import INVALID_PARAMS, NO_SUCH_RULE, McrelayError


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[FakeDaemon]:
    fake = FakeDaemon(tmp_path / "mcrelay.sock")
    yield fake
    fake.close()


def test_a_call_is_one_json_rpc_object_per_line_and_returns_result(daemon: FakeDaemon) -> None:
    daemon.replies["daemon.status"] = {"version": "0.1.0", "pid": 42}
    with Client(daemon.path) as mc:
        assert mc.call("daemon.status") == {"version": "0.1.0", "pid": 42}
    assert daemon.requests == [{"jsonrpc": "2.0", "id": 1, "method": "daemon.status"}]


def test_calls_reuse_one_connection_with_increasing_ids(daemon: FakeDaemon) -> None:
    daemon.replies["route.list"] = {"routes": []}
    with Client(daemon.path) as mc:
        mc.routes()
        mc.routes()
        mc.routes()
    assert [r["id"] for r in daemon.requests] == [1, 2, 3]
    assert daemon.connections == 1


def test_socket_path_comes_from_the_environment(
    daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MCRELAY_SOCKET", daemon.path)
    daemon.replies["worker.list"] = {"workers": [{"index": 0, "pid": 7}]}
    assert Client().workers() == [{"index": 0, "pid": 7}]
    monkeypatch.delenv("MCRELAY_SOCKET")
    assert Client().socket_path == "/run/mcrelay/mcrelay.sock"


def test_a_reply_with_another_id_is_skipped(daemon: FakeDaemon) -> None:
    def stale_then_real(request: dict[str, Any]) -> bytes:
        stale = {"jsonrpc": "2.0", "id": 999, "result": "stale"}
        real = {"jsonrpc": "2.0", "id": request["id"], "result": {"routes": []}}
        return (json.dumps(stale) + "\n" + json.dumps(real) + "\n").encode()

    daemon.raw = stale_then_real
    assert Client(daemon.path).routes() == []


# ---------------------------------------------------------------- convenience methods


def test_route_add_star_g_omits_source(daemon: FakeDaemon) -> None:
    daemon.replies["route.add"] = echo_route
    Client(daemon.path).route_add("eth0", "239.1.1.1", ["eth1", {"name": "eth2", "ttl": 8}])
    assert daemon.last("route.add")["params"] == {
        "iif": "eth0",
        "group": "239.1.1.1",
        "oifs": ["eth1", {"name": "eth2", "ttl": 8}],
        "dry_run": False,
    }


def test_route_add_s_g_and_dry_run(daemon: FakeDaemon) -> None:
    daemon.replies["route.add"] = echo_route
    result = Client(daemon.path).route_add(
        "eth0", "239.1.1.1", ["eth1"], source="10.0.0.1", dry_run=True
    )
    assert daemon.last("route.add")["params"]["source"] == "10.0.0.1"
    assert daemon.last("route.add")["params"]["dry_run"] is True
    assert result["dry_run"] is True


def test_relay_add_sends_input_outputs_mode(daemon: FakeDaemon) -> None:
    daemon.replies["relay.add"] = {"relay": {}, "dry_run": False}
    Client(daemon.path).relay_add(
        "tv1",
        {"iif": "eth0", "group": "239.1.1.1", "port": 5000},
        [{"address": "192.0.2.10", "port": 7000}],
        mode="socket",
    )
    assert daemon.last("relay.add")["params"] == {
        "name": "tv1",
        "input": {"iif": "eth0", "group": "239.1.1.1", "port": 5000},
        "outputs": [{"address": "192.0.2.10", "port": 7000}],
        "mode": "socket",
        "dry_run": False,
    }


def test_group_join_with_and_without_source(daemon: FakeDaemon) -> None:
    daemon.replies["group.join"] = {"group": {}, "dry_run": False}
    daemon.replies["group.leave"] = {"group": {}, "dry_run": False}
    mc = Client(daemon.path)
    mc.group_join("eth0", "232.1.1.1", "10.0.0.1")
    mc.group_leave("eth0", "239.1.1.1")
    assert daemon.last("group.join")["params"] == {
        "iface": "eth0",
        "group": "232.1.1.1",
        "source": "10.0.0.1",
        "dry_run": False,
    }
    assert daemon.last("group.leave")["params"] == {
        "iface": "eth0",
        "group": "239.1.1.1",
        "dry_run": False,
    }


def test_trace_and_apply_parameters(daemon: FakeDaemon) -> None:
    daemon.replies["trace.read"] = {"records": [], "cursor": 9}
    daemon.replies["config.apply"] = {"diff": {}, "dry_run": True}
    mc = Client(daemon.path)
    assert mc.trace_read("tv1", cursor=5) == {"records": [], "cursor": 9}
    mc.apply({"routes": [], "relays": [], "groups": []}, dry_run=True)
    assert daemon.last("trace.read")["params"] == {"name": "tv1", "cursor": 5}
    assert daemon.last("config.apply")["params"] == {
        "rules": {"routes": [], "relays": [], "groups": []},
        "dry_run": True,
    }


# ---------------------------------------------------------------- errors


def test_server_error_raises_remote_error_with_its_code_and_data(daemon: FakeDaemon) -> None:
    daemon.replies["relay.del"] = RpcError(NO_SUCH_RULE, "no such rule: relay tv9", {"rule": "tv9"})
    with pytest.raises(RemoteError) as caught:
        Client(daemon.path).relay_del("tv9")
    err = caught.value
    assert isinstance(err, McrelayError)
    assert (err.code, err.message, err.data) == (
        NO_SUCH_RULE,
        "no such rule: relay tv9",
        {"rule": "tv9"},
    )


def test_parse_error_reply_with_null_id_is_ours(daemon: FakeDaemon) -> None:
    daemon.raw = lambda req: (
        b'{"jsonrpc":"2.0","id":null,"error":{"code":-32602,"message":"group: bad"}}\n'
    )
    with pytest.raises(RemoteError) as caught:
        Client(daemon.path).routes()
    assert caught.value.code == INVALID_PARAMS


def test_missing_socket_names_the_path_and_how_to_start(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.sock")
    with pytest.raises(DaemonUnreachable) as caught:
        Client(path).status()
    msg = str(caught.value)
    assert path in msg
    assert "no such socket" in msg
    assert "systemctl start mcrelay" in msg and "mcrelayd" in msg
    assert caught.value.path == path


def test_stale_socket_is_connection_refused(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # the file stays, nobody listens: a daemon that died
    with pytest.raises(DaemonUnreachable, match="connection refused"):
        Client(str(path)).status()


def test_no_reply_within_timeout_is_unreachable(daemon: FakeDaemon) -> None:
    daemon.raw = lambda req: b""  # read the request, never answer
    with pytest.raises(DaemonUnreachable, match=r"no reply within 0.3 s"):
        Client(daemon.path, timeout=0.3).status()


def test_hang_up_before_reply_is_unreachable(daemon: FakeDaemon) -> None:
    daemon.raw = lambda req: None
    with pytest.raises(DaemonUnreachable, match="closed by the daemon"):
        Client(daemon.path).status()


def test_idle_connection_closed_by_daemon_is_reopened(daemon: FakeDaemon) -> None:
    daemon.replies["route.list"] = {"routes": []}
    daemon.close_after_reply = True
    mc = Client(daemon.path)
    mc.routes()
    time.sleep(0.2)  # the daemon has hung up the idle connection by now
    assert mc.routes() == []
    assert daemon.connections == 2
    assert daemon.methods() == ["route.list", "route.list"]


def test_garbage_reply_is_a_protocol_error(daemon: FakeDaemon) -> None:
    daemon.raw = lambda req: b"hello\n"
    with pytest.raises(ProtocolError, match="not JSON"):
        Client(daemon.path).status()


# ---------------------------------------------------------------- a busy daemon is not a dead one


def test_waiting_while_connected_outlasts_the_timeout_and_reports_each_step(
    daemon: FakeDaemon,
) -> None:
    daemon.replies["config.apply"] = {"diff": {}, "dry_run": False}
    daemon.delays["config.apply"] = 0.5
    waited: list[float] = []
    mc = Client(daemon.path, timeout=0.1, wait_while_connected=True, on_wait=waited.append)
    assert mc.apply({"routes": []}) == {"diff": {}, "dry_run": False}
    assert len(waited) >= 3
    assert waited == sorted(waited) and waited[0] >= 0.1


def test_without_waiting_a_slow_reply_is_still_no_reply_within_timeout(
    daemon: FakeDaemon,
) -> None:
    daemon.replies["daemon.status"] = {}
    daemon.delays["daemon.status"] = 0.5
    with pytest.raises(DaemonUnreachable, match=r"no reply within 0.1 s"):
        Client(daemon.path, timeout=0.1).status()


def test_a_connection_dropped_while_waiting_is_unreachable(daemon: FakeDaemon) -> None:
    def hang_up_later(request: dict[str, Any]) -> None:
        time.sleep(0.3)
        return None

    daemon.raw = hang_up_later
    mc = Client(daemon.path, timeout=0.1, wait_while_connected=True)
    with pytest.raises(DaemonUnreachable, match="closed by the daemon"):
        mc.status()
