"""The BPF compiler: programs are checked by interpreting them on real header bytes."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcrelay.net import bpf


def v4(dst: str, dport: int, *, frag: int = 0, proto: int = 17, ihl: int = 5) -> bytes:
    opts = bytes(4 * (ihl - 5))
    hdr = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | ihl,
        0,
        20 + len(opts) + 8,
        0,
        frag,
        1,
        proto,
        0,
        socket.inet_aton("192.0.2.2"),
        socket.inet_aton(dst),
    )
    return hdr + opts + struct.pack("!HHHH", 1234, dport, 8, 0)


def v6(dst: str, dport: int, *, frag: int | None = None) -> bytes:
    src = socket.inet_pton(socket.AF_INET6, "2001:db8:1::2")
    dst_b = socket.inet_pton(socket.AF_INET6, dst)
    udp = struct.pack("!HHHH", 1234, dport, 8, 0)
    if frag is None:
        return struct.pack("!IHBB", 6 << 28, 8, 17, 1) + src + dst_b + udp
    fh = struct.pack("!BBHI", 17, 0, frag, 99)
    return struct.pack("!IHBB", 6 << 28, 16, 44, 1) + src + dst_b + fh + udp


RULES4 = [("239.1.1.1", 5000), ("239.1.1.1", 5001), ("224.0.0.251", 5353), ("192.0.2.1", 7)]


def test_exact_v4_accepts_only_configured_keys() -> None:
    p = bpf.compile_filter(4, RULES4)
    assert p.tier == "exact"
    for dst, port in RULES4:
        assert bpf.run(p, v4(dst, port)) == bpf.ACCEPT
    assert bpf.run(p, v4("239.1.1.1", 5002)) == 0
    assert bpf.run(p, v4("224.0.0.251", 5000)) == 0
    assert bpf.run(p, v4("239.1.1.2", 5000)) == 0
    assert bpf.run(p, v4("239.1.1.1", 5000, proto=6)) == 0


def test_v4_options_and_fragments() -> None:
    p = bpf.compile_filter(4, RULES4)
    assert bpf.run(p, v4("239.1.1.1", 5000, ihl=8)) == bpf.ACCEPT  # UDP after options
    # The first fragment passes (the worker counts it); later ones never do.
    assert bpf.run(p, v4("239.1.1.1", 5000, frag=0x2000)) == bpf.ACCEPT
    assert bpf.run(p, v4("239.1.1.1", 5000, frag=0x0001)) == 0
    assert bpf.run(p, v4("239.1.1.1", 5000, frag=0x20B9)) == 0


def test_v6_direct_and_first_fragment() -> None:
    p = bpf.compile_filter(6, [("ff3e::1", 5000), ("ff02::fb", 5353)])
    assert p.tier == "exact"
    assert bpf.run(p, v6("ff3e::1", 5000)) == bpf.ACCEPT
    assert bpf.run(p, v6("ff02::fb", 5353)) == bpf.ACCEPT
    assert bpf.run(p, v6("ff3e::1", 5353)) == 0
    assert bpf.run(p, v6("ff3e::2", 5000)) == 0
    assert bpf.run(p, v6("ff3e::1", 5000, frag=1)) == bpf.ACCEPT  # offset 0, M set
    assert bpf.run(p, v6("ff3e::1", 5000, frag=0x00B9)) == 0  # offset 23


def test_tiers_at_scale() -> None:
    # 10,000 distinct groups, few ports: too many for an exact program.
    rules = [(f"239.{i // 250}.{i % 250}.1", 5000 + i % 7) for i in range(10000)]
    p = bpf.compile_filter(4, rules)
    assert p.tier == "ports" and len(p) <= bpf.BPF_MAXINSNS
    assert bpf.run(p, v4("239.0.0.1", 5003)) == bpf.ACCEPT
    assert bpf.run(p, v4("239.0.0.1", 6000)) == 0
    many_ports = [(f"239.{i // 250}.{i % 250}.1", 1000 + i) for i in range(10000)]
    p2 = bpf.compile_filter(4, many_ports)
    assert p2.tier == "udp" and bpf.run(p2, v4("239.9.9.9", 9)) == bpf.ACCEPT
    # A few hundred rules stay exact.
    few = [(f"239.{i // 200}.{i % 200}.1", 5000 + i % 3) for i in range(300)]
    assert bpf.compile_filter(4, few).tier == "exact"


def test_many_ports_on_one_group_split_into_blocks() -> None:
    rules = [("239.1.1.1", p) for p in range(1000, 1700)]
    p = bpf.compile_filter(4, rules)
    assert p.tier == "exact"
    assert all(bpf.run(p, v4("239.1.1.1", port)) == bpf.ACCEPT for port in range(1000, 1700))
    assert bpf.run(p, v4("239.1.1.1", 1700)) == 0


@settings(max_examples=60, deadline=None)
@given(
    st.sets(st.tuples(st.integers(0, 40), st.integers(1, 65535)), min_size=1, max_size=60),
    st.integers(0, 40),
    st.integers(1, 65535),
)
def test_exact_matches_set_membership(keys: set[tuple[int, int]], g: int, port: int) -> None:
    rules = [(f"239.0.0.{a}", p) for a, p in keys]
    p = bpf.compile_filter(4, rules)
    want = bpf.ACCEPT if (g, port) in keys else 0
    assert bpf.run(p, v4(f"239.0.0.{g}", port)) == want


def test_kernel_accepts_programs() -> None:
    """SO_ATTACH_FILTER validates the program: jumps in range, ends in RET."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for prog in (
            bpf.compile_filter(4, RULES4),
            bpf.compile_filter(6, [("ff3e::1", 5000)]),
            bpf.compile_filter(4, [(f"239.{i // 250}.{i % 250}.1", 5000) for i in range(10000)]),
            bpf.drop_all(),
        ):
            bpf.attach(s, prog)


# ---------------------------------------------------------------- any table size (issue 12)


def _keys(n: int, ports: int = 1) -> list[tuple[str, int]]:
    return [
        (f"239.{100 + i // 62500}.{(i // 250) % 250}.{i % 250 + 1}", 5000 + i % ports)
        for i in range(n)
    ]


SIZES = sorted({*range(1, 700, 13), *range(700, 5000, 301), *range(5000, 20001, 3001), 20000})


def test_program_fits_the_kernel_at_every_table_size() -> None:
    """1..20,000 keys: within BPF_MAXINSNS and within the option-memory budget of both
    the old default optmem_max (20 KiB) and today's (128 KiB), where the old and the
    new filter must fit together while one replaces the other."""
    for optmem in (bpf.OPTMEM_MAX_DEFAULT, 131072):
        budget = bpf.default_budget(optmem)
        assert 2 * budget <= optmem * 3 // 4
        for n in SIZES:
            for ports in (1, n) if optmem == bpf.OPTMEM_MAX_DEFAULT else (1, 7, n):
                p = bpf.compile_filter(4, _keys(n, ports), budget)
                assert len(p) <= bpf.BPF_MAXINSNS, (optmem, n, ports)
                assert bpf.charge(p) <= max(budget, bpf.charge(bpf.compile_filter(4, [], 0))), (
                    optmem,
                    n,
                    ports,
                )


def test_the_kernel_takes_each_size_in_turn_on_one_socket() -> None:
    """What the kernel accepts: attach the program of each size over the previous one
    (SO_ATTACH_FILTER charges both meanwhile), growing and shrinking, as relays added
    one by one and removed would; and a fresh socket at each size."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for n in [*SIZES, *reversed(SIZES)]:
            p = bpf.compile_filter(4, _keys(n))
            bpf.attach(s, p)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as fresh:
                bpf.attach(fresh, p)
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        for n in (1, 100, 281, 600, 1000, 3000, 20000):
            bpf.attach(s, bpf.compile_filter(6, [(f"ff3e::{i:x}", 5000) for i in range(n)]))


def test_281_and_600_relays_on_one_interface_stay_exact() -> None:
    """The sizes of the issue: the exact tier, no longer refused with ENOMEM."""
    for n in (280, 281, 600):
        p = bpf.compile_filter(4, _keys(n))
        assert p.tier == "exact" and bpf.charge(p) <= bpf.default_budget(131072)


@pytest.mark.parametrize("n", [5, 41, 300, 1500])
def test_search_trees_match_exactly(n: int) -> None:
    keys = _keys(n, 3) + [("239.100.0.1", 6000 + i) for i in range(n // 10)]
    p = bpf.compile_filter(4, keys)
    assert p.tier == "exact"
    have = set(keys)
    for dst, port in keys:
        assert bpf.run(p, v4(dst, port)) == bpf.ACCEPT
    for i in range(0, n + 40, 3):
        dst = f"239.{100 + i // 62500}.{(i // 250) % 250}.{i % 250 + 1}"
        for port in (4999, 5000, 5001, 5002, 5003, 6001):
            want = bpf.ACCEPT if (dst, port) in have else 0
            assert bpf.run(p, v4(dst, port)) == want, (dst, port)


def test_v6_exact_groups_by_prefix() -> None:
    keys = [(f"ff3e::{i:x}", 5000) for i in range(50)] + [
        (f"ff05::1:{i:x}", 5001) for i in range(9)
    ]
    p = bpf.compile_filter(6, keys)
    assert p.tier == "exact"
    for dst, port in keys:
        assert bpf.run(p, v6(dst, port)) == bpf.ACCEPT
    assert bpf.run(p, v6("ff3e::1", 5001)) == 0
    assert bpf.run(p, v6("ff05::1:1", 5000)) == 0
    assert bpf.run(p, v6("ff3e::1:1", 5000)) == 0


def test_coarser_steps_down_to_udp() -> None:
    keys = _keys(300, 3)
    p = bpf.compile_filter(4, keys)
    tiers = [p.tier]
    while (q := bpf.coarser(4, keys, p)) is not None:
        p = q
        tiers.append(p.tier)
    assert tiers == ["exact", "ports", "udp"]
