"""SendQueue bookkeeping: per-message outputs and sizes, counters credited at flush."""

from __future__ import annotations

import ctypes
import errno
import socket

from mcrelay.relay.messages import N_COUNTERS, QUEUE
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
