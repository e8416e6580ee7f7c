"""Rules and their validation, shared by every process.

A rule is built only through the ``parse_*`` functions (or ``from_dict``), which
check every field and raise :class:`InvalidParams` naming the field and the
allowed values. Anything holding a ``Route``, ``Relay`` or ``GroupJoin`` may
therefore trust it: the kernel engine and the workers never re-check.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import InvalidParams

MAX_OUTPUTS = 32
MAX_ROUTES = 20000  # as many as relays: 10,000 routes by one apply (issue 12)
MAX_RELAYS = 20000
MAX_GROUPS = MAX_RELAYS  # explicit joins: as many as the relays may hold implicitly
MAX_NAME = 64
MAX_SOURCES = 64
DEFAULT_MCAST_TTL = 16
DEFAULT_UNICAST_TTL = 64

IfName = str
Mode = Literal["packet", "socket"]
MODES: tuple[Mode, ...] = ("packet", "socket")
SourceMode = Literal["keep", "own"]
SOURCE_MODES: tuple[SourceMode, ...] = ("keep", "own")
LIMITED_BROADCAST = "255.255.255.255"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@\[\]-]*$")

DSCP_CLASSES: dict[str, int] = {
    "BE": 0,
    "DF": 0,
    "LE": 1,
    **{f"CS{i}": 8 * i for i in range(8)},
    **{f"AF{c}{d}": 8 * c + 2 * d for c in range(1, 5) for d in range(1, 4)},
    "VA": 44,
    "EF": 46,
}


# ---------------------------------------------------------------- field checks


def _expect(value: Any, kind: type | tuple[type, ...], field_name: str, what: str) -> Any:
    # bool is an int in Python; a JSON true is never a port or a TTL.
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise InvalidParams(field_name, f"must be {what}, got {_show(value)}")
    return value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_ifname(value: Any, field_name: str) -> str:
    """Linux interface-name rules: 1-15 bytes, no '/', no whitespace, not '.' or '..'."""
    _expect(value, str, field_name, "an interface name (1-15 bytes)")
    # surrogatepass: a lone surrogate from JSON ("\\ud800") must be refused below
    # as unprintable, not raise UnicodeEncodeError here.
    raw = value.encode("utf-8", "surrogatepass")
    if not 1 <= len(raw) <= 15:
        raise InvalidParams(field_name, f"interface name must be 1-15 bytes, got {len(raw)}")
    if value in (".", "..") or "/" in value or ":" in value or any(c.isspace() for c in value):
        raise InvalidParams(
            field_name,
            f"invalid interface name {_show(value)}: no '/', ':', whitespace, not '.' or '..'",
        )
    if not value.isprintable():
        raise InvalidParams(field_name, f"invalid interface name {_show(value)}: unprintable")
    return str(value)


def check_int(value: Any, field_name: str, low: int, high: int) -> int:
    """An integer in [low, high]; numeric strings from the CLI are accepted."""
    # isascii(): str.isdigit() is also true for "²" and other digits int() refuses;
    # the length cap keeps int() under Python's 4300-digit conversion limit.
    if isinstance(value, str):
        digits = value.strip()
        if digits.isascii() and digits.isdigit() and len(digits) <= 20:
            value = int(digits)
    _expect(value, int, field_name, f"an integer {low}-{high}")
    if not low <= value <= high:
        raise InvalidParams(field_name, f"must be {low}-{high}, got {value}")
    return int(value)


def check_port(value: Any, field_name: str) -> int:
    return check_int(value, field_name, 1, 65535)


def check_ttl(value: Any, field_name: str) -> int:
    return check_int(value, field_name, 1, 255)


def check_dscp(value: Any, field_name: str) -> int:
    """DSCP as 0-63 or a class name (EF, AF41, CS5, BE...)."""
    if isinstance(value, str) and not value.strip().isdigit():
        code = DSCP_CLASSES.get(value.strip().upper())
        if code is None:
            raise InvalidParams(
                field_name,
                f"unknown DSCP class {_show(value)}; use 0-63 or one of "
                "BE, LE, CS0-CS7, AF11-AF43, VA, EF",
            )
        return code
    return check_int(value, field_name, 0, 63)


def check_address(value: Any, field_name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    _expect(value, str, field_name, "an IPv4 or IPv6 address")
    try:
        addr = ipaddress.ip_address(value.strip())
    except ValueError:
        raise InvalidParams(field_name, f"{_show(value)} is not an IPv4 or IPv6 address") from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id:
        raise InvalidParams(field_name, "scoped IPv6 addresses (with %zone) are not supported")
    return addr


def check_group(value: Any, field_name: str, *, kernel: bool) -> str:
    """A multicast group; kernel routes refuse link-local scopes the kernel never forwards."""
    addr = check_address(value, field_name)
    if not addr.is_multicast:
        allowed = "224.0.0.0/4" if addr.version == 4 else "ff00::/8"
        raise InvalidParams(field_name, f"{addr} is not multicast (allowed: {allowed})")
    if kernel:
        if addr.version == 4 and addr in ipaddress.IPv4Network("224.0.0.0/24"):
            raise InvalidParams(
                field_name,
                f"{addr} is link-local (224.0.0.0/24): the kernel never forwards it; "
                "use a relay to carry it between segments",
            )
        if addr.version == 6 and (int(addr) >> 112) & 0xF in (1, 2):
            raise InvalidParams(
                field_name,
                f"{addr} has interface/link-local scope (ff01/ff02): the kernel never forwards "
                "it; use a relay to carry it between segments",
            )
    return str(addr)


def check_source(value: Any, field_name: str, family: int) -> str | None:
    """A unicast source address of the group's family, or None / '*' for any source."""
    if value is None or value == "*":
        return None
    addr = check_address(value, field_name)
    if addr.version != family:
        raise InvalidParams(field_name, f"{addr} is IPv{addr.version}, the group is IPv{family}")
    if addr.is_multicast or addr.is_unspecified:
        raise InvalidParams(field_name, f"{addr} cannot be a source (must be a unicast address)")
    return str(addr)


def check_name(value: Any, field_name: str) -> str:
    _expect(value, str, field_name, "a name")
    if not 1 <= len(value) <= MAX_NAME or not _NAME_RE.match(value):
        raise InvalidParams(
            field_name,
            f"invalid name {_show(value)}: 1-{MAX_NAME} characters from letters, digits "
            "and . _ - : @ [ ], starting with a letter or digit",
        )
    return str(value)


def _mapping(value: Any, field_name: str) -> Mapping[str, Any]:
    _expect(value, dict, field_name, "an object")
    return value  # type: ignore[no-any-return]


def _sequence(value: Any, field_name: str, limit: int) -> Sequence[Any]:
    _expect(value, (list, tuple), field_name, "a list")
    if len(value) > limit:
        raise InvalidParams(field_name, f"at most {limit} entries, got {len(value)}")
    return value  # type: ignore[no-any-return]


def _no_extra(obj: Mapping[str, Any], allowed: set[str], field_name: str) -> None:
    extra = sorted(str(k) for k in obj if k not in allowed)
    if extra:
        where = f"{field_name}." if field_name else ""
        raise InvalidParams(
            f"{where}{extra[0]}", f"unknown field; allowed: {', '.join(sorted(allowed))}"
        )


# ---------------------------------------------------------------- kernel routes


@dataclass(frozen=True)
class Oif:
    """An output interface of a kernel route with its TTL threshold."""

    name: IfName
    ttl: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ttl": self.ttl}


@dataclass(frozen=True)
class RouteKey:
    """Identity of a kernel route; source None is (*,G)."""

    iif: IfName
    source: str | None
    group: str

    def __str__(self) -> str:
        return f"route ({self.source or '*'}, {self.group}) on {self.iif}"

    def to_dict(self) -> dict[str, Any]:
        return {"iif": self.iif, "source": self.source or "*", "group": self.group}


@dataclass(frozen=True)
class Route:
    """A static kernel multicast route from iif to oifs.

    ``source`` is an address, a prefix ``S/LEN`` or None (any source);
    ``group`` an address or a prefix ``G/LEN``; names may be ``prefix+``
    wildcards. An exact (S,G) on a named iif goes into the kernel as it is;
    anything wider is a *template*: each new (S,G) the kernel reports that it
    matches is installed with its outputs (see kernel/engine.py). No outputs
    make a stop filter.
    """

    iif: IfName
    source: str | None
    group: str
    oifs: tuple[Oif, ...]

    @property
    def family(self) -> int:
        return 6 if ":" in self.group else 4

    @property
    def is_template(self) -> bool:
        """True unless this is one exact (S,G) on one named input interface."""
        return (
            self.source is None or "/" in self.source or "/" in self.group or is_wildcard(self.iif)
        )

    @property
    def specificity(self) -> tuple[int, int, int]:
        """Orders templates matching one (S,G): the source's prefix length first, then the
        group's, then a named iif over a wildcard (larger wins)."""
        return (
            range_length(self.source),
            range_length(self.group),
            0 if is_wildcard(self.iif) else 1,
        )

    @property
    def key(self) -> RouteKey:
        return RouteKey(self.iif, self.source, self.group)

    def to_dict(self) -> dict[str, Any]:
        return {
            "iif": self.iif,
            "source": self.source or "*",
            "group": self.group,
            "oifs": [o.to_dict() for o in self.oifs],
        }


def is_wildcard(name: str) -> bool:
    """``eth+``: every interface whose name starts with ``eth``, now and later (smcroute's form)."""
    return name.endswith("+")


def ifname_matches(pattern: str, name: str) -> bool:
    """Does interface ``name`` fall under ``pattern`` (a name or a ``prefix+`` wildcard)?"""
    return name.startswith(pattern[:-1]) if is_wildcard(pattern) else name == pattern


def check_ifpattern(value: Any, field_name: str) -> str:
    """An interface name or a wildcard ``prefix+`` (a name ending in '+' is always a wildcard)."""
    name = check_ifname(value, field_name)
    if name == "+":
        raise InvalidParams(field_name, "'+' alone matches every interface; give a prefix (eth+)")
    return name


def _check_prefix(
    value: Any, field_name: str, what: str
) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    _expect(value, str, field_name, what)
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise InvalidParams(field_name, f"{_show(value)} is not {what}") from None


def check_group_range(value: Any, field_name: str, *, kernel: bool) -> str:
    """A group or a group prefix ``G/LEN`` (canonical: the network; a host length is the address).

    Kernel routes refuse a range that lies wholly in the link-local scope the
    kernel never forwards (a wider range simply never matches those groups).
    """
    if not (isinstance(value, str) and "/" in value):
        return check_group(value, field_name, kernel=kernel)
    net = _check_prefix(value, field_name, "a multicast group prefix (G/LEN)")
    allowed = ipaddress.ip_network("224.0.0.0/4" if net.version == 4 else "ff00::/8")
    if not net.subnet_of(allowed):  # type: ignore[arg-type]
        raise InvalidParams(field_name, f"{net} is not within multicast {allowed}")
    if net.prefixlen == net.max_prefixlen:
        return check_group(str(net.network_address), field_name, kernel=kernel)
    if kernel:
        local = ipaddress.ip_network("224.0.0.0/24" if net.version == 4 else "ff02::/16")
        if net.subnet_of(local):  # type: ignore[arg-type]
            raise InvalidParams(
                field_name, f"{net} is link-local: the kernel never forwards it; use a relay"
            )
    return str(net)


def check_source_range(value: Any, field_name: str, family: int) -> str | None:
    """A unicast source, a source prefix ``S/LEN``, or None / '*' for any source."""
    if not (isinstance(value, str) and "/" in value):
        return check_source(value, field_name, family)
    net = _check_prefix(value, field_name, "a source prefix (S/LEN)")
    if net.version != family:
        raise InvalidParams(field_name, f"{net} is IPv{net.version}, the group is IPv{family}")
    if net.prefixlen == 0:
        return None  # every source: the same as '*'
    if net.prefixlen == net.max_prefixlen:
        return check_source(str(net.network_address), field_name, family)
    if net.is_multicast:
        raise InvalidParams(field_name, f"{net} cannot be a source prefix (it is multicast)")
    return str(net)


def range_length(text: str | None) -> int:
    """Prefix length of a source/group as stored (an address is a host route, '*' is 0)."""
    if text is None:
        return 0
    if "/" in text:
        return int(text.rsplit("/", 1)[1])
    return 128 if ":" in text else 32


def in_range(address: str, text: str | None) -> bool:
    """Is ``address`` the stored source/group, or inside its prefix ('*' holds everything)?"""
    if text is None:
        return True
    if "/" not in text:
        return ipaddress.ip_address(address) == ipaddress.ip_address(text)
    return ipaddress.ip_address(address) in ipaddress.ip_network(text)


def parse_route_key(params: Mapping[str, Any], where: str = "") -> RouteKey:
    p = f"{where}." if where else ""
    iif = check_ifpattern(params.get("iif"), f"{p}iif")
    group = check_group_range(params.get("group"), f"{p}group", kernel=True)
    source = check_source_range(params.get("source"), f"{p}source", 6 if ":" in group else 4)
    return RouteKey(iif, source, group)


def parse_route(params: Any, where: str = "") -> Route:
    """Validate a route from its JSON form ({iif, source?, group, oifs}).

    No outputs is a *stop filter*: an (S,G) with no outputs blocks that source
    even where a wider (*,G/LEN) route would forward it.
    """
    obj = _mapping(params, where or "params")
    _no_extra(obj, {"iif", "source", "group", "oifs"}, where)
    key = parse_route_key(obj, where)
    p = f"{where}." if where else ""
    raw_oifs = _sequence(obj.get("oifs", []), f"{p}oifs", MAX_OUTPUTS)
    oifs: list[Oif] = []
    for i, raw in enumerate(raw_oifs):
        f = f"{p}oifs[{i}]"
        if isinstance(raw, str):
            oif = Oif(check_ifpattern(raw, f))
        else:
            o = _mapping(raw, f)
            _no_extra(o, {"name", "ttl"}, f)
            oif = Oif(
                check_ifpattern(o.get("name"), f"{f}.name"), check_ttl(o.get("ttl", 1), f"{f}.ttl")
            )
        if oif.name == key.iif:
            raise InvalidParams(
                f, f"{oif.name} is the input interface; it cannot also be an output"
            )
        if any(o.name == oif.name for o in oifs):
            raise InvalidParams(f, f"duplicate output interface {oif.name}")
        oifs.append(oif)
    return Route(key.iif, key.source, key.group, tuple(oifs))


# ---------------------------------------------------------------- relays


@dataclass(frozen=True)
class RelayInput:
    """Where a relay listens: a group (or a unicast host address) and port on an interface."""

    iif: IfName
    group: str
    port: int
    sources: tuple[str, ...] = ()

    @property
    def family(self) -> int:
        return 6 if ":" in self.group else 4

    @property
    def is_multicast(self) -> bool:
        return ipaddress.ip_address(self.group).is_multicast

    @property
    def key(self) -> tuple[str, str, int]:
        """Lookup key shared with the workers: (iif, destination address, port)."""
        return (self.iif, self.group, self.port)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"iif": self.iif, "group": self.group, "port": self.port}
        if self.sources:
            d["sources"] = list(self.sources)
        return d


@dataclass(frozen=True)
class RelayOutput:
    """One destination of a relay: multicast or broadcast (with oif) or unicast.

    ``src`` says whose source address the packets carry: ``own`` (the router's,
    sent from an ordinary UDP socket) or ``keep`` (the original sender's
    address and port, written into the IP header on a raw socket, so unicast
    answers go straight back to the sender). ``ttl`` 0 exists only in a
    reflector's expanded legs: the packet keeps the TTL it arrived with.
    """

    address: str
    port: int
    oif: IfName | None
    ttl: int
    dscp: int = 0
    src: SourceMode = "own"

    @property
    def family(self) -> int:
        return 6 if ":" in self.address else 4

    @property
    def is_multicast(self) -> bool:
        return ipaddress.ip_address(self.address).is_multicast

    def spec(self) -> str:
        """The CLI spelling, ADDR:PORT[@OIF][,ttl=N][,dscp=N][,src=keep]."""
        host = f"[{self.address}]" if self.family == 6 else self.address
        text = f"{host}:{self.port}"
        if self.oif:
            text += f"@{self.oif}"
        text = f"{text},ttl={self.ttl},dscp={self.dscp}"
        return text + ",src=keep" if self.src == "keep" else text

    @property
    def is_broadcast(self) -> bool:
        return self.address == LIMITED_BROADCAST

    def to_dict(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "port": self.port,
            "oif": self.oif,
            "ttl": self.ttl,
            "dscp": self.dscp,
            "src": self.src,
        }


@dataclass(frozen=True)
class Reflect:
    """A discovery reflector: ``endpoints`` (group or broadcast, port; per family) on members.

    A packet arriving on any member (``on`` or ``listen_only``) is sent to the
    same address and port on every ``on`` member but the one it came from;
    ``listen_only`` members are heard but never sent to. ``proto`` is the preset
    name, or None for a GROUP:PORT given by hand. ``allow`` holds source
    prefixes (empty: any source).
    """

    proto: str | None
    endpoints: tuple[tuple[str, int], ...]
    on: tuple[IfName, ...]
    listen_only: tuple[IfName, ...] = ()
    source: SourceMode = "keep"
    allow: tuple[str, ...] = ()

    @property
    def members(self) -> tuple[IfName, ...]:
        return self.on + self.listen_only

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.proto is not None:
            d["proto"] = self.proto
        else:
            d["group"], d["port"] = self.endpoints[0]
        d["on"] = list(self.on)
        d["listen_only"] = list(self.listen_only)
        d["source"] = self.source
        d["allow"] = list(self.allow)
        return d


@dataclass(frozen=True)
class Relay:
    """A userspace relay rule: one input, up to 32 outputs; or a reflector.

    A reflector (``reflect`` set) is one rule over N interfaces. Its ``input``
    is its first leg's (the first member and endpoint), kept so that code
    needing one input (names, listings) has one; :meth:`legs` gives the one-way
    relays it stands for, which are what the engine installs.
    """

    name: str
    input: RelayInput
    outputs: tuple[RelayOutput, ...]
    mode: Mode = "packet"
    reflect: Reflect | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.reflect is not None:
            return {"name": self.name, "reflect": self.reflect.to_dict(), "mode": self.mode}
        return {
            "name": self.name,
            "input": self.input.to_dict(),
            "outputs": [o.to_dict() for o in self.outputs],
            "mode": self.mode,
        }

    def legs(self) -> tuple[Relay, ...]:
        """The one-way relays this rule is made of: itself, or one per reflector member
        and endpoint (members that would have no output have no leg)."""
        if self.reflect is None:
            return (self,)
        return reflect_legs(self.name, self.reflect)

    def input_keys(self) -> frozenset[tuple[str, str, int]]:
        """Every (iif, address, port) this rule listens on; two rules may not share one."""
        return frozenset(leg.input.key for leg in self.legs())


def parse_relay_input(raw: Any, where: str) -> RelayInput:
    obj = _mapping(raw, where)
    _no_extra(obj, {"iif", "group", "port", "sources"}, where)
    iif = check_ifname(obj.get("iif"), f"{where}.iif")
    addr = check_address(obj.get("group"), f"{where}.group")
    if addr.is_unspecified:
        raise InvalidParams(f"{where}.group", "must be a multicast group or a host address")
    port = check_port(obj.get("port"), f"{where}.port")
    sources: list[str] = []
    for i, s in enumerate(_sequence(obj.get("sources", []), f"{where}.sources", MAX_SOURCES)):
        src = check_source(s, f"{where}.sources[{i}]", addr.version)
        if src is None:
            raise InvalidParams(f"{where}.sources[{i}]", "must be a unicast address, not '*'")
        if src not in sources:
            sources.append(src)
    if sources and not addr.is_multicast:
        raise InvalidParams(f"{where}.sources", "a source filter needs a multicast input group")
    return RelayInput(iif, str(addr), port, tuple(sources))


def parse_relay_output(raw: Any, where: str, family: int) -> RelayOutput:
    obj = _mapping(raw, where)
    _no_extra(obj, {"address", "port", "oif", "ttl", "dscp", "src"}, where)
    addr = check_address(obj.get("address"), f"{where}.address")
    if addr.version != family:
        raise InvalidParams(
            f"{where}.address", f"{addr} is IPv{addr.version}, the input is IPv{family}"
        )
    if addr.is_unspecified:
        raise InvalidParams(f"{where}.address", "must be a multicast group or a unicast address")
    port = check_port(obj.get("port"), f"{where}.port")
    oif_raw = obj.get("oif")
    oif = None if oif_raw is None else check_ifname(oif_raw, f"{where}.oif")
    if addr.is_multicast and oif is None:
        raise InvalidParams(f"{where}.oif", "a multicast output needs an interface (ADDR:PORT@OIF)")
    if str(addr) == LIMITED_BROADCAST and oif is None:
        raise InvalidParams(
            f"{where}.oif", "a broadcast output needs an interface (255.255.255.255:PORT@OIF)"
        )
    default_ttl = DEFAULT_MCAST_TTL if addr.is_multicast else DEFAULT_UNICAST_TTL
    ttl = check_ttl(obj.get("ttl", default_ttl), f"{where}.ttl")
    dscp = check_dscp(obj.get("dscp", 0), f"{where}.dscp")
    src = check_source_mode(obj.get("src", "own"), f"{where}.src")
    return RelayOutput(str(addr), port, oif, ttl, dscp, src)


def derive_relay_name(inp: RelayInput) -> str:
    host = f"[{inp.group}]" if inp.family == 6 else inp.group
    return f"{host}:{inp.port}@{inp.iif}"


def parse_relay(params: Any, where: str = "") -> Relay:
    """Validate a relay from its JSON form ({name?, input, outputs, mode?}) or a
    reflector's ({name, reflect, mode?})."""
    obj = _mapping(params, where or "params")
    p = f"{where}." if where else ""
    if "reflect" in obj:
        return _parse_reflector(obj, where)
    _no_extra(obj, {"name", "input", "outputs", "mode"}, where)
    inp = parse_relay_input(obj.get("input"), f"{p}input")
    name = obj.get("name")
    name = derive_relay_name(inp) if name is None else check_name(name, f"{p}name")
    mode = obj.get("mode", "packet")
    if mode not in MODES:
        raise InvalidParams(f"{p}mode", f"must be one of {', '.join(MODES)}, got {_show(mode)}")
    raw_outputs = _sequence(obj.get("outputs"), f"{p}outputs", MAX_OUTPUTS)
    if not raw_outputs:
        raise InvalidParams(f"{p}outputs", "at least one output is required")
    outputs: list[RelayOutput] = []
    for i, raw in enumerate(raw_outputs):
        f = f"{p}outputs[{i}]"
        out = parse_relay_output(raw, f, inp.family)
        if (out.address, out.port) == (inp.group, inp.port) and out.oif in (None, inp.iif):
            raise InvalidParams(
                f, f"{out.spec()} is the relay's own input: relaying it back would loop"
            )
        if any((o.address, o.port, o.oif) == (out.address, out.port, out.oif) for o in outputs):
            raise InvalidParams(f, f"duplicate output {out.address}:{out.port}")
        if out.src == "keep" and mode != "packet":
            raise InvalidParams(
                f"{f}.src", "src=keep needs --mode packet (socket mode never sees the sender)"
            )
        outputs.append(out)
    return Relay(name, inp, tuple(outputs), mode)


# Well-known discovery groups, each for both families where both exist.
REFLECT_PRESETS: dict[str, tuple[tuple[str, int], ...]] = {
    "mdns": (("224.0.0.251", 5353), ("ff02::fb", 5353)),
    "ssdp": (("239.255.255.250", 1900), ("ff02::c", 1900)),
    "llmnr": (("224.0.0.252", 5355), ("ff02::1:3", 5355)),
    "wsd": (("239.255.255.250", 3702), ("ff02::c", 3702)),
    "wol": ((LIMITED_BROADCAST, 9),),
}
MDNS_PORT = 5353
MDNS_TTL = 255  # RFC 6762 section 11: receivers drop mDNS with any other TTL/hop limit
_MDNS_GROUPS = frozenset({"224.0.0.251", "ff02::fb"})
MAX_MEMBERS = MAX_OUTPUTS + 1
MAX_ALLOW = 64


def is_mdns(address: str, port: int) -> bool:
    """The mDNS group and port of either family (such packets leave from port 5353, TTL 255)."""
    return port == MDNS_PORT and address in _MDNS_GROUPS


def check_source_mode(value: Any, field_name: str) -> SourceMode:
    if value not in SOURCE_MODES:
        raise InvalidParams(
            field_name, f"must be one of {', '.join(SOURCE_MODES)}, got {_show(value)}"
        )
    return value  # type: ignore[no-any-return]


def _member_list(raw: Any, field_name: str) -> tuple[IfName, ...]:
    names: list[str] = []
    for i, v in enumerate(_sequence(raw, field_name, MAX_MEMBERS)):
        name = check_ifname(v, f"{field_name}[{i}]")
        if name in names:
            raise InvalidParams(f"{field_name}[{i}]", f"duplicate interface {name}")
        names.append(name)
    return tuple(names)


def parse_reflect(raw: Any, where: str) -> Reflect:
    """Validate a reflector spec: {proto | group+port, on, listen_only?, source?, allow?}."""
    obj = _mapping(raw, where)
    _no_extra(obj, {"proto", "group", "port", "on", "listen_only", "source", "allow"}, where)
    proto = obj.get("proto")
    if proto is not None:
        if "group" in obj or "port" in obj:
            raise InvalidParams(f"{where}.proto", "give either proto or group and port, not both")
        if proto not in REFLECT_PRESETS:
            raise InvalidParams(
                f"{where}.proto",
                f"unknown preset {_show(proto)}; allowed: {', '.join(REFLECT_PRESETS)} "
                "(or group and port)",
            )
        endpoints = REFLECT_PRESETS[proto]
    else:
        addr = check_address(obj.get("group"), f"{where}.group")
        if not (addr.is_multicast or str(addr) == LIMITED_BROADCAST):
            raise InvalidParams(
                f"{where}.group",
                f"{addr} is neither multicast nor the broadcast address {LIMITED_BROADCAST}",
            )
        endpoints = ((str(addr), check_port(obj.get("port"), f"{where}.port")),)
    on = _member_list(obj.get("on"), f"{where}.on")
    listen_only = _member_list(obj.get("listen_only", []), f"{where}.listen_only")
    if not on:
        raise InvalidParams(f"{where}.on", "at least one member that is sent to is required")
    for i, name in enumerate(listen_only):
        if name in on:
            raise InvalidParams(f"{where}.listen_only[{i}]", f"{name} is already in on")
    if len(on) + len(listen_only) < 2:
        raise InvalidParams(f"{where}.on", "a reflector needs at least two interfaces")
    if len(on) + len(listen_only) > MAX_MEMBERS:
        raise InvalidParams(f"{where}.on", f"at most {MAX_MEMBERS} interfaces in all")
    source = check_source_mode(obj.get("source", "keep"), f"{where}.source")
    allow: list[str] = []
    for i, v in enumerate(_sequence(obj.get("allow", []), f"{where}.allow", MAX_ALLOW)):
        f = f"{where}.allow[{i}]"
        _expect(v, str, f, "a source prefix (ADDR/LEN)")
        try:
            net = ipaddress.ip_network(v.strip(), strict=False)
        except ValueError:
            raise InvalidParams(f, f"{_show(v)} is not a source prefix (ADDR/LEN)") from None
        if net.network_address.is_multicast:
            raise InvalidParams(f, f"{net} is multicast; sources are unicast")
        if str(net) not in allow:
            allow.append(str(net))
    return Reflect(proto, endpoints, on, listen_only, source, tuple(allow))


def reflect_legs(name: str, spec: Reflect) -> tuple[Relay, ...]:
    """One packet-mode relay per member and endpoint, to that endpoint on every other
    ``on`` member: TTL 255 and source port 5353 for mDNS, else the arriving TTL (0)."""
    legs: list[Relay] = []
    for group, port in spec.endpoints:
        ttl = MDNS_TTL if is_mdns(group, port) else 0
        for member in spec.members:
            outs = tuple(
                RelayOutput(group, port, other, ttl, 0, spec.source)
                for other in spec.on
                if other != member
            )
            if outs:
                legs.append(Relay(name, RelayInput(member, group, port), outs, "packet"))
    return tuple(legs)


def _parse_reflector(obj: Mapping[str, Any], where: str) -> Relay:
    _no_extra(obj, {"name", "reflect", "mode"}, where)
    p = f"{where}." if where else ""
    if obj.get("name") is None:
        raise InvalidParams(f"{p}name", "a reflector needs a name")
    name = check_name(obj.get("name"), f"{p}name")
    if obj.get("mode", "packet") != "packet":
        raise InvalidParams(
            f"{p}mode", "a reflector is packet mode only (it must see each sender's address)"
        )
    spec = parse_reflect(obj.get("reflect"), f"{p}reflect")
    legs = reflect_legs(name, spec)
    return Relay(name, legs[0].input, (), "packet", spec)


# ---------------------------------------------------------------- group joins


@dataclass(frozen=True)
class GroupJoin:
    """A standing IGMP/MLD membership on an interface (ASM, or SSM with a source)."""

    iface: IfName
    group: str
    source: str | None = None

    @property
    def family(self) -> int:
        return 6 if ":" in self.group else 4

    def __str__(self) -> str:
        src = f" from {self.source}" if self.source else ""
        return f"group {self.group}{src} on {self.iface}"

    def to_dict(self) -> dict[str, Any]:
        return {"iface": self.iface, "group": self.group, "source": self.source or "*"}

    def expand(self) -> list[tuple[str, str | None]]:
        """Every (group, source) this rule joins: ranges (G/LEN, S/LEN) spelt out."""
        sources: list[str | None] = [*_hosts(self.source)] or [None]
        return [(g, s) for g in _hosts(self.group) for s in sources]


MAX_JOINS_PER_RULE = 1024


def _hosts(text: str | None) -> list[str]:
    if text is None:
        return []
    if "/" not in text:
        return [text]
    net = ipaddress.ip_network(text)
    return [str(net.network_address + i) for i in range(net.num_addresses)]


def parse_group_join(params: Any, where: str = "") -> GroupJoin:
    """Validate a standing join; ``group`` and ``source`` may be ranges (at most 1,024 joins)."""
    obj = _mapping(params, where or "params")
    _no_extra(obj, {"iface", "group", "source"}, where)
    p = f"{where}." if where else ""
    iface = check_ifpattern(obj.get("iface"), f"{p}iface")
    group = check_group_range(obj.get("group"), f"{p}group", kernel=False)
    source = check_source_range(obj.get("source"), f"{p}source", 6 if ":" in group else 4)
    count = 1
    for text in (group, source):
        if text is not None and "/" in text:
            count *= ipaddress.ip_network(text).num_addresses
    if count > MAX_JOINS_PER_RULE:
        raise InvalidParams(
            f"{p}group",
            f"{group}{f' from {source}' if source else ''} is {count} joins; "
            f"at most {MAX_JOINS_PER_RULE} per rule (use a longer prefix)",
        )
    return GroupJoin(iface, group, source)


# ---------------------------------------------------------------- whole rule set


@dataclass(frozen=True)
class RuleSet:
    """Everything the user configured; what the state file and `apply` hold."""

    routes: tuple[Route, ...] = ()
    relays: tuple[Relay, ...] = ()
    groups: tuple[GroupJoin, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {
            "routes": [r.to_dict() for r in self.routes],
            "relays": [r.to_dict() for r in self.relays],
            "groups": [g.to_dict() for g in self.groups],
        }


def parse_ruleset(params: Any, where: str = "") -> RuleSet:
    """Validate a whole rule set; duplicates inside it are refused like on add."""
    obj = _mapping(params, where or "rules")
    _no_extra(obj, {"routes", "relays", "groups"}, where)
    p = f"{where}." if where else ""
    routes = [
        parse_route(r, f"{p}routes[{i}]")
        for i, r in enumerate(_sequence(obj.get("routes", []), f"{p}routes", MAX_ROUTES))
    ]
    relays = [
        parse_relay(r, f"{p}relays[{i}]")
        for i, r in enumerate(_sequence(obj.get("relays", []), f"{p}relays", MAX_RELAYS))
    ]
    groups = [
        parse_group_join(g, f"{p}groups[{i}]")
        for i, g in enumerate(_sequence(obj.get("groups", []), f"{p}groups", MAX_GROUPS))
    ]
    seen_routes: set[RouteKey] = set()
    for i, r in enumerate(routes):
        if r.key in seen_routes:
            raise InvalidParams(f"{p}routes[{i}]", f"duplicate {r.key}")
        seen_routes.add(r.key)
    names: set[str] = set()
    keys: set[tuple[str, str, int]] = set()
    for i, rl in enumerate(relays):
        if rl.name in names:
            raise InvalidParams(f"{p}relays[{i}].name", f"duplicate relay name {rl.name!r}")
        mine = rl.input_keys()
        if mine & keys:
            raise InvalidParams(f"{p}relays[{i}].input", "duplicate relay input")
        names.add(rl.name)
        keys |= mine
    if len(set(groups)) != len(groups):
        raise InvalidParams(f"{p}groups", "duplicate group join")
    return RuleSet(tuple(routes), tuple(relays), tuple(groups))


# ---------------------------------------------------------------- CLI spellings


def parse_output_spec(spec: str, where: str = "outputs[0]") -> dict[str, Any]:
    """`ADDR:PORT[@OIF][,ttl=N][,dscp=CLASS][,src=keep|own]` into the JSON form of an output."""
    head, *opts = spec.split(",")
    out: dict[str, Any] = _parse_endpoint(
        head, where, "ADDR:PORT[@OIF][,ttl=N][,dscp=CLASS][,src=keep|own]"
    )
    if out.get("iif") is not None:
        out["oif"] = out.pop("iif")
    else:
        out.pop("iif", None)
    for opt in opts:
        key, sep, value = opt.partition("=")
        key = key.strip().lower()
        if not sep or key not in ("ttl", "dscp", "src"):
            raise InvalidParams(
                where, f"unknown option {opt!r}; allowed: ttl=N, dscp=CLASS, src=keep|own"
            )
        out[key] = value.strip()
    out["address"] = out.pop("group")
    return out


def parse_input_spec(spec: str, where: str = "input") -> dict[str, Any]:
    """`GROUP:PORT@IIF` (IPv6 in brackets) into the JSON form of a relay input."""
    out = _parse_endpoint(spec, where, "GROUP:PORT@IIF")
    if out.get("iif") is None:
        raise InvalidParams(f"{where}.iif", "the input needs an interface: GROUP:PORT@IIF")
    return out


def parse_reflect_spec(text: str, where: str = "reflect") -> dict[str, Any]:
    """`PROTO`, `GROUP:PORT` (IPv6 in brackets) or `broadcast:PORT` into reflect fields."""
    word = text.strip().lower()
    if word in REFLECT_PRESETS:
        return {"proto": word}
    if word.startswith("broadcast:"):
        return {"group": LIMITED_BROADCAST, "port": word.partition(":")[2]}
    if ":" not in word:
        raise InvalidParams(
            f"{where}.proto",
            f"unknown preset {text!r}; allowed: {', '.join(REFLECT_PRESETS)}, GROUP:PORT "
            "or broadcast:PORT",
        )
    out = _parse_endpoint(text, where, "PROTO, GROUP:PORT or broadcast:PORT")
    if out.pop("iif") is not None:
        raise InvalidParams(where, "no @IF here: the interfaces are given with --on")
    return out


def _parse_endpoint(text: str, where: str, form: str) -> dict[str, Any]:
    text = text.strip()
    addr_part, at, ifname = text.partition("@")
    if addr_part.startswith("["):
        host, close, rest = addr_part[1:].partition("]")
        if not close or not rest.startswith(":"):
            raise InvalidParams(where, f"cannot parse {text!r}; expected {form}")
        port = rest[1:]
    else:
        host, colon, port = addr_part.rpartition(":")
        if not colon or ":" in host:
            raise InvalidParams(
                where, f"cannot parse {text!r}; expected {form} (IPv6 addresses in brackets)"
            )
    return {"group": host, "port": port, "iif": ifname if at else None}
