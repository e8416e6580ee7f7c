"""Bounded rings of per-packet trace records.

Workers keep a :class:`Ring` per traced relay and hand its records to the
manager with each Stats reply; the manager keeps a :class:`Ring` per relay with
a sequence number per record so a reader can follow it with a cursor.
"""

from __future__ import annotations

from collections import deque
from typing import Any

WORKER_RING = 1024
MANAGER_RING = 10000


class Ring:
    """The last ``size`` records, each numbered; older ones fall off."""

    def __init__(self, size: int) -> None:
        self.records: deque[tuple[int, dict[str, Any]]] = deque(maxlen=size)
        self.next_seq = 0
        self.lost = 0

    def add(self, record: dict[str, Any]) -> None:
        if len(self.records) == self.records.maxlen:
            self.lost += 1
        self.records.append((self.next_seq, record))
        self.next_seq += 1

    def take(self) -> list[dict[str, Any]]:
        """Remove and return everything (worker side)."""
        out = [r for _, r in self.records]
        self.records.clear()
        return out

    def read(self, cursor: int, limit: int = 1000) -> tuple[list[dict[str, Any]], int]:
        """Records numbered ``cursor`` and later (at most ``limit``), and the next cursor.

        A cursor older than the ring's oldest record skips to the oldest one.
        """
        out: list[dict[str, Any]] = []
        nxt = max(cursor, self.records[0][0] if self.records else self.next_seq)
        for seq, rec in self.records:
            if seq >= nxt and len(out) < limit:
                out.append(rec)
                nxt = seq + 1
        return out, nxt


def record(
    t: float,
    source: str,
    size: int,
    outputs: list[str],
    result: str,
    worker: int,
    destination: str = "",
) -> dict[str, Any]:
    """One packet's trace record (the JSON shape the CLI streams); ``t``: its receive time."""
    return {
        "time": t,
        "destination": destination,
        "source": source,
        "size": size,
        "outputs": outputs,
        "result": result,
        "worker": worker,
    }
