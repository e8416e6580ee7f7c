"""The supervisor<->child channel: framing, descriptors, non-blocking posting."""

from __future__ import annotations

import os

from mcrelay.ipc import Channel, Ping


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def test_descriptors_travel_with_their_message() -> None:
    a, b = Channel.pair()
    r, w = os.pipe()
    try:
        a.send(Ping(1), [r])
        msg, fds = b.recv_message()
        assert msg == Ping(1) and len(fds) == 1
        os.write(w, b"x")
        assert os.read(fds[0], 1) == b"x", "the received descriptor is the same pipe"
        os.close(fds[0])
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def test_a_channel_that_takes_no_descriptors_closes_any_it_is_sent() -> None:
    a, b = Channel.pair(takes_fds=False)
    r, w = os.pipe()
    try:
        before = open_fds()
        a.send(Ping(2), [r])
        msg, fds = b.recv_message()
        assert msg == Ping(2) and fds == []
        assert open_fds() == before, "the passed copy was closed, nothing leaked"
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def test_post_queues_what_the_socket_cannot_take_yet() -> None:
    a, b = Channel.pair()
    try:
        for i in range(5000):  # far more than the socket buffer holds
            a.post(Ping(i))
        assert a.wants_write
        got = []
        while len(got) < 5000:
            a.flush()
            msg = b.recv()
            if msg is not None:
                got.append(msg[0].seq)
        assert got == list(range(5000)) and not a.wants_write
    finally:
        a.close()
        b.close()
