"""How the ``mcrelay`` command shows daemon results to people.

Everything here turns a JSON result (the shapes in docs/protocol.md) into text:
aligned tables with numbers right-aligned and counters in human units
(``1.2k``, ``3.4M``), one-line descriptions of rules, the ``apply`` diff, trace
lines and the ``status`` summary. Scripts use ``--output json`` instead, which
bypasses this module, so the layout here may change between releases.

Results come from a daemon that may be older or newer than this client: a
missing key is shown as ``-`` rather than raising.

Imports are kept to what ``status`` and ``route add`` need: the rule model
(for DSCP names) and :mod:`ipaddress` (for sorting and filters) are loaded
when a table first needs them, since a CLI call is short-lived.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

Cell = str | int | float | None
Align = Literal["left", "right"]
MISSING = "-"

_DSCP_NAMES: dict[int, str] = {}


def _dscp_names() -> dict[int, str]:
    """Preferred class name for each DSCP value (EF rather than 46, CS0 shown as nothing)."""
    if not _DSCP_NAMES:
        from .model import DSCP_CLASSES

        for name, code in DSCP_CLASSES.items():
            if name not in ("BE", "DF") and code not in _DSCP_NAMES:
                _DSCP_NAMES[code] = name
    return _DSCP_NAMES


# ---------------------------------------------------------------- primitives


def json_text(obj: Any) -> str:
    """Stable JSON for scripts: sorted keys, indent 2, no trailing spaces."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False)


def json_line(obj: Any) -> str:
    """One compact, sorted JSON object per line (streams: trace, stats --watch)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def human(value: Any, exact: bool = False) -> str:
    """A counter in SI units: 999, 1.2k, 12.3k, 123k, 3.4M, 5.6G (exact digits if asked)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return MISSING
    if exact or abs(value) < 1000:
        return str(int(value)) if float(value).is_integer() else f"{value:.1f}"
    for unit in ("k", "M", "G", "T", "P", "E"):
        value /= 1000.0
        if abs(value) < 999.95:
            return f"{value:.1f}{unit}" if abs(value) < 99.95 else f"{value:.0f}{unit}"
    return f"{value:.0f}E"


def duration(seconds: Any) -> str:
    """Uptime as 3d 4h, 2h 5m, 4m 12s or 12s."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        return MISSING
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {s}s"
    return f"{s}s"


class Column:
    """A table column: its header and how its cells line up.

    A plain class, not a dataclass: :mod:`dataclasses` alone costs a CLI call
    several milliseconds to import.
    """

    __slots__ = ("align", "header")

    def __init__(self, header: str, align: Align = "left") -> None:
        self.header = header
        self.align = align


def table(columns: Sequence[Column], rows: Iterable[Sequence[Cell]]) -> str:
    """Aligned columns, two spaces apart, headers in capitals; no trailing spaces.

    Cells are rendered with ``str`` (None as ``-``); right-aligned columns are
    for numbers so their digits line up.
    """
    text_rows = [[MISSING if c is None else str(c) for c in row] for row in rows]
    widths = [len(col.header) for col in columns]
    for row in text_rows:
        for i, cell in enumerate(row[: len(columns)]):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [[c.header for c in columns], *text_rows]:
        cells = []
        for i, col in enumerate(columns):
            cell = row[i] if i < len(row) else ""
            cells.append(cell.rjust(widths[i]) if col.align == "right" else cell.ljust(widths[i]))
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _get(obj: Any, key: str, default: Any = None) -> Any:
    return obj.get(key, default) if isinstance(obj, Mapping) else default


def _list(obj: Any, key: str) -> list[Any]:
    value = _get(obj, key)
    return list(value) if isinstance(value, list) else []


def _host(address: Any) -> str:
    text = str(address) if address is not None else MISSING
    return f"[{text}]" if ":" in text else text


# ---------------------------------------------------------------- rule spellings


def dscp_name(value: Any) -> str:
    """46 -> EF, 34 -> AF41, 40 -> CS5, 0 -> 0; other values as numbers."""
    if isinstance(value, int) and not isinstance(value, bool):
        return _dscp_names().get(value, str(value)) if value else "0"
    return str(value)


def oifs_text(oifs: Any) -> str:
    """Route outputs as ``eth1,eth2(ttl=4)``: the TTL threshold only when it is not 1."""
    parts = []
    for oif in oifs if isinstance(oifs, list) else []:
        if isinstance(oif, str):
            parts.append(oif)
            continue
        name = str(_get(oif, "name", MISSING))
        ttl = _get(oif, "ttl", 1)
        notes = [] if ttl in (1, None) else [f"ttl={ttl}"]
        mark = marker(oif)  # a waiting output: (down), (missing), (renamed to X)
        if mark:
            notes.append(mark[1:-1])
        parts.append(f"{name}({','.join(notes)})" if notes else name)
    return ",".join(parts) or MISSING


def input_text(inp: Any) -> str:
    """A relay input as ``GROUP:PORT@IIF``, with its source filter if any."""
    text = f"{_host(_get(inp, 'group'))}:{_get(inp, 'port', MISSING)}@{_get(inp, 'iif', MISSING)}"
    sources = _list(inp, "sources")
    if sources:
        text += " from " + ",".join(str(s) for s in sources)
    return text


def output_text(out: Any) -> str:
    """A relay output in the CLI spelling ``ADDR:PORT[@OIF][,ttl=N][,dscp=CLASS]``."""
    text = f"{_host(_get(out, 'address'))}:{_get(out, 'port', MISSING)}"
    if _get(out, "oif"):
        text += f"@{_get(out, 'oif')}"
    if _get(out, "ttl") is not None:
        text += f",ttl={_get(out, 'ttl')}"
    dscp = _get(out, "dscp")
    if dscp not in (None, 0, "0"):
        text += f",dscp={dscp_name(dscp)}"
    if _get(out, "src") == "keep":
        text += ",src=keep"
    return text


def reflect_text(spec: Any) -> str:
    """A reflector as ``mdns on up0,dn1 listen-only dn2 src=keep allow 10.0.0.0/8``."""
    what = _get(spec, "proto")
    if what is None:
        group = _get(spec, "group")
        host = "broadcast" if group == "255.255.255.255" else _host(group)
        what = f"{host}:{_get(spec, 'port', MISSING)}"
    text = f"{what} on {','.join(str(i) for i in _list(spec, 'on'))}"
    listen = _list(spec, "listen_only")
    if listen:
        text += f" listen-only {','.join(str(i) for i in listen)}"
    text += f" src={_get(spec, 'source', 'keep')}"
    allow = _list(spec, "allow")
    if allow:
        text += f" allow {','.join(str(a) for a in allow)}"
    return text


def describe_route(route: Any) -> str:
    """``route (10.0.0.1, 239.1.1.1) on eth0 -> eth1,eth2``."""
    source = _get(route, "source") or "*"
    text = f"route ({source}, {_get(route, 'group', MISSING)}) on {_get(route, 'iif', MISSING)}"
    if "oifs" in route:
        oifs = _get(route, "oifs")
        text += f" -> {oifs_text(oifs)}" if oifs else ": stop filter (no outputs: blocked)"
    return text


def describe_relay(relay: Any) -> str:
    """``relay tv1: 239.1.1.1:5000@eth0 -> 239.2.2.2:6000@eth1,ttl=16 (packet)``."""
    text = f"relay {_get(relay, 'name', MISSING)}"
    if "reflect" in relay:
        return f"{text}: reflect {reflect_text(_get(relay, 'reflect'))}"
    if "input" in relay:
        text += f": {input_text(_get(relay, 'input'))}"
    outputs = _list(relay, "outputs")
    if outputs:
        text += " -> " + " ".join(output_text(o) for o in outputs)
    if _get(relay, "mode"):
        text += f" ({_get(relay, 'mode')})"
    return text


def describe_group(group: Any) -> str:
    """``group 232.1.1.1 from 10.0.0.1 on eth0`` (no ``from`` for any source)."""
    source = _get(group, "source")
    src = f" from {source}" if source not in (None, "*") else ""
    return f"group {_get(group, 'group', MISSING)}{src} on {_get(group, 'iface', MISSING)}"


def describe(kind: str, rule: Any) -> str:
    """A rule of kind ``routes``/``relays``/``groups`` (or singular) on one line."""
    if not isinstance(rule, Mapping):
        return str(rule)
    if kind.startswith("route"):
        return describe_route(rule)
    if kind.startswith("relay"):
        return describe_relay(rule)
    return describe_group(rule)


# ---------------------------------------------------------------- tables


def _family(route: Any) -> str:
    fam = _get(route, "family")
    if fam in (4, 6):
        return f"IPv{fam}"
    group = str(_get(route, "group", ""))
    return "IPv6" if ":" in group else "IPv4"


def routes_table(routes: Sequence[Any], verbose: bool = False) -> str:
    """Kernel routes; with ``verbose`` exact counters and the sources learned for (*,G)."""
    cols = [
        Column("IIF"),
        Column("SOURCE"),
        Column("GROUP"),
        Column("OIFS"),
        Column("STATE"),
        Column("PACKETS", "right"),
        Column("BYTES", "right"),
        Column("WRONG-IF", "right"),
    ]
    rows: list[list[Cell]] = []
    for r in sorted(routes, key=_route_sort_key):
        rows.append(
            [
                _get(r, "iif"),
                _get(r, "source") or "*",
                _get(r, "group"),
                oifs_text(_get(r, "oifs")),
                state_text(r),
                human(_get(r, "packets"), verbose),
                human(_get(r, "bytes"), verbose),
                human(_get(r, "wrong_if"), verbose),
            ]
        )
        if verbose:
            for learned in _list(r, "learned"):
                rows.append(
                    [
                        "",
                        f" {_get(learned, 'source', MISSING)}",
                        "",
                        "",
                        "learned",
                        human(_get(learned, "packets"), True),
                        human(_get(learned, "bytes"), True),
                        "",
                    ]
                )
    return table(cols, rows)


def _route_sort_key(route: Any) -> tuple[int, str, str, str]:
    return (
        6 if _family(route) == "IPv6" else 4,
        str(_get(route, "iif", "")),
        _addr_key(_get(route, "group")),
        _addr_key(_get(route, "source")),
    )


def _addr_key(text: Any) -> str:
    """Addresses sorted numerically (239.1.1.2 before 239.1.1.10), '*' first."""
    import ipaddress

    try:
        return f"{int(ipaddress.ip_address(str(text))):040d}"
    except ValueError:
        return "" if text in (None, "*") else str(text)


def _reflector_rows(rows: list[list[Cell]], r: Any, total: Any, verbose: bool) -> None:
    """A reflector's row, then one per member: ``<> IF`` heard (PACKETS) and sent (BYTES...)."""
    rows.append(
        [
            _get(r, "name"),
            state_text(r),
            "reflect",
            reflect_text(_get(r, "reflect")),
            human(_get(r, "packets"), verbose),
            human(_get(r, "bytes"), verbose),
            human(total, verbose),
        ]
    )
    for mem in _list(r, "members"):
        role = "<-" if _get(mem, "role") == "listen-only" else "<>"
        state = f" {marker(mem)}" if marker(mem) else ""
        heard = human(_get(mem, "received"), verbose)
        rows.append(
            [
                "",
                "",
                "",
                f"{role} {_get(mem, 'name')}{state} heard {heard}",
                human(_get(mem, "packets"), verbose),
                human(_get(mem, "bytes"), verbose),
                human(_get(mem, "errors"), verbose),
            ]
        )
    drops = _get(r, "drops")
    if verbose and isinstance(drops, Mapping):
        detail = " ".join(f"{k}={drops[k]}" for k in sorted(drops) if drops[k])
        if detail:
            rows.append(["", "", "", f"drops: {detail}", "", "", ""])


def relays_table(relays: Sequence[Any], verbose: bool = False) -> str:
    """Relays, each followed by its outputs (``-> SPEC``) with their own counters.

    The relay row counts what arrived and what was dropped before the outputs;
    an output row counts what was sent there and its send errors. With
    ``verbose`` the drop reasons follow each relay and counters are exact.
    """
    cols = [
        Column("NAME"),
        Column("STATE"),
        Column("MODE"),
        Column("INPUT / OUTPUTS"),
        Column("PACKETS", "right"),
        Column("BYTES", "right"),
        Column("DROPS", "right"),
    ]
    rows: list[list[Cell]] = []
    for r in sorted(relays, key=lambda r: str(_get(r, "name", ""))):
        drops = _get(r, "drops")
        total: Any = None
        if isinstance(drops, Mapping):
            total = sum(v for v in drops.values() if isinstance(v, int))
        elif isinstance(drops, int):
            total = drops
        if "reflect" in r:
            _reflector_rows(rows, r, total, verbose)
            continue
        rows.append(
            [
                _get(r, "name"),
                state_text(r),
                _get(r, "mode"),
                input_text(_get(r, "input")),
                human(_get(r, "packets"), verbose),
                human(_get(r, "bytes"), verbose),
                human(total, verbose),
            ]
        )
        for out in _list(r, "outputs"):
            rows.append(
                [
                    "",
                    "",
                    "",
                    f"-> {output_text(out)} {marker(out)}".rstrip(),
                    human(_get(out, "packets"), verbose),
                    human(_get(out, "bytes"), verbose),
                    human(_get(out, "errors"), verbose),
                ]
            )
        if verbose and isinstance(drops, Mapping):
            detail = " ".join(f"{k}={drops[k]}" for k in sorted(drops) if drops[k])
            if detail:  # only the reasons that happened
                rows.append(["", "", "", f"drops: {detail}", "", "", ""])
    return table(cols, rows)


def interfaces_table(interfaces: Sequence[Any]) -> str:
    """Interfaces, link state, addresses and the VIF (IPv4) / MIF (IPv6) slot mcrelay holds."""
    cols = [
        Column("NAME"),
        Column("INDEX", "right"),
        Column("STATE"),
        Column("VIF4", "right"),
        Column("VIF6", "right"),
        Column("ADDRESSES"),
    ]
    rows: list[list[Cell]] = []
    for i in sorted(interfaces, key=lambda i: (_get(i, "ifindex") or 0, str(_get(i, "name")))):
        up = _get(i, "up")
        rows.append(
            [
                _get(i, "name"),
                _get(i, "ifindex"),
                MISSING if up is None else ("up" if up else "down"),
                _get(i, "vif4"),
                _get(i, "vif6"),
                ",".join(str(a) for a in _list(i, "addresses")) or MISSING,
            ]
        )
    return table(cols, rows)


def groups_table(groups: Sequence[Any]) -> str:
    """Memberships held, and which rules need them."""
    cols = [Column("IFACE"), Column("GROUP"), Column("SOURCE"), Column("STATE"), Column("USERS")]
    rows: list[list[Cell]] = []
    for g in sorted(groups, key=lambda g: (str(_get(g, "iface", "")), _addr_key(_get(g, "group")))):
        users = _get(g, "users")
        users_text = ",".join(str(u) for u in users) if isinstance(users, list) else users
        rows.append(
            [
                _get(g, "iface"),
                _get(g, "group"),
                _get(g, "source") or "*",
                _get(g, "state"),
                users_text or MISSING,
            ]
        )
    return table(cols, rows)


def workers_table(workers: Sequence[Any]) -> str:
    """Relay worker processes."""
    cols = [
        Column("WORKER", "right"),
        Column("PID", "right"),
        Column("STATE"),
        Column("RESTARTS", "right"),
        Column("CPU", "right"),
        Column("USER"),
    ]
    rows: list[list[Cell]] = []
    for w in sorted(workers, key=lambda w: _get(w, "index") or 0):
        cpu = _get(w, "cpu_seconds")
        rows.append(
            [
                _get(w, "index"),
                _get(w, "pid"),
                _get(w, "state"),
                _get(w, "restarts"),
                f"{cpu:.1f}s" if isinstance(cpu, int | float) else None,
                _get(w, "user"),
            ]
        )
    return table(cols, rows)


def section(title: str, items: Sequence[Any], body: str, empty: str) -> str:
    """A titled block: ``Routes (2):`` and the table, or a one-line note when empty."""
    if not items:
        return f"{title}: {empty}"
    return f"{title} ({len(items)}):\n{body}"


# ---------------------------------------------------------------- other results


def status_text(status: Mapping[str, Any]) -> str:
    """``mcrelay status``: what runs, where, with how many rules, and what is wrong."""
    workers = _get(status, "workers")
    kernel = _get(status, "kernel")
    lines = [
        f"mcrelayd {_get(status, 'version', MISSING)}, pid {_get(status, 'pid', MISSING)}, "
        f"up {duration(_get(status, 'uptime'))}"
    ]
    rows: list[tuple[str, str]] = [
        ("socket", str(_get(status, "socket", MISSING))),
        ("state file", str(_get(status, "state_file", MISSING))),
        (
            "rules",
            f"{_count(status, 'routes', 'route')}, {_count(status, 'relays', 'relay')}, "
            f"{_count(status, 'groups', 'group join')}",
        ),
    ]
    if isinstance(workers, Mapping):
        rows.append(
            (
                "workers",
                f"{_get(workers, 'running', MISSING)}/{_get(workers, 'configured', MISSING)} "
                f"running, {_get(workers, 'restarts', MISSING)} restarts",
            )
        )
    if isinstance(kernel, Mapping):
        rows.append(
            (
                "kernel",
                "multicast routing "
                + ", ".join(
                    f"IPv{v} {_yes(_get(kernel, f'ipv{v}'))}" for v in (4, 6) if f"ipv{v}" in kernel
                ),
            )
        )
    width = max(len(k) for k, _ in rows)
    lines += [f"  {k.ljust(width)}  {v}" for k, v in rows]
    for warning in _list(status, "warnings"):
        lines.append(f"warning: {warning}")
    return "\n".join(lines)


def _count(obj: Any, key: str, noun: str) -> str:
    n = _get(obj, key, MISSING)
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _yes(value: Any) -> str:
    if value is None:
        return MISSING
    return "available" if value else "unavailable"


DIFF_MARKS = (("added", "+"), ("removed", "-"), ("changed", "~"))


def diff_lines(diff: Any) -> tuple[list[str], dict[str, int]]:
    """The ``apply`` diff as ``+ route ...`` / ``- relay ...`` / ``~ group ...`` lines.

    Returns the lines and the counts per mark. A changed entry may be the new
    rule or {"old": ..., "new": ...} (``before``/``after`` also accepted); the
    new rule is shown.
    """
    lines: list[str] = []
    counts = {"added": 0, "removed": 0, "changed": 0}
    for kind in ("routes", "relays", "groups"):
        part = _get(diff, kind)
        if not isinstance(part, Mapping):
            continue
        for what, mark in DIFF_MARKS:
            for item in _list(part, what):
                rule = item
                if isinstance(item, Mapping) and ("new" in item or "after" in item):
                    rule = item.get("new", item.get("after"))
                lines.append(f"{mark} {describe(kind, rule)}")
                counts[what] += 1
    return lines, counts


def trace_line(record: Mapping[str, Any]) -> str:
    """One traced packet, tcpdump style, stamped with its own receive time::

        12:00:01.123456 IP 10.0.0.1.4000 > 239.1.1.1.5000: UDP, length 1316 -> 239.2.2.2.6000 ok

    Addresses are ``host.port`` as tcpdump writes them; ``length`` is the UDP
    payload. A daemon that sends no ``destination`` gets a line without it.
    """
    t = _get(record, "time")
    if isinstance(t, int | float) and not isinstance(t, bool):
        stamp = time.strftime("%H:%M:%S", time.localtime(t)) + f".{int((t % 1) * 1e6):06d}"
    else:
        stamp = str(t) if t is not None else MISSING
    source = str(_get(record, "source", MISSING))
    text = f"{stamp} {'IP6' if source.count(':') > 1 else 'IP'} {_dotted(source)}"
    if _get(record, "destination"):
        text += f" > {_dotted(_get(record, 'destination'))}"
    text += f": UDP, length {_get(record, 'size', MISSING)}"
    outputs = _get(record, "outputs")
    if isinstance(outputs, list):
        parts = [output_text(o) if isinstance(o, Mapping) else _dotted(o) for o in outputs]
        out_text = ",".join(parts)
    else:
        out_text = MISSING if outputs is None else str(outputs)
    return f"{text} -> {out_text or MISSING} {_get(record, 'result', MISSING)}"


def _dotted(endpoint: Any) -> str:
    """``10.0.0.1:4000`` -> ``10.0.0.1.4000``, ``[ff3e::1]:5000`` -> ``ff3e::1.5000``."""
    text = str(endpoint)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or (host.count(":") and not host.startswith("[")):
        return text
    return f"{host.strip('[]')}.{port}"


# ---------------------------------------------------------------- filters (show VIEW FILTER...)

# The words each view can be filtered by, iproute2 style (``show routes iif up0``).
# For relays and interfaces a word that is not one of these is a name.
FILTER_KEYS: dict[str, tuple[str, ...]] = {
    "routes": ("iif", "oif", "group", "source"),
    "relays": ("name", "iif", "oif", "group"),
    "groups": ("iface", "group", "source"),
    "interfaces": ("name",),
}
_FILTER_FORMS = {
    "name": "NAME",
    "iif": "IFACE",
    "oif": "IFACE",
    "iface": "IFACE",
    "group": "PREFIX",
    "source": "PREFIX",
}
_PREFIX_KEYS = ("group", "source")

Terms = dict[str, list[Any]]  # key -> accepted values (names, or ip_network objects)


def parse_filter(view: str, words: Sequence[str]) -> Terms:
    """``iif up0 group 239.1.0.0/16`` -> {"iif": ["up0"], "group": [ip_network]}.

    Raises :class:`~mcrelay.errors.InvalidParams` naming the word and what the
    view accepts, so a typo never silently shows everything.
    """
    from .errors import InvalidParams

    keys = FILTER_KEYS.get(view, ())
    if words and not keys:
        raise InvalidParams("filter", f"show {view} takes no filter, got {' '.join(words)!r}")
    terms: Terms = {}
    i = 0
    while i < len(words):
        word = words[i]
        if word in keys and i + 1 < len(words):
            key, value, i = word, words[i + 1], i + 2
        elif word in keys:
            raise InvalidParams("filter", f"{word} needs a value: {word} {_FILTER_FORMS[word]}")
        elif "name" in keys:
            key, value, i = "name", word, i + 1
        else:
            expected = ", ".join(f"{k} {_FILTER_FORMS[k]}" for k in keys)
            raise InvalidParams(
                "filter", f"{word!r} is not a filter of show {view}; expected {expected}"
            )
        terms.setdefault(key, []).append(_prefix(key, value) if key in _PREFIX_KEYS else value)
    return terms


def _prefix(key: str, text: str) -> Any:
    """An address or prefix (host bits allowed, as ``ip`` does): the network it names."""
    import ipaddress

    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        from .errors import InvalidParams

        raise InvalidParams(
            key, f"{text!r} is not an address or prefix (239.1.0.0/16, ff3e::/16)"
        ) from None


def filter_text(terms: Terms) -> str:
    """The filter as the user could have typed it: ``iif up0 group 239.1.0.0/16``."""
    return " ".join(f"{k} {v}" for k, values in terms.items() for v in values)


def select(view: str, items: Sequence[Any], terms: Terms) -> list[Any]:
    """The items of ``view`` that match every key of ``terms`` (any one value per key)."""
    fields = _FIELDS[view]
    return [
        item
        for item in items
        if all(
            any(_matches(key, value, fields(item, key)) for value in values)
            for key, values in terms.items()
        )
    ]


def _matches(key: str, wanted: Any, have: list[Any]) -> bool:
    """Does one of the item's values for ``key`` match ``wanted``?"""
    if key in _PREFIX_KEYS:
        return any(_in_network(text, wanted) for text in have)
    if key == "name" and any(c in str(wanted) for c in "*?["):
        from fnmatch import fnmatchcase

        return any(fnmatchcase(str(text), str(wanted)) for text in have)
    return any(text == wanted for text in have)


def _in_network(text: Any, network: Any) -> bool:
    import ipaddress

    try:
        address = ipaddress.ip_address(str(text))
    except ValueError:
        return False  # "*" or missing: a (*,G) route has no source to match
    return bool(address.version == network.version and address in network)


def _route_fields(route: Any, key: str) -> list[Any]:
    if key == "oif":
        return [o if isinstance(o, str) else _get(o, "name") for o in _list(route, "oifs")]
    return [_get(route, key)]


def _relay_fields(relay: Any, key: str) -> list[Any]:
    """A relay's name, input interface, output interfaces, or every address it uses.

    ``group`` matches the input group and each output address, so both ends
    of a translating relay find it.
    """
    spec = _get(relay, "reflect")
    if isinstance(spec, Mapping) and key in ("iif", "oif", "group"):
        return _reflector_fields(spec, key)
    inp = _get(relay, "input")
    outputs = _list(relay, "outputs")
    if key == "iif":
        return [_get(inp, "iif")]
    if key == "oif":
        return [_get(o, "oif") for o in outputs]
    if key == "group":
        return [_get(inp, "group"), *(_get(o, "address") for o in outputs)]
    return [_get(relay, key)]


def _reflector_fields(spec: Mapping[str, Any], key: str) -> list[Any]:
    """A reflector hears on every member, sends on the ``on`` ones, uses its preset's groups."""
    if key == "iif":
        return [*_list(spec, "on"), *_list(spec, "listen_only")]
    if key == "oif":
        return list(_list(spec, "on"))
    from .model import REFLECT_PRESETS

    proto = _get(spec, "proto")
    if proto in REFLECT_PRESETS:
        return [group for group, _port in REFLECT_PRESETS[proto]]
    return [_get(spec, "group")]


def _plain_fields(item: Any, key: str) -> list[Any]:
    return [_get(item, key)]


_FIELDS = {
    "routes": _route_fields,
    "relays": _relay_fields,
    "groups": _plain_fields,
    "interfaces": _plain_fields,
}


# ---------------------------------------------------------------- states and rates

_ANSI_HIGHLIGHT = ("\033[1;7m", "\033[0m")  # bold reverse video: an output losing packets


def state_text(obj: Any) -> str:
    """A rule's state as a table shows it: ``active``, ``partial`` or ``waiting: why``.

    The reason is shortened (``input interface missing`` -> ``input missing``);
    a partial rule's reasons are on its outputs' markers.
    """
    state = _get(obj, "state")
    if state is None:
        return MISSING
    reason = _get(obj, "reason")
    if state != "waiting" or not reason:
        return str(state)
    return f"waiting: {str(reason).replace('interface ', '')}"


def marker(obj: Any) -> str:
    """The compact mark of a waiting output: ``(down)``, ``(missing)``, ``(renamed to X)``."""
    if _get(obj, "state", "active") == "active":
        return ""
    reason = _get(obj, "reason")
    return f"({str(reason).replace('interface ', '') if reason else 'waiting'})"


def _counter(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _drops_total(relay: Any) -> int | None:
    drops = _get(relay, "drops")
    total: int | None = None
    if isinstance(drops, Mapping):
        total = sum(v for v in drops.values() if isinstance(v, int))
    elif isinstance(drops, int):
        total = drops
    extra = _counter(_get(relay, "input_drops"))
    if extra is not None:
        total = (total or 0) + extra
    return total


Sample = dict[tuple[Any, ...], tuple[int | None, int | None, int | None]]


def sample(stats: Any) -> Sample:
    """Every rule's and relay output's (packets, bytes, drops or errors), by a stable key."""
    out: Sample = {}
    for r in _list(stats, "routes"):
        key = ("route", _get(r, "iif"), _get(r, "source") or "*", _get(r, "group"))
        out[key] = (_counter(_get(r, "packets")), _counter(_get(r, "bytes")), None)
    for r in _list(stats, "relays"):
        name = _get(r, "name")
        out[("relay", name)] = (
            _counter(_get(r, "packets")),
            _counter(_get(r, "bytes")),
            _drops_total(r),
        )
        for i, o in enumerate(_list(r, "outputs") or _list(r, "members")):
            out[("out", name, i)] = (
                _counter(_get(o, "packets")),
                _counter(_get(o, "bytes")),
                _counter(_get(o, "errors")),
            )
    return out


def rates(before: Sample, after: Sample, seconds: float) -> dict[tuple[Any, ...], list[Any]]:
    """Per key [packets/s, bits/s, drops/s] over ``seconds``; None where unknown.

    A counter that went backwards (the daemon restarted, the rule was
    re-created) has no rate for this interval rather than a negative one.
    """
    out: dict[tuple[Any, ...], list[Any]] = {}
    for key, now in after.items():
        old = before.get(key)
        vals: list[Any] = [None, None, None]
        if old is not None and seconds > 0:
            for i, (a, b) in enumerate(zip(old, now, strict=True)):
                if a is not None and b is not None and b >= a:
                    vals[i] = (b - a) * (8 if i == 1 else 1) / seconds
        out[key] = vals
    return out


def _rate(value: Any) -> str:
    """A rate: whole units from 10 on (999.9 packets/s reads 1000, not 999.9)."""
    if value is None:
        return MISSING
    return human(round(value) if value >= 10 else round(value, 1))


def rates_table(
    stats: Any, per_key: Mapping[tuple[Any, ...], list[Any]] | None, color: bool = False
) -> str:
    """``stats --watch``: each rule and output with packets/s, bits/s and drops/s.

    Route bits count IP packets (headers included), relay bits UDP payload:
    what each engine's ``bytes`` counts. A kernel route has one counter: the
    kernel sends each packet on every active output, so outputs show their
    state only. An output (or relay) that lost packets in the interval is
    marked ``!`` (and highlighted on a terminal).
    """
    cols = [
        Column("RULE / OUTPUT"),
        Column("STATE"),
        Column("PACKETS", "right"),
        Column("PKT/S", "right"),
        Column("BIT/S", "right"),
        Column("DROP/S", "right"),
    ]
    per_key = per_key or {}
    rows: list[list[Cell]] = []
    hot: set[int] = set()

    def add(key: tuple[Any, ...], label: str, state: str, packets: Any) -> None:
        pps, bps, dps = per_key.get(key, [None, None, None])
        if dps:
            label = f"{label} !"
            hot.add(len(rows))
        rows.append([label, state, human(packets), _rate(pps), _rate(bps), _rate(dps)])

    for r in sorted(_list(stats, "routes"), key=_route_sort_key):
        key = ("route", _get(r, "iif"), _get(r, "source") or "*", _get(r, "group"))
        add(
            key,
            describe_route({k: v for k, v in r.items() if k != "oifs"}),
            state_text(r),
            _get(r, "packets"),
        )
        for o in _list(r, "oifs"):
            name = o if isinstance(o, str) else str(_get(o, "name", MISSING))
            rows.append([f"  -> {name} {marker(o)}".rstrip(), _get(o, "state"), "", "", "", ""])
    for r in sorted(_list(stats, "relays"), key=lambda r: str(_get(r, "name", ""))):
        name = _get(r, "name")
        add(("relay", name), f"relay {name}", state_text(r), _get(r, "packets"))
        outputs = _list(r, "outputs")
        for i, o in enumerate(outputs or _list(r, "members")):
            label = output_text(o) if outputs else f"<> {_get(o, 'name', MISSING)}"
            add(
                ("out", name, i),
                f"  -> {label} {marker(o)}".rstrip(),
                _get(o, "state"),
                _get(o, "packets"),
            )
    text = table(cols, rows)
    if not color or not hot:
        return text
    lines = text.split("\n")
    for i in hot:
        lines[i + 1] = f"{_ANSI_HIGHLIGHT[0]}{lines[i + 1]}{_ANSI_HIGHLIGHT[1]}"
    return "\n".join(lines)


def rates_json(per_key: Mapping[tuple[Any, ...], list[Any]], seconds: float) -> dict[str, Any]:
    """The rates of one ``stats --watch -o json`` line: routes, relays and their outputs."""
    routes: list[dict[str, Any]] = []
    relays: dict[Any, dict[str, Any]] = {}
    for key, (pps, bps, dps) in per_key.items():
        if key[0] == "route":
            routes.append(
                {"iif": key[1], "source": key[2], "group": key[3], "pps": pps, "bps": bps}
            )
        elif key[0] == "relay":
            relays.setdefault(key[1], {"outputs": []}).update(
                name=key[1], pps=pps, bps=bps, drops_ps=dps
            )
        else:
            relays.setdefault(key[1], {"outputs": []})["outputs"].append(
                {"pps": pps, "bps": bps, "errors_ps": dps}
            )
    return {"interval": round(seconds, 3), "routes": routes, "relays": list(relays.values())}
