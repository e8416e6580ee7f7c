"""Settings: defaults, TOML, overrides, error messages, reload rules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mcrelay import config
from mcrelay.config import (
    DEFAULT_CONFIG,
    RELOADABLE,
    RESTART_ONLY,
    SETTING_KEYS,
    Settings,
    admin_gid,
    apply_reload,
    check_startup,
    load_settings,
    reloadable_changes,
    restart_required,
    socket_gid,
)
from mcrelay.errors import ConfigError


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "mcrelay.toml"
    path.write_text(text)
    return str(path)


def test_defaults_without_any_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(config, "DEFAULT_CONFIG", str(tmp_path / "absent.toml"))
    s = load_settings(None, {})
    assert s.socket == "/run/mcrelay/mcrelay.sock"
    assert s.socket_group == "mcrelay"
    assert s.admin_group is None
    assert s.state == "/var/lib/mcrelay/state.json"
    assert s.workers == max(1, min(256, os.cpu_count() or 1))
    assert s.user == "nobody"
    assert s.log_level == "info"
    assert s.metrics_listen is None and s.metrics_address is None
    assert s.learned_expiry == 60
    assert s.max_line == 16 * 1024 * 1024
    assert s.max_connections == 64
    assert s.idle_timeout == 300
    assert s.config_path is None
    assert s == Settings()
    assert DEFAULT_CONFIG == "/etc/mcrelay/mcrelay.toml"


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=f"^{path}: no such file"):
        load_settings(path, {})


def test_every_key_from_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        socket = "/tmp/x/mc.sock"
        socket_group = "netops"
        admin_group = "wheel"
        state = "/srv/mcrelay/state.json"
        workers = 3
        user = "mcrelay-worker"
        log_level = "DEBUG"
        metrics_listen = "[::1]:9108"
        metrics_per_relay = false
        learned_expiry = 120
        max_line = 65536
        max_connections = 8
        idle_timeout = 2.5
        table = 100
        rules = ["/etc/mcrelay/rules.d/*.conf"]
        mrdisc = ["eth+"]
        mrdisc_interval = 30
        """,
    )
    s = load_settings(path, {})
    assert s.to_dict() == {
        "socket": "/tmp/x/mc.sock",
        "socket_group": "netops",
        "admin_group": "wheel",
        "state": "/srv/mcrelay/state.json",
        "workers": 3,
        "user": "mcrelay-worker",
        "log_level": "debug",
        "metrics_listen": "[::1]:9108",
        "metrics_per_relay": False,
        "learned_expiry": 120,
        "max_line": 65536,
        "max_connections": 8,
        "idle_timeout": 2.5,
        "table": 100,
        "rules": ("/etc/mcrelay/rules.d/*.conf",),
        "mrdisc": ("eth+",),
        "mrdisc_interval": 30,
    }
    assert s.metrics_address == ("::1", 9108)
    assert s.config_path == path
    assert set(s.to_dict()) == set(SETTING_KEYS)


def test_overrides_win_and_none_means_not_given(tmp_path: Path) -> None:
    path = write(tmp_path, 'workers = 2\nlog_level = "error"\nstate = "/a/state.json"\n')
    s = load_settings(
        path, {"workers": "5", "log_level": None, "socket": "/run/t.sock", "state": None}
    )
    assert s.workers == 5
    assert s.log_level == "error"
    assert s.socket == "/run/t.sock"
    assert s.state == "/a/state.json"


def test_workers_auto(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, 'workers = "auto"\n'), {})
    assert s.workers == max(1, min(256, os.cpu_count() or 1))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('workers = "x"', 'workers: must be an integer 1-256 or "auto", got "x"'),
        ("workers = 0", "workers: must be an integer 1-256"),
        ("workers = 257", "workers: must be an integer 1-256"),
        ("workers = true", "got true"),
        ("workers = 1.5", "workers: must be an integer 1-256"),
        ('log_level = "verbose"', "log_level: must be one of debug, info, warning, error"),
        ('socket = "relative.sock"', "socket: must be an absolute path"),
        ('socket = "/' + "a" * 120 + '"', "socket: a Unix socket path is at most 107 bytes"),
        ('state = "/var/lib/mcrelay/"', "state: must be a file path, not a directory"),
        ("learned_expiry = 0", "learned_expiry: must be an integer 1-86400 seconds, got 0"),
        ("learned_expiry = 86401", "learned_expiry: must be an integer 1-86400 seconds"),
        ("max_line = 10", "max_line: must be an integer 1024-"),
        ("max_connections = -1", "max_connections: must be an integer 1-65536, got -1"),
        ("idle_timeout = 0", "idle_timeout: must be a number 1-86400 seconds, got 0"),
        ("idle_timeout = nan", "idle_timeout: must be a number"),
        ('metrics_listen = "9108"', 'metrics_listen: must be "HOST:PORT"'),
        ('metrics_listen = "1.2.3.4:0"', "port 1-65535"),
        ('metrics_listen = "::1:9108"', 'IPv6 as "[ADDR]:PORT"'),
        ('user = "bad user"', "user: must be a user name or a numeric id"),
        ('metrics_per_relay = "no"', 'metrics_per_relay: must be true or false, got "no"'),
        ("metrics_per_relay = 1", "metrics_per_relay: must be true or false, got 1"),
        ("socket_group = []", "socket_group: must be a group name or a numeric id, got an array"),
    ],
)
def test_bad_values_name_file_key_and_allowed(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, {})
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert expected in message


def test_exact_message_format(tmp_path: Path) -> None:
    path = write(tmp_path, "learned_expiry = -5\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, {})
    assert str(info.value) == f"{path}: learned_expiry: must be an integer 1-86400 seconds, got -5"


def test_unknown_key_suggests_and_lists_allowed(tmp_path: Path) -> None:
    path = write(tmp_path, "worker = 4\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, {})
    message = str(info.value)
    assert message.startswith(f"{path}: worker: unknown setting (did you mean workers?)")
    for key in SETTING_KEYS:
        assert key in message


def test_tables_are_refused_with_a_hint(tmp_path: Path) -> None:
    path = write(tmp_path, "[daemon]\nworkers = 4\n")
    with pytest.raises(ConfigError, match="no \\[tables\\]"):
        load_settings(path, {})


def test_invalid_toml_names_file(tmp_path: Path) -> None:
    path = write(tmp_path, "workers = = 4\n")
    with pytest.raises(ConfigError, match=f"^{path}: not valid TOML: .*line 1"):
        load_settings(path, {})


def test_bad_override_names_the_option() -> None:
    with pytest.raises(ConfigError, match=r"^--workers: must be an integer 1-256"):
        load_settings(None, {"workers": "many"})
    with pytest.raises(ConfigError, match=r"^--log-level: must be one of"):
        load_settings(None, {"log_level": "loud"})
    with pytest.raises(ConfigError, match=r"^--frobnicate: unknown setting"):
        load_settings(None, {"frobnicate": 1})


def test_empty_optional_strings_mean_none(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, 'admin_group = ""\nmetrics_listen = ""\n'), {})
    assert s.admin_group is None and s.metrics_listen is None


def test_reload_classification_covers_every_key() -> None:
    assert set(SETTING_KEYS) == RELOADABLE | RESTART_ONLY
    assert not RELOADABLE & RESTART_ONLY
    assert {"log_level", "learned_expiry", "admin_group", "idle_timeout"} <= RELOADABLE
    assert {"max_connections", "max_line"} <= RELOADABLE
    assert {"socket", "state", "workers", "user"} <= RESTART_ONLY


def test_restart_required_and_apply_reload() -> None:
    old = Settings(workers=2)
    new = Settings(workers=4, log_level="debug", socket="/run/other.sock", idle_timeout=10)
    assert restart_required(old, new) == ["socket", "workers"]
    assert restart_required(old, old) == []
    merged = apply_reload(old, new)
    assert merged.workers == 2 and merged.socket == old.socket
    assert merged.log_level == "debug" and merged.idle_timeout == 10


def test_reloadable_changes_are_the_applied_keys() -> None:
    old = Settings(workers=2)
    new = Settings(workers=4, log_level="debug", metrics_per_relay=False)
    assert reloadable_changes(old, new) == ["log_level", "metrics_per_relay"]
    assert reloadable_changes(old, old) == []


def test_metrics_per_relay_from_the_command_line_spelling() -> None:
    assert load_settings(None, {"metrics_per_relay": "false"}).metrics_per_relay is False
    assert load_settings(None, {}).metrics_per_relay is True


@pytest.mark.skipif(os.geteuid() != 0, reason="only root changes user: checked only as root")
def test_startup_refuses_a_user_that_does_not_exist(tmp_path: Path) -> None:
    path = write(tmp_path, 'user = "no-such-user-mcrelay"\n')
    with pytest.raises(ConfigError) as info:
        check_startup(load_settings(path, {}))
    assert str(info.value).startswith(f"{path}: user: user 'no-such-user-mcrelay' does not exist")
    with pytest.raises(ConfigError, match=r"^--user: user 'nosuchuser' does not exist"):
        check_startup(load_settings(None, {"user": "nosuchuser"}), {"user": "nosuchuser"})
    with pytest.raises(ConfigError, match=r"^--user: user 'root' is root"):
        check_startup(load_settings(None, {"user": "root"}), {"user": "root"})
    check_startup(load_settings(None, {"user": "nobody"}), {"user": "nobody"})


def test_group_resolution_falls_back_with_a_warning() -> None:
    gid, warning = socket_gid(Settings(socket_group="root"))
    assert (gid, warning) == (0, None)
    gid, warning = socket_gid(Settings(socket_group="no-such-group-mcrelay"))
    assert gid == 0
    assert warning is not None and "does not exist" in warning and "root (0)" in warning
    assert socket_gid(Settings(socket_group="4242")) == (4242, None)
    assert admin_gid(Settings()) == (None, None)
    gid2, warning2 = admin_gid(Settings(admin_group="no-such-group-mcrelay"))
    assert gid2 is None and warning2 is not None and "only root" in warning2


def test_example_config_is_valid_and_matches_defaults(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "packaging" / "mcrelay.toml"
    text = example.read_text()
    for key in SETTING_KEYS:
        assert f"\n# {key} = " in text, f"{key} is not documented in {example}"
    # Uncommenting every setting line gives exactly the defaults.
    uncommented = "\n".join(
        line[2:] if line.startswith("# ") and " = " in line else line for line in text.splitlines()
    )
    path = write(tmp_path, uncommented)
    assert load_settings(path, {}).to_dict() == Settings().to_dict()
    # As shipped (all commented out) it is valid too.
    assert load_settings(str(example), {}).to_dict() == Settings().to_dict()
