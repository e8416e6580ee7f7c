"""Relay counters summed over the workers alive now and every worker that died.

Workers report cumulative counters since they started (and only what changed,
see :class:`mcrelay.relay.messages.Stats`). When a worker dies its last report
is *retired* into a per-relay sum, so a restart never makes a counter go
backwards. Relays are keyed by the id the manager gives each rule version.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mcrelay.relay import messages as m

OUTPUT_FIELDS = 3  # packets, bytes, errors


def _add(acc: list[int], vals: Sequence[int]) -> None:
    for i, v in enumerate(vals):
        acc[i] += v


@dataclass
class WorkerCounters:
    """What one worker slot reported last."""

    relays: dict[int, m.RelayStats] = field(default_factory=dict)
    worker: dict[str, int] = field(default_factory=dict)
    cpu: float = 0.0
    cpu_base: float = 0.0  # CPU seconds of the slot's earlier processes


class Counters:
    """Live and retired counters for ``workers`` slots."""

    def __init__(self, workers: int) -> None:
        self.slots = [WorkerCounters() for _ in range(workers)]
        self._retired: dict[int, tuple[list[int], list[list[int]]]] = {}

    def merge(self, index: int, stats: m.Stats, keep: Callable[[int], bool] | None = None) -> None:
        """A Stats message from worker ``index``: changes merged, ids gone dropped.

        An id the worker let go while ``keep(id)`` holds (the rule is still
        there, its input is waiting: an interface flap) is retired, not
        dropped, so the relay's counters go on from where they were.
        """
        slot = self.slots[index]
        slot.relays.update((rs.id, rs) for rs in stats.relays)
        for gone in stats.gone:
            st = slot.relays.pop(gone, None)
            if st is not None and keep is not None and keep(gone):
                self._retire_one(gone, st)
        slot.worker = stats.worker
        slot.cpu = stats.cpu

    def retire(self, index: int) -> None:
        """Worker ``index`` is gone: keep its last counters in the retired sums."""
        slot = self.slots[index]
        for rid, st in slot.relays.items():
            self._retire_one(rid, st)
        slot.relays = {}
        slot.cpu_base += slot.cpu
        slot.cpu = 0.0

    def _retire_one(self, rid: int, st: m.RelayStats) -> None:
        acc = self._retired.get(rid)
        if acc is None:
            acc = self._retired[rid] = ([0] * m.N_COUNTERS, [])
        _add(acc[0], st.counters)
        while len(acc[1]) < len(st.outputs):
            acc[1].append([0] * OUTPUT_FIELDS)
        for i, o in enumerate(st.outputs):
            _add(acc[1][i], o)

    def forget(self, rid: int) -> None:
        """The relay version ``rid`` is removed: its history goes with it."""
        self._retired.pop(rid, None)

    def total(self, rid: int, outputs: int) -> tuple[list[int], list[list[int]]]:
        """(relay counters, per-output [packets, bytes, errors]) over all workers, ever."""
        c = [0] * m.N_COUNTERS
        outs = [[0] * OUTPUT_FIELDS for _ in range(outputs)]
        acc = self._retired.get(rid)
        if acc is not None:
            _add(c, acc[0])
            for i, o in enumerate(acc[1][:outputs]):
                _add(outs[i], o)
        for slot in self.slots:
            st = slot.relays.get(rid)
            if st is not None:
                _add(c, st.counters)
                for i, so in enumerate(st.outputs[:outputs]):
                    _add(outs[i], so)
        return c, outs

    def worker(self, index: int) -> dict[str, float | int]:
        """A slot's own counters for ``show workers``."""
        slot = self.slots[index]
        return {
            "cpu_seconds": round(slot.cpu_base + slot.cpu, 3),
            "received": slot.worker.get("received", 0),
            "unmatched": slot.worker.get("unmatched", 0),
            "malformed": slot.worker.get("malformed", 0),
        }
