"""Typed messages between the supervisor's RelayManager and its relay workers.

Sequence for a (re)started worker: ``Setup`` -> ``AddIngress`` (descriptors
attached) ... -> ``SetTable`` -> ``SetTrace`` -> ``Start``; the worker drops its
privileges on ``Start`` and answers ``Ready``. Afterwards any of ``AddIngress``,
``RemoveIngress``, ``SetTable``, ``SetTrace``, ``StatsRequest``, ``Ping`` and
``Stop`` may arrive; the worker answers ``Stats`` and ``Pong``.

Relays are referred to by an integer id the manager assigns: a changed rule
gets a new id, so per-id counters never mix two definitions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mcrelay.ipc import message

# Indices into a relay's counter list (workers and manager share them).
PACKETS = 0
BYTES = 1
NO_BUFFER = 2
SEND_ERROR = 3
FRAGMENT = 4
FILTERED = 5
QUEUE = 6
LOOP = 7  # a reflector heard a packet it had sent itself
DUPLICATE = 8  # a reflector heard again a packet it relayed moments ago
N_COUNTERS = 9
DROP_NAMES = ("no_buffer", "send_error", "fragment", "filtered", "queue", "loop", "duplicate")

# OutputSpec.src: how an output's packets get their source address.
SRC_OWN = 0  # the router's, from a UDP egress socket (the fast path)
SRC_KEEP = 1  # the original sender's, header written by the worker on the raw socket
SRC_OWN_RAW = 2  # the router's, header written on the raw socket (port/TTL control)


@dataclass(frozen=True)
class IngressSpec:
    """One ingress socket: ``packet`` (AF_PACKET, one per worker) or ``socket`` (UDP)."""

    id: int
    kind: str  # "packet" | "socket"
    family: int
    ifindex: int


@dataclass(frozen=True)
class OutputSpec:
    """One destination; ``ifindex`` 0 routes by table (unicast), -1 means the oif is missing."""

    address: str
    port: int
    ifindex: int
    ttl: int  # 0: the TTL the packet arrived with
    dscp: int
    src: int = SRC_OWN


@dataclass(frozen=True)
class ReflectSpec:
    """What a reflector leg's packets are checked against before they are sent.

    ``rule`` is shared by all legs of one reflector, so they share one memory
    of what was sent and relayed (loops and duplicates are seen across legs).
    """

    rule: int
    allow: tuple[str, ...]


@dataclass(frozen=True)
class TableEntry:
    """One relay as a worker sees it: which ingress, which key, where to."""

    id: int
    name: str
    ingress: int
    group: str
    port: int
    sources: tuple[str, ...]
    outputs: tuple[OutputSpec, ...]
    reflect: ReflectSpec | None = None


def _entry_from(d: Any) -> TableEntry:
    r = d[7] if len(d) > 7 else None
    return TableEntry(
        int(d[0]),
        str(d[1]),
        int(d[2]),
        str(d[3]),
        int(d[4]),
        tuple(str(s) for s in d[5]),
        tuple(
            OutputSpec(str(o[0]), int(o[1]), int(o[2]), int(o[3]), int(o[4]), int(o[5]))
            for o in d[6]
        ),
        None if r is None else ReflectSpec(int(r[0]), tuple(str(a) for a in r[1])),
    )


def _entry_to(e: TableEntry) -> list[Any]:
    outs = [[o.address, o.port, o.ifindex, o.ttl, o.dscp, o.src] for o in e.outputs]
    r = None if e.reflect is None else [e.reflect.rule, list(e.reflect.allow)]
    return [e.id, e.name, e.ingress, e.group, e.port, list(e.sources), outs, r]


@message
@dataclass(frozen=True)
class Setup:
    """First message to a new worker: who it is and whom to become."""

    index: int
    user: str


@message
@dataclass(frozen=True)
class Start:
    """Everything initial was sent: drop privileges and run."""


@message
@dataclass(frozen=True)
class Ready:
    """Sent by the worker once unprivileged."""

    pid: int
    uid: int
    gid: int


@message
@dataclass(frozen=True)
class AddIngress:
    """Ingress sockets; their descriptors are attached in the same order."""

    specs: tuple[IngressSpec, ...]

    def to_wire(self) -> list[list[Any]]:
        return [[s.id, s.kind, s.family, s.ifindex] for s in self.specs]

    @classmethod
    def from_wire(cls, body: Any) -> AddIngress:
        return cls(tuple(IngressSpec(int(a), str(b), int(c), int(d)) for a, b, c, d in body))


@message
@dataclass(frozen=True)
class AddRaw:
    """Raw IP sockets (``IPPROTO_RAW``), one per family, descriptors attached in order.

    Opening one needs CAP_NET_RAW, which workers never have: the supervisor
    opens them and the workers send keep-source packets through them.
    """

    families: tuple[int, ...]

    def to_wire(self) -> list[int]:
        return list(self.families)

    @classmethod
    def from_wire(cls, body: Any) -> AddRaw:
        return cls(tuple(int(f) for f in body))


@message
@dataclass(frozen=True)
class RemoveIngress:
    ids: tuple[int, ...]

    def to_wire(self) -> list[int]:
        return list(self.ids)

    @classmethod
    def from_wire(cls, body: Any) -> RemoveIngress:
        return cls(tuple(int(i) for i in body))


@message
@dataclass(frozen=True)
class SetTable:
    """The complete relay table; replaces the previous one."""

    version: int
    entries: tuple[TableEntry, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"v": self.version, "e": [_entry_to(e) for e in self.entries]}

    @classmethod
    def from_wire(cls, body: Any) -> SetTable:
        return cls(int(body["v"]), tuple(_entry_from(e) for e in body["e"]))


@message
@dataclass(frozen=True)
class SetTrace:
    """Relay ids whose packets the worker records."""

    ids: tuple[int, ...]

    def to_wire(self) -> list[int]:
        return list(self.ids)

    @classmethod
    def from_wire(cls, body: Any) -> SetTrace:
        return cls(tuple(int(i) for i in body))


@message
@dataclass(frozen=True)
class StatsRequest:
    seq: int


@dataclass(frozen=True)
class RelayStats:
    """Cumulative counters of one relay in one worker since the worker started."""

    id: int
    counters: tuple[int, ...]  # indexed by PACKETS..QUEUE
    outputs: tuple[tuple[int, int, int], ...]  # packets, bytes, errors per output


@message
@dataclass(frozen=True)
class Stats:
    """A worker's counters and the trace records gathered since the last Stats.

    ``relays`` holds only the relays whose counters changed since the worker's
    previous Stats (all of them in its first), ``gone`` the ids it reported
    before and no longer holds; the receiver keeps the rest as they were.
    """

    seq: int
    relays: tuple[RelayStats, ...]
    worker: dict[str, int]
    cpu: float
    traces: dict[str, list[dict[str, Any]]]
    gone: tuple[int, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "r": [[r.id, list(r.counters), [list(o) for o in r.outputs]] for r in self.relays],
            "w": self.worker,
            "cpu": self.cpu,
            "t": self.traces,
            "g": list(self.gone),
        }

    @classmethod
    def from_wire(cls, body: Any) -> Stats:
        relays = tuple(
            RelayStats(
                int(r[0]),
                tuple(int(c) for c in r[1]),
                tuple((int(o[0]), int(o[1]), int(o[2])) for o in r[2]),
            )
            for r in body["r"]
        )
        worker = {str(k): int(v) for k, v in body["w"].items()}
        traces = {str(k): list(v) for k, v in body["t"].items()}
        gone = tuple(int(i) for i in body.get("g", ()))
        return cls(int(body["seq"]), relays, worker, float(body["cpu"]), traces, gone)


@message
@dataclass(frozen=True)
class Stop:
    """Exit cleanly."""
