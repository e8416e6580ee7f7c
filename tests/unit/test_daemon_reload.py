"""`daemon.reload` / SIGHUP in the supervisor: what changed, sd_notify around it, failures."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from mcrelay import protocol
from mcrelay.config import load_settings
from mcrelay.errors import SETTINGS_INVALID, InvalidParams, McrelayError, SettingsInvalid
from mcrelay.model import RuleSet
from mcrelay.service import RuleService
from mcrelay.supervisor import Supervisor


@pytest.fixture
def notify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """What systemd would hear: NOTIFY_SOCKET points at this datagram socket."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(1)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield sock
    sock.close()


def heard(sock: socket.socket) -> list[str]:
    out = []
    sock.setblocking(False)
    try:
        while True:
            out += [line.split("=")[0] for line in sock.recv(4096).decode().splitlines()]
    except BlockingIOError:
        pass
    return [k for k in out if k in ("RELOADING", "READY")]


def supervisor(path: Path) -> Supervisor:
    sup = Supervisor(load_settings(str(path), {}), str(path), {})
    empty = {"added": [], "removed": [], "changed": []}
    diff = {"routes": empty, "relays": empty, "groups": empty}
    sup.service = cast(
        Any, SimpleNamespace(rules=RuleSet(), load_files=lambda files, dry_run=False: diff)
    )
    return sup


def test_reload_applies_what_it_can_and_names_what_needs_a_restart(
    tmp_path: Path, notify: socket.socket
) -> None:
    path = tmp_path / "mcrelay.toml"
    path.write_text('log_level = "info"\nworkers = 1\n')
    sup = supervisor(path)
    answer = sup.reload()
    assert {k: answer[k] for k in ("dry_run", "config", "changed", "restart_required")} == {
        "dry_run": False,
        "config": str(path),
        "changed": [],
        "restart_required": [],
    }
    assert answer["rule_files"] == []  # no `rules` setting: no rule files
    path.write_text('log_level = "debug"\nworkers = 3\nmetrics_per_relay = false\n')
    assert sup.reload(dry_run=True)["changed"] == ["log_level", "metrics_per_relay"]
    assert sup.settings.log_level == "info"  # a dry run changes nothing
    heard(notify)
    answer = sup.reload()
    assert answer["changed"] == ["log_level", "metrics_per_relay"]
    assert answer["restart_required"] == ["workers"]
    assert sup.settings.log_level == "debug" and sup.settings.workers == 1
    assert logging.getLogger().level == logging.DEBUG
    assert heard(notify) == ["RELOADING", "READY"]
    logging.getLogger().setLevel(logging.WARNING)


def test_a_bad_file_keeps_the_old_settings_and_says_why(
    tmp_path: Path, notify: socket.socket
) -> None:
    path = tmp_path / "mcrelay.toml"
    path.write_text("workers = 1\n")
    sup = supervisor(path)
    path.write_text("workers = 0\n")
    heard(notify)
    with pytest.raises(SettingsInvalid) as info:
        sup.reload()
    assert info.value.code == SETTINGS_INVALID
    assert str(path) in info.value.message and "workers" in info.value.message
    assert heard(notify) == ["RELOADING", "READY"]  # systemd is never left waiting
    sup._reload()  # SIGHUP: the same failure, only logged


def test_reload_steps_run_in_order_and_merge_their_answers(tmp_path: Path) -> None:
    path = tmp_path / "mcrelay.toml"
    path.write_text("")
    sup = supervisor(path)
    ran: list[str] = []

    def rules(origin: str, dry_run: bool) -> dict[str, Any]:
        ran.append(origin)
        return {"rules": "re-applied"}

    sup._reload_steps = lambda: [sup._reload_settings, rules]  # type: ignore[method-assign]
    answer = sup.reload("SIGHUP")
    assert ran == ["SIGHUP"] and answer["rules"] == "re-applied" and "changed" in answer


def test_daemon_reload_is_an_admin_method_taking_only_dry_run() -> None:
    assert protocol.METHODS["daemon.reload"].access == "admin"
    assert protocol.parse_command("daemon.reload", {"dry_run": True}).dry_run
    with pytest.raises(InvalidParams, match="takes only dry_run"):
        protocol.parse_command("daemon.reload", {"force": True})


def test_the_service_hands_the_reload_to_the_supervisor() -> None:
    calls: list[bool] = []

    def reload(dry_run: bool = False) -> dict[str, Any]:
        calls.append(dry_run)
        return {"changed": []}

    none = cast(Any, None)
    service = RuleService(none, none, none, none, reload=reload)
    assert service.execute(protocol.Command("daemon.reload", True)) == {"changed": []}
    assert calls == [True]
    with pytest.raises(McrelayError, match="cannot reload"):
        RuleService(none, none, none, none).execute(protocol.Command("daemon.reload"))
