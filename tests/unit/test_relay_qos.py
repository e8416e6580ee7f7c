"""SendQueue bookkeeping: per-message outputs and sizes, counters credited at flush."""

from __future__ import annotations

import ctypes
import errno
import socket
from array import array

from hypothesis import given, settings
from hypothesis import strategies as st

from mcrelay.relay.messages import N_COUNTERS, QUEUE
from mcrelay.relay.mmsg import Q_CONTROL, Q_CONTROLLEN, Q_IOV, Q_STRIDE
from mcrelay.relay.qos import Backlog, Output, SendQueue


class _Dest:
    addr = 0
    len = 16
    pyaddr = ("127.0.0.1", 9)


def _queue(send_result: int) -> tuple[SendQueue, list[SendQueue], Backlog]:
    backlog = Backlog(limit=4)
    dirty: list[SendQueue] = []
    sq = SendQueue(socket.socket(socket.AF_INET, socket.SOCK_DGRAM), 8, backlog, dirty, gso=True)
    sq.sv.send = lambda fd, start, count: send_result  # type: ignore[method-assign]
    return sq, dirty, backlog


def test_would_block_moves_every_payload_to_the_backlog_with_its_output() -> None:
    sq, dirty, backlog = _queue(-errno.EAGAIN)
    relay = [0] * N_COUNTERS
    a = Output(sq, _Dest(), 0, [0, 0, 0, relay])
    b = Output(sq, _Dest(), 10, [0, 0, 0, relay])
    data = [ctypes.create_string_buffer(bytes([65 + k]) * 5) for k in range(5)]
    # a a b b a: three messages (a x2 as GSO, b x2 as GSO, a), five payloads
    for k, o in enumerate([a, a, b, b, a]):
        sq.add(o, ctypes.addressof(data[k]), 5)
    assert dirty == [sq]
    sq.flush()
    assert backlog.size == 4  # limit 4: the fifth (lowest class, a) is dropped
    queued = [(o, p) for d in (0, 10) for o, p in backlog.classes[d]]
    assert queued == [(a, b"AAAAA"), (a, b"BBBBB"), (b, b"CCCCC"), (b, b"DDDDD")]
    assert a.oc[:3] == [2, 10, 1] and b.oc[:3] == [2, 10, 0]
    assert relay[QUEUE] == 1
    assert sq.n == 0 and sq.cur is None


def test_counters_credited_per_message_on_success() -> None:
    sq, _dirty, _ = _queue(2)  # two messages: 7 B x3 (GSO), 9 B
    relay = [0] * N_COUNTERS
    a = Output(sq, _Dest(), 0, [0, 0, 0, relay])
    buf = ctypes.create_string_buffer(64)
    for ln in (7, 7, 7, 9):
        sq.add(a, ctypes.addressof(buf), ln)
    sq.flush()
    assert a.oc[:3] == [4, 30, 0]


def _state(sq: SendQueue, outs: list[Output]) -> tuple[object, ...]:
    """Everything sendmmsg would read, plus the bookkeeping a later add continues from."""
    nm = sq.m + 1 if sq.n else 0
    sv = sq.sv
    words = []
    for k in range(nm):
        w = list(sv.q[k * Q_STRIDE : (k + 1) * Q_STRIDE])
        w[Q_IOV] -= sv.iovs_addr  # pointers into this queue's own arrays: compare offsets
        w[Q_CONTROL] = w[Q_CONTROL] - sv.ctl_addr if w[Q_CONTROLLEN] else 0
        words.append(w)
    return (
        sq.n,
        sq.m,
        tuple(sq.iq[: 2 * sq.n]),
        words,
        sq.first[:nm],
        sq.lens[:nm],
        [outs.index(o) for o in sq.outs[:nm]],  # type: ignore[arg-type]
        None if sq.cur is None else outs.index(sq.cur),
        sq.cur_len,
        sq.cur_left,
    )


@settings(max_examples=200, deadline=None)
@given(
    runs=st.lists(
        st.tuples(
            st.integers(0, 1), st.sampled_from([0, 64, 1316, 1400, 9000]), st.integers(0, 70)
        ),
        max_size=6,
    ),
    gso=st.booleans(),
)
def test_add_run_leaves_the_queue_as_repeated_add(
    runs: list[tuple[int, int, int]], gso: bool
) -> None:
    queues = []
    for bulk in (True, False):
        backlog = Backlog()
        dirty: list[SendQueue] = []
        sq = SendQueue(
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM), 64, backlog, dirty, gso=gso
        )
        flushed: list[object] = []
        relay = [0] * N_COUNTERS
        outs = [Output(sq, _Dest(), 0, [0, 0, 0, relay]), Output(sq, _Dest(), 0, [0, 0, 0, relay])]
        real_flush = sq.flush

        def flush(
            sq: SendQueue = sq, fl: list[object] = flushed, f: object = real_flush, o: object = outs
        ) -> None:
            fl.append(_state(sq, o))  # type: ignore[arg-type]
            f()  # type: ignore[operator]

        sq.flush = flush  # type: ignore[method-assign]
        sq.sv.send = lambda fd, start, count: count  # type: ignore[method-assign]
        addr = 1 << 20
        for which, length, count in runs:
            addrs = memoryview(array("Q", range(addr, addr + count)))
            if bulk:
                sq.add_run(outs[which], addrs, length)
            else:
                for a in addrs:
                    sq.add(outs[which], a, length)
            addr += count
        queues.append((_state(sq, outs), flushed, [o.oc[:3] for o in outs], len(dirty)))
        sq.sock.close()
    bulk_q, each_q = queues
    assert bulk_q[0][:7] == each_q[0][:7]  # queued payloads and message layout
    assert bulk_q[0][8:] == each_q[0][8:]  # where the open message continues
    assert bulk_q[1:] == each_q[1:]  # what each flush saw, counters, dirty list
