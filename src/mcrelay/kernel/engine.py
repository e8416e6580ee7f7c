"""The kernel route engine: static (S,G) and (*,G) routes in the kernel MFC.

The engine keeps the wanted routes and a record of what it installed in the
kernel (VIFs and MFC entries). Every change works the same way:

1. build the *target* kernel state from the wanted routes, the known
   interface indexes and the learned (*,G) sources;
2. diff it against what is installed into a list of kernel steps
   (delete MFC, delete VIF, add VIF, add/replace MFC, in that order so the
   kernel never sees an entry whose VIFs are missing);
3. run the steps; if one fails, undo the applied ones in reverse order and
   re-raise, leaving routes, record and kernel as they were.

``dry_run`` stops after step 2. Because the target is rebuilt from scratch,
interface changes and retries after a failure need no special cases: the next
change simply converges on the right state.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import KernelRefused, NoSuchRule, RuleExists, Unavailable, VifTableFull
from ..model import Route, RouteKey, ifname_matches, in_range, is_wildcard
from .mroute import MrouteApi, MrouteSocket, Upcall, UpcallKind
from .vifs import VifTable

log = logging.getLogger(__name__)

State = Literal["active", "partial", "waiting"]
Resolver = Callable[[str], int | None]
# Why an interface cannot be used now ("interface down", "interface missing",
# "interface renamed to X"); None when it can.
Explainer = Callable[[str], str | None]
Names = Callable[[], Iterable[str]]
SocketFactory = Callable[[int], MrouteApi]

# Kernel answers to deleting something that is already gone (for instance a
# VIF the kernel dropped itself when its interface was unregistered): the goal
# of the step is reached, so they are not failures.
_ALREADY_GONE = frozenset({errno.ENOENT, errno.EADDRNOTAVAIL, errno.ENODEV})

MfcKey = tuple[int, str, str]  # (family, source, group)

# The kernel sends one NOCACHE upcall per new (S,G), then queues the packets in
# an unresolved entry for 10 s without asking again. An upcall no route wanted
# is remembered this long, so a (*,G) route added while its stream already
# flows installs the source at once instead of after the kernel gives up.
RECENT_UPCALL_TTL = 12.0
RECENT_UPCALL_MAX = 4096


def _canon(addr: str) -> str:
    return str(ipaddress.ip_address(addr))


# ---------------------------------------------------------------- results


def _route_dict(route: Route) -> dict[str, Any]:
    return {
        "iif": route.iif,
        "source": route.source if route.source is not None else "*",
        "group": route.group,
        "oifs": [{"name": o.name, "ttl": o.ttl} for o in route.oifs],
        "family": route.family,
    }


@dataclass(frozen=True, slots=True)
class LearnedSource:
    """An (S,G) a template route installed from an upcall, with its MFC entry's counters."""

    source: str
    packets: int
    bytes: int
    wrong_if: int = 0
    group: str = ""
    iif: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "source": self.source,
            "group": self.group,
            "iif": self.iif,
            "packets": self.packets,
            "bytes": self.bytes,
        }


@dataclass(frozen=True, slots=True)
class OifState:
    """One output of a route now: ``reason`` None when it forwards.

    A wildcard output (``eth+``) is never waiting: it stands for whatever
    matches now (``matches``), possibly nothing.
    """

    name: str
    reason: str | None = None
    matches: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class RouteStatus:
    """A route as the kernel sees it, with counters that survive kernel resets.

    ``state`` is ``active`` when the input and every output are in place,
    ``partial`` when some outputs wait, ``waiting`` when the route is not in
    the kernel (``reason`` says why). ``packets``/``bytes``/``wrong_if`` are
    the kernel's MFC counters (bytes: whole IP packets as received) plus what
    the entries counted before the engine removed or rewrote them since
    ``counters_since`` (Unix time the route was first installed).
    """

    route: Route
    state: State
    packets: int = 0
    bytes: int = 0
    wrong_if: int = 0
    learned: tuple[LearnedSource, ...] = ()
    reason: str | None = None
    oif_states: tuple[OifState, ...] = ()
    counters_since: float | None = None
    counter_resets: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the route's fields plus state and counters)."""
        d = _route_dict(self.route)
        states = {o.name: o for o in self.oif_states}
        for od in d["oifs"]:
            st = states.get(od["name"])
            od["state"] = "waiting" if st is not None and st.reason else "active"
            if st is not None and st.reason:
                od["reason"] = st.reason
            if st is not None and st.matches is not None:
                od["matches"] = list(st.matches)
        d.update(
            state=self.state,
            packets=self.packets,
            bytes=self.bytes,
            wrong_if=self.wrong_if,
            learned=[ls.to_dict() for ls in self.learned],
            counters_since=self.counters_since,
            counter_resets=self.counter_resets,
            bytes_counted="ip_packet",  # the kernel's MFC counts whole IP packets
        )
        if self.reason:
            d["reason"] = self.reason
        return d


@dataclass(frozen=True, slots=True)
class RouteDiff:
    """What a whole-set replace changes; ``changed`` holds the new versions."""

    added: tuple[Route, ...] = ()
    removed: tuple[Route, ...] = ()
    changed: tuple[Route, ...] = ()

    @property
    def empty(self) -> bool:
        """True when the replace changes nothing."""
        return not (self.added or self.removed or self.changed)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "added": [_route_dict(r) for r in self.added],
            "removed": [_route_dict(r) for r in self.removed],
            "changed": [_route_dict(r) for r in self.changed],
        }


# ---------------------------------------------------------------- plan


@dataclass(frozen=True, slots=True)
class MfcSpec:
    """One MFC entry as installed: input slot and output (slot, ifindex, ttl).

    Interface indexes are part of the value so that an interface re-created
    under the same name (same slot, new index) makes the entry differ and be
    rewritten.
    """

    parent: int
    parent_ifindex: int
    oifs: tuple[tuple[int, int, int], ...]

    def ttls(self) -> dict[int, int]:
        """Output slot -> TTL threshold, as the socket wants it."""
        return {slot: ttl for slot, _ifindex, ttl in self.oifs}


@dataclass(frozen=True, slots=True)
class Step:
    """One kernel change and the change that reverts it."""

    what: str
    do: Callable[[], None]
    undo: Callable[[], None]

    def __str__(self) -> str:
        return self.what


@dataclass(slots=True)
class _Learned:
    """An (S,G) seen in an upcall and installed for a template; ``iif`` is where it arrived."""

    iif: str
    packets: int = 0
    bytes: int = 0
    wrong_if: int = 0
    last_active: float = 0.0


@dataclass(slots=True)
class _KernelState:
    vifs: dict[int, VifTable]
    mfc: dict[MfcKey, MfcSpec] = field(default_factory=dict)
    owner: dict[MfcKey, RouteKey] = field(default_factory=dict)
    active: set[RouteKey] = field(default_factory=set)


def run_transaction(steps: Sequence[Step]) -> None:
    """Apply ``steps`` in order; on failure undo the applied ones in reverse and re-raise."""
    done: list[Step] = []
    try:
        for step in steps:
            step.do()
            done.append(step)
    except BaseException as exc:
        log.warning("kernel step failed (%s); rolling back %d step(s)", exc, len(done))
        for applied in reversed(done):
            try:
                applied.undo()
            except Exception as undo_exc:  # keep undoing the rest; report the first error
                log.error("rollback of %r failed: %s", str(applied), undo_exc)
        raise


# ---------------------------------------------------------------- engine


class KernelEngine:
    """Static multicast routes in the kernel MFC, IPv4 and IPv6.

    ``resolve`` maps an interface name to its index (None when absent); it is
    asked when a route names an interface the engine does not know yet, and
    :meth:`interface_changed` keeps the answers current afterwards.
    ``socket_factory`` opens the mroute socket of a family (tests pass a fake
    kernel here).

    Call :meth:`expire` periodically (a few times per ``learned_expiry``) to
    age out learned (*,G) sources. IPv6 MFC entries carry no TTL thresholds,
    so an output's ``ttl`` only matters for IPv4.
    """

    def __init__(
        self,
        resolve: Resolver,
        learned_expiry: float = 60.0,
        socket_factory: SocketFactory = MrouteSocket,
        names: Names = tuple,
        explain: Explainer | None = None,
    ) -> None:
        self._resolve = resolve
        self._explain = explain
        self._names_now = names  # every interface name there is (for eth+ wildcards)
        self.learned_expiry = learned_expiry
        self._factory = socket_factory
        self._socks: dict[int, MrouteApi] = {}
        self._unavailable: dict[int, KernelRefused] = {}
        self._opened = False
        self._routes: dict[RouteKey, Route] = {}
        self._ifindex: dict[str, int | None] = {}
        self._learned: dict[MfcKey, _Learned] = {}
        self._k = _KernelState({4: VifTable(4), 6: VifTable(6)})
        self._dirty = False
        # (family, source, group) -> (input VIF slot, when) of unwanted NOCACHE upcalls.
        self._recent: dict[MfcKey, tuple[int, float]] = {}
        # Counters of MFC entries the engine removed (the kernel's restart at 0
        # when an entry is re-added), per route, so a flap never resets a route.
        self._absorbed: dict[RouteKey, list[int]] = {}  # packets, bytes, wrong_if, resets
        self._since: dict[RouteKey, float] = {}  # Unix time a route was first installed

    # ------------------------------------------------------------ lifecycle

    def open(self) -> None:
        """Become the multicast router (MRT_INIT, MRT6_INIT) and install known routes.

        IPv4 is required; if IPv6 multicast routing is unavailable the engine
        logs it and runs IPv4 only, refusing IPv6 routes.
        """
        if self._opened:
            return
        self._socks[4] = self._factory(4)
        try:
            self._socks[6] = self._factory(6)
        except (KernelRefused, OSError) as exc:
            refused = (
                exc
                if isinstance(exc, KernelRefused)
                else KernelRefused("MRT6_INIT", exc.errno or errno.EAFNOSUPPORT)
            )
            self._unavailable[6] = refused
            log.warning("IPv6 multicast routing unavailable, running IPv4 only: %s", refused)
        self._opened = True
        if self._routes:
            self._apply(self._routes, self._learned, strict=frozenset())

    def close(self) -> None:
        """Remove every MFC entry and VIF the engine installed, then MRT_DONE.

        Best effort: a failing removal is logged and the rest still goes.
        The wanted routes are kept, so a later :meth:`open` reinstalls them.
        """
        if not self._opened:
            return
        empty = _KernelState({f: VifTable(f) for f in (4, 6)})
        for step in self._plan(self._k, empty):
            try:
                step.do()
            except Exception as exc:
                log.warning("cleanup step %r failed: %s", str(step), exc)
        self._k = empty
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()
        self._unavailable.clear()
        self._opened = False

    def fds(self) -> list[int]:
        """The mroute sockets to watch for readability (upcalls)."""
        return [sock.fileno() for sock in self._socks.values()]

    def families(self) -> list[int]:
        """The address families the engine can route right now."""
        return sorted(self._socks)

    # ------------------------------------------------------------ routes

    def add_route(self, route: Route, dry_run: bool = False) -> None:
        """Install one route; refused with RuleExists, VifTableFull or KernelRefused."""
        self._require_family(route.family)
        if route.key in self._routes:
            raise RuleExists(str(route.key))
        self._check_sg_conflict(route, self._routes.values())
        self._learn_names([route])  # the installed routes' names are known already
        routes = dict(self._routes)
        routes[route.key] = route
        self._apply(routes, self._learned, strict=frozenset({route.key}), dry_run=dry_run)

    def update_route(self, route: Route, dry_run: bool = False) -> None:
        """Replace the route of the same identity (its outputs change); NoSuchRule if unknown."""
        if route.key not in self._routes:
            raise NoSuchRule(str(route.key))
        self._learn_names([route, *self._routes.values()])
        routes = dict(self._routes)
        routes[route.key] = route
        self._apply(routes, self._learned, strict=frozenset({route.key}), dry_run=dry_run)

    def del_route(self, key: RouteKey, dry_run: bool = False) -> None:
        """Remove one route and whatever of it is in the kernel; NoSuchRule if unknown."""
        if key not in self._routes:
            raise NoSuchRule(str(key))
        routes = {k: r for k, r in self._routes.items() if k != key}
        self._apply(routes, self._learned, strict=frozenset(), dry_run=dry_run)

    def replace(self, routes: Sequence[Route], dry_run: bool = False) -> RouteDiff:
        """Make ``routes`` the whole route set in one transaction; return the diff.

        Either every route is installed (or waiting for its input interface)
        or nothing changes. Learned sources survive for (*,G) routes kept.
        """
        new: dict[RouteKey, Route] = {}
        exact: dict[tuple[Any, str], Route] = {}  # (S,G) -> its route: one per (S,G), in O(1)
        for route in routes:
            self._require_family(route.family)
            if route.key in new:
                raise RuleExists(str(route.key))
            if not route.is_template:
                other = exact.setdefault((route.source, route.group), route)
                if other is not route:
                    raise RuleExists(str(other.key))
            new[route.key] = route
        self._learn_names(routes)
        diff = RouteDiff(
            added=tuple(r for k, r in new.items() if k not in self._routes),
            removed=tuple(r for k, r in self._routes.items() if k not in new),
            changed=tuple(r for k, r in new.items() if k in self._routes and self._routes[k] != r),
        )
        self._apply(new, self._learned, strict=frozenset(new), dry_run=dry_run)
        return diff

    def routes(self) -> list[RouteStatus]:
        """Every wanted route with its state and kernel counters."""
        return [self._status(route) for route in self._routes.values()]

    def warnings(self) -> list[str]:
        """Routes not wholly in the kernel and why, for ``status`` (no counter reads)."""
        out = []
        for route in self._routes.values():
            state, reason, _ = self._states(route)
            if state == "waiting":
                out.append(f"{route.key} waits: {reason}")
            elif state == "partial":
                out.append(f"{route.key}: output {reason}")
        return out

    def get(self, key: RouteKey) -> RouteStatus:
        """One route's status; NoSuchRule if unknown."""
        route = self._routes.get(key)
        if route is None:
            raise NoSuchRule(str(key))
        return self._status(route)

    def vifs(self, family: int) -> VifTable:
        """A copy of the installed VIF (4) or MIF (6) table."""
        return self._k.vifs[family].copy()

    # ------------------------------------------------------------ interfaces

    def interface_changed(self, name: str, ifindex: int | None) -> None:
        """An interface appeared (index), vanished (None) or was re-created.

        Routes using it are rebuilt: an absent input interface makes a route
        ``waiting``; absent outputs are left out of its MFC entry until they
        return. A route that no longer fits the VIF table waits too (logged).
        """
        if not any(name in self._concrete(r) for r in self._routes.values()):
            self._ifindex.pop(name, None)
            return
        if self._ifindex.get(name) == ifindex and not self._dirty:
            return
        self._ifindex[name] = ifindex
        if self._opened:
            self.resync()

    def reconcile(self) -> None:
        """Converge on the interfaces as the resolver sees them now (level-triggered).

        Cheap when nothing moved: the kernel is only touched if an interface a
        route names changed index or presence, or an earlier rebuild failed.
        Raises KernelRefused if the kernel refuses; the caller retries.
        """
        names = {n for r in self._routes.values() for n in self._concrete(r)}
        fresh = {n: self._resolve(n) for n in names}
        if fresh == self._ifindex and not self._dirty:
            return
        self._ifindex = fresh
        if self._opened:
            self.resync()

    @property
    def needs_resync(self) -> bool:
        """True after an interface change could not be applied (see :meth:`resync`)."""
        return self._dirty

    def resync(self) -> None:
        """Converge the kernel on the wanted routes and known interfaces.

        Interface changes happen whether or not the kernel accepts the
        rebuild; when it refuses, the engine stays consistent with the old
        kernel state and marks itself dirty. Calling this (for instance on a
        timer while :attr:`needs_resync`) retries.
        """
        self._dirty = True
        self._apply(self._routes, self._learned, strict=frozenset())
        self._dirty = False

    # ------------------------------------------------------------ upcalls

    def handle_readable(self, fd: int, now: float) -> None:
        """Read the upcalls queued on ``fd`` and learn sources for (*,G) routes."""
        for sock in list(self._socks.values()):
            if sock.fileno() == fd:
                for upcall in sock.read_upcalls():
                    self._on_upcall(upcall, now)

    def _on_upcall(self, up: Upcall, now: float) -> None:
        if up.kind != UpcallKind.NOCACHE:
            log.debug("ignoring upcall %s", up)
            return
        vif = self._k.vifs[up.family].by_slot(up.vif)
        if vif is None:
            return
        mkey: MfcKey = (up.family, _canon(up.source), _canon(up.group))
        if mkey in self._k.mfc:
            return
        route = self._match(vif.name, mkey)
        if route is None:
            log.debug("no active template route for %s", up)
            self._remember(mkey, up.vif, now)
            return
        self._learn(route, mkey, vif.name, now)

    def _match(
        self,
        iif: str,
        mkey: MfcKey,
        routes: Mapping[RouteKey, Route] | None = None,
        active: Iterable[RouteKey] | None = None,
    ) -> Route | None:
        """The most specific active template route for (S,G) arriving on ``iif``."""
        family, source, group = mkey
        routes = self._routes if routes is None else routes
        best: Route | None = None
        for key in self._k.active if active is None else active:
            route = routes.get(key)
            if (
                route is None
                or not route.is_template
                or route.family != family
                or not ifname_matches(route.iif, iif)
                or not in_range(source, route.source)
                or not in_range(group, route.group)
            ):
                continue
            if best is None or route.specificity > best.specificity:
                best = route
        return best

    def _learn(self, route: Route, mkey: MfcKey, iif: str, now: float) -> None:
        family, source, group = mkey
        if mkey in self._k.mfc:
            return
        spec = self._spec(route, self._k.vifs[family], iif)
        if spec is None:
            return
        try:
            self._socks[family].add_mfc(source, group, spec.parent, spec.ttls())
        except KernelRefused as exc:
            log.warning("could not install (%s, %s) for %s: %s", source, group, route.key, exc)
            return
        self._k.mfc[mkey] = spec
        self._k.owner[mkey] = route.key
        self._learned[mkey] = _Learned(iif, last_active=now)
        self._recent.pop(mkey, None)
        what = "blocked" if not spec.oifs else "learned"
        log.info("%s (%s, %s) on %s for %s", what, source, group, iif, route.key)

    def _remember(self, mkey: MfcKey, vif: int, now: float) -> None:
        if len(self._recent) >= RECENT_UPCALL_MAX:
            self._forget_old(now)
            if len(self._recent) >= RECENT_UPCALL_MAX:
                self._recent.pop(next(iter(self._recent)))
        self._recent[mkey] = (vif, now)

    def _forget_old(self, now: float) -> None:
        for mkey, (_, seen) in list(self._recent.items()):
            if now - seen > RECENT_UPCALL_TTL:
                del self._recent[mkey]

    def _adopt_recent(self) -> None:
        """Install sources whose packets the kernel holds for newly active template routes."""
        if not self._recent:
            return
        now = time.monotonic()
        self._forget_old(now)
        for mkey, (vif_slot, _) in list(self._recent.items()):
            vif = self._k.vifs[mkey[0]].by_slot(vif_slot)
            if vif is None:
                continue
            route = self._match(vif.name, mkey)
            if route is not None:
                self._learn(route, mkey, vif.name, now)

    def expire(self, now: float) -> list[tuple[RouteKey, str]]:
        """Remove learned (S,G) entries whose packet counter stood still too long.

        Also re-resolves a learned (S,G) whose packets now all arrive on
        another interface. Returns the (route, source) pairs removed; a removed
        source is learned again by its next packet's upcall.
        """
        removed: list[tuple[RouteKey, str]] = []
        for mkey, rec in list(self._learned.items()):
            owner = self._k.owner.get(mkey)
            if owner is None:
                del self._learned[mkey]
                continue
            count = self._count(mkey)
            if (
                count is not None
                and count[2] > rec.wrong_if
                and (count[2] - rec.wrong_if >= count[0] - rec.packets)
            ):
                # Every packet since the last look came in on another interface
                # (the kernel counts those as packets *and* wrong-interface): the
                # source moved. Drop the entry so the next packet's upcall
                # resolves it on the route of its new input.
                log.info(
                    "(%s, %s) now arrives on another interface than %s; re-resolving",
                    mkey[1],
                    mkey[2],
                    rec.iif,
                )
                if self._forget_learned(mkey):
                    removed.append((owner, mkey[1]))
                continue
            if count is not None and count[0] != rec.packets:
                rec.packets, rec.bytes, rec.wrong_if = count
                rec.last_active = now
                continue
            if now - rec.last_active < self.learned_expiry:
                continue
            if self._forget_learned(mkey):
                removed.append((owner, mkey[1]))
                log.info("expired idle (%s, %s) of %s", mkey[1], mkey[2], owner)
        return removed

    def _forget_learned(self, mkey: MfcKey) -> bool:
        count = self._count(mkey)
        try:
            self._del_mfc(*mkey)
        except KernelRefused as exc:
            log.warning("could not remove (%s, %s): %s", mkey[1], mkey[2], exc)
            return False
        self._absorb(self._k.owner.get(mkey), count, self._routes, reset=False)
        self._k.mfc.pop(mkey, None)
        self._k.owner.pop(mkey, None)
        self._learned.pop(mkey, None)
        return True

    # ------------------------------------------------------------ internals

    def _require_family(self, family: int) -> None:
        if not self._opened:
            raise Unavailable("the kernel route engine is not open")
        if family not in self._socks:
            refused = self._unavailable.get(family)
            raise refused or KernelRefused("MRT6_INIT", errno.EAFNOSUPPORT)

    @staticmethod
    def _check_sg_conflict(route: Route, others: Iterable[Route]) -> None:
        # The kernel keys MFC entries by (S,G) alone: one (S,G) can have one iif.
        if route.is_template:
            return
        for other in others:
            if not other.is_template and (other.source, other.group) == (
                route.source,
                route.group,
            ):
                raise RuleExists(str(other.key))

    def _concrete(self, route: Route) -> list[str]:
        """The interface names a route uses now: its names, wildcards expanded."""
        patterns = [route.iif, *(o.name for o in route.oifs)]
        if not any(is_wildcard(p) for p in patterns):
            return patterns
        present = list(self._names_now())
        out: list[str] = []
        for p in patterns:
            for name in present if is_wildcard(p) else [p]:
                if ifname_matches(p, name) and name not in out:
                    out.append(name)
        return out

    def _oifs(self, route: Route, iif: str) -> list[tuple[str, int]]:
        """(name, ttl) of a route's outputs for packets arriving on ``iif``, wildcards expanded."""
        out: dict[str, int] = {}
        present = list(self._names_now()) if any(is_wildcard(o.name) for o in route.oifs) else []
        for o in route.oifs:
            for name in present if is_wildcard(o.name) else [o.name]:
                if name != iif and ifname_matches(o.name, name):
                    out.setdefault(name, o.ttl)
        return sorted(out.items())

    def _learn_names(self, routes: Iterable[Route]) -> None:
        for route in routes:
            for name in self._concrete(route):
                if name not in self._ifindex:
                    self._ifindex[name] = self._resolve(name)

    def _spec(self, route: Route, vifs: VifTable, iif_name: str | None = None) -> MfcSpec | None:
        iif = vifs.get(iif_name or route.iif)
        if iif is None:
            return None
        oifs = []
        for name, ttl in self._oifs(route, iif.name):
            vif = vifs.get(name)
            if vif is not None:
                oifs.append((vif.slot, vif.ifindex, ttl))
        return MfcSpec(iif.slot, iif.ifindex, tuple(sorted(oifs)))

    def _target(
        self,
        routes: Mapping[RouteKey, Route],
        learned: Mapping[MfcKey, _Learned],
        strict: frozenset[RouteKey],
    ) -> _KernelState:
        wanted = {n for r in routes.values() for n in self._concrete(r)}
        vifs = {f: t.planning_copy(wanted) for f, t in self._k.vifs.items()}
        target = _KernelState(vifs)
        for route in routes.values():
            if route.family not in self._socks:
                continue
            names = self._concrete(route)
            inputs = [n for n in names if ifname_matches(route.iif, n)]
            if not any(self._ifindex.get(n) is not None for n in inputs):
                continue
            table = vifs[route.family]
            present = [(n, idx) for n in names if (idx := self._ifindex.get(n)) is not None]
            taken: list[str] = []
            try:
                for name, idx in present:
                    table.acquire(name, idx)
                    taken.append(name)
            except VifTableFull:
                for name in taken:
                    table.release(name)
                if route.key in strict:
                    raise
                log.warning("%s waits: the IPv%d VIF table is full", route.key, route.family)
                continue
            target.active.add(route.key)
            if not route.is_template:
                spec = self._spec(route, table)
                assert spec is not None
                mkey = (route.family, str(route.source), route.group)
                target.mfc[mkey] = spec
                target.owner[mkey] = route.key
        # Sources learned for templates go to the most specific template that
        # matches them now (an exact (S,G) always wins: it is installed above).
        for mkey, rec in learned.items():
            if mkey in target.mfc:
                continue
            template = self._match(rec.iif, mkey, routes, target.active)
            if template is None:
                continue
            spec = self._spec(template, vifs[template.family], rec.iif)
            if spec is not None:
                target.mfc[mkey] = spec
                target.owner[mkey] = template.key
        return target

    def _plan(self, cur: _KernelState, new: _KernelState) -> list[Step]:
        steps: list[Step] = []
        for mkey, spec in cur.mfc.items():
            if mkey not in new.mfc:
                steps.append(self._step_del_mfc(mkey, spec))
        for family in (4, 6):
            old_t, new_t = cur.vifs[family], new.vifs[family]
            for vif in old_t:
                nv = new_t.get(vif.name)
                if nv is None or (nv.slot, nv.ifindex) != (vif.slot, vif.ifindex):
                    steps.append(self._step_del_vif(family, vif.slot, vif.ifindex, vif.name))
            for vif in new_t:
                ov = old_t.get(vif.name)
                if ov is None or (ov.slot, ov.ifindex) != (vif.slot, vif.ifindex):
                    steps.append(self._step_add_vif(family, vif.slot, vif.ifindex, vif.name))
        for mkey, spec in new.mfc.items():
            old = cur.mfc.get(mkey)
            if old != spec:
                steps.append(self._step_add_mfc(mkey, spec, old))
        return steps

    def _apply(
        self,
        routes: Mapping[RouteKey, Route],
        learned: Mapping[MfcKey, _Learned],
        strict: frozenset[RouteKey],
        dry_run: bool = False,
    ) -> list[Step]:
        target = self._target(routes, learned, strict)
        steps = self._plan(self._k, target)
        if dry_run:
            return steps
        gone = {k: self._count(k) for k in self._k.mfc if k not in target.mfc}
        run_transaction(steps)
        for mkey, count in gone.items():
            self._absorb(self._k.owner.get(mkey), count, routes)
        self._k = target
        self._routes = dict(routes)
        now = time.time()
        for key in target.active:
            self._since.setdefault(key, now)
        for key in [k for k in self._since if k not in self._routes]:
            del self._since[key]
            self._absorbed.pop(key, None)
        self._learned = {k: v for k, v in learned.items() if k in target.mfc}
        referenced = {n for r in self._routes.values() for n in self._concrete(r)}
        self._ifindex = {n: i for n, i in self._ifindex.items() if n in referenced}
        if steps:
            log.debug("applied %d kernel step(s): %s", len(steps), "; ".join(map(str, steps)))
        self._adopt_recent()
        return steps

    # ------------------------------------------------------------ steps

    def _del_mfc(self, family: int, source: str, group: str) -> None:
        try:
            self._socks[family].del_mfc(source, group)
        except KernelRefused as exc:
            if exc.errno not in _ALREADY_GONE:
                raise
            log.debug("MFC (%s, %s) was already gone", source, group)

    def _add_mfc(self, family: int, source: str, group: str, spec: MfcSpec) -> None:
        self._socks[family].add_mfc(source, group, spec.parent, spec.ttls())

    def _step_del_mfc(self, mkey: MfcKey, spec: MfcSpec) -> Step:
        f, src, grp = mkey
        return Step(
            f"del MFC ({src}, {grp})",
            lambda: self._del_mfc(f, src, grp),
            lambda: self._add_mfc(f, src, grp, spec),
        )

    def _step_add_mfc(self, mkey: MfcKey, spec: MfcSpec, old: MfcSpec | None) -> Step:
        f, src, grp = mkey
        if old is None:
            return Step(
                f"add MFC ({src}, {grp}) iif slot {spec.parent} oifs {sorted(spec.ttls())}",
                lambda: self._add_mfc(f, src, grp, spec),
                lambda: self._del_mfc(f, src, grp),
            )
        return Step(
            f"update MFC ({src}, {grp}) iif slot {spec.parent} oifs {sorted(spec.ttls())}",
            lambda: self._add_mfc(f, src, grp, spec),
            lambda: self._add_mfc(f, src, grp, old),
        )

    def _del_vif(self, family: int, slot: int) -> None:
        try:
            self._socks[family].del_vif(slot)
        except KernelRefused as exc:
            if exc.errno not in _ALREADY_GONE:
                raise
            log.debug("IPv%d VIF %d was already gone", family, slot)

    def _step_add_vif(self, family: int, slot: int, ifindex: int, name: str) -> Step:
        sock = self._socks[family]
        return Step(
            f"add IPv{family} VIF {slot} = {name} (ifindex {ifindex})",
            lambda: sock.add_vif(slot, ifindex),
            lambda: self._del_vif(family, slot),
        )

    def _step_del_vif(self, family: int, slot: int, ifindex: int, name: str) -> Step:
        sock = self._socks[family]
        return Step(
            f"del IPv{family} VIF {slot} = {name} (ifindex {ifindex})",
            lambda: self._del_vif(family, slot),
            lambda: sock.add_vif(slot, ifindex),
        )

    # ------------------------------------------------------------ status

    def _count(self, mkey: MfcKey) -> tuple[int, int, int] | None:
        sock = self._socks.get(mkey[0])
        if sock is None:
            return None
        try:
            c = sock.sg_count(mkey[1], mkey[2])
        except KernelRefused as exc:
            log.debug("counters of %s unavailable: %s", mkey, exc)
            return None
        return None if c is None else (c.packets, c.bytes, c.wrong_if)

    def _absorb(
        self,
        owner: RouteKey | None,
        count: tuple[int, int, int] | None,
        routes: Mapping[RouteKey, Route],
        reset: bool = True,
    ) -> None:
        """Keep what a removed MFC entry counted in its route's totals.

        ``reset``: the entry went because an interface moved (it is counted
        as a reset); an idle learned source that expired is not one.
        """
        if owner is None or owner not in routes:
            return
        acc = self._absorbed.setdefault(owner, [0, 0, 0, 0])
        for i, v in enumerate(count or (0, 0, 0)):
            acc[i] += v
        if reset and route_has_counted(count):
            acc[3] += 1

    def _why(self, name: str) -> str:
        """The reason interface ``name`` is not usable, as the interface table says."""
        why = self._explain(name) if self._explain is not None else None
        return why or "interface missing"

    def _states(self, route: Route) -> tuple[State, str | None, tuple[OifState, ...]]:
        """A route's state, its reason and each output's state, from what the engine holds."""
        if route.key not in self._k.active:
            if route.family not in self._socks:
                return "waiting", f"IPv{route.family} multicast routing unavailable", ()
            inputs = [n for n in self._concrete(route) if ifname_matches(route.iif, n)]
            if not any(self._ifindex.get(n) is not None for n in inputs):
                why = "no interface matches" if is_wildcard(route.iif) else self._why(route.iif)
                return "waiting", f"input {why}", ()
            return "waiting", f"IPv{route.family} VIF table full", ()
        oifs: list[OifState] = []
        for o in route.oifs:
            if is_wildcard(o.name):
                names = tuple(sorted(n for n in self._concrete(route) if ifname_matches(o.name, n)))
                oifs.append(OifState(o.name, None, names))
            elif self._ifindex.get(o.name) is None:
                oifs.append(OifState(o.name, self._why(o.name)))
            else:
                oifs.append(OifState(o.name))
        waiting = [o for o in oifs if o.reason]
        if waiting:
            # Every output waiting: nothing is forwarded, so the route waits too.
            state: State = "waiting" if len(waiting) == len(oifs) else "partial"
            return state, "; ".join(f"{o.name} {o.reason}" for o in waiting), tuple(oifs)
        return "active", None, tuple(oifs)

    def _status(self, route: Route) -> RouteStatus:
        state, reason, oifs = self._states(route)
        base = self._absorbed.get(route.key, [0, 0, 0, 0])
        since, resets = self._since.get(route.key), base[3]
        if route.key not in self._k.active:  # nothing in the kernel to count
            return RouteStatus(
                route,
                state,
                base[0],
                base[1],
                base[2],
                reason=reason,
                counters_since=since,
                counter_resets=resets,
            )
        learned: list[LearnedSource] = []
        if not route.is_template:
            sg = self._count((route.family, str(route.source), route.group)) or (0, 0, 0)
        else:
            for mkey, owner in self._k.owner.items():
                rec = self._learned.get(mkey)
                if owner != route.key or rec is None:
                    continue
                c = self._count(mkey) or (rec.packets, rec.bytes, rec.wrong_if)
                learned.append(LearnedSource(mkey[1], *c, group=mkey[2], iif=rec.iif))
            sg = (
                sum(ls.packets for ls in learned),
                sum(ls.bytes for ls in learned),
                sum(ls.wrong_if for ls in learned),
            )
        return RouteStatus(
            route,
            state,
            sg[0] + base[0],
            sg[1] + base[1],
            sg[2] + base[2],
            tuple(learned),
            reason=reason,
            oif_states=oifs,
            counters_since=since,
            counter_resets=resets,
        )


def route_has_counted(count: tuple[int, int, int] | None) -> bool:
    """True when an entry being removed had counted anything (a reset worth reporting)."""
    return count is not None and any(count)
