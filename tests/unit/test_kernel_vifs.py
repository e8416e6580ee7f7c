"""VifTable: slot allocation, reference counting, the 32-slot limit."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcrelay.errors import VifTableFull
from mcrelay.kernel.vifs import VifTable


def test_lowest_free_slot_and_refcount() -> None:
    t = VifTable(4)
    assert t.acquire("eth0", 2) == 0
    assert t.acquire("eth1", 3) == 1
    assert t.acquire("eth0", 2) == 0
    assert t.get("eth0") is not None and t.get("eth0").refs == 2  # type: ignore[union-attr]
    assert t.release("eth0") is None  # still referenced
    assert t.release("eth0") == 0  # freed
    assert "eth0" not in t and len(t) == 1
    assert t.acquire("eth2", 4) == 0  # the freed slot is reused first
    assert t.by_slot(1) is not None and t.by_slot(1).name == "eth1"  # type: ignore[union-attr]
    with pytest.raises(KeyError):
        t.release("nope")


@pytest.mark.parametrize(("family", "kind"), [(4, "VIF"), (6, "MIF")])
def test_33rd_interface_is_refused(family: int, kind: str) -> None:
    t = VifTable(family)
    for i in range(32):
        assert t.acquire(f"if{i}", i + 1) == i
    # More references on existing names are fine.
    assert t.acquire("if5", 6) == 5
    with pytest.raises(VifTableFull) as info:
        t.acquire("if32", 99)
    msg = str(info.value)
    assert f"IPv{family} {kind} table is full" in msg
    assert "32 interfaces" in msg and "'if32'" in msg
    assert len(t) == 32 and "if32" not in t


def test_planning_copy_keeps_slots_of_kept_names() -> None:
    t = VifTable(4)
    for name in ("a", "b", "c", "d"):
        t.acquire(name, ord(name))
    new = t.planning_copy(["b", "d", "x"])
    assert len(new) == 0
    # A new name must not take the slots b and d will want back.
    assert new.acquire("x", 1) == 0
    assert new.acquire("y", 2) == 2
    assert new.acquire("d", 100) == 3
    assert new.acquire("b", 101) == 1
    assert new.get("d").ifindex == 100  # type: ignore[union-attr]
    # The original is untouched.
    assert [v.name for v in t] == ["a", "b", "c", "d"]


def test_successor_names_first_interface_that_does_not_fit() -> None:
    t = VifTable(6, capacity=3)
    with pytest.raises(VifTableFull) as info:
        t.successor([("a", 1), ("b", 2), ("a", 1), ("c", 3), ("d", 4)])
    assert info.value.data["interface"] == "d"
    new = t.successor([("a", 1), ("b", 2), ("a", 1)])
    assert [(v.name, v.slot, v.refs) for v in new] == [("a", 0, 2), ("b", 1, 1)]


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 40)), max_size=300))
def test_slots_stay_unique_and_counted(ops: list[tuple[bool, int]]) -> None:
    t = VifTable(4)
    refs: dict[str, int] = {}
    for acquire, n in ops:
        name = f"if{n}"
        if acquire:
            try:
                t.acquire(name, n + 1)
            except VifTableFull:
                assert len(refs) == 32 and name not in refs
                continue
            refs[name] = refs.get(name, 0) + 1
        elif name in refs:
            freed = t.release(name)
            refs[name] -= 1
            assert (freed is not None) == (refs[name] == 0)
            if refs[name] == 0:
                del refs[name]
        slots = [v.slot for v in t]
        assert len(set(slots)) == len(slots) and all(0 <= s < 32 for s in slots)
        assert {v.name: v.refs for v in t} == refs
