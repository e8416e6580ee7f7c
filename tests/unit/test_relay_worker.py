"""The worker's hot path on synthetic AF_PACKET batches, sending on loopback only."""

from __future__ import annotations

import ctypes
import socket
from collections.abc import Iterator

import pytest

from mcrelay.ipc import Channel
from mcrelay.lab.headers import ipv4_udp, ipv6_udp
from mcrelay.relay import messages as m
from mcrelay.relay.mmsg import I_LEN, I_STRIDE, RecvVec
from mcrelay.relay.worker import Worker

v4 = ipv4_udp
v6 = ipv6_udp


def load(rv: RecvVec, packets: list[bytes]) -> int:
    for i, p in enumerate(packets):
        ctypes.memmove(rv.buf_addr + i * rv.size, p, len(p))
        rv.u32[i * I_STRIDE + I_LEN] = len(p)
    return len(packets)


@pytest.fixture
def sink() -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(2)
    yield s
    s.close()


def make_worker(ingress_family: int, entries: tuple[m.TableEntry, ...]) -> Worker:
    a, b = Channel.pair()
    w = Worker(b)
    w._keep = a  # type: ignore[attr-defined]
    dummy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    w.handle(m.AddIngress((m.IngressSpec(1, "packet", ingress_family, 1),)), [dummy.detach()])
    w.handle(m.SetTable(1, entries), [])
    w.running = True
    w.rebuild()
    return w


def test_v4_batch_relays_payloads_and_counts_drops(sink: socket.socket) -> None:
    port = sink.getsockname()[1]
    entry = m.TableEntry(
        7,
        "r",
        1,
        "239.1.1.1",
        5000,
        ("192.0.2.2",),
        (m.OutputSpec("127.0.0.1", port, 0, 64, 46),),
    )
    w = make_worker(4, (entry,))
    payloads = [bytes([i]) * (100 + i) for i in range(10)]
    pkts = [v4("192.0.2.2", "239.1.1.1", 5000, p) for p in payloads]
    pkts.append(v4("192.0.2.2", "239.1.1.1", 5000, b"x" * 50, frag=0x2000))  # fragment
    pkts.append(v4("192.0.2.9", "239.1.1.1", 5000, b"y" * 50))  # wrong source
    pkts.append(v4("192.0.2.2", "239.1.1.1", 5001, b"z" * 50))  # no rule
    n = load(w.rv_packet, pkts)
    w.batch_v4(w.ingress[1], w.rv_packet, n)
    for sq in w.dirty:
        sq.flush()
    got = [sink.recv(2048) for _ in payloads]
    assert got == payloads
    c = w.counters[7]
    assert c[m.PACKETS] == 10 and c[m.BYTES] == sum(map(len, payloads))
    assert c[m.FRAGMENT] == 1 and c[m.FILTERED] == 1
    assert w.unmatched == 1
    st = w.stats(1)
    assert st.relays[0].outputs == ((10, sum(map(len, payloads)), 0),)


def test_v6_batch(sink: socket.socket) -> None:
    port = sink.getsockname()[1]
    entry = m.TableEntry(
        3, "r6", 1, "ff3e::1", 5000, (), (m.OutputSpec("127.0.0.1", port, 0, 5, 0),)
    )
    w = make_worker(6, (entry,))
    n = load(w.rv_packet, [v6("ff3e::1", 5000, b"hello v6"), v6("ff3e::2", 5000, b"no")])
    w.batch_v6(w.ingress[1], w.rv_packet, n)
    for sq in w.dirty:
        sq.flush()
    assert sink.recv(100) == b"hello v6"
    assert w.counters[3][m.PACKETS] == 1 and w.unmatched == 1


def test_send_error_counted_per_output() -> None:
    # Port 0 is refused by the kernel on send: each message fails with EINVAL.
    entry = m.TableEntry(4, "e", 1, "239.1.1.1", 5000, (), (m.OutputSpec("127.0.0.1", 0, 0, 5, 0),))
    w = make_worker(4, (entry,))
    n = load(w.rv_packet, [v4("192.0.2.2", "239.1.1.1", 5000, b"a" * 10)] * 3)
    w.batch_v4(w.ingress[1], w.rv_packet, n)
    for sq in w.dirty:
        sq.flush()
    assert w.counters[4][m.SEND_ERROR] == 3
    assert w.stats(1).relays[0].outputs == ((0, 0, 3),)


def test_stats_send_changes_only(sink: socket.socket) -> None:
    port = sink.getsockname()[1]
    out = (m.OutputSpec("127.0.0.1", port, 0, 5, 0),)
    a = m.TableEntry(1, "a", 1, "239.1.1.1", 5000, (), out)
    b = m.TableEntry(2, "b", 1, "239.1.1.2", 5000, (), out)
    w = make_worker(4, (a, b))
    assert {r.id for r in w.stats(1).relays} == {1, 2}  # first Stats: everything
    assert w.stats(2).relays == () and w.stats(2).gone == ()  # idle: nothing
    n = load(w.rv_packet, [v4("192.0.2.2", "239.1.1.2", 5000, b"x" * 7)])
    w.batch_v4(w.ingress[1], w.rv_packet, n)
    for sq in w.dirty:
        sq.flush()
    st = w.stats(3)
    assert [(r.id, r.counters[m.PACKETS], r.outputs) for r in st.relays] == [(2, 1, ((1, 7, 0),))]
    w.handle(m.SetTable(2, (b,)), [])
    w.rebuild()
    st = w.stats(4)
    assert st.relays == () and st.gone == (1,)


def test_traced_packets_carry_their_own_kernel_receive_time(sink: socket.socket) -> None:
    import os
    import time

    inp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    inp.bind(("127.0.0.1", 0))
    a, b = Channel.pair()
    w = Worker(b)
    w._keep = a  # type: ignore[attr-defined]
    w.handle(m.AddIngress((m.IngressSpec(1, "socket", 4, 1),)), [os.dup(inp.fileno())])
    out = m.OutputSpec("127.0.0.1", sink.getsockname()[1], 0, 64, 0)
    w.handle(m.SetTable(1, (m.TableEntry(7, "r", 1, "239.1.1.1", 5000, (), (out,)),)), [])
    w.handle(m.SetTrace((7,)), [])
    w.running = True
    w.rebuild()
    time.sleep(0.1)  # the kernel turns receive timestamps on
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    t0 = time.time()
    tx.sendto(b"a" * 10, inp.getsockname())
    time.sleep(0.2)
    t1 = time.time()
    tx.sendto(b"b" * 20, inp.getsockname())
    time.sleep(0.05)
    w.drain(w.ingress[1])  # one batch of two packets
    first, second = w.rings[7].take()
    assert (first["size"], second["size"]) == (10, 20)
    assert t0 <= first["time"] < t1 <= second["time"] < time.time()
    assert first["destination"] == "239.1.1.1:5000" and first["result"] == "relayed"
    w.handle(m.SetTrace(()), [])
    w.rebuild()
    tx.sendto(b"c", inp.getsockname())
    time.sleep(0.05)
    w.drain(w.ingress[1])
    assert w.rv_socket.timestamp(0) is None  # tracing off: no timestamps asked of the kernel
    tx.close()
    inp.close()
