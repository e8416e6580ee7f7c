"""Fuzzing the protocol layer in-process: whatever a client sends, parsing fails cleanly.

The control process turns request lines into typed commands with
``protocol.parse_request`` and ``protocol.parse_command``; the supervisor
re-parses the normalised parameters of every accepted command. These
properties must hold for any input:

* parsing returns a value or raises a :class:`McrelayError` subclass, whose
  JSON-RPC error object is JSON-serialisable; never another exception;
* an accepted command's normalised parameters parse again to the same command
  (the supervisor and the control process agree on what was asked).

Fast (pure Python, no sockets): a few thousand examples in a few seconds.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcrelay.errors import McrelayError
from mcrelay.protocol import METHODS, Command, parse_command, parse_request

FAST = settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))

# ---------------------------------------------------------------- strategies

NASTY_TEXT = st.sampled_from(
    [
        "",
        " ",
        ".",
        "..",
        "/",
        "../../etc/passwd",
        "/etc/shadow",
        "eth0/../lo",
        "a" * 16,
        "a" * 65,
        "x" * 5000,
        "\x00",
        "eth\x00",
        "\ud800",
        "\udcff",
        "²",
        "١٢",
        "9" * 5000,
        "-1",
        "1e9",
        "NaN",
        "\uff10",
        "\u202eeth0",
        "eth 0",
        "eth\t0",
        "e:0",
        "*",
        "239.1.1.1",
        "224.0.0.1",
        "ff02::1",
        "ff3e::1%eth0",
        "::ffff:239.1.1.1",
        "239.1.1.1:5000@up0",
        "EF",
        "ef",
        "AF99",
        "🙂",
    ]
)
TEXT = st.one_of(NASTY_TEXT, st.text(max_size=40))
NUMBERS = st.one_of(
    st.integers(),
    st.sampled_from([0, -1, 1, 255, 256, 65535, 65536, 2**31, 2**63, 2**64, -(2**63), 10**300]),
    st.floats(allow_nan=True, allow_infinity=True),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)),
    max_leaves=12,
)

VALID: dict[str, dict[str, Any]] = {
    "route.add": {"iif": "up0", "source": "192.0.2.2", "group": "239.1.1.1", "oifs": ["dn1"]},
    "route.del": {"iif": "up0", "source": "192.0.2.2", "group": "239.1.1.1"},
    "relay.add": {
        "name": "feed",
        "input": {"iif": "up0", "group": "239.9.9.9", "port": 5000, "sources": ["192.0.2.2"]},
        "outputs": [
            {"address": "239.2.2.2", "port": 6000, "oif": "dn1", "ttl": 4, "dscp": "EF"},
            {"address": "198.51.100.2", "port": 7000},
        ],
        "mode": "packet",
    },
    "relay.del": {"name": "feed"},
    "group.join": {"iface": "dn1", "group": "232.1.1.1", "source": "192.0.2.2"},
    "group.leave": {"iface": "dn1", "group": "ff3e::1"},
    "trace.read": {"name": "feed", "cursor": 3},
    "config.apply": {
        "rules": {
            "routes": [{"iif": "up0", "group": "ff3e::2", "oifs": [{"name": "dn2", "ttl": 2}]}],
            "relays": [],
            "groups": [{"iface": "dn2", "group": "239.5.5.5"}],
        }
    },
}


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a nested JSON value (dict keys and list indexes)."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _replace(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    copy = json.loads(json.dumps(obj))
    target = copy
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return copy


@st.composite
def mutated_params(draw: st.DrawFn) -> tuple[str, Any]:
    """A valid request's parameters with one place replaced, removed or extended."""
    method = draw(st.sampled_from(sorted(VALID)))
    params = VALID[method]
    path = draw(st.sampled_from(_paths(params)))
    action = draw(st.sampled_from(["replace", "delete", "extra"]))
    if action == "replace" or not path:
        return method, _replace(params, path, draw(JSON_VALUES))
    if action == "delete":
        parent = json.loads(json.dumps(params))  # never mutate VALID
        target = parent
        for step in path[:-1]:
            target = target[step]
        del target[path[-1]]
        return method, parent
    copy = json.loads(json.dumps(params))
    parent = copy
    for step in path[:-1]:
        parent = parent[step]
    if isinstance(parent, list):
        parent.append(draw(JSON_VALUES))  # one more element
    else:
        parent[draw(TEXT)] = draw(JSON_VALUES)  # an unknown (or replaced) field
    return method, copy


def _deep(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


# ---------------------------------------------------------------- properties


def check_parse(method: str, params: Any) -> Command | None:
    """parse_command returns a command that re-parses to itself, or refuses cleanly."""
    try:
        cmd = parse_command(method, params)
    except McrelayError as exc:
        err = exc.to_error()
        json.dumps(err)  # the control process must be able to send it
        assert isinstance(err["code"], int) and isinstance(err["message"], str) and err["message"]
        return None
    again = parse_command(method, json.loads(json.dumps(cmd.params())))
    assert again == cmd, "the supervisor must read the same command the control process accepted"
    return cmd


@FAST
@given(st.sampled_from(sorted(METHODS)), st.dictionaries(TEXT, JSON_VALUES, max_size=6))
def test_random_params_for_every_method_fail_cleanly(method: str, params: dict[str, Any]) -> None:
    check_parse(method, params)


@FAST
@given(mutated_params())
def test_structure_aware_mutations_of_valid_requests_fail_cleanly(case: tuple[str, Any]) -> None:
    method, params = case
    if isinstance(params, dict):
        check_parse(method, params)


@FAST
@given(st.binary(max_size=300))
def test_random_bytes_never_raise_anything_but_protocol_errors(line: bytes) -> None:
    try:
        req = parse_request(line)
    except McrelayError:
        return
    check_parse(req.method, req.params)


@FAST
@given(
    rid=st.one_of(SCALARS, st.lists(SCALARS, max_size=2)),
    method=st.one_of(st.sampled_from(sorted(METHODS)), TEXT, SCALARS),
    params=st.one_of(JSON_VALUES, st.dictionaries(TEXT, JSON_VALUES, max_size=4)),
    jsonrpc=st.one_of(st.just("2.0"), SCALARS),
)
def test_request_envelopes_fail_cleanly(rid: Any, method: Any, params: Any, jsonrpc: Any) -> None:
    line = json.dumps({"jsonrpc": jsonrpc, "id": rid, "method": method, "params": params})
    try:
        req = parse_request(line.encode())
    except McrelayError as exc:
        json.dumps(exc.to_error())
        return
    assert req.method == method and isinstance(req.params, dict)
    check_parse(req.method, req.params)


def test_known_nasty_values_are_refused_with_a_message_naming_the_field() -> None:
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("route.add", {**VALID["route.add"], "oifs": [{"name": "dn1", "ttl": "²"}]}, "oifs[0].ttl"),
        ("route.add", {**VALID["route.add"], "iif": "\ud800"}, "iif"),
        ("route.add", {**VALID["route.add"], "iif": "../../etc"}, "iif"),
        ("relay.del", {"name": "\ud800"}, "name"),
        ("relay.del", {"name": "/etc/passwd"}, "name"),
        ("trace.read", {"name": "x", "cursor": "9" * 5000}, "cursor"),
        ("trace.read", {"name": "x", "cursor": 10**300}, "cursor"),
        ("group.join", {"iface": "dn1", "group": "239.1.1.1\x00"}, "group"),
        ("config.apply", {"rules": _deep(20)}, "rules"),
    ]
    for method, params, field in cases:
        try:
            parse_command(method, params)
        except McrelayError as exc:
            assert field in exc.message, (method, params, exc.message)
        else:
            raise AssertionError(f"{method} {params!r} was accepted")


def test_deep_nesting_and_huge_numbers_are_refused_at_the_envelope() -> None:
    for line in (
        b"[" * 100_000 + b"]" * 100_000,
        json.dumps(
            {"jsonrpc": "2.0", "id": 1, "method": "daemon.status", "params": _deep(40)}
        ).encode(),
        b'{"jsonrpc":"2.0","id":1,"method":"daemon.status","params":{"a":' + b"9" * 5000 + b"}}",
        b'{"jsonrpc":"2.0","id":' + b"9" * 5000 + b',"method":"daemon.status"}',
        b"\xff\xfe\x00",
    ):
        try:
            parse_request(line)
        except McrelayError as exc:
            assert exc.code in (-32700, -32600)
        else:
            raise AssertionError(f"accepted {line[:60]!r}")
