"""Supervisor<->worker messages survive the real channel, descriptors included."""

from __future__ import annotations

import os
import socket
import threading

from mcrelay.ipc import Channel
from mcrelay.relay import messages as m


def roundtrip(msg: object, fds: list[int] | None = None) -> tuple[object, list[int]]:
    a, b = Channel.pair()
    try:
        # A big message spans many frames: send from a thread so the socket
        # buffer drains while it is written.
        t = threading.Thread(target=a.send, args=(msg, fds or []))
        t.start()
        got = b.recv_message()
        t.join()
        return got
    finally:
        a.close()
        b.close()


def test_table_roundtrip_large() -> None:
    entries = tuple(
        m.TableEntry(
            i,
            f"r{i}",
            1,
            f"239.{i // 250}.{i % 250}.1",
            5000,
            ("192.0.2.2",) if i % 2 else (),
            (m.OutputSpec("239.9.9.9", 6000, 3, 16, 46), m.OutputSpec("198.51.100.2", 7, 0, 64, 0)),
        )
        for i in range(10000)
    )
    msg = m.SetTable(7, entries)
    got, fds = roundtrip(msg)
    assert got == msg and fds == []


def test_stats_roundtrip() -> None:
    msg = m.Stats(
        3,
        (m.RelayStats(5, (1, 2, 3, 4, 5, 6, 7), ((1, 2, 0), (3, 4, 1))),),
        {"received": 9},
        0.25,
        {"5": [{"time": 1.0, "source": "192.0.2.2:1", "size": 3, "outputs": [], "result": "x"}]},
        (6, 8),
    )
    got, _ = roundtrip(msg)
    assert got == msg


def test_add_ingress_carries_descriptors() -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        spec = m.IngressSpec(4, "socket", 4, 2)
        got, fds = roundtrip(m.AddIngress((spec,)), [s.fileno()])
        assert got == m.AddIngress((spec,))
        assert len(fds) == 1
        st = os.fstat(fds[0])
        assert st.st_ino == os.fstat(s.fileno()).st_ino
        os.close(fds[0])
    finally:
        s.close()


def test_simple_messages() -> None:
    for msg in (
        m.Setup(1, "nobody"),
        m.Start(),
        m.Ready(10, 65534, 65534),
        m.RemoveIngress((1, 2)),
        m.SetTrace((3,)),
        m.StatsRequest(1),
        m.Stop(),
    ):
        assert roundtrip(msg)[0] == msg
