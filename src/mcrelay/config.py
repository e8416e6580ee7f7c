"""Daemon settings: a small flat TOML file, command-line overrides, defaults.

The file (``/etc/mcrelay/mcrelay.toml`` unless ``--config`` names another) holds
flat top-level keys, no tables, because there is one daemon and a dozen knobs;
``packaging/mcrelay.toml`` lists every key with its default. Every key is
optional: without a file the defaults work. A missing *default* file therefore
means "all defaults", while a missing file named with ``--config`` is an error
(the operator asked for that file; silently ignoring a typo in its name would
run the router with settings nobody chose).

Validation is strict and happens here, once: an unknown key or a bad value
raises :class:`ConfigError` naming the file, the key and what is allowed, e.g.
``/etc/mcrelay/mcrelay.toml: workers: must be an integer 1-256, got "x"``.

Group names (``socket_group``, ``admin_group``) are *not* resolved at load time:
the Debian package creates the ``mcrelay`` group after the file may have been
written, and a reload should see a group created since start. Resolve them
with :func:`socket_gid` / :func:`admin_gid`, which return a warning for the
caller to log instead of failing.

SIGHUP re-reads the file; :data:`RELOADABLE` settings take effect at once, the
others (:data:`RESTART_ONLY`) need a restart and :func:`restart_required` lists
those that changed so the daemon can say so.
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ConfigError
from .privileges import PrivilegeDropFailed, resolve_group, resolve_user

DEFAULT_CONFIG = "/etc/mcrelay/mcrelay.toml"
DEFAULT_SOCKET = "/run/mcrelay/mcrelay.sock"
DEFAULT_SOCKET_GROUP = "mcrelay"
DEFAULT_STATE = "/var/lib/mcrelay/state.json"
DEFAULT_USER = "nobody"
DEFAULT_LOG_LEVEL = "info"
DEFAULT_LEARNED_EXPIRY = 60
DEFAULT_MAX_LINE = 16 * 1024 * 1024
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_IDLE_TIMEOUT = 300
DEFAULT_MRDISC_INTERVAL = 20  # RFC 4286 MRD advertisement interval, seconds
MAX_TABLE = 2**32 - 1

MAX_WORKERS = 256
LOG_LEVELS = ("debug", "info", "warning", "error")
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107

#: Settings SIGHUP applies at run time.
RELOADABLE: frozenset[str] = frozenset(
    {
        "log_level",
        "learned_expiry",
        "admin_group",
        "idle_timeout",
        "max_connections",
        "max_line",
        "metrics_per_relay",
        "rules",
        "mrdisc",
        "mrdisc_interval",
    }
)
#: Settings that only take effect when the daemon restarts (sockets bound,
#: processes forked, privileges dropped at start).
RESTART_ONLY: frozenset[str] = frozenset(
    {"socket", "socket_group", "state", "workers", "user", "metrics_listen", "table"}
)


def _default_workers() -> int:
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


@dataclass(frozen=True)
class Settings:
    """Validated daemon settings; build with :func:`load_settings`.

    ``config_path`` is the file the settings came from (None: no file, all
    defaults); it is informational and not itself a setting.
    """

    socket: str = DEFAULT_SOCKET
    socket_group: str = DEFAULT_SOCKET_GROUP
    admin_group: str | None = None
    state: str = DEFAULT_STATE
    workers: int = field(default_factory=_default_workers)
    user: str = DEFAULT_USER
    log_level: str = DEFAULT_LOG_LEVEL
    metrics_listen: str | None = None
    metrics_per_relay: bool = True
    learned_expiry: int = DEFAULT_LEARNED_EXPIRY
    max_line: int = DEFAULT_MAX_LINE
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    table: int = 0
    rules: tuple[str, ...] = ()
    mrdisc: tuple[str, ...] = ()
    mrdisc_interval: int = DEFAULT_MRDISC_INTERVAL
    config_path: str | None = None

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """``metrics_listen`` split into (host, port) for bind(); None if disabled."""
        if self.metrics_listen is None:
            return None
        host, _, port = self.metrics_listen.rpartition(":")
        return host.strip("[]"), int(port)

    def to_dict(self) -> dict[str, Any]:
        """Every setting by its key (for `daemon.status` and debug logs)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "config_path"}


SETTING_KEYS: tuple[str, ...] = tuple(f.name for f in fields(Settings) if f.name != "config_path")


# ---------------------------------------------------------------- value checks


class _Bad(Exception):
    """A value problem; the caller adds the file and key."""


def _show(value: Any) -> str:
    """A value spelled the way it was written in TOML (strings quoted)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, dict):
        text = "a table"
    elif isinstance(value, list):
        text = "an array"
    else:
        text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(value: Any, low: int, high: int, unit: str = "") -> int:
    """An integer in [low, high]; a string of digits is accepted (CLI, quoted TOML)."""
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _Bad(f"must be an integer {low}-{high}{unit}, got {_show(value)}")
    return value


def _number(value: Any, low: float, high: float, unit: str = "") -> float:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value.strip())
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not low <= value <= high  # also refuses NaN
    ):
        raise _Bad(f"must be a number {low:g}-{high:g}{unit}, got {_show(value)}")
    return float(value)


def _abs_path(value: Any, limit: int | None = None) -> str:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise _Bad(f"must be an absolute path (starting with /), got {_show(value)}")
    if limit is not None and len(value.encode()) > limit:
        raise _Bad(f"a Unix socket path is at most {limit} bytes, got {len(value.encode())}")
    return value


_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\$?$")


def _account(value: Any, what: str) -> str:
    """A user or group name (or a numeric id), as getpwnam/getgrnam accept."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return str(value)
    if not isinstance(value, str) or not _NAME_RE.match(value) or len(value) > 32:
        raise _Bad(f"must be a {what} name or a numeric id, got {_show(value)}")
    return value


def _socket(value: Any) -> str:
    return _abs_path(value, MAX_SOCKET_PATH)


def _socket_group(value: Any) -> str:
    return _account(value, "group")


def _admin_group(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return _account(value, "group")


def _state(value: Any) -> str:
    path = _abs_path(value)
    if path.endswith("/"):
        raise _Bad(f"must be a file path, not a directory, got {_show(value)}")
    return path


def _workers(value: Any) -> int:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return _default_workers()
    try:
        return _int(value, 1, MAX_WORKERS)
    except _Bad:
        raise _Bad(f'must be an integer 1-{MAX_WORKERS} or "auto", got {_show(value)}') from None


def _user(value: Any) -> str:
    return _account(value, "user")


def _log_level(value: Any) -> str:
    if isinstance(value, str):
        level = value.strip().lower()
        level = {"warn": "warning", "err": "error"}.get(level, level)
        if level in LOG_LEVELS:
            return level
    raise _Bad(f"must be one of {', '.join(LOG_LEVELS)}, got {_show(value)}")


_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")


def _metrics_listen(value: Any) -> str | None:
    if value is None or value == "":
        return None
    allowed = 'must be "HOST:PORT" (IPv6 as "[ADDR]:PORT"), e.g. "127.0.0.1:9108"'
    if not isinstance(value, str):
        raise _Bad(f"{allowed}, got {_show(value)}")
    host, colon, port = value.strip().rpartition(":")
    if not colon or not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise _Bad(f"{allowed}, port 1-65535, got {_show(value)}")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise _Bad(f"{allowed}, got {_show(value)}") from None
    elif ":" in host or not _HOST_RE.match(host):
        raise _Bad(f"{allowed}, got {_show(value)}")
    return f"{host}:{int(port)}"


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _Bad(f"must be true or false, got {_show(value)}")


def _table(value: Any) -> int:
    return _int(value, 0, MAX_TABLE, " (0: the kernel's default table)")


def _string_list(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _Bad(f"must be an array of {what}, got {_show(value)}")
    return tuple(value)


def _rules(value: Any) -> tuple[str, ...]:
    globs = _string_list(value, "file paths or globs")
    for g in globs:
        if not os.path.isabs(g):
            raise _Bad(f"must be absolute paths, got {_show(g)}")
    return globs


def _mrdisc(value: Any) -> tuple[str, ...]:
    names = _string_list(value, "interface names (eth+ for every eth*)")
    for n in names:
        if len(n.encode()) > 15 or "/" in n or any(c.isspace() for c in n):
            raise _Bad(f"{_show(n)} is not an interface name")
    return names


def _mrdisc_interval(value: Any) -> int:
    return _int(value, 4, 180, " seconds (RFC 4286)")


def _learned_expiry(value: Any) -> int:
    return _int(value, 1, 86400, " seconds")


def _max_line(value: Any) -> int:
    return _int(value, 1024, 1024 * 1024 * 1024, " bytes")


def _max_connections(value: Any) -> int:
    return _int(value, 1, 65536)


def _idle_timeout(value: Any) -> float:
    return _number(value, 1, 86400, " seconds")


_CHECKS: dict[str, Callable[[Any], Any]] = {
    "socket": _socket,
    "socket_group": _socket_group,
    "admin_group": _admin_group,
    "state": _state,
    "workers": _workers,
    "user": _user,
    "log_level": _log_level,
    "metrics_listen": _metrics_listen,
    "metrics_per_relay": _bool,
    "learned_expiry": _learned_expiry,
    "max_line": _max_line,
    "max_connections": _max_connections,
    "idle_timeout": _idle_timeout,
    "table": _table,
    "rules": _rules,
    "mrdisc": _mrdisc,
    "mrdisc_interval": _mrdisc_interval,
}
assert set(_CHECKS) == set(SETTING_KEYS)


# ---------------------------------------------------------------- loading


def _read_file(path: str, explicit: bool) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{path}: no such file (named with --config)") from None
        return None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a TOML file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def _unknown_key(where: str, key: str, value: Any) -> ConfigError:
    hint = ""
    close = difflib.get_close_matches(key, SETTING_KEYS, n=1)
    if close:
        hint = f" (did you mean {close[0]}?)"
    elif isinstance(value, dict):
        hint = " (settings are flat top-level keys; there are no [tables])"
    return ConfigError(
        f"{where}: {key}: unknown setting{hint}; allowed: {', '.join(sorted(SETTING_KEYS))}"
    )


def load_settings(path: str | None, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Settings from ``path`` (None: the default file, if present) plus overrides.

    ``overrides`` holds command-line values by setting key (``socket``,
    ``state``, ``workers``, ``user``, ``log_level``...); None values mean "not
    given" and are skipped, so an argparse namespace can be passed as a dict.
    Overrides win over the file. Raises :class:`ConfigError`.
    """
    explicit = path is not None
    file_path = path if path is not None else DEFAULT_CONFIG
    data = _read_file(file_path, explicit)
    values: dict[str, Any] = {}
    if data is not None:
        for key, value in data.items():
            if key not in _CHECKS:
                raise _unknown_key(file_path, key, value)
            try:
                values[key] = _CHECKS[key](value)
            except _Bad as e:
                raise ConfigError(f"{file_path}: {key}: {e}") from None
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        option = "--" + key.replace("_", "-")
        if key not in _CHECKS:
            raise ConfigError(
                f"{option}: unknown setting; allowed: {', '.join(sorted(SETTING_KEYS))}"
            )
        try:
            values[key] = _CHECKS[key](value)
        except _Bad as e:
            raise ConfigError(f"{option}: {e}") from None
    return Settings(**values, config_path=file_path if data is not None else None)


# ---------------------------------------------------------------- reload and groups


def changed(old: Settings, new: Settings) -> list[str]:
    """Keys whose value differs between two settings, in a stable order."""
    return [k for k in SETTING_KEYS if getattr(old, k) != getattr(new, k)]


def restart_required(old: Settings, new: Settings) -> list[str]:
    """Changed keys SIGHUP cannot apply; the daemon keeps the old values for them
    and logs e.g. ``workers changed in the file; restart mcrelayd to apply it``."""
    return [k for k in changed(old, new) if k in RESTART_ONLY]


def reloadable_changes(old: Settings, new: Settings) -> list[str]:
    """Changed keys SIGHUP applies at once."""
    return [k for k in changed(old, new) if k in RELOADABLE]


def apply_reload(old: Settings, new: Settings) -> Settings:
    """The settings to run with after SIGHUP: ``new`` for reloadable keys,
    ``old`` for everything that needs a restart."""
    keep = {k: getattr(old, k) for k in RESTART_ONLY}
    return Settings(**{**new.to_dict(), **keep}, config_path=new.config_path)


def check_startup(settings: Settings, overrides: Mapping[str, Any] | None = None) -> None:
    """Refuse, before anything starts, settings only a child process would trip on.

    The control process and the relay workers drop to ``user`` after they
    start: an account that does not exist (or is root) would otherwise make
    them exit at once, over and over, while the daemon had already said
    ready. Raises :class:`ConfigError` naming the key and where it was set.
    Only checked when running as root: an unprivileged daemon (tests) never
    changes user.
    """
    if os.geteuid() != 0:
        return
    given = (overrides or {}).get("user") is not None
    where = "--user" if given else f"{settings.config_path or 'default'}: user"
    try:
        uid, _ = resolve_user(settings.user)
    except PrivilegeDropFailed:
        raise ConfigError(
            f"{where}: user {settings.user!r} does not exist; the control process and the "
            "relay workers run as this account: create it (adduser --system) or set 'user' "
            "to an existing unprivileged account"
        ) from None
    if uid == 0:
        raise ConfigError(
            f"{where}: user {settings.user!r} is root; the control process and the relay "
            "workers must run as an unprivileged account"
        )


def socket_gid(settings: Settings) -> tuple[int, str | None]:
    """The gid to give the control socket, and a warning to log if the
    configured group does not exist (then root's group 0: only root can connect)."""
    gid = resolve_group(settings.socket_group)
    if gid is not None:
        return gid, None
    return 0, (
        f"socket_group: group {settings.socket_group!r} does not exist; the control socket "
        f"{settings.socket} gets group root (0), so only root can use mcrelay. Create it "
        f"with 'addgroup --system {settings.socket_group}' and restart mcrelayd"
    )


def admin_gid(settings: Settings) -> tuple[int | None, str | None]:
    """The gid allowed to change rules (None: root only), and a warning to log
    if the configured admin group does not exist (then root only, never wider)."""
    if settings.admin_group is None:
        return None, None
    gid = resolve_group(settings.admin_group)
    if gid is not None:
        return gid, None
    return None, (
        f"admin_group: group {settings.admin_group!r} does not exist; only root may change rules"
    )
