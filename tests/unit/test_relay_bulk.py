"""The whole-run path ends every batch exactly as the per-packet path would.

Each property builds a batch in the receive buffer, runs it once through the
worker with the bulk path and once with it off, and captures what sendmmsg
would have sent (destination, payload and GSO segment size of every message)
instead of sending it. The per-packet path is the reference.
"""

from __future__ import annotations

import ctypes
import socket
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from test_relay_worker import load, make_worker, v4, v6

from mcrelay.ipc import Channel
from mcrelay.relay import messages as m
from mcrelay.relay.hotpath import runs
from mcrelay.relay.mmsg import (
    GSO_CMSG_SPACE,
    I_FLAGS,
    I_LEN,
    I_STRIDE,
    Q_CONTROLLEN,
    Q_IOV,
    Q_IOVLEN,
    Q_STRIDE,
    Cmsghdr,
)
from mcrelay.relay.qos import GSO_BYTES, GSO_SEGMENTS, SendQueue
from mcrelay.relay.worker import Worker

Sent = list[tuple[int, bytes, int]]  # (sockaddr address, payload, gso size) per datagram


def capture(sq: SendQueue, sent: Sent) -> None:
    """Replace the queue's sendmmsg with one that records and reports success."""
    sv = sq.sv

    def send(fd: int, start: int, count: int) -> int:
        for k in range(start, start + count):
            b = k * Q_STRIDE
            iov = (sv.q[b + Q_IOV] - sv.iovs_addr) // 16
            gso = (
                sv.ctl16[(k * GSO_CMSG_SPACE + ctypes.sizeof(Cmsghdr)) // 2]
                if sv.q[b + Q_CONTROLLEN]
                else 0
            )
            segs = sv.q[b + Q_IOVLEN]
            lens = {sv.iq[2 * j + 1] for j in range(iov, iov + segs)}
            # What the kernel needs of a GSO message: one segment size, few enough segments.
            assert segs == 1 or (lens == {gso} and segs <= GSO_SEGMENTS and segs * gso <= GSO_BYTES)
            for j in range(iov, iov + segs):
                data = ctypes.string_at(sv.iq[2 * j], sv.iq[2 * j + 1])
                sent.append((sv.q[b], data, gso))
        return count

    sv.send = send  # type: ignore[method-assign]


def run(
    bulk: bool, family: int, entries: tuple[m.TableEntry, ...], pkts: list[bytes]
) -> tuple[dict[Any, list[bytes]], list[Any], int, int, list[int]]:
    w: Worker = make_worker(family, entries)
    w.bulk = bulk
    sent: Sent = []
    for sq in w.egress.values():
        capture(sq, sent)
    n = load(w.rv_packet, pkts)
    (w.batch_v4 if family == 4 else w.batch_v6)(w.ingress[1], w.rv_packet, n)
    for sq in w.dirty:
        sq.flush()
    # What each output of each relay sent, in order. Outputs of different
    # relays may interleave differently (a batch of mixed flows is queued flow
    # by flow), but no output's own order may change.
    output_of = {o.name_addr: (e.id, idx) for e in w.table.entries for idx, o in enumerate(e.outs)}
    per_output: dict[Any, list[bytes]] = {}
    for addr, data, _gso in sent:
        per_output.setdefault(output_of[addr], []).append(data)
    counters = [w.counters[e.id] for e in entries]
    outs = sorted((k, v[:3]) for k, v in w.out_counters.items())
    return per_output, [counters, outs], w.unmatched, w.malformed, [len(sent)]


OUT = (m.OutputSpec("127.0.0.1", 9, 0, 5, 0), m.OutputSpec("127.0.0.2", 9, 0, 5, 0))

v4_packets = st.lists(
    st.tuples(
        st.sampled_from(["192.0.2.2", "192.0.2.9"]),  # source (one is filtered)
        st.sampled_from(["239.1.1.1", "239.1.1.2", "239.9.9.9"]),  # group (last: no rule)
        st.sampled_from([5000, 5001]),  # port
        st.integers(0, 1400),  # payload size
        st.sampled_from([0, 0, 0, 0x4000, 0x2000]),  # DF, more fragments
    ),
    min_size=1,
    max_size=64,
)


@settings(max_examples=150, deadline=None)
@given(spec=v4_packets, uniform=st.booleans(), filtered=st.booleans(), outs=st.integers(1, 2))
def test_v4_bulk_equals_per_packet(
    spec: list[tuple[str, str, int, int, int]], uniform: bool, filtered: bool, outs: int
) -> None:
    if uniform:
        spec = [spec[0]] * len(spec)  # one flow: the bulk path takes it
    entries = (
        m.TableEntry(1, "a", 1, "239.1.1.1", 5000, ("192.0.2.2",) if filtered else (), OUT[:outs]),
        m.TableEntry(2, "b", 1, "239.1.1.2", 5000, (), OUT[:1]),
    )
    pkts = [
        v4(s, g, p, bytes([i % 251]) * size, frag) for i, (s, g, p, size, frag) in enumerate(spec)
    ]
    assert run(True, 4, entries, pkts) == run(False, 4, entries, pkts)


def test_v4_uniform_batch_is_one_gso_message_per_output() -> None:
    entries = (m.TableEntry(1, "a", 1, "239.1.1.1", 5000, (), OUT),)
    pkts = [v4("192.0.2.2", "239.1.1.1", 5000, bytes([i]) * 64) for i in range(64)]
    w = make_worker(4, entries)
    sent: Sent = []
    for sq in w.egress.values():
        capture(sq, sent)
    load(w.rv_packet, pkts)
    assert w.run_v4(w.ingress[1], w.rv_packet, 0, 64)
    for sq in w.dirty:
        sq.flush()
    assert [g for _a, _d, g in sent] == [64] * 128  # every datagram went in a GSO message
    assert [d for _a, d, _g in sent] == [p[28:] for p in pkts] * 2
    assert w.counters[1][m.PACKETS] == 64 and w.counters[1][m.BYTES] == 64 * 64


def test_v4_batch_with_ip_options_is_not_uniform() -> None:
    entries = (m.TableEntry(1, "a", 1, "239.1.1.1", 5000, (), OUT[:1]),)
    p = v4("192.0.2.2", "239.1.1.1", 5000, b"x" * 10)
    opt = bytes([0x46]) + p[1:20] + b"\x01\x01\x01\x00" + p[20:]  # IHL 6: four NOP/EOL bytes
    w = make_worker(4, entries)
    load(w.rv_packet, [opt, opt])
    assert not w.run_v4(w.ingress[1], w.rv_packet, 0, 2)


def test_v4_short_read_is_left_to_the_per_packet_path() -> None:
    entries = (m.TableEntry(1, "a", 1, "239.1.1.1", 5000, (), OUT[:1]),)
    p = v4("192.0.2.2", "239.1.1.1", 5000, b"x" * 100)
    w = make_worker(4, entries)
    load(w.rv_packet, [p, p[:60]])  # UDP length says 108, only 40 bytes of UDP arrived
    w.rv_packet.u32[1 * I_STRIDE + I_LEN] = 60
    assert not w.run_v4(w.ingress[1], w.rv_packet, 0, 2)
    assert per_packet_malformed(w, 2) == 1


def per_packet_malformed(w: Worker, n: int) -> int:
    w.bulk = False
    w.batch_v4(w.ingress[1], w.rv_packet, n)
    return w.malformed


v6_packets = st.lists(
    st.tuples(
        st.sampled_from(["ff3e::1", "ff3e::2"]),
        st.sampled_from([5000, 5001]),
        st.integers(0, 1400),
    ),
    min_size=1,
    max_size=64,
)


@settings(max_examples=80, deadline=None)
@given(spec=v6_packets, uniform=st.booleans())
def test_v6_bulk_equals_per_packet(spec: list[tuple[str, int, int]], uniform: bool) -> None:
    if uniform:
        spec = [spec[0]] * len(spec)
    entries = (m.TableEntry(1, "a", 1, "ff3e::1", 5000, (), OUT),)
    pkts = [v6(g, p, bytes([i % 251]) * size) for i, (g, p, size) in enumerate(spec)]
    assert run(True, 6, entries, pkts) == run(False, 6, entries, pkts)


def test_v6_uniform_batch_relays_every_payload() -> None:
    entries = (m.TableEntry(1, "a", 1, "ff3e::1", 5000, (), OUT[:1]),)
    pkts = [v6("ff3e::1", 5000, bytes([i]) * 200) for i in range(10)]
    w = make_worker(6, entries)
    sent: Sent = []
    for sq in w.egress.values():
        capture(sq, sent)
    load(w.rv_packet, pkts)
    assert w.run_v6(w.ingress[1], w.rv_packet, 0, 10)
    for sq in w.dirty:
        sq.flush()
    assert [d for _a, d, _g in sent] == [p[48:] for p in pkts]


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 1400), min_size=1, max_size=64), uniform=st.booleans())
def test_socket_bulk_equals_per_packet(sizes: list[int], uniform: bool) -> None:
    if uniform:
        sizes = [sizes[0]] * len(sizes)
    results = []
    for bulk in (True, False):
        w = make_socket_worker()
        w.bulk = bulk
        sent: Sent = []
        for sq in w.egress.values():
            capture(sq, sent)
        rv = w.rv_socket
        for i, size in enumerate(sizes):
            ctypes.memmove(rv.buf_addr + i * rv.size, bytes([i % 251]) * size, size)
            rv.u32[i * I_STRIDE + I_LEN] = size
            rv.u32[i * I_STRIDE + I_FLAGS] = 0
        w.batch_socket(w.ingress[1], rv, len(sizes))
        for sq in w.dirty:
            sq.flush()
        per_dest: dict[int, list[bytes]] = {}
        for addr, data, _gso in sent:
            per_dest.setdefault(addr, []).append(data)
        results.append((sorted(per_dest.values()), w.counters[1]))
    assert results[0] == results[1]


def make_socket_worker() -> Worker:
    a, b = Channel.pair()
    w = Worker(b)
    w._keep = a  # type: ignore[attr-defined]
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    w.handle(m.AddIngress((m.IngressSpec(1, "socket", 4, 1),)), [udp.detach()])
    w.handle(m.SetTable(1, (m.TableEntry(1, "s", 1, "239.1.1.1", 5000, (), OUT),)), [])
    w.running = True
    w.rebuild()
    return w


def test_runs_cuts_a_batch_where_the_key_changes() -> None:
    assert runs([1] * 6 + [2] * 3 + [1] * 5, 14) == [(0, 6), (6, 9), (9, 14)]
    assert runs([1, 2] * 5, 10) == []  # nothing long enough to be worth it
    assert runs([7] * 9, 9) == []  # one run: the caller tried the whole batch already


flow_runs = st.lists(
    st.tuples(
        st.sampled_from(
            [
                ("192.0.2.2", "239.1.1.1", 5000, 64, 0),
                ("192.0.2.2", "239.1.1.1", 5000, 1316, 0),  # same flow, other size
                ("192.0.2.2", "239.1.1.2", 5000, 64, 0),
                ("192.0.2.9", "239.1.1.1", 5000, 64, 0),  # filtered source
                ("192.0.2.2", "239.1.1.1", 5000, 64, 0x2000),  # fragments
                ("192.0.2.2", "239.9.9.9", 5000, 200, 0),  # no rule
            ]
        ),
        st.integers(1, 20),
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=150, deadline=None)
@given(spec=flow_runs, filtered=st.booleans())
def test_v4_interleaved_runs_equal_per_packet(
    spec: list[tuple[tuple[str, str, int, int, int], int]], filtered: bool
) -> None:
    flat = [flow for flow, count in spec for _ in range(count)][:64]
    entries = (
        m.TableEntry(1, "a", 1, "239.1.1.1", 5000, ("192.0.2.2",) if filtered else (), OUT),
        m.TableEntry(2, "b", 1, "239.1.1.2", 5000, (), OUT[:1]),
    )
    pkts = [v4(s, g, p, bytes([i % 251]) * size, fr) for i, (s, g, p, size, fr) in enumerate(flat)]
    assert run(True, 4, entries, pkts) == run(False, 4, entries, pkts)


@settings(max_examples=80, deadline=None)
@given(
    spec=st.lists(
        st.tuples(st.sampled_from(["ff3e::1", "ff3e::2", "ff3e::1:1"]), st.integers(1, 20)),
        min_size=1,
        max_size=8,
    )
)
def test_v6_interleaved_runs_equal_per_packet(spec: list[tuple[str, int]]) -> None:
    flat = [g for g, count in spec for _ in range(count)][:64]
    entries = (
        m.TableEntry(1, "a", 1, "ff3e::1", 5000, (), OUT),
        m.TableEntry(2, "b", 1, "ff3e::1:1", 5000, (), OUT[:1]),
    )
    pkts = [v6(g, 5000, bytes([i % 251]) * 100) for i, g in enumerate(flat)]
    assert run(True, 6, entries, pkts) == run(False, 6, entries, pkts)
