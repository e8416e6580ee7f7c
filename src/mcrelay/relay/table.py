"""The worker's lookup table: per ingress socket, (dst address, dst port) -> relay.

An AF_PACKET ingress belongs to one interface and one family, so a dict per
ingress keyed by (packed destination address, port) is the (iif, group, port)
lookup of the design, one hash probe per packet at any rule count. A socket-mode
ingress carries exactly one relay.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from mcrelay.relay.messages import N_COUNTERS, TableEntry
from mcrelay.relay.qos import Output

Key = tuple[bytes, int]


def key_of(address: str, port: int) -> Key:
    """The lookup key of a destination as the packet headers carry it."""
    fam = socket.AF_INET6 if ":" in address else socket.AF_INET
    return (socket.inet_pton(fam, address), port)


class Entry:
    """A relay at run time: counters, source filter, resolved outputs."""

    __slots__ = ("add1", "c", "id", "name", "out1", "outs", "sources", "spec", "traced")

    def __init__(
        self,
        spec: TableEntry,
        counters: list[int],
        outs: list[Output],
        traced: bool,
    ) -> None:
        self.spec = spec
        self.id = spec.id
        self.name = spec.name
        self.c = counters
        self.outs = outs
        # Most relays have one output: the hot loop calls its queue's bound add
        # directly instead of iterating a one-element list (measurably cheaper).
        self.out1: Output | None = outs[0] if len(outs) == 1 else None
        self.add1: Callable[[Output, int, int], None] | None = (
            outs[0].sq.add if len(outs) == 1 else None
        )
        self.traced = traced
        self.sources: frozenset[bytes] | None = (
            frozenset(key_of(s, 0)[0] for s in spec.sources) if spec.sources else None
        )


@dataclass
class Table:
    """Lookup dicts per packet ingress id, and the single relay of each socket ingress."""

    packet: dict[int, dict[Key, Entry]] = field(default_factory=dict)
    single: dict[int, Entry] = field(default_factory=dict)
    entries: list[Entry] = field(default_factory=list)


def build(
    specs: Iterable[TableEntry],
    kind_of: Callable[[int], str | None],
    make_outputs: Callable[[TableEntry, list[int]], list[Output]],
    counters: dict[int, list[int]],
    traced: set[int],
) -> Table:
    """Resolve entries against the ingress sockets this worker holds.

    ``counters`` carries counter lists across rebuilds (same relay id, same list);
    entries for ingress this worker does not hold (another worker's socket-mode
    relay) are skipped.
    """
    t = Table()
    for spec in specs:
        kind = kind_of(spec.ingress)
        if kind is None:
            continue
        c = counters.get(spec.id)
        if c is None:
            c = counters[spec.id] = [0] * N_COUNTERS
        e = Entry(spec, c, make_outputs(spec, c), spec.id in traced)
        t.entries.append(e)
        if kind == "packet":
            t.packet.setdefault(spec.ingress, {})[key_of(spec.group, spec.port)] = e
        else:
            t.single[spec.ingress] = e
    return t
