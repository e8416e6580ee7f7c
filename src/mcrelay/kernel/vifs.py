"""Slot bookkeeping for the kernel's VIF (IPv4) / MIF (IPv6) table.

The kernel offers 32 slots per family. A slot is given to an interface name on
first use, counted by the routes that reference it and freed when the count
drops to zero. The table is pure bookkeeping (no kernel calls): the engine
plans on a copy and commits it only after the kernel accepted the plan.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ..errors import VifTableFull
from .structs import MAXMIFS, MAXVIFS


@dataclass(frozen=True, slots=True)
class Vif:
    """One occupied slot: which interface (name and index) and how many users."""

    slot: int
    name: str
    ifindex: int
    refs: int


class VifTable:
    """Slots of one family, keyed by interface name."""

    def __init__(self, family: int, capacity: int | None = None) -> None:
        if family not in (4, 6):
            raise ValueError(f"family must be 4 or 6, got {family}")
        self.family = family
        self.capacity = capacity if capacity is not None else (MAXVIFS if family == 4 else MAXMIFS)
        self._by_name: dict[str, Vif] = {}
        # Slots that acquire() must not hand to a new name: kept for names
        # that are about to be re-acquired (see successor()).
        self._reserved: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._by_name)

    def __iter__(self) -> Iterator[Vif]:
        return iter(sorted(self._by_name.values(), key=lambda v: v.slot))

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def get(self, name: str) -> Vif | None:
        """The slot record of ``name``, if it has one."""
        return self._by_name.get(name)

    def slot_of(self, name: str) -> int | None:
        """The slot of ``name``, if it has one."""
        vif = self._by_name.get(name)
        return None if vif is None else vif.slot

    def by_slot(self, slot: int) -> Vif | None:
        """The record occupying ``slot``, if any."""
        for vif in self._by_name.values():
            if vif.slot == slot:
                return vif
        return None

    def copy(self) -> VifTable:
        """An independent table with the same contents."""
        new = VifTable(self.family, self.capacity)
        new._by_name = dict(self._by_name)
        new._reserved = dict(self._reserved)
        return new

    def acquire(self, name: str, ifindex: int) -> int:
        """Take one reference on ``name``'s slot, allocating the lowest free one.

        Raises VifTableFull naming ``name`` when every slot is taken; the
        table is unchanged then.
        """
        vif = self._by_name.get(name)
        if vif is not None:
            self._by_name[name] = Vif(vif.slot, name, ifindex, vif.refs + 1)
            return vif.slot
        slot = self._reserved.pop(name, None)
        if slot is None:
            used = {v.slot for v in self._by_name.values()} | set(self._reserved.values())
            slot = next((i for i in range(self.capacity) if i not in used), None)
            if slot is None:
                raise VifTableFull(self.family, name)
        self._by_name[name] = Vif(slot, name, ifindex, 1)
        return slot

    def release(self, name: str) -> int | None:
        """Drop one reference on ``name``; return its slot if that freed it."""
        vif = self._by_name.get(name)
        if vif is None:
            raise KeyError(name)
        if vif.refs > 1:
            self._by_name[name] = Vif(vif.slot, name, vif.ifindex, vif.refs - 1)
            return None
        del self._by_name[name]
        return vif.slot

    def planning_copy(self, wanted: Iterable[str]) -> VifTable:
        """An empty table that will give each of ``wanted`` its current slot back.

        Used to rebuild the table from scratch for a new set of routes: names
        already present keep their slot when acquired again (so unchanged
        routes keep their kernel entries), new names take the lowest slots
        nobody keeps.
        """
        keep = set(wanted)
        new = VifTable(self.family, self.capacity)
        new._reserved = {v.name: v.slot for v in self._by_name.values() if v.name in keep}
        return new

    def successor(self, demand: Iterable[tuple[str, int]]) -> VifTable:
        """A new table holding exactly ``demand`` (one reference per item).

        Raises VifTableFull naming the first interface (in demand order) that
        does not fit.
        """
        items = list(demand)
        new = self.planning_copy(name for name, _ in items)
        for name, ifindex in items:
            new.acquire(name, ifindex)
        return new
