"""`mcrelay reload` against the fake daemon: what it sends, what it prints, its exit codes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_daemon import FakeDaemon, RpcError

from mcrelay import cli
from mcrelay.errors import SETTINGS_INVALID


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[FakeDaemon]:
    d = FakeDaemon(tmp_path / "mcrelay.sock")
    try:
        yield d
    finally:
        d.close()


def run(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli.main(["--socket", str(daemon.path), *argv])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_reload_says_what_applies_and_what_needs_a_restart(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.replies["daemon.reload"] = {
        "config": "/etc/mcrelay/mcrelay.toml",
        "changed": ["log_level"],
        "restart_required": ["workers"],
        "dry_run": False,
    }
    code, out = run(daemon, capsys, "reload")
    assert code == 0
    assert daemon.last("daemon.reload")["params"] == {"dry_run": False}
    assert out.splitlines() == [
        "settings re-read from /etc/mcrelay/mcrelay.toml",
        "applied: log_level",
        "changed but need a restart (systemctl restart mcrelay): workers",
    ]


def test_reload_dry_run_and_json(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    reply = {"config": None, "changed": [], "restart_required": [], "dry_run": True}
    daemon.replies["daemon.reload"] = reply
    code, out = run(daemon, capsys, "--dry-run", "reload")
    assert code == 0 and daemon.last("daemon.reload")["params"] == {"dry_run": True}
    assert out.splitlines() == [
        "dry run: built-in defaults (no settings file) read, nothing was changed"
    ]
    code, out = run(daemon, capsys, "-o", "json", "reload")
    assert code == 0 and json.loads(out) == reply


def test_reload_refused_exits_1_with_the_daemons_message(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    message = "settings not reloaded, keeping the current ones: /x.toml: workers: must be ..."
    daemon.replies["daemon.reload"] = RpcError(SETTINGS_INVALID, message)
    code, out = run(daemon, capsys, "reload")
    assert code == 1 and message in out


def test_rel_is_still_relay_and_reload_is_exact(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.replies["relay.del"] = {"relay": {"name": "tv1"}, "dry_run": False}
    code, _ = run(daemon, capsys, "rel", "d", "tv1")
    assert code == 0 and daemon.last("relay.del")["params"]["name"] == "tv1"


def test_reload_without_a_daemon_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["--socket", str(tmp_path / "none.sock"), "reload"])
    assert code == 2
