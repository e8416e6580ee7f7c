"""Daemon settings on a real daemon: defaults, strict errors, SIGHUP without packet loss."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from mcrelay.lab import StandardLab
from mcrelay.lab.daemon import DaemonError, DaemonProcess

SRC4 = "192.0.2.2"
PORT = 5000


def test_without_any_settings_file_the_defaults_work(lab: StandardLab) -> None:
    # No --config, and /etc/mcrelay/mcrelay.toml is hidden by an empty tmpfs in the
    # daemon's private mount namespace (the machine's /etc is not touched).
    hide_etc = (
        "sh",
        "-c",
        'if [ -d /etc/mcrelay ]; then mount -t tmpfs none /etc/mcrelay; fi; exec "$@"',
        "sh",
    )
    with DaemonProcess(lab, "router", wrapper=hide_etc) as d:
        d.start()
        status = d.cli_json("status")
        assert status["socket"] == d.socket and status["state_file"] == d.state
        d.cli("route", "add", "up0", SRC4, "239.1.1.1", "dn1", check=True)
        assert "ERROR" not in d.log() and "CRITICAL" not in d.log()


BAD_SETTINGS = {
    "unknown-key": (
        'sokcet_group = "mcrelay"\n',
        ["sokcet_group", "unknown setting", "socket_group"],
    ),
    "a-table": ("[daemon]\nworkers = 2\n", ["daemon", "unknown setting"]),
    "bad-workers": ('workers = "many"\n', ["workers", "1-256", '"many"']),
    "bad-log-level": ('log_level = "loud"\n', ["log_level", "debug, info, warning, error"]),
    "bad-idle": ("idle_timeout = -5\n", ["idle_timeout", "1-86400"]),
    "relative-state": ('state = "state.json"\n', ["state", "absolute path"]),
    "not-toml": ("workers = = 2\n", ["not valid TOML"]),
}


@pytest.mark.parametrize("case", sorted(BAD_SETTINGS))
def test_a_bad_settings_file_is_an_error_naming_the_file_the_key_and_what_is_allowed(
    lab: StandardLab, case: str
) -> None:
    text, expected = BAD_SETTINGS[case]
    with DaemonProcess(lab, "router", config=text) as d:
        with pytest.raises(DaemonError, match="exited with 1"):
            d.start(timeout=15)
        log = d.log()
        assert d.config is not None and d.config in log, log
        for part in expected:
            assert part in log, (part, log)
        assert "Traceback" not in log
        assert not Path(d.socket).exists()


def test_a_missing_config_file_named_on_the_command_line_is_an_error(lab: StandardLab) -> None:
    with DaemonProcess(lab, "router", args=("--config", "/nonexistent/mcrelay.toml")) as d:
        with pytest.raises(DaemonError, match="exited with 1"):
            d.start(timeout=15)
        assert "/nonexistent/mcrelay.toml: no such file" in d.log()


def test_settings_from_the_file_are_used(lab: StandardLab) -> None:
    config = 'max_line = 2048\nsocket_group = "nogroup"\n'
    with DaemonProcess(lab, "router", config=config) as d:
        d.start()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(d.socket)
            s.sendall(b"x" * 3000 + b"\n")
            assert b"longer than 2048 bytes" in s.recv(65536)


def long_line_refused(d: DaemonProcess, size: int) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(d.socket)
        line = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "daemon.status"}).encode()
        s.sendall(line + b" " * (size - len(line)) + b"\n")
        return b"longer than" in s.recv(65536)


def test_sighup_rereads_settings_without_losing_a_packet_on_existing_routes(
    lab: StandardLab,
) -> None:
    with DaemonProcess(lab, "router", config="max_line = 1048576\n") as d:
        d.start()
        d.cli("route", "add", "up0", SRC4, "239.1.1.2", "dn1", check=True)
        d.cli("route", "add", "up0", "239.1.1.3", "dn2", check=True)
        lab.probe_until_forwarded("src", "239.1.1.2", PORT, "veth0", "rcv1", "veth0", timeout=10)
        lab.probe_until_forwarded("src", "239.1.1.3", PORT, "veth0", "rcv2", "veth0", timeout=10)
        assert not long_line_refused(d, 4000)

        assert d.config is not None
        Path(d.config).write_text('max_line = 1024\nlog_level = "info"\n')
        count = 3000  # 3 s at 1000/s, with five reloads in the middle
        r1 = lab.receiver("rcv1", "239.1.1.2", PORT, "veth0", count=count, duration=10, idle=2)
        r2 = lab.receiver("rcv2", "239.1.1.3", PORT, "veth0", count=count, duration=10, idle=2)
        senders = [
            threading.Thread(
                target=lab.send,
                args=("src", group, PORT),
                kwargs={"iface": "veth0", "count": count, "ttl": 8, "rate": 1000},
            )
            for group in ("239.1.1.2", "239.1.1.3")
        ]
        for t in senders:
            t.start()
        for _ in range(5):
            time.sleep(0.4)
            d.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        for t in senders:
            t.join(20)
        got1, got2 = r1.result(), r2.result()

        assert got1.count == count and got1.intact == count, "no packet lost on the (S,G) route"
        assert got2.count == count and got2.intact == count, "no packet lost on the (*,G) route"
        assert d.log().count("SIGHUP: settings re-read") >= 5
        assert long_line_refused(d, 4000), "the new max_line applies after SIGHUP"
        assert d.cli_json("status")["routes"] == 2
        assert d.proc is not None and d.proc.poll() is None


def test_sighup_with_a_broken_file_keeps_the_running_settings(lab: StandardLab) -> None:
    with DaemonProcess(lab, "router", config="max_line = 2048\n") as d:
        d.start()
        d.cli("route", "add", "up0", SRC4, "239.1.1.4", "dn1", check=True)
        assert d.config is not None
        Path(d.config).write_text("max_line = 1\nbogus = true\n")
        d.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        deadline = time.monotonic() + 10
        while "settings not reloaded" not in d.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        log = d.log()
        assert "settings not reloaded" in log and d.config in log and "max_line" in log
        assert long_line_refused(d, 3000) and not long_line_refused(d, 1500)
        assert d.cli_json("status")["routes"] == 1
