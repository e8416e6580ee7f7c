"""smcroute.conf syntax, both ways: an smcroute user points mcrelay at the file they have.

Read (:func:`parse`) and written (:func:`format_rules`)::

    phyint IFNAME [enable|disable] [mrdisc] [ttl-threshold N]
    mgroup   from IFNAME [source ADDR[/LEN]] group GROUP[/LEN]
    ssmgroup from IFNAME group GROUP source ADDR
    mroute   from IFNAME [source ADDR[/LEN]] group GROUP[/LEN] [to IFNAME ...]
    include  GLOB                    # relative to the including file
    # comments run to the end of the line

Interface names may be ``eth+`` wildcards. An ``mroute`` without ``to`` is a
stop filter. ``phyint ... ttl-threshold N`` becomes the TTL threshold of every
output on that interface; ``phyint ... mrdisc`` enables RFC 4286 router
advertisements there; ``enable``/``disable`` are accepted and change nothing
(mcrelay creates a VIF only for interfaces a route uses). Every rule goes
through the same validation as a JSON-RPC request; an error names the file,
the line and the field.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, InvalidParams
from .model import GroupJoin, Route, parse_group_join, parse_route

MAX_INCLUDE_DEPTH = 8


@dataclass
class Parsed:
    """What a file (and what it includes) holds, with where each rule came from."""

    routes: list[Route] = field(default_factory=list)
    groups: list[GroupJoin] = field(default_factory=list)
    mrdisc: list[str] = field(default_factory=list)
    origins: dict[Any, str] = field(default_factory=dict)  # rule identity -> "file:line"


class _Line:
    def __init__(self, path: str, number: int, words: list[str]) -> None:
        self.path, self.number, self.words = path, number, words

    def where(self) -> str:
        return f"{self.path}:{self.number}"

    def fail(self, problem: str) -> ConfigError:
        return ConfigError(f"{self.where()}: {problem}")


def _options(line: _Line, start: int, keys: Mapping[str, str]) -> dict[str, Any]:
    """``key value`` pairs (and ``to`` taking the rest) after the statement word."""
    out: dict[str, Any] = {}
    words = line.words
    i = start
    while i < len(words):
        word = words[i]
        if word == "to" and "to" in keys:
            out["to"] = words[i + 1 :]
            break
        if word not in keys:
            expected = ", ".join(k for k in keys)
            raise line.fail(f"{words[0]}: unexpected {word!r} (expected one of: {expected})")
        if i + 1 >= len(words):
            raise line.fail(f"{words[0]}: {word} needs a value ({keys[word]})")
        if word in out:
            raise line.fail(f"{words[0]}: {word} given twice")
        out[word] = words[i + 1]
        i += 2
    return out


def _validated(line: _Line, build: Callable[[], Any]) -> Any:
    try:
        return build()
    except InvalidParams as exc:
        raise line.fail(f"{line.words[0]}: {exc.field}: {exc.problem}") from None


def parse(path: str) -> Parsed:
    """Read an smcroute.conf file (and its includes); ConfigError names file, line and field."""
    out = Parsed()
    thresholds: dict[str, int] = {}
    pending: list[tuple[_Line, dict[str, Any]]] = []
    for line in _lines(path, 0, set()):
        word = line.words[0]
        if word == "phyint":
            _phyint(line, out, thresholds)
        elif word in ("mgroup", "ssmgroup"):
            opts = _options(line, 1, {"from": "IFNAME", "source": "ADDR", "group": "GROUP"})
            if "from" not in opts or "group" not in opts:
                raise line.fail(f"{word}: needs 'from IFNAME' and 'group GROUP'")
            if word == "ssmgroup" and "source" not in opts:
                raise line.fail("ssmgroup: needs 'source ADDR'")
            params = {"iface": opts["from"], "group": opts["group"], "source": opts.get("source")}
            join = _validated(line, lambda p=params: parse_group_join(p, "group"))  # type: ignore[misc]
            if join in out.groups:
                raise line.fail(f"{word}: duplicate {join}")
            out.groups.append(join)
            out.origins[join] = line.where()
        elif word == "mroute":
            opts = _options(
                line, 1, {"from": "IFNAME", "source": "ADDR", "group": "GROUP", "to": "IFNAME..."}
            )
            if "from" not in opts or "group" not in opts:
                raise line.fail("mroute: needs 'from IFNAME' and 'group GROUP'")
            pending.append((line, opts))
        else:
            raise line.fail(
                f"unknown statement {word!r} (expected phyint, mgroup, ssmgroup, mroute, include)"
            )
    # Routes last: a phyint's ttl-threshold applies wherever it appears in the file.
    for line, opts in pending:
        params = {
            "iif": opts["from"],
            "source": opts.get("source"),
            "group": opts["group"],
            "oifs": [{"name": n, "ttl": thresholds.get(n, 1)} for n in opts.get("to", [])],
        }
        route = _validated(line, lambda p=params: parse_route(p, "route"))  # type: ignore[misc]
        if any(r.key == route.key for r in out.routes):
            raise line.fail(f"mroute: duplicate {route.key}")
        out.routes.append(route)
        out.origins[route.key] = line.where()
    return out


def _phyint(line: _Line, out: Parsed, thresholds: dict[str, int]) -> None:
    words = line.words
    if len(words) < 2:
        raise line.fail("phyint: needs an interface name")
    name = words[1]
    i = 2
    while i < len(words):
        word = words[i]
        if word in ("enable", "disable"):
            i += 1
        elif word == "mrdisc":
            out.mrdisc.append(name)
            i += 1
        elif word == "ttl-threshold":
            value = words[i + 1] if i + 1 < len(words) else ""
            if not value.isdigit() or not 1 <= int(value) <= 255:
                raise line.fail(f"phyint: ttl-threshold must be 1-255, got {value!r}")
            thresholds[name] = int(value)
            i += 2
        else:
            raise line.fail(
                f"phyint: unexpected {word!r} (expected enable, disable, mrdisc, ttl-threshold N)"
            )


def _lines(path: str, depth: int, seen: set[str]) -> Iterable[_Line]:
    real = os.path.realpath(path)
    if real in seen:
        raise ConfigError(f"{path}: included twice (include loop?)")
    seen.add(real)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    for number, raw in enumerate(text.splitlines(), 1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        line = _Line(path, number, words)
        if words[0] != "include":
            yield line
            continue
        if len(words) != 2:
            raise line.fail("include: needs exactly one file or glob")
        if depth >= MAX_INCLUDE_DEPTH:
            raise line.fail(f"include: nested more than {MAX_INCLUDE_DEPTH} deep")
        pattern = os.path.join(os.path.dirname(path), words[1])
        for included in sorted(glob.glob(pattern)):
            yield from _lines(included, depth + 1, seen)


# ---------------------------------------------------------------- writing


def format_rules(rules: Mapping[str, Any]) -> str:
    """An export (``mcrelay export`` JSON) as smcroute.conf lines; relays become comments."""
    out = ["# written by mcrelay export --format smcroute"]
    thresholds: dict[str, int] = {}
    for route in rules.get("routes", []):
        for o in route.get("oifs", []):
            if int(o.get("ttl", 1)) > 1:
                thresholds.setdefault(o["name"], int(o["ttl"]))
    for name, ttl in sorted(thresholds.items()):
        out.append(f"phyint {name} ttl-threshold {ttl}")
    for g in rules.get("groups", []):
        source = "" if g.get("source", "*") == "*" else f" source {g['source']}"
        out.append(f"mgroup from {g['iface']}{source} group {g['group']}")
    for r in rules.get("routes", []):
        source = "" if r.get("source", "*") == "*" else f" source {r['source']}"
        oifs: Sequence[str] = [o["name"] for o in r.get("oifs", [])]
        to = f" to {' '.join(oifs)}" if oifs else ""
        out.append(f"mroute from {r['iif']}{source} group {r['group']}{to}")
    for relay in rules.get("relays", []):
        out.append(f"# relay {relay.get('name')}: relays have no smcroute.conf form (mcrelay only)")
    return "\n".join(out) + "\n"
