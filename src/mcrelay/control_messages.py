"""Messages between the supervisor and the control process."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .ipc import message


@message
@dataclass(frozen=True)
class Call:
    """A validated request: the method and its normalised parameters, with the peer's uid."""

    seq: int
    method: str
    params: dict[str, Any]
    uid: int


@message
@dataclass(frozen=True)
class Reply:
    """The answer to a Call: exactly one of result / error is set."""

    seq: int
    result: Any = None
    error: dict[str, Any] | None = None


@message
@dataclass(frozen=True)
class ControlSettings:
    """The limits and access rules the control process enforces (re-sent on SIGHUP)."""

    socket_gid: int
    admin_gid: int | None
    max_line: int
    max_connections: int
    idle_timeout: float
    log_level: str
