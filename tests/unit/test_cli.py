"""The ``mcrelay`` command against a fake daemon: argv -> the JSON-RPC request, exit codes, output.

These tests pin the command-line contract of DESIGN.md: what each command
sends, what it prints, and that exit codes mean 0 ok / 1 refused / 2 no daemon.
"""

from __future__ import annotations

import copy
import io
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
from fake_daemon import FakeDaemon, RpcError, echo_route

from mcrelay import cli, cli_format, protocol
from mcrelay.errors import INVALID_PARAMS, NO_SUCH_RULE


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str


class Mcrelay(Protocol):
    def __call__(self, *argv: str) -> Run: ...


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[FakeDaemon]:
    fake = FakeDaemon(tmp_path / "mcrelay.sock")
    yield fake
    fake.close()


@pytest.fixture
def mcrelay(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Mcrelay:
    """Run `mcrelay ARGV...` with MCRELAY_SOCKET pointing at the fake daemon."""
    monkeypatch.setenv("MCRELAY_SOCKET", daemon.path)

    def run(*argv: str) -> Run:
        code = cli.main(list(argv))
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)

    return run


ROUTES = [
    {
        "iif": "eth0",
        "source": "*",
        "group": "239.1.1.1",
        "oifs": [{"name": "eth1", "ttl": 1}, {"name": "eth2", "ttl": 8}],
        "family": 4,
        "state": "active",
        "packets": 1234,
        "bytes": 1_664_000,
        "wrong_if": 0,
        "learned": [{"source": "10.0.0.5", "packets": 1234, "bytes": 1_664_000}],
    },
    {
        "iif": "eth0",
        "source": "10.0.0.1",
        "group": "239.1.1.10",
        "oifs": [{"name": "eth1", "ttl": 1}],
        "family": 4,
        "state": "waiting",
        "packets": 5,
        "bytes": 6580,
        "wrong_if": 2,
        "learned": [],
    },
]

RELAYS = [
    {
        "name": "tv1",
        "input": {"iif": "eth0", "group": "239.1.1.1", "port": 5000},
        "outputs": [
            {
                "address": "239.2.2.2",
                "port": 6000,
                "oif": "eth1",
                "ttl": 16,
                "dscp": 46,
                "packets": 1200,
                "bytes": 1_579_200,
                "errors": 0,
            },
            {
                "address": "192.0.2.10",
                "port": 7000,
                "oif": None,
                "ttl": 64,
                "dscp": 0,
                "packets": 1200,
                "bytes": 1_579_200,
                "errors": 3,
            },
        ],
        "mode": "packet",
        "state": "active",
        "packets": 1200,
        "bytes": 1_579_200,
        "drops": {"no_buffer": 0, "send_error": 3, "fragment": 0, "filtered": 0, "queue": 0},
    }
]


# ---------------------------------------------------------------- route add / del


def test_route_add_without_source_is_star_g(daemon: FakeDaemon, mcrelay: Mcrelay) -> None:
    daemon.replies["route.add"] = echo_route
    run = mcrelay("route", "add", "eth0", "239.1.1.1", "eth1", "eth2")
    assert run.code == 0
    assert daemon.last("route.add")["params"] == {
        "iif": "eth0",
        "group": "239.1.1.1",
        "oifs": ["eth1", "eth2"],
        "dry_run": False,
    }
    assert run.out == "added route (*, 239.1.1.1) on eth0 -> eth1,eth2\n"


def test_route_add_with_unicast_second_word_is_s_g(daemon: FakeDaemon, mcrelay: Mcrelay) -> None:
    daemon.replies["route.add"] = echo_route
    assert mcrelay("route", "add", "eth0", "10.0.0.1", "239.1.1.1", "eth1").code == 0
    assert daemon.last("route.add")["params"] == {
        "iif": "eth0",
        "source": "10.0.0.1",
        "group": "239.1.1.1",
        "oifs": ["eth1"],
        "dry_run": False,
    }


def test_route_add_ipv6_s_g(daemon: FakeDaemon, mcrelay: Mcrelay) -> None:
    daemon.replies["route.add"] = echo_route
    assert mcrelay("route", "add", "eth0", "2001:db8::1", "ff3e::10", "eth1", "eth2").code == 0
    params = daemon.last("route.add")["params"]
    assert (params["source"], params["group"], params["oifs"]) == (
        "2001:db8::1",
        "ff3e::10",
        ["eth1", "eth2"],
    )


def test_route_add_ttl_threshold_turns_a_name_into_name_and_ttl(
    daemon: FakeDaemon, mcrelay: Mcrelay
) -> None:
    daemon.replies["route.add"] = echo_route
    run = mcrelay("route", "add", "eth0", "239.1.1.1", "eth1", "eth2", "--ttl-threshold", "eth2=8")
    assert run.code == 0
    assert daemon.last("route.add")["params"]["oifs"] == ["eth1", {"name": "eth2", "ttl": 8}]
    assert run.out == "added route (*, 239.1.1.1) on eth0 -> eth1,eth2(ttl=8)\n"


def test_route_add_ttl_threshold_for_an_unknown_oif_is_refused(
    daemon: FakeDaemon, mcrelay: Mcrelay
) -> None:
    run = mcrelay("route", "add", "eth0", "239.1.1.1", "eth1", "--ttl-threshold", "eth9=8")
    assert run.code == 1
    assert "ttl-threshold" in run.err and "eth1" in run.err
    assert daemon.requests == []


def test_route_add_dry_run_says_nothing_changed(daemon: FakeDaemon, mcrelay: Mcrelay) -> None:
    daemon.replies["route.add"] = echo_route
    run = mcrelay("route", "add", "eth0", "239.1.1.1", "eth1", "--dry-run")
    assert run.code == 0
    assert daemon.last("route.add")["params"]["dry_run"] is True
    assert run.out == (
        "would add route (*, 239.1.1.1) on eth0 -> eth1\ndry run: nothing was changed\n"
    )


def test_route_add_second_word_not_an_address_is_refused_locally(
    daemon: FakeDaemon, mcrelay: Mcrelay
) -> None:
    run = mcrelay("route", "add", "eth0", "eth1", "239.1.1.1")
    assert run.code == 1
    assert run.err.startswith("mcrelay: group: 'eth1' is not an IP address")
    assert daemon.requests == []


def test_a_star_g_route_without_oif_is_refused_locally(
    daemon: FakeDaemon, mcrelay: Mcrelay
) -> None:
    run = mcrelay("route", "add", "eth0", "239.1.1.1")
    assert run.code == 1
    assert "oifs: at least one output interface is required" in run.err
    assert daemon.requests == []


def test_an_s_g_route_without_oif_is_a_stop_filter(daemon: FakeDaemon, mcrelay: Mcrelay) -> None:
    daemon.replies["route.add"] = echo_route
    assert mcrelay("route", "add", "eth0", "10.0.0.1", "239.1.1.1").code == 0
    assert daemon.last("route.add")["params"]["oifs"] == []


def test_prefixes_are_sent_as_typed(daemon: FakeDaemon, mcrelay: Mcrelay) -> None:
    daemon.replies["route.add"] = echo_route
    assert mcrelay("route", "add", "up0", "10.0.0.0/8", "225.1.2.3/24", "dn+").code == 0
    params = daemon.last("route.add")["params"]
    assert (params["source"], params["group"], params["oifs"]) == (
        "10.0.0.0/8",
        "225.1.2.3/24",
        ["dn+"],
    )


def test_route_del_star_g_and_s_g(daemon: FakeDaemon, mcrelay: Mcrelay) -> None:
    daemon.replies["route.del"] = echo_route
    assert mcrelay("route", "del", "eth0", "239.1.1.1").code == 0
    assert daemon.last("route.del")["params"] == {
        "iif": "eth0",
        "group": "239.1.1.1",
        "dry_run": False,
    }
    run = mcrelay("route", "del", "eth0", "10.0.0.1", "239.1.1.1")
    assert daemon.last("route.del")["params"] == {
        "iif": "eth0",
        "source": "10.0.0.1",
        "group": "239.1.1.1",
        "dry_run": False,
    }
    assert run.out == "deleted route (10.0.0.1, 239.1.1.1) on eth0\n"


def test_server_refusal_exits_1_with_the_server_message(
    daemon: FakeDaemon, mcrelay: Mcrelay
) -> None:
    message = (
        "group: 224.0.0.5 is link-local (224.0.0.0/24): the kernel never forwards it; "
        "use a relay to carry it between segments"
    )
    daemon.replies["route.add"] = RpcError(INVALID_PARAMS, message, {"field": "group"})
    run = mcrelay("route", "add", "eth0", "224.0.0.5", "eth1")
    assert run.code == 1
    assert run.out == ""
    assert run.err == f"mcrelay: {message}\n"


def test_verbose_refusal_adds_the_error_code(daemon: FakeDaemon, mcrelay: Mcrelay) -> None:
    daemon.replies["relay.del"] = RpcError(NO_SUCH_RULE, "no such rule: relay tv9")
    run = mcrelay("-v", "relay", "del", "tv9")
    assert run.code == 1
    assert "mcrelay: no such rule: relay tv9 (error -32002)" in run.err
    # -v also shows the JSON-RPC exchange, like curl -v
    assert '> {"jsonrpc":"2.0","id":1,"method":"relay.del"' in run.err


# ---------------------------------------------------------------- relay add / del


def test_relay_add_ipv4_unicast_and_multicast_outputs(daemon: FakeDaemon, mcrelay: Mcrelay) -> None:
    daemon.replies["relay.add"] = {"relay": RELAYS[0], "dry_run": False}
    run = mcrelay(
        "relay",
        "add",
        "tv1",
        "--in",
        "239.1.1.1:5000@eth0",
        "--out",
        "239.2.2.2:6000@eth1,ttl=16,dscp=EF",
        "--out",
        "192.0.2.10:7000",
    )
    assert run.code == 0
    assert daemon.last("relay.add")["params"] == {
        "name": "tv1",
        "input": {"iif": "eth0", "group": "239.1.1.1", "port": 5000},
        "outputs": [
            {"address": "239.2.2.2", "port": 6000, "oif": "eth1", "ttl": 16, "dscp": 46},
            {"address": "192.0.2.10", "port": 7000},
        ],
        "dry_run": False,
    }
    assert run.out == (
        "added relay tv1: 239.1.1.1:5000@eth0 -> 239.2.2.2:6000@eth1,ttl=16,dscp=EF "
        "192.0.2.10:7000,ttl=64 (packet)\n"
    )


def test_relay_add_ipv6_brackets_mode_and_sources(daemon: FakeDaemon, mcrelay: Mcrelay) -> None:
    daemon.replies["relay.add"] = {"relay": {}, "dry_run": False}
    run = mcrelay(
        "relay",
        "add",
        "v6feed",
        "--in",
        "[ff3e::1]:5000@eth0",
        "--out",
        "[ff3e::10]:6000@eth2,ttl=16,dscp=af41",
        "--out",
        "[2001:db8::10]:7000,dscp=10",
        "--mode",
        "socket",
        "--source",
        "2001:db8::1",
        "2001:db8::2",
    )
    assert run.code == 0, run.err
    assert daemon.last("relay.add")["params"] == {
        "name": "v6feed",
        "input": {
            "iif": "eth0",
            "group": "ff3e::1",
            "port": 5000,
            "sources": ["2001:db8::1", "2001:db8::2"],
        },
        "outputs": [
            {"address": "ff3e::10", "port": 6000, "oif": "eth2", "ttl": 16, "dscp": 34},
            {"address": "2001:db8::10", "port": 7000, "dscp": 10},
        ],
        "mode": "socket",
        "dry_run": False,
    }


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ("239.2.2.2", "outputs[0]: cannot parse '239.2.2.2'"),
        ("ff3e::10:6000@eth1", "outputs[0]: cannot parse 'ff3e::10:6000@eth1'"),
        ("239.2.2.2:0@eth1", "outputs[0].port: must be 1-65535, got 0"),
        ("239.2.2.2:6000@eth1,ttl=300", "outputs[0].ttl: must be 1-255, got 300"),
        ("239.2.2.2:6000@eth1,dscp=XX", "outputs[0].dscp: unknown DSCP class 'XX'"),
        ("239.2.2.2:6000@eth1,tos=4", "outputs[0]: unknown option 'tos=4'"),
    ],
)
def test_malformed_output_spec_exits_1_naming_the_field(
    daemon: FakeDaemon, mcrelay: Mcrelay, spec: str, field: str
) -> None:
    run = mcrelay("relay", "add", "tv1", "--in", "239.1.1.1:5000@eth0", "--out", spec)
    assert run.code == 1
    assert run.err.startswith(f"mcrelay: {field}")
    assert daemon.requests == []


def test_input_without_interface_is_refused(daemon: FakeDaemon, mcrelay: Mcrelay) -> None:
    run = mcrelay("relay", "add", "tv1", "--in", "239.1.1.1:5000", "--out", "192.0.2.1:7000")
    assert run.code == 1
    assert "input.iif: the input needs an interface: GROUP:PORT@IIF" in run.err


def test_relay_del(daemon: FakeDaemon, mcrelay: Mcrelay) -> None:
    daemon.replies["relay.del"] = {"relay": {"name": "tv1"}, "dry_run": True}
    run = mcrelay("--dry-run", "relay", "del", "tv1")
    assert daemon.last("relay.del")["params"] == {"name": "tv1", "dry_run": True}
    assert run.out == "would delete relay tv1\ndry run: nothing was changed\n"


# ---------------------------------------------------------------- group join / leave


def test_group_join_ssm_and_leave_asm(daemon: FakeDaemon, mcrelay: Mcrelay) -> None:
    daemon.replies["group.join"] = lambda p: {"group": p, "dry_run": False}
    daemon.replies["group.leave"] = lambda p: {"group": p, "dry_run": False}
    run = mcrelay("group", "join", "eth0", "232.1.1.1", "10.0.0.1")
    assert daemon.last("group.join")["params"] == {
        "iface": "eth0",
        "group": "232.1.1.1",
        "source": "10.0.0.1",
        "dry_run": False,
    }
    assert run.out == "joined group 232.1.1.1 from 10.0.0.1 on eth0\n"
    run = mcrelay("group", "leave", "eth0", "239.255.255.250")
    assert daemon.last("group.leave")["params"] == {
        "iface": "eth0",
        "group": "239.255.255.250",
        "dry_run": False,
    }
    assert run.out == "left group 239.255.255.250 on eth0\n"


# ---------------------------------------------------------------- exit codes, globals


def test_unreachable_daemon_exits_2_naming_socket_and_how_to_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(tmp_path / "nothing-here.sock")
    code = cli.main(["--socket", path, "status"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"cannot reach mcrelayd at {path}: no such socket" in err
    assert "systemctl start mcrelay" in err and "mcrelayd" in err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["route"],
        ["route", "add", "eth0"],
        ["show", "everything"],
        ["relay", "add", "tv1", "--out", "192.0.2.1:7000"],
        ["stats", "--watch", "soon"],
        ["-o", "xml", "show"],
    ],
)
def test_usage_errors_exit_1_with_usage(mcrelay: Mcrelay, argv: list[str]) -> None:
    run = mcrelay(*argv)
    assert run.code == 1
    assert run.err.startswith("usage: mcrelay")
    assert "mcrelay: " in run.err.splitlines()[-1]


def test_help_exits_0(mcrelay: Mcrelay) -> None:
    run = mcrelay("route", "add", "--help")
    assert run.code == 0
    assert "mcrelay route add IIF [SOURCE[/LEN]] GROUP[/LEN] [OIF...]" in run.out


def test_global_options_before_or_after_the_subcommand(
    daemon: FakeDaemon, mcrelay: Mcrelay, tmp_path: Path
) -> None:
    daemon.replies["route.list"] = {"routes": ROUTES}
    before = mcrelay("-o", "json", "show", "routes")
    after = mcrelay("show", "routes", "--output", "json")
    assert before.code == after.code == 0
    assert before.out == after.out
    # --socket after the subcommand wins over MCRELAY_SOCKET
    run = mcrelay("status", "--socket", str(tmp_path / "other.sock"))
    assert run.code == 2 and "other.sock" in run.err


# ---------------------------------------------------------------- show


def test_json_output_is_the_server_result_sorted_and_indented(
    daemon: FakeDaemon, mcrelay: Mcrelay
) -> None:
    daemon.replies["route.list"] = {"routes": ROUTES}
    run = mcrelay("show", "routes", "-o", "json")
    assert json.loads(run.out) == {"routes": ROUTES}
    assert run.out == json.dumps({"routes": ROUTES}, sort_keys=True, indent=2) + "\n"


def test_routes_table_aligns_columns_and_humanises_counters(
    daemon: FakeDaemon, mcrelay: Mcrelay
) -> None:
    daemon.replies["route.list"] = {"routes": ROUTES}
    run = mcrelay("show", "routes")
    assert run.out == (
        "IIF   SOURCE    GROUP       OIFS              STATE    PACKETS  BYTES  WRONG-IF\n"
        "eth0  *         239.1.1.1   eth1,eth2(ttl=8)  active      1.2k   1.7M         0\n"
        "eth0  10.0.0.1  239.1.1.10  eth1              waiting        5   6.6k         2\n"
    )


def test_verbose_routes_table_has_exact_counters_and_learned_sources(
    daemon: FakeDaemon, mcrelay: Mcrelay
) -> None:
    daemon.replies["route.list"] = {"routes": ROUTES}
    lines = mcrelay("show", "routes", "-v").out.splitlines()
    assert lines[1].split() == [
        "eth0",
        "*",
        "239.1.1.1",
        "eth1,eth2(ttl=8)",
        "active",
        "1234",
        "1664000",
        "0",
    ]
    assert lines[2].split() == ["10.0.0.5", "learned", "1234", "1664000"]


def test_relays_table_lists_outputs_under_their_relay(daemon: FakeDaemon, mcrelay: Mcrelay) -> None:
    daemon.replies["relay.list"] = {"relays": RELAYS}
    run = mcrelay("show", "relays")
    assert run.out == (
        "NAME  STATE   MODE    INPUT / OUTPUTS                        PACKETS  BYTES  DROPS\n"
        "tv1   active  packet  239.1.1.1:5000@eth0                       1.2k   1.6M      3\n"
        "                      -> 239.2.2.2:6000@eth1,ttl=16,dscp=EF     1.2k   1.6M      0\n"
        "                      -> 192.0.2.10:7000,ttl=64                 1.2k   1.6M      3\n"
    )


def test_show_defaults_to_routes_and_relays(daemon: FakeDaemon, mcrelay: Mcrelay) -> None:
    daemon.replies["route.list"] = {"routes": ROUTES}
    daemon.replies["relay.list"] = {"relays": []}
    run = mcrelay("show")
    assert run.code == 0
    assert run.out.startswith("Routes (2):\nIIF ")
    assert run.out.endswith("\n\nRelays: none\n")
    assert daemon.methods() == ["route.list", "relay.list"]


def test_show_interfaces_with_free_vif_slots(daemon: FakeDaemon, mcrelay: Mcrelay) -> None:
    daemon.replies["interface.list"] = {
        "interfaces": [
            {"name": "eth1", "ifindex": 3, "up": False, "addresses": [], "vif4": None},
            {"name": "eth0", "ifindex": 2, "up": True, "addresses": ["192.0.2.1/24"], "vif4": 0},
        ]
    }
    assert mcrelay("show", "interfaces").out == (
        "NAME  INDEX  STATE  VIF4  VIF6  ADDRESSES\n"
        "eth0      2  up        0     -  192.0.2.1/24\n"
        "eth1      3  down      -     -  -\n"
    )


def test_show_empty_list(daemon: FakeDaemon, mcrelay: Mcrelay) -> None:
    daemon.replies["group.list"] = {"groups": []}
    assert mcrelay("show", "groups").out == "no groups\n"


def test_human_units() -> None:
    assert [cli_format.human(n) for n in (0, 999, 1234, 12_345, 123_456, 3_400_000)] == [
        "0",
        "999",
        "1.2k",
        "12.3k",
        "123k",
        "3.4M",
    ]
    assert cli_format.human(5_600_000_000) == "5.6G"
    assert cli_format.human(3_400_000, exact=True) == "3400000"
    assert cli_format.human(None) == "-"


# ---------------------------------------------------------------- status, stats


STATUS = {
    "version": "0.1.0",
    "pid": 42,
    "uptime": 7384,
    "socket": "/run/mcrelay/mcrelay.sock",
    "state_file": "/var/lib/mcrelay/state.json",
    "routes": 2,
    "relays": 1,
    "groups": 0,
    "workers": {"configured": 2, "running": 2, "restarts": 1},
    "kernel": {"ipv4": True, "ipv6": False},
    "warnings": ["rp_filter on eth0 drops relay tv2 (socket mode)"],
}


def test_status_summary(daemon: FakeDaemon, mcrelay: Mcrelay) -> None:
    daemon.replies["daemon.status"] = STATUS
    assert mcrelay("status").out == (
        "mcrelayd 0.1.0, pid 42, up 2h 3m\n"
        "  socket      /run/mcrelay/mcrelay.sock\n"
        "  state file  /var/lib/mcrelay/state.json\n"
        "  rules       2 routes, 1 relay, 0 group joins\n"
        "  workers     2/2 running, 1 restarts\n"
        "  kernel      multicast routing IPv4 available, IPv6 unavailable\n"
        "warning: rp_filter on eth0 drops relay tv2 (socket mode)\n"
    )


def test_status_tolerates_missing_keys(daemon: FakeDaemon, mcrelay: Mcrelay) -> None:
    daemon.replies["daemon.status"] = {"version": "0.2.0"}
    run = mcrelay("status")
    assert run.code == 0
    assert run.out.startswith("mcrelayd 0.2.0, pid -, up -\n")


def _relay_at(packets: int, errors: int, pid: int = 42) -> dict[str, Any]:
    """A stats.get reply with one route and one relay that have counted ``packets``."""
    relay = copy.deepcopy(RELAYS[0])
    relay["packets"], relay["bytes"] = packets, packets * 1316
    for out in relay["outputs"]:
        out["packets"], out["bytes"], out["errors"] = packets, packets * 1316, 0
        out["state"] = "active"
    relay["outputs"][1]["errors"] = errors
    relay["outputs"][1]["packets"] -= errors
    relay["drops"] = {"send_error": errors}
    route = {**ROUTES[1], "state": "active", "packets": packets * 2, "bytes": packets * 2 * 1344}
    return {
        "routes": [route],
        "relays": [relay],
        "workers": [],
        "daemon": {**STATUS, "pid": pid},
    }


def _watch_clock(monkeypatch: pytest.MonkeyPatch, stop_after: int) -> list[float]:
    """time.sleep advances a fake monotonic clock; Ctrl-C after ``stop_after`` sleeps."""
    clock = [1000.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock[0] += seconds
        if len(sleeps) == stop_after:
            raise KeyboardInterrupt

    monkeypatch.setattr(time, "sleep", sleep)
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    return sleeps


def test_stats_watch_shows_rates_per_rule_and_output_and_marks_drops(
    daemon: FakeDaemon, mcrelay: Mcrelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    replies = iter([_relay_at(1000, 0), _relay_at(3000, 10), _relay_at(3000, 10)])
    daemon.replies["stats.get"] = lambda p: next(replies)
    sleeps = _watch_clock(monkeypatch, 3)
    run = mcrelay("stats", "--watch", "2")
    assert run.code == 0 and sleeps == [2.0, 2.0, 2.0]
    screens = run.out.split("Every 2s: mcrelay stats")[1:]
    assert len(screens) == 3
    assert "Rules, rates from the next refresh on (2):" in screens[0]
    assert "Rules, rates over the last 2.0s (2):" in screens[1]
    # 2,000 packets of 1,316 payload bytes in 2 s: 1.0k packets/s, 10.5M bits/s; the
    # unicast output lost 10 (5/s): marked. The route: 4,000 IP packets of 1,344 bytes.
    rows = [line.split() for line in screens[1].splitlines()]
    assert ["relay", "tv1", "!", "active", "3.0k", "1.0k", "10.5M", "5"] in rows
    assert [
        "->",
        "239.2.2.2:6000@eth1,ttl=16,dscp=EF",
        "active",
        "3.0k",
        "1.0k",
        "10.5M",
        "0",
    ] in rows
    assert ["->", "192.0.2.10:7000,ttl=64", "!", "active", "3.0k", "995", "10.5M", "5"] in rows
    route = next(r for r in rows if r[:2] == ["route", "(10.0.0.1,"])
    assert route[-4:] == ["6.0k", "2.0k", "21.5M", "-"]
    # nothing moved in the last interval: zero rates, no mark
    assert "!" not in screens[2] and ["relay", "tv1", "active", "3.0k", "0", "0", "0"] in [
        line.split() for line in screens[2].splitlines()
    ]
    assert "Workers: none" in screens[1] and "Daemon: mcrelayd 0.1.0, pid 42" in screens[1]


def test_stats_watch_reconnects_when_the_daemon_restarts(
    daemon: FakeDaemon, mcrelay: Mcrelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = iter(
        [_relay_at(1000, 0), None, None, _relay_at(50, 0, pid=43), _relay_at(250, 0, 43)]
    )

    def raw(request: dict[str, Any]) -> bytes | None:
        result = next(answers)
        if result is None:
            return None  # the daemon went away mid-call
        reply = {"jsonrpc": "2.0", "id": request["id"], "result": result}
        return json.dumps(reply).encode() + b"\n"

    daemon.raw = raw
    sleeps = _watch_clock(monkeypatch, 5)
    run = mcrelay("stats", "--watch", "1")
    assert run.code == 0  # never exit 2 while it can retry
    assert len(sleeps) == 5
    assert run.err.count("retrying every 1s") == 1
    assert "mcrelay: daemon restarted after 2.0s (pid 43)" in run.err
    screens = run.out.split("Every 1s: mcrelay stats")[1:]
    assert len(screens) == 3
    # no rate across the restart (counters start again), then rates again
    assert "rates from the next refresh on" in screens[1]
    rows = [line.split() for line in screens[2].splitlines()]
    assert ["relay", "tv1", "active", "250", "200", "2.1M", "0"] in rows


def test_stats_watch_json_is_one_object_per_line_with_rates(
    daemon: FakeDaemon, mcrelay: Mcrelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    replies = iter([_relay_at(1000, 0), _relay_at(3000, 10)])
    daemon.replies["stats.get"] = lambda p: next(replies)
    _watch_clock(monkeypatch, 2)
    run = mcrelay("stats", "--watch", "2", "-o", "json")
    first, second = (json.loads(line) for line in run.out.splitlines())
    assert "rates" not in first and first["relays"][0]["packets"] == 1000
    rates = second.pop("rates")
    assert second == _relay_at(3000, 10)
    assert rates["interval"] == 2.0
    (relay,) = rates["relays"]
    assert (relay["name"], relay["pps"], relay["bps"], relay["drops_ps"]) == (
        "tv1",
        1000.0,
        10_528_000.0,
        5.0,
    )
    assert [o["errors_ps"] for o in relay["outputs"]] == [0.0, 5.0]
    assert rates["routes"][0]["pps"] == 2000.0


# ---------------------------------------------------------------- trace


LATER = time.time() + 3600.25  # packets received after the trace started


def _records(*sizes: int, at: float = LATER) -> list[dict[str, Any]]:
    return [
        {"time": at, "source": "10.0.0.1:4000", "size": s, "outputs": 2, "result": r}
        for s, r in zip(sizes, ["sent", "sent", "dropped: queue", "sent"], strict=False)
    ]


def test_trace_prints_records_until_count_and_stops_tracing(
    daemon: FakeDaemon, mcrelay: Mcrelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "TRACE_POLL", 0)
    pages = iter(
        [
            {"records": _records(1316, 1316), "cursor": 2},
            {"records": [], "cursor": 2},
            {"records": _records(188, 1316), "cursor": 4},
        ]
    )
    daemon.replies["trace.start"] = {"name": "tv1", "tracing": True}
    daemon.replies["trace.stop"] = {"name": "tv1", "tracing": False}
    daemon.replies["trace.read"] = lambda p: next(pages)
    run = mcrelay("trace", "tv1", "--count", "3")
    assert run.code == 0
    stamp = time.strftime("%H:%M:%S", time.localtime(LATER)) + f".{int(LATER % 1 * 1e6):06d}"
    assert run.out.splitlines() == [
        f"{stamp} IP 10.0.0.1.4000: UDP, length 1316 -> 2 sent",
        f"{stamp} IP 10.0.0.1.4000: UDP, length 1316 -> 2 sent",
        f"{stamp} IP 10.0.0.1.4000: UDP, length 188 -> 2 sent",
    ]
    assert daemon.methods() == [
        "trace.start",
        "trace.read",
        "trace.read",
        "trace.read",
        "trace.stop",
    ]
    # the cursor returned by each read is passed to the next
    cursors = [r["params"]["cursor"] for r in daemon.requests if r["method"] == "trace.read"]
    assert cursors == [0, 2, 2]
    assert "3 packets traced" in run.err


def test_trace_starts_at_its_own_cursor_and_skips_packets_from_before_it(
    daemon: FakeDaemon, mcrelay: Mcrelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "TRACE_POLL", 0)
    old = _records(100, 100, at=time.time() - 2)  # the end of an earlier trace, handed over late
    new = [
        {**r, "destination": "239.1.1.1:5000", "outputs": ["239.2.2.2:6000"], "result": "relayed"}
        for r in _records(1316, 188)
    ]
    new[1]["time"] += 0.000125  # each packet has its own receive time
    pages = iter([{"records": old + new[:1], "cursor": 12}, {"records": new[1:], "cursor": 13}])
    daemon.replies["trace.start"] = {"name": "tv1", "tracing": True, "cursor": 9}
    daemon.replies["trace.stop"] = {"name": "tv1", "tracing": False}
    daemon.replies["trace.read"] = lambda p: next(pages)
    run = mcrelay("trace", "tv1", "--count", "2")
    assert run.code == 0
    cursors = [r["params"]["cursor"] for r in daemon.requests if r["method"] == "trace.read"]
    assert cursors == [9, 12]  # from this trace's first record, not the ring's oldest
    stamp = time.strftime("%H:%M:%S", time.localtime(LATER))
    assert run.out.splitlines() == [
        f"{stamp}.{int(LATER % 1 * 1e6):06d} IP 10.0.0.1.4000 > 239.1.1.1.5000: UDP, length 1316"
        " -> 239.2.2.2.6000 relayed",
        f"{stamp}.{int((LATER + 0.000125) % 1 * 1e6):06d} IP 10.0.0.1.4000 > 239.1.1.1.5000: UDP,"
        " length 188 -> 239.2.2.2.6000 relayed",
    ]
    assert "2 packets traced" in run.err


def test_trace_ctrl_c_still_stops_tracing(
    daemon: FakeDaemon, mcrelay: Mcrelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(time, "sleep", interrupted)
    daemon.replies["trace.start"] = {"name": "tv1", "tracing": True}
    daemon.replies["trace.stop"] = {"name": "tv1", "tracing": False}
    daemon.replies["trace.read"] = {"records": [], "cursor": 0}
    run = mcrelay("trace", "tv1")
    assert run.code == 0
    assert daemon.methods() == ["trace.start", "trace.read", "trace.stop"]


def test_trace_of_unknown_relay_exits_1_without_stop(daemon: FakeDaemon, mcrelay: Mcrelay) -> None:
    daemon.replies["trace.start"] = RpcError(NO_SUCH_RULE, "no such rule: relay nope")
    run = mcrelay("trace", "nope")
    assert run.code == 1
    assert run.err == "mcrelay: no such rule: relay nope\n"
    assert daemon.methods() == ["trace.start"]


# ---------------------------------------------------------------- apply / export

RULE_FILE = {
    "version": 1,
    "routes": [{"iif": "eth0", "source": "*", "group": "239.1.1.1", "oifs": [{"name": "eth1"}]}],
    "relays": [],
    "groups": [{"iface": "eth0", "group": "239.255.255.250", "source": "*"}],
}

DIFF = {
    "routes": {
        "added": [{"iif": "eth0", "source": "*", "group": "239.1.1.1", "oifs": [{"name": "eth1"}]}],
        "removed": [{"iif": "eth0", "source": "10.0.0.1", "group": "239.9.9.9", "oifs": []}],
        "changed": [],
    },
    "relays": {
        "added": [],
        "removed": [],
        "changed": [
            {
                "old": RELAYS[0],
                "new": {**RELAYS[0], "outputs": RELAYS[0]["outputs"][:1]},  # type: ignore[index]
            }
        ],
    },
    "groups": {"added": [], "removed": [], "changed": []},
}


def test_apply_sends_the_rules_without_version_and_prints_the_diff(
    daemon: FakeDaemon, mcrelay: Mcrelay, tmp_path: Path
) -> None:
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(RULE_FILE))
    daemon.replies["config.apply"] = {"diff": DIFF, "dry_run": False}
    run = mcrelay("apply", str(path))
    assert run.code == 0
    assert daemon.last("config.apply")["params"] == {
        "rules": {k: v for k, v in RULE_FILE.items() if k != "version"},
        "dry_run": False,
    }
    assert run.out == (
        "+ route (*, 239.1.1.1) on eth0 -> eth1\n"
        "- route (10.0.0.1, 239.9.9.9) on eth0: stop filter (no outputs: blocked)\n"
        "~ relay tv1: 239.1.1.1:5000@eth0 -> 239.2.2.2:6000@eth1,ttl=16,dscp=EF (packet)\n"
        "1 added, 1 removed, 1 changed\n"
    )


def test_apply_dry_run_says_nothing_was_changed(
    daemon: FakeDaemon, mcrelay: Mcrelay, tmp_path: Path
) -> None:
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(RULE_FILE))
    daemon.replies["config.apply"] = {"diff": DIFF, "dry_run": True}
    run = mcrelay("apply", str(path), "--dry-run")
    assert daemon.last("config.apply")["params"]["dry_run"] is True
    assert run.out.endswith("1 added, 1 removed, 1 changed; dry run: nothing was changed\n")


def test_apply_with_no_difference(daemon: FakeDaemon, mcrelay: Mcrelay, tmp_path: Path) -> None:
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(RULE_FILE))
    daemon.replies["config.apply"] = {"diff": {}, "dry_run": False}
    assert mcrelay("apply", str(path)).out == "no changes: the running rules already match\n"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read {path}: No such file or directory"),
        ('{"routes": [}', "{path}: not valid JSON: Expecting value at line 1 column 13"),
        ("[]", "{path}: expected a JSON object"),
        ('{"version": 2, "routes": []}', "version: {path}: rule file version 2 is not supported"),
    ],
)
def test_apply_bad_file_exits_1_without_calling_the_daemon(
    daemon: FakeDaemon, mcrelay: Mcrelay, tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "rules.json"
    if content is not None:
        path.write_text(content)
    run = mcrelay("apply", str(path))
    assert run.code == 1
    assert run.err.startswith("mcrelay: " + message.format(path=path))
    assert daemon.requests == []


def test_export_output_is_what_apply_reads(
    daemon: FakeDaemon, mcrelay: Mcrelay, tmp_path: Path
) -> None:
    daemon.replies["config.export"] = RULE_FILE
    run = mcrelay("export")
    assert run.out == json.dumps(RULE_FILE, sort_keys=True, indent=2) + "\n"
    path = tmp_path / "exported.json"
    path.write_text(run.out)
    assert cli.read_rule_file(str(path)) == {k: v for k, v in RULE_FILE.items() if k != "version"}


# ---------------------------------------------------------------- agreement with the server


@pytest.mark.parametrize(
    "argv",
    [
        ["route", "add", "eth0", "239.1.1.1", "eth1", "eth2"],
        ["route", "add", "eth0", "10.0.0.1", "239.1.1.1", "eth1", "--ttl-threshold", "eth1=4"],
        ["route", "add", "eth0", "2001:db8::1", "ff3e::10", "eth1", "--dry-run"],
        ["route", "del", "eth0", "239.1.1.1"],
        ["route", "del", "eth0", "10.0.0.1", "239.1.1.1"],
        ["relay", "add", "tv1", "--in", "239.1.1.1:5000@eth0", "--out", "192.0.2.10:7000"],
        [
            "relay",
            "add",
            "v6",
            "--in",
            "[ff3e::1]:5000@eth0",
            "--out",
            "[ff3e::10]:6000@eth2,ttl=16,dscp=EF",
            "--mode",
            "socket",
            "--source",
            "2001:db8::1",
        ],
        ["relay", "del", "tv1"],
        ["group", "join", "eth0", "232.1.1.1", "10.0.0.1"],
        ["group", "leave", "eth0", "224.0.0.251"],
        ["trace", "tv1", "--count", "1"],
        ["show"],
        ["show", "interfaces"],
        ["stats"],
        ["status"],
        ["export"],
    ],
)
def test_every_request_the_cli_sends_is_valid_for_the_server(
    daemon: FakeDaemon, mcrelay: Mcrelay, argv: list[str]
) -> None:
    """The server's own parser (protocol.py) accepts what the CLI sends, unchanged in meaning."""
    daemon.replies.update(
        {
            name: (lambda p: {"records": [{"size": 1}], "cursor": 1})
            if name == "trace.read"
            else {}
            for name in protocol.METHODS
        }
    )
    daemon.replies["route.list"] = {"routes": []}
    daemon.replies["relay.list"] = {"relays": []}
    daemon.replies["interface.list"] = {"interfaces": []}
    run = mcrelay(*argv)
    assert run.code == 0, run.err
    assert daemon.requests
    for request in daemon.requests:
        command = protocol.parse_command(request["method"], request.get("params", {}))
        assert command.dry_run == ("--dry-run" in argv)


# ---------------------------------------------------------------- iproute2 habits (issue 14)

MANY_ROUTES = [
    {"iif": "up0", "source": "*", "group": "239.1.2.3", "oifs": ["dn1"], "state": "active"},
    {"iif": "up0", "source": "10.0.0.1", "group": "239.2.0.1", "oifs": ["dn2"], "state": "active"},
    {"iif": "up1", "source": "*", "group": "239.1.9.9", "oifs": ["dn1", "dn2"], "state": "active"},
    {"iif": "up1", "source": "2001:db8::1", "group": "ff3e::1", "oifs": ["dn3"], "state": "active"},
]
MANY_RELAYS = [
    {
        "name": name,
        "state": "active",
        "mode": "packet",
        "input": {"iif": iif, "group": group, "port": 5000},
        "outputs": [{"address": out, "port": 6000, "oif": oif}],
    }
    for name, iif, group, out, oif in (
        ("tv1", "up0", "239.1.1.1", "239.9.1.1", "dn1"),
        ("tv2", "up0", "239.1.1.2", "239.9.1.2", "dn2"),
        ("radio", "up1", "239.3.0.1", "192.0.2.50", None),
    )
]
GROUPS = [
    {"iface": "up0", "group": "239.1.1.1", "source": None, "state": "joined"},
    {"iface": "up1", "group": "232.1.1.1", "source": "10.0.0.1", "state": "joined"},
]


@pytest.fixture
def listing(daemon: FakeDaemon) -> FakeDaemon:
    daemon.replies["route.list"] = {"routes": MANY_ROUTES}
    daemon.replies["relay.list"] = {"relays": MANY_RELAYS, "workers_polled": True}
    daemon.replies["group.list"] = {"groups": GROUPS}
    daemon.replies["interface.list"] = {
        "interfaces": [{"name": n, "ifindex": i} for i, n in enumerate(("up0", "dn1", "dn2"), 2)]
    }
    return daemon


@pytest.mark.parametrize(
    "argv",
    [
        ["show", "routes"],
        ["show", "route"],
        ["route", "show"],
        ["route", "list"],
        ["sh", "ro"],
        ["ro", "l"],
    ],
)
def test_every_iproute2_spelling_of_show_routes_lists_routes(
    listing: FakeDaemon, mcrelay: Mcrelay, argv: list[str]
) -> None:
    run = mcrelay(*argv)
    assert run.code == 0, run.err
    assert run.out == mcrelay("show", "routes").out
    assert listing.methods() == ["route.list", "route.list"]


@pytest.mark.parametrize(
    "argv", [["show", "relays"], ["show", "relay"], ["relay", "show"], ["relay", "list"]]
)
def test_every_spelling_of_show_relays_lists_relays(
    listing: FakeDaemon, mcrelay: Mcrelay, argv: list[str]
) -> None:
    assert mcrelay(*argv).out == mcrelay("show", "relays").out
    assert listing.methods() == ["relay.list", "relay.list"]


def test_group_show_lists_memberships(listing: FakeDaemon, mcrelay: Mcrelay) -> None:
    assert mcrelay("group", "show").out == mcrelay("show", "groups").out


@pytest.mark.parametrize(
    ("argv", "method", "params"),
    [
        (["route", "delete", "eth0", "239.1.1.1"], "route.del", {"group": "239.1.1.1"}),
        (["ro", "de", "eth0", "239.1.1.1"], "route.del", {"group": "239.1.1.1"}),
        (["relay", "delete", "tv1"], "relay.del", {"name": "tv1"}),
        (["rel", "d", "tv1"], "relay.del", {"name": "tv1"}),
        (
            ["rel", "a", "tv1", "--in", "239.1.1.1:5000@eth0", "--out", "192.0.2.10:7000"],
            "relay.add",
            {"name": "tv1"},
        ),
        (["ro", "a", "eth0", "239.1.1.1", "eth1"], "route.add", {"oifs": ["eth1"]}),
        (["statu"], "daemon.status", {}),
        (["gr", "j", "eth0", "239.1.1.1"], "group.join", {"iface": "eth0"}),
    ],
)
def test_delete_and_unambiguous_prefixes_are_the_full_command(
    daemon: FakeDaemon, mcrelay: Mcrelay, argv: list[str], method: str, params: dict[str, Any]
) -> None:
    daemon.replies[method] = lambda p: {}
    run = mcrelay(*argv)
    assert run.code == 0, run.err
    sent = daemon.last(method).get("params", {})
    assert {k: sent[k] for k in params} == params


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["s"], "ambiguous command 's': could be show, stats, status"),
        (["st"], "ambiguous command 'st': could be stats, status"),
        (["r", "add", "eth0"], "ambiguous command 'r': could be relay, route"),
        (["show", "r"], "ambiguous view 'r': could be relays, routes"),
        (["route", "x"], "unknown route action 'x'; expected one of add, del, show"),
        (["launch"], "unknown command 'launch'; expected one of apply, export, group, relay,"),
    ],
)
def test_ambiguous_or_unknown_word_exits_1_listing_the_candidates(
    daemon: FakeDaemon, mcrelay: Mcrelay, argv: list[str], message: str
) -> None:
    run = mcrelay(*argv)
    assert run.code == 1
    assert run.err.startswith("usage: mcrelay")
    assert f"mcrelay: {message}" in run.err
    assert daemon.requests == []


def _routes_shown(out: str) -> list[tuple[str, str]]:
    return [(line.split()[0], line.split()[2]) for line in out.splitlines()[1:]]


@pytest.mark.parametrize(
    ("filters", "shown"),
    [
        (["iif", "up0"], [("up0", "239.1.2.3"), ("up0", "239.2.0.1")]),
        (["group", "239.1.0.0/16"], [("up0", "239.1.2.3"), ("up1", "239.1.9.9")]),
        (["group", "239.1.2.3"], [("up0", "239.1.2.3")]),
        (["group", "ff00::/8"], [("up1", "ff3e::1")]),
        (["oif", "dn2"], [("up0", "239.2.0.1"), ("up1", "239.1.9.9")]),
        (["source", "10.0.0.0/8"], [("up0", "239.2.0.1")]),
        (["iif", "up1", "oif", "dn1"], [("up1", "239.1.9.9")]),  # every key must match
        (
            ["oif", "dn1", "oif", "dn3"],
            [("up0", "239.1.2.3"), ("up1", "239.1.9.9"), ("up1", "ff3e::1")],
        ),
    ],
)
def test_show_routes_filters_by_iif_oif_group_prefix_and_source(
    listing: FakeDaemon, mcrelay: Mcrelay, filters: list[str], shown: list[tuple[str, str]]
) -> None:
    run = mcrelay("show", "routes", *filters)
    assert run.code == 0, run.err
    assert sorted(_routes_shown(run.out)) == sorted(shown)


def test_filtered_json_keeps_the_daemons_shape_with_only_the_matches(
    listing: FakeDaemon, mcrelay: Mcrelay
) -> None:
    routes = json.loads(mcrelay("-o", "json", "show", "routes", "iif", "up1").out)
    assert routes == {"routes": MANY_ROUTES[2:]}
    relays = json.loads(mcrelay("show", "relays", "tv2", "-o", "json").out)
    assert relays == {"relays": [MANY_RELAYS[1]], "workers_polled": True}


@pytest.mark.parametrize(
    ("filters", "names"),
    [
        (["tv1"], ["tv1"]),
        (["name", "tv1"], ["tv1"]),
        (["tv*"], ["tv1", "tv2"]),
        (["tv1", "radio"], ["radio", "tv1"]),
        (["iif", "up0"], ["tv1", "tv2"]),
        (["oif", "dn2"], ["tv2"]),
        (["group", "239.1.0.0/16"], ["tv1", "tv2"]),
        (["group", "239.9.1.2"], ["tv2"]),  # an output address finds the relay too
        (["group", "192.0.2.0/24"], ["radio"]),
    ],
)
def test_show_relays_filters_by_name_iif_oif_and_group(
    listing: FakeDaemon, mcrelay: Mcrelay, filters: list[str], names: list[str]
) -> None:
    out = json.loads(mcrelay("-o", "json", "show", "relays", *filters).out)
    assert sorted(r["name"] for r in out["relays"]) == names
    table = mcrelay("show", "relays", *filters).out
    assert sorted(line.split()[0] for line in table.splitlines()[1:] if line[0] != " ") == names


def test_show_groups_filters_by_iface_and_interfaces_by_name(
    listing: FakeDaemon, mcrelay: Mcrelay
) -> None:
    groups = mcrelay("show", "groups", "iface", "up1").out.splitlines()
    assert [line.split()[:2] for line in groups[1:]] == [["up1", "232.1.1.1"]]
    assert json.loads(mcrelay("-o", "json", "show", "groups", "group", "239.0.0.0/8").out) == {
        "groups": GROUPS[:1]
    }
    interfaces = mcrelay("show", "interfaces", "dn*").out.splitlines()
    assert [line.split()[0] for line in interfaces[1:]] == ["dn1", "dn2"]


def test_a_filter_matching_nothing_says_so(listing: FakeDaemon, mcrelay: Mcrelay) -> None:
    run = mcrelay("show", "routes", "iif", "eth9", "group", "239.0.0.0/8")
    assert (run.code, run.out) == (0, "no routes match iif eth9 group 239.0.0.0/8\n")
    assert json.loads(mcrelay("-o", "json", "show", "relays", "nope").out)["relays"] == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["show", "routes", "up0"], "'up0' is not a filter of show routes; expected iif IFACE"),
        (["show", "routes", "iif"], "iif needs a value: iif IFACE"),
        (["show", "routes", "group", "239.1/99"], "'239.1/99' is not an address or prefix"),
        (["show", "workers", "w0"], "show workers takes no filter"),
        (["show", "groups", "iif", "up0"], "'iif' is not a filter of show groups"),
    ],
)
def test_a_bad_filter_exits_1_before_asking_the_daemon(
    listing: FakeDaemon, mcrelay: Mcrelay, argv: list[str], message: str
) -> None:
    run = mcrelay(*argv)
    assert run.code == 1
    assert message in run.err
    assert listing.requests == []


# ---------------------------------------------------------------- batch mode (issue 12)


@pytest.fixture
def routes_daemon(daemon: FakeDaemon) -> FakeDaemon:
    daemon.replies["route.add"] = echo_route
    daemon.replies["route.del"] = echo_route
    return daemon


def _batch(tmp_path: Path, *lines: str) -> str:
    path = tmp_path / "commands"
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_batch_runs_every_line_over_one_connection_one_line_each(
    routes_daemon: FakeDaemon, mcrelay: Mcrelay, tmp_path: Path
) -> None:
    lines = [f"route add up0 239.1.1.{i} dn1" for i in range(1, 51)]
    run = mcrelay("-b", _batch(tmp_path, *lines))
    assert run.code == 0, run.err
    assert run.out.splitlines() == [
        f"added route (*, 239.1.1.{i}) on up0 -> dn1" for i in range(1, 51)
    ]
    assert routes_daemon.connections == 1
    assert len(routes_daemon.requests) == 50


def test_batch_skips_comments_and_blank_lines_and_takes_the_cli_syntax(
    routes_daemon: FakeDaemon, mcrelay: Mcrelay, tmp_path: Path
) -> None:
    path = _batch(
        tmp_path,
        "# the feeds of studio 1",
        "",
        "   ",
        "ro a up0 10.0.0.1 239.1.1.1 dn1 dn2   # prefixes work too",
        "route delete up0 239.1.1.9",
    )
    run = mcrelay("--batch", path)
    assert run.code == 0, run.err
    assert routes_daemon.methods() == ["route.add", "route.del"]
    assert routes_daemon.requests[0]["params"]["oifs"] == ["dn1", "dn2"]


def test_batch_from_stdin(
    routes_daemon: FakeDaemon, mcrelay: Mcrelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("route add up0 239.1.1.1 dn1\n"))
    run = mcrelay("-b", "-")
    assert (run.code, run.out) == (0, "added route (*, 239.1.1.1) on up0 -> dn1\n")


def test_batch_stops_at_the_first_refused_command_and_exits_1(
    routes_daemon: FakeDaemon, mcrelay: Mcrelay, tmp_path: Path
) -> None:
    routes_daemon.replies["route.add"] = lambda p: (
        RpcError(-32001, f"rule exists: route {p['group']}") if p["group"] == "239.1.1.2" else {}
    )
    path = _batch(tmp_path, *(f"route add up0 239.1.1.{i} dn1" for i in (1, 2, 3)))
    run = mcrelay("-b", path)
    assert run.code == 1
    assert len(run.out.splitlines()) == 1  # line 1 only
    assert "mcrelay: line 2: rule exists: route 239.1.1.2" in run.err
    assert "stopped at line 2" in run.err
    assert len(routes_daemon.requests) == 2


def test_batch_force_goes_on_after_refusals_and_still_exits_1(
    routes_daemon: FakeDaemon, mcrelay: Mcrelay, tmp_path: Path
) -> None:
    path = _batch(
        tmp_path,
        "route add up0 239.1.1.1 dn1",
        "route add up0 nonsense dn1",  # refused by the CLI itself
        "show everything",  # a usage error
        "route add up0 239.1.1.3 dn1",
    )
    run = mcrelay("-b", path, "--force")
    assert run.code == 1
    assert len(run.out.splitlines()) == 2
    assert "line 2: group: 'nonsense' is not an IP address" in run.err
    assert "line 3: unknown view 'everything'" in run.err
    assert "mcrelay: 2 of 4 commands refused" in run.err
    assert routes_daemon.methods() == ["route.add", "route.add"]


def test_batch_json_prints_one_tagged_object_per_command(
    routes_daemon: FakeDaemon, mcrelay: Mcrelay, tmp_path: Path
) -> None:
    path = _batch(tmp_path, "route add up0 239.1.1.1 dn1", "# note", "route add up0 x dn1")
    run = mcrelay("-o", "json", "-b", path, "--force")
    assert run.code == 1
    first, second = (json.loads(line) for line in run.out.splitlines())
    assert first == {"line": 1, "result": echo_route({"iif": "up0", "group": "239.1.1.1",
                                                      "oifs": ["dn1"]})}  # fmt: skip
    assert second["line"] == 3
    assert second["error"]["code"] == INVALID_PARAMS


def test_batch_dry_run_says_nothing_changed_once_at_the_end(
    routes_daemon: FakeDaemon, mcrelay: Mcrelay, tmp_path: Path
) -> None:
    path = _batch(tmp_path, "route add up0 239.1.1.1 dn1", "route add up0 239.1.1.2 dn1")
    run = mcrelay("--dry-run", "-b", path)
    assert run.code == 0
    assert run.out.splitlines() == [
        "would add route (*, 239.1.1.1) on up0 -> dn1",
        "would add route (*, 239.1.1.2) on up0 -> dn1",
        "dry run: nothing was changed",
    ]
    assert all(r["params"]["dry_run"] for r in routes_daemon.requests)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("trace tv1", "trace runs until stopped; it cannot be part of a batch"),
        ("stats --watch", "stats runs until stopped"),
        ("--socket /tmp/x.sock status", "--socket applies to the whole batch"),
        ("-b other", "a batch line cannot start another batch"),
        ('route add up0 "239.1.1.1 dn1', "No closing quotation"),
    ],
)
def test_batch_refuses_lines_that_cannot_run_in_a_batch(
    routes_daemon: FakeDaemon, mcrelay: Mcrelay, tmp_path: Path, line: str, message: str
) -> None:
    run = mcrelay("-b", _batch(tmp_path, line))
    assert run.code == 1
    assert f"line 1: {message}" in run.err
    assert routes_daemon.requests == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-b", "FILE", "status"], "with -b FILE the commands come from FILE"),
        (["--force", "status"], "--force goes with --batch FILE"),
    ],
)
def test_batch_options_misused_are_usage_errors(
    mcrelay: Mcrelay, argv: list[str], message: str
) -> None:
    run = mcrelay(*argv)
    assert run.code == 1
    assert message in run.err


def test_batch_file_that_cannot_be_read_exits_1(mcrelay: Mcrelay, tmp_path: Path) -> None:
    run = mcrelay("-b", str(tmp_path / "absent"))
    assert run.code == 1
    assert "cannot read" in run.err


def test_batch_stops_with_exit_2_when_the_daemon_is_gone(mcrelay: Mcrelay, tmp_path: Path) -> None:
    path = _batch(tmp_path, "route add up0 239.1.1.1 dn1", "route add up0 239.1.1.2 dn1")
    run = mcrelay("--socket", str(tmp_path / "none.sock"), "--force", "-b", path)
    assert run.code == 2
    assert run.err.count("cannot reach mcrelayd") == 1


# ---------------------------------------------------------------- fast path and slow replies


@pytest.mark.parametrize(
    ("command", "argv"),
    [
        ("status", ["status"]),
        ("status", ["status", "-o", "json", "--socket", "/tmp/s.sock"]),
        ("status", ["--output=json", "-v", "status", "--dry-run"]),
        ("route", ["route", "add", "eth0", "239.1.1.1", "eth1", "eth2"]),
        (
            "route",
            ["--dry-run", "route", "add", "eth0", "10.0.0.1", "239.1.1.1", "eth1", "-o", "json"],
        ),
        ("route", ["route", "del", "eth0", "239.1.1.1", "--socket=/tmp/s.sock"]),
        ("route", ["route", "del", "eth0", "10.0.0.1", "239.1.1.1", "--verbose"]),
    ],
)
def test_the_fast_path_parses_exactly_as_argparse_does(command: str, argv: list[str]) -> None:
    fast = cli._fast_parse(argv)
    assert fast is not None
    assert vars(fast) == vars(cli.build_parser(command).parse_args(argv))


@pytest.mark.parametrize(
    "argv",
    [
        ["status", "--help"],
        ["status", "extra"],
        ["route", "add", "eth0", "239.1.1.1", "eth1", "--ttl-threshold", "eth1=4"],
        ["route", "add", "eth0"],
        ["--dry", "route", "del", "eth0", "239.1.1.1"],  # an abbreviation: argparse's
        ["-ojson", "status"],
        ["-o", "xml", "status"],
        ["show", "routes"],
    ],
)
def test_the_fast_path_leaves_anything_else_to_argparse(argv: list[str]) -> None:
    assert cli._fast_parse(argv) is None


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_slow_reply_on_a_live_connection_is_waited_for_not_unreachable(
    daemon: FakeDaemon, mcrelay: Mcrelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "REPLY_STEP", 0.1)  # the 10 s step, shortened
    daemon.replies["config.export"] = {"routes": [], "relays": [], "groups": []}
    daemon.delays["config.export"] = 0.5  # five steps: the old fixed timeout would say exit 2
    run = mcrelay("export")
    assert run.code == 0, run.err
    assert json.loads(run.out) == {"routes": [], "relays": [], "groups": []}
    assert run.err == ""  # not a terminal: no progress notes


def test_a_person_at_a_terminal_is_told_the_daemon_is_still_working(
    daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "REPLY_STEP", 0.1)
    monkeypatch.setenv("MCRELAY_SOCKET", daemon.path)
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    daemon.replies["daemon.status"] = {"version": "0.1.0"}
    daemon.delays["daemon.status"] = 0.35
    assert cli.main(["status"]) == 0
    notes = terminal.getvalue().splitlines()
    assert len(notes) >= 2
    assert notes[0] == "mcrelay: still waiting for mcrelayd (0 s)\u2026"
    assert all(n.startswith("mcrelay: still waiting for mcrelayd (") for n in notes)


def test_a_connection_dropped_while_waiting_is_unreachable(
    daemon: FakeDaemon, mcrelay: Mcrelay
) -> None:
    daemon.raw = lambda req: None  # the daemon dies before replying
    run = mcrelay("status")
    assert run.code == 2
    assert "connection closed by the daemon before it replied" in run.err


# ---------------------------------------------------------------- states with reasons


def test_show_marks_each_waiting_output_and_says_why_a_rule_waits(
    daemon: FakeDaemon, mcrelay: Mcrelay
) -> None:
    partial = {
        **ROUTES[1],
        "oifs": [
            {"name": "eth1", "ttl": 1, "state": "active"},
            {"name": "dn9", "ttl": 8, "state": "waiting", "reason": "interface down"},
        ],
        "state": "partial",
        "reason": "dn9 interface down",
    }
    full = {**ROUTES[0], "state": "waiting", "reason": "IPv4 VIF table full"}
    daemon.replies["route.list"] = {"routes": [full, partial]}
    rows = [line.split() for line in mcrelay("show", "routes").out.splitlines()]
    assert rows[1][:6] == ["eth0", "*", "239.1.1.1", "eth1,eth2(ttl=8)", "waiting:", "IPv4"]
    assert rows[2][:5] == ["eth0", "10.0.0.1", "239.1.1.10", "eth1,dn9(ttl=8,down)", "partial"]
    relay = copy.deepcopy(RELAYS[0])
    relay.update(state="waiting", reason="input address not on this host")
    relay["outputs"][0].update(state="waiting", reason="interface renamed to wan1")
    daemon.replies["relay.list"] = {"relays": [relay]}
    out = mcrelay("show", "relays").out
    assert "tv1   waiting: input address not on this host  packet" in out
    assert "-> 239.2.2.2:6000@eth1,ttl=16,dscp=EF (renamed to wan1)" in out
    assert "-> 192.0.2.10:7000,ttl=64 " in out and "(renamed" not in out.splitlines()[-1]


def test_stats_watch_highlights_an_output_losing_packets_on_a_terminal() -> None:
    from mcrelay import cli_format as fmt

    before, after = _relay_at(1000, 0), _relay_at(3000, 10)
    text = fmt.rates_table(after, fmt.rates(fmt.sample(before), fmt.sample(after), 2.0), True)
    hot = [line for line in text.splitlines() if line.startswith("\033[1;7m")]
    assert len(hot) == 2 and "relay tv1 !" in hot[0] and "192.0.2.10:7000,ttl=64 !" in hot[1]
    assert all(line.endswith("\033[0m") for line in hot)
