"""Exceptions with meaning, shared by every process.

Each error carries a JSON-RPC code and a data dict. The control process turns
them into JSON-RPC error objects and the CLI into messages and exit codes; that
is the one boundary where they change shape. Application codes are documented
in docs/protocol.md.
"""

from __future__ import annotations

import errno as errno_mod
import os
from typing import Any

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

RULE_EXISTS = -32001
NO_SUCH_RULE = -32002
INTERFACE_UNKNOWN = -32003
VIF_TABLE_FULL = -32004
KERNEL_REFUSED = -32005
PERMISSION_DENIED = -32006
STATE_WRITE_FAILED = -32007
LIMIT_EXCEEDED = -32008
UNAVAILABLE = -32009
SETTINGS_INVALID = -32010
RULE_IN_FILE = -32011


class McrelayError(Exception):
    """Base of every error a user may see: a code, a message, structured data."""

    code: int = INTERNAL_ERROR

    def __init__(self, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.data: dict[str, Any] = dict(data or {})

    def to_error(self) -> dict[str, Any]:
        """The JSON-RPC error object for this exception."""
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data:
            err["data"] = self.data
        return err


class InvalidParams(McrelayError):
    """A request field is missing or outside its allowed values."""

    code = INVALID_PARAMS

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}", {"field": field})
        self.field = field
        self.problem = problem


class InvalidRequest(McrelayError):
    """The request is not a JSON-RPC 2.0 request object."""

    code = INVALID_REQUEST


class ParseError(McrelayError):
    """The line is not valid JSON."""

    code = PARSE_ERROR


class MethodNotFound(McrelayError):
    """No such method."""

    code = METHOD_NOT_FOUND

    def __init__(self, method: str, known: list[str]) -> None:
        super().__init__(
            f"unknown method {method!r}; known methods: {', '.join(known)}",
            {"method": method},
        )


class RuleInFile(McrelayError):
    """The rule comes from a rule file: change the file and reload, not the runtime rules."""

    code = RULE_IN_FILE

    def __init__(self, rule: str, where: str) -> None:
        super().__init__(
            f"{rule} is defined in {where}; edit that file and run 'mcrelay reload'",
            {"rule": rule, "file": where},
        )


class RuleExists(McrelayError):
    """A rule with the same identity is already installed."""

    code = RULE_EXISTS

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} already exists", {"rule": what})


class NoSuchRule(McrelayError):
    """The rule named in a delete or trace does not exist."""

    code = NO_SUCH_RULE

    def __init__(self, what: str) -> None:
        super().__init__(f"no such rule: {what}", {"rule": what})


class InterfaceUnknown(McrelayError):
    """The operation needs an interface that does not exist right now."""

    code = INTERFACE_UNKNOWN

    def __init__(self, name: str) -> None:
        super().__init__(f"interface {name!r} does not exist", {"interface": name})


class VifTableFull(McrelayError):
    """The kernel has 32 VIF (IPv4) / MIF (IPv6) slots and all are in use."""

    code = VIF_TABLE_FULL

    def __init__(self, family: int, interface: str) -> None:
        kind = "VIF" if family == 4 else "MIF"
        super().__init__(
            f"the IPv{family} {kind} table is full (32 interfaces): "
            f"cannot add interface {interface!r}; delete routes using other interfaces first",
            {"family": family, "interface": interface, "limit": 32},
        )


class KernelRefused(McrelayError):
    """A kernel call failed; everything applied before it was rolled back."""

    code = KERNEL_REFUSED

    def __init__(self, op: str, errno: int, detail: str = "") -> None:
        name = errno_mod.errorcode.get(errno, str(errno))
        text = f"kernel refused {op}: {name} ({os.strerror(errno)})"
        if detail:
            text += f": {detail}"
        super().__init__(text, {"op": op, "errno": errno, "errno_name": name})
        self.errno = errno


class PermissionDenied(McrelayError):
    """The peer may not call this method."""

    code = PERMISSION_DENIED


class StateWriteFailed(McrelayError):
    """The state file could not be written; the change was rolled back."""

    code = STATE_WRITE_FAILED


class LimitExceeded(McrelayError):
    """A size or count limit was hit."""

    code = LIMIT_EXCEEDED


class Unavailable(McrelayError):
    """The daemon cannot serve the request right now (starting, stopping)."""

    code = UNAVAILABLE


class SettingsInvalid(McrelayError):
    """A reload found the settings file unreadable or invalid; the old settings stay."""

    code = SETTINGS_INVALID


class StateFileError(Exception):
    """The state file is corrupt, unreadable or of an unknown version.

    Not a McrelayError: it stops the daemon at start and is never sent to a client.
    """


class ConfigError(Exception):
    """The settings file has an unknown key or a bad value (names file, key, allowed)."""
