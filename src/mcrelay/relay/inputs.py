"""The ingress sockets the supervisor owns for the relays, kept level with the rules.

- per (input interface, family) with packet-mode relays: one AF_PACKET socket
  per worker slot, all in one PACKET_FANOUT hash group. The supervisor keeps
  its own reference, so a restarted worker gets the same socket back (its
  fanout share and queued packets included), and a rule change only
  re-attaches the BPF filter to these sockets (the very ones the workers read);
- per socket-mode relay: one UDP socket, given to the one worker chosen by a
  hash of the relay's input key (so each stream stays in order);
- per unicast packet-mode input: a bound never-read UDP socket (no ICMP
  port-unreachable from the host).

:meth:`Inputs.sync` compares what the rules need on the interfaces as they are
*now* (name and index) with what is open, closes what is stale (an interface
gone, down, or re-created with a new index), opens what is missing, and
reports both, so the caller can tell the workers. Opening goes through
:class:`Openers`, which unit tests replace.
"""

from __future__ import annotations

import errno
import logging
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from mcrelay.model import Relay
from mcrelay.net import bpf, rawsend
from mcrelay.relay import ingress
from mcrelay.relay import messages as m

# The interface vanished under us while opening: the next sync retries.
GONE_ERRNOS = frozenset({errno.ENODEV, errno.ENXIO, errno.ENETDOWN})


class Closable(Protocol):
    def fileno(self) -> int: ...
    def close(self) -> None: ...


class Openers(Protocol):
    """How ingress sockets are made (the kernel's way in :class:`KernelOpeners`)."""

    def packet(
        self, ifindex: int, family: int, fanout: int | None, prog: bpf.Program
    ) -> tuple[Closable, int]: ...

    def udp(self, relay: Relay, ifindex: int) -> Closable: ...

    def holder(self, iif: str, family: int, address: str, port: int) -> Closable | None: ...

    def attach(self, sock: Closable, prog: bpf.Program) -> None: ...

    def packet_stats(self, sock: Closable) -> tuple[int, int]: ...

    def raw(self, family: int) -> Closable: ...


class KernelOpeners:
    """Real sockets (:mod:`mcrelay.relay.ingress`)."""

    def packet(
        self, ifindex: int, family: int, fanout: int | None, prog: bpf.Program
    ) -> tuple[Closable, int]:
        return ingress.open_packet(ifindex, family, fanout, prog)

    def udp(self, relay: Relay, ifindex: int) -> Closable:
        i = relay.input
        return ingress.open_udp_input(
            i.iif, ifindex, i.family, i.group, i.port, i.sources, i.is_multicast
        )

    def holder(self, iif: str, family: int, address: str, port: int) -> Closable | None:
        return ingress.open_port_holder(iif, family, address, port)

    def attach(self, sock: Closable, prog: bpf.Program) -> None:
        bpf.attach(sock, prog)  # type: ignore[arg-type]

    def packet_stats(self, sock: Closable) -> tuple[int, int]:
        return ingress.packet_stats(sock)  # type: ignore[arg-type]

    def raw(self, family: int) -> Closable:
        return rawsend.open_raw(family)


@dataclass
class PacketInput:
    """AF_PACKET sockets of one (interface, family), one per worker."""

    id: int
    iif: str
    family: int
    ifindex: int
    fanout: int
    socks: list[Closable]
    keys: frozenset[tuple[str, int]]
    tier: str
    packets: int = 0
    drops: int = 0

    def spec(self) -> m.IngressSpec:
        return m.IngressSpec(self.id, "packet", self.family, self.ifindex)


@dataclass
class SocketInput:
    """The UDP socket of one socket-mode relay, read by one worker."""

    id: int
    relay_id: int
    iif: str
    family: int
    ifindex: int
    sock: Closable
    worker: int

    def spec(self) -> m.IngressSpec:
        return m.IngressSpec(self.id, "socket", self.family, self.ifindex)


@dataclass
class Changes:
    """What one sync opened and closed: the workers must be told."""

    opened: list[PacketInput | SocketInput] = field(default_factory=list)
    closed: list[PacketInput | SocketInput] = field(default_factory=list)


def input_text(relay: Relay) -> str:
    """A relay's input key as the CLI spells it: GROUP:PORT@IIF."""
    i = relay.input
    host = f"[{i.group}]" if i.family == 6 else i.group
    return f"{host}:{i.port}@{i.iif}"


class Inputs:
    """Every ingress socket the relays need, for ``workers`` worker slots."""

    def __init__(self, workers: int, log: logging.Logger, openers: Openers | None = None) -> None:
        self.workers = workers
        self.packet: dict[tuple[str, int], PacketInput] = {}
        self.socket: dict[int, SocketInput] = {}  # by relay id
        self.holders: dict[tuple[str, str, int], Closable | None] = {}
        # Why an input that should be open is not (relay name -> reason); the
        # next sync tries again.
        self.errors: dict[str, str] = {}
        self._openers = openers or KernelOpeners()
        self._log = log
        self._next_id = 1

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    @property
    def openers(self) -> Openers:
        """How this set opens sockets (the relay manager opens its raw sockets the same way)."""
        return self._openers

    # ------------------------------------------------------------ sync

    def sync(
        self, relays: Iterable[tuple[int, Relay]], ifindex: Callable[[str], int | None]
    ) -> Changes:
        """Open and close sockets so they match ``relays`` (id, rule) on today's interfaces.

        Never raises for a socket that cannot be opened: the reason lands in
        :attr:`errors` under the relay's name and the next sync retries.
        """
        rules = list(relays)
        changes = Changes()
        errors: dict[str, str] = {}
        # packet-mode inputs, per (iif, family)
        want: dict[tuple[str, int], set[tuple[str, int]]] = {}
        users: dict[tuple[str, int], list[str]] = {}
        for _, r in rules:
            if r.mode == "packet" and ifindex(r.input.iif) is not None:
                key = (r.input.iif, r.input.family)
                want.setdefault(key, set()).add((r.input.group, r.input.port))
                users.setdefault(key, []).append(r.name)
        for key, pin in list(self.packet.items()):
            if key not in want or ifindex(key[0]) != pin.ifindex:
                changes.closed.append(self._close_packet(key))
        for key, keyset in want.items():
            frozen = frozenset(keyset)
            have = self.packet.get(key)
            try:
                if have is None:
                    opened = self._open_packet(key, frozen, ifindex(key[0]) or 0)
                    if opened is not None:
                        changes.opened.append(opened)
                elif have.keys != frozen:
                    prog = self._attach_all(have.socks, key[1], frozen)
                    have.keys, have.tier = frozen, prog.tier
            except OSError as exc:
                for name in users[key]:
                    errors[name] = f"cannot open packet input on {key[0]}: {exc.strerror or exc}"
        # socket-mode inputs, per relay
        by_id = dict(rules)
        for rid, sin in list(self.socket.items()):
            rule = by_id.get(rid)
            if rule is None or rule.mode != "socket" or ifindex(sin.iif) != sin.ifindex:
                changes.closed.append(self._close_socket(rid))
        for rid, r in rules:
            if r.mode != "socket" or rid in self.socket:
                continue
            ix = ifindex(r.input.iif)
            if ix is None:
                continue
            try:
                sock = self._openers.udp(r, ix)
            except OSError as exc:
                errors[r.name] = f"cannot open socket input: {exc.strerror or exc}"
                continue
            worker = zlib.crc32(input_text(r).encode()) % self.workers
            sin = SocketInput(self._new_id(), rid, r.input.iif, r.input.family, ix, sock, worker)
            self.socket[rid] = sin
            changes.opened.append(sin)
        self._sync_holders(rules, ifindex)
        for name, why in errors.items():
            if self.errors.get(name) != why:
                self._log.warning("relay %s: %s (will retry)", name, why)
        self.errors = errors
        return changes

    def _sync_holders(
        self, rules: list[tuple[int, Relay]], ifindex: Callable[[str], int | None]
    ) -> None:
        wanted = {
            (r.input.iif, r.input.group, r.input.port)
            for _, r in rules
            if r.mode == "packet" and not r.input.is_multicast and ifindex(r.input.iif) is not None
        }
        for hk in list(self.holders):
            h = self.holders[hk]
            if hk not in wanted or h is None:
                if h is not None:
                    h.close()
                del self.holders[hk]
        for hk in wanted - set(self.holders):
            fam = 6 if ":" in hk[1] else 4
            self.holders[hk] = self._openers.holder(hk[0], fam, hk[1], hk[2])

    def _attach_all(
        self, socks: list[Closable], family: int, keys: frozenset[tuple[str, int]]
    ) -> bpf.Program:
        """Attach the tightest filter the kernel takes to every socket; the one attached.

        The compiler keeps programs within the socket's option memory; should
        the kernel still refuse one (ENOMEM: a smaller ``optmem_max`` than
        when compiled, or more charged), the next coarser tier goes on, down
        to *udp*, which always fits: the worker's dict does the exact match.
        """
        prog = bpf.compile_filter(family, keys)
        while True:
            try:
                for s in socks:
                    self._openers.attach(s, prog)
                return prog
            except OSError as exc:
                smaller = bpf.coarser(family, keys, prog) if exc.errno == errno.ENOMEM else None
                if smaller is None:
                    raise
                self._log.info(
                    "%s filter of %d insns refused (%s); trying %s",
                    prog.tier,
                    len(prog),
                    exc.strerror,
                    smaller.tier,
                )
                prog = smaller

    def _open_packet(
        self,
        key: tuple[str, int],
        keys: frozenset[tuple[str, int]],
        ix: int,
        prog: bpf.Program | None = None,
    ) -> PacketInput | None:
        iif, fam = key
        prog = prog or bpf.compile_filter(fam, keys)
        socks: list[Closable] = []
        fanout: int | None = None
        try:
            for _ in range(self.workers):
                s, fanout = self._openers.packet(ix, fam, fanout, prog)
                socks.append(s)
        except OSError as exc:
            for s in socks:
                s.close()
            smaller = bpf.coarser(fam, keys, prog) if exc.errno == errno.ENOMEM else None
            if smaller is not None:  # see _attach_all
                self._log.info("%s filter refused (%s); trying %s", prog.tier, exc, smaller.tier)
                return self._open_packet(key, keys, ix, smaller)
            if exc.errno in GONE_ERRNOS:
                self._log.info("input %s went away while opening: %s", iif, exc)
                return None
            raise
        assert fanout is not None
        pin = PacketInput(self._new_id(), iif, fam, ix, fanout, socks, keys, prog.tier)
        self.packet[key] = pin
        self._log.info(
            "packet input %s IPv%d ifindex %d fanout %d (%s filter, %d insns)",
            iif,
            fam,
            ix,
            fanout,
            prog.tier,
            len(prog),
        )
        return pin

    def _close_packet(self, key: tuple[str, int]) -> PacketInput:
        pin = self.packet.pop(key)
        for s in pin.socks:
            s.close()
        return pin

    def _close_socket(self, rid: int) -> SocketInput:
        sin = self.socket.pop(rid)
        sin.sock.close()
        return sin

    # ------------------------------------------------------------ queries

    def for_worker(self, index: int) -> list[tuple[m.IngressSpec, int]]:
        """Every ingress a (re)started worker ``index`` reads, with its descriptor."""
        out = [(p.spec(), p.socks[index].fileno()) for p in self.packet.values()]
        out += [(s.spec(), s.sock.fileno()) for s in self.socket.values() if s.worker == index]
        return out

    def ingress_of(self, rid: int, relay: Relay) -> int | None:
        """The ingress id a relay's packets arrive on, None while its input is not open."""
        if relay.mode == "packet":
            pin = self.packet.get((relay.input.iif, relay.input.family))
            return pin.id if pin is not None else None
        sin = self.socket.get(rid)
        return sin.id if sin is not None else None

    def poll_drops(self) -> None:
        """Add the kernel's AF_PACKET counters (reset on every read) to ours."""
        for pin in self.packet.values():
            for s in pin.socks:
                try:
                    p, d = self._openers.packet_stats(s)
                except OSError:
                    continue
                pin.packets += p
                pin.drops += d

    def close(self) -> None:
        for key in list(self.packet):
            self._close_packet(key)
        for rid in list(self.socket):
            self._close_socket(rid)
        for h in self.holders.values():
            if h is not None:
                h.close()
        self.holders.clear()
