"""The JSON-RPC 2.0 control protocol: methods, their parameters, typed commands.

The control process parses each request line into a :class:`Command` here; the
supervisor receives it re-encoded as normalised parameters and parses it with
the same code, so both sides agree on one definition of every method.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidParams, InvalidRequest, MethodNotFound, ParseError
from .model import (
    GroupJoin,
    Relay,
    Route,
    RouteKey,
    RuleSet,
    check_int,
    check_name,
    parse_group_join,
    parse_relay,
    parse_route,
    parse_route_key,
    parse_ruleset,
)

JSONRPC = "2.0"
MAX_DEPTH = 32


@dataclass(frozen=True)
class Request:
    """One parsed request line. id None means a notification (no reply)."""

    id: int | str | None
    method: str
    params: Mapping[str, Any]
    is_notification: bool = False


@dataclass(frozen=True)
class Command:
    """A validated method call, ready for the supervisor."""

    method: str
    dry_run: bool = False

    def params(self) -> dict[str, Any]:
        """Normalised parameters: parsing them again yields an equal command."""
        return {"dry_run": self.dry_run} if self.dry_run else {}


@dataclass(frozen=True)
class RouteCommand(Command):
    route: Route | None = None

    def params(self) -> dict[str, Any]:
        assert self.route is not None
        return {**self.route.to_dict(), **super().params()}


@dataclass(frozen=True)
class RouteKeyCommand(Command):
    key: RouteKey | None = None

    def params(self) -> dict[str, Any]:
        assert self.key is not None
        return {**self.key.to_dict(), **super().params()}


@dataclass(frozen=True)
class RelayCommand(Command):
    relay: Relay | None = None

    def params(self) -> dict[str, Any]:
        assert self.relay is not None
        return {**self.relay.to_dict(), **super().params()}


@dataclass(frozen=True)
class NameCommand(Command):
    name: str = ""
    cursor: int = 0

    def params(self) -> dict[str, Any]:
        p: dict[str, Any] = {"name": self.name, **super().params()}
        if self.method == "trace.read":
            p["cursor"] = self.cursor
        return p


@dataclass(frozen=True)
class GroupCommand(Command):
    join: GroupJoin | None = None

    def params(self) -> dict[str, Any]:
        assert self.join is not None
        return {**self.join.to_dict(), **super().params()}


@dataclass(frozen=True)
class ApplyCommand(Command):
    rules: RuleSet = field(default_factory=RuleSet)

    def params(self) -> dict[str, Any]:
        return {"rules": self.rules.to_dict(), **super().params()}


Parser = Callable[[str, dict[str, Any]], Command]


@dataclass(frozen=True)
class MethodSpec:
    """A method: who may call it and how its parameters are read."""

    name: str
    access: str  # "read" (socket group) or "admin" (root / admin group)
    parse: Parser
    summary: str


def _dry_run(params: dict[str, Any]) -> bool:
    value = params.pop("dry_run", False)
    if not isinstance(value, bool):
        raise InvalidParams("dry_run", f"must be true or false, got {value!r}")
    return value


def _no_params(method: str, params: dict[str, Any]) -> Command:
    if params:
        raise InvalidParams(next(iter(params)), f"{method} takes no parameters")
    return Command(method)


def _dry_only(method: str, params: dict[str, Any]) -> Command:
    dry = _dry_run(params)
    if params:
        raise InvalidParams(next(iter(params)), f"{method} takes only dry_run")
    return Command(method, dry)


def _route(method: str, params: dict[str, Any]) -> Command:
    dry = _dry_run(params)
    return RouteCommand(method, dry, route=parse_route(params))


def _route_key(method: str, params: dict[str, Any]) -> Command:
    dry = _dry_run(params)
    params.pop("oifs", None)  # tolerated: `del` may be given the whole route
    extra = set(params) - {"iif", "source", "group"}
    if extra:
        raise InvalidParams(sorted(extra)[0], "unknown field; allowed: iif, source, group")
    return RouteKeyCommand(method, dry, key=parse_route_key(params))


def _relay(method: str, params: dict[str, Any]) -> Command:
    dry = _dry_run(params)
    return RelayCommand(method, dry, relay=parse_relay(params))


def _name(method: str, params: dict[str, Any]) -> Command:
    dry = _dry_run(params)
    cursor = 0
    if method == "trace.read":
        cursor = check_int(params.pop("cursor", 0), "cursor", 0, 2**62)
    extra = set(params) - {"name"}
    if extra:
        raise InvalidParams(sorted(extra)[0], "unknown field; allowed: name")
    return NameCommand(method, dry, name=check_name(params.get("name"), "name"), cursor=cursor)


def _group(method: str, params: dict[str, Any]) -> Command:
    dry = _dry_run(params)
    return GroupCommand(method, dry, join=parse_group_join(params))


def _apply(method: str, params: dict[str, Any]) -> Command:
    dry = _dry_run(params)
    extra = set(params) - {"rules"}
    if extra:
        raise InvalidParams(sorted(extra)[0], "unknown field; allowed: rules, dry_run")
    return ApplyCommand(method, dry, rules=parse_ruleset(params.get("rules"), "rules"))


_SPECS = [
    MethodSpec("route.add", "admin", _route, "add a kernel route"),
    MethodSpec("route.del", "admin", _route_key, "delete a kernel route"),
    MethodSpec("route.list", "read", _no_params, "list kernel routes with counters"),
    MethodSpec("relay.add", "admin", _relay, "add a relay"),
    MethodSpec("relay.del", "admin", _name, "delete a relay"),
    MethodSpec("relay.list", "read", _no_params, "list relays with counters"),
    MethodSpec("group.join", "admin", _group, "hold an IGMP/MLD membership"),
    MethodSpec("group.leave", "admin", _group, "drop a membership"),
    MethodSpec("group.list", "read", _no_params, "list memberships"),
    MethodSpec("interface.list", "read", _no_params, "list interfaces and VIFs"),
    MethodSpec("worker.list", "read", _no_params, "list relay workers"),
    MethodSpec("stats.get", "read", _no_params, "all counters"),
    MethodSpec("trace.start", "admin", _name, "start tracing a relay"),
    MethodSpec("trace.stop", "admin", _name, "stop tracing a relay"),
    MethodSpec("trace.read", "admin", _name, "read trace records after a cursor"),
    MethodSpec("config.apply", "admin", _apply, "replace the whole rule set"),
    MethodSpec("config.export", "read", _no_params, "the whole rule set"),
    MethodSpec("daemon.status", "read", _no_params, "daemon health and summary"),
    MethodSpec("daemon.reload", "admin", _dry_only, "re-read the settings; what changed"),
]
METHODS: dict[str, MethodSpec] = {s.name: s for s in _SPECS}


def _depth(obj: Any, limit: int) -> int:
    stack = [(obj, 1)]
    deepest = 0
    while stack:
        item, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((v, d + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, d + 1) for v in item)
    return deepest


def parse_request(line: bytes | str) -> Request:
    """Parse one line into a Request; raises ParseError/InvalidRequest (id in .data)."""
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise ParseError(f"parse error: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise InvalidRequest("invalid request: expected a JSON object")
    rid = obj.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, int | str)):
        raise InvalidRequest("invalid request: id must be a string, a number or null")
    if isinstance(rid, str) and len(rid) > 256:
        raise InvalidRequest("invalid request: id longer than 256 characters")
    if obj.get("jsonrpc") != JSONRPC:
        raise InvalidRequest('invalid request: "jsonrpc" must be "2.0"', {"id": rid})
    method = obj.get("method")
    if not isinstance(method, str):
        raise InvalidRequest('invalid request: "method" must be a string', {"id": rid})
    params = obj.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise InvalidRequest(
            'invalid request: "params" must be an object (by-name parameters)', {"id": rid}
        )
    if _depth(params, MAX_DEPTH) > MAX_DEPTH:
        raise InvalidRequest(f"invalid request: params nested deeper than {MAX_DEPTH}", {"id": rid})
    return Request(rid, method, params, is_notification="id" not in obj)


def parse_command(method: str, params: Mapping[str, Any]) -> Command:
    """Validate a method call into a typed Command (raises MethodNotFound/InvalidParams)."""
    spec = METHODS.get(method)
    if spec is None:
        raise MethodNotFound(method, sorted(METHODS))
    return spec.parse(method, dict(params))


def response(rid: int | str | None, result: Any) -> dict[str, Any]:
    return {"jsonrpc": JSONRPC, "id": rid, "result": result}


def error_response(rid: int | str | None, error: Mapping[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": JSONRPC, "id": rid, "error": dict(error)}


def encode_line(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=False).encode() + b"\n"
