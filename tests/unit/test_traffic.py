"""Traffic tool on loopback: payload format, parsing, counting, the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcrelay.lab import traffic
from mcrelay.lab.netns import python_env, wait_for
from mcrelay.lab.traffic import (
    MIN_SIZE,
    PROBE_STREAM,
    ReceiveResult,
    TrafficError,
    make_payload,
    parse_payload,
)

TRAFFIC = [sys.executable, "-m", "mcrelay.lab.traffic"]


@given(
    seq=st.integers(0, 2**32 - 1),
    size=st.integers(MIN_SIZE, 2000),
    stream=st.integers(0, 0xFFFF),
)
def test_payload_roundtrip(seq: int, size: int, stream: int) -> None:
    data = make_payload(seq, size, stream)
    assert len(data) == size
    info = parse_payload(data)
    assert info == traffic.PayloadInfo(stream=stream, seq=seq, size=size, intact=True)


@given(
    seq=st.integers(0, 2**32 - 1),
    size=st.integers(MIN_SIZE + 1, 600),
    data=st.data(),
)
def test_any_changed_byte_breaks_intact(seq: int, size: int, data: st.DataObject) -> None:
    payload = bytearray(make_payload(seq, size))
    pos = data.draw(st.integers(0, size - 1))
    payload[pos] ^= data.draw(st.integers(1, 255))
    info = parse_payload(bytes(payload))
    assert info is None or not info.intact


def test_payload_details() -> None:
    assert make_payload(0, 64) != make_payload(1, 64)
    assert make_payload(5, 64, stream=1) != make_payload(5, 64, stream=2)
    assert make_payload(3, 1000)[12:16] == struct.pack("!I", 1000)
    truncated = make_payload(7, 200)[:150]
    assert parse_payload(truncated) == traffic.PayloadInfo(0, 7, 200, intact=False)
    assert parse_payload(b"hello world, not ours") is None
    assert parse_payload(b"MCRT") is None
    with pytest.raises(TrafficError):
        make_payload(0, MIN_SIZE - 1)
    with pytest.raises(TrafficError):
        make_payload(0, 70000)
    with pytest.raises(TrafficError):
        make_payload(0, 64, stream=70000)


def test_struct_layouts_match_kernel() -> None:
    # struct group_req: u32 + 4 pad + 128-byte sockaddr_storage (8-aligned).
    req = traffic.group_req(3, "239.1.2.3")
    assert len(req) == 136
    assert struct.unpack_from("=I", req)[0] == 3
    assert struct.unpack_from("=H", req, 8)[0] == socket.AF_INET
    assert req[12:16] == socket.inet_aton("239.1.2.3")
    sreq = traffic.group_source_req(4, "ff3e::1", "2001:db8::5")
    assert len(sreq) == 264
    assert struct.unpack_from("=H", sreq, 8)[0] == socket.AF_INET6
    assert sreq[16:32] == socket.inet_pton(socket.AF_INET6, "ff3e::1")
    assert sreq[136 + 8 : 136 + 24] == socket.inet_pton(socket.AF_INET6, "2001:db8::5")


def test_argument_errors() -> None:
    with pytest.raises(TrafficError, match="needs an interface"):
        traffic.open_sender("239.1.1.1")
    with pytest.raises(TrafficError, match="needs an interface"):
        traffic.open_receiver("ff3e::1", 5000)
    with pytest.raises(TrafficError, match="not an IP address"):
        traffic.send("nowhere", 5000)
    with pytest.raises(TrafficError, match="family"):
        traffic.open_sender("127.0.0.1", source="::1")
    with pytest.raises(TrafficError, match="no interface"):
        traffic.open_sender("239.1.1.1", iface="nonexistent0")


def receive_in_thread(address: str, **kw: object) -> tuple[int, Callable[[], ReceiveResult]]:
    """Bind a receiver now (port chosen by the kernel), receive in a thread."""
    sock = traffic.open_receiver(address, 0)
    port = sock.getsockname()[1]
    box: list[ReceiveResult] = []
    t = threading.Thread(
        target=lambda: box.append(traffic.receive(address, port, sock=sock, **kw))  # type: ignore[arg-type]
    )
    t.start()

    def result() -> ReceiveResult:
        t.join(10)
        sock.close()
        return box[0]

    return port, result


@pytest.mark.parametrize("address", ["127.0.0.1", "::1"])
def test_loopback_send_receive(address: str) -> None:
    port, result = receive_in_thread(address, count=20, duration=5)
    sent = traffic.send(address, port, count=20, size=200, ttl=33, tos=0x10)
    assert (sent.sent, sent.bytes, sent.errors) == (20, 4000, 0)
    got = result()
    assert got.count == 20 and got.intact == 20 and got.reason == "count"
    assert got.seqs == list(range(20))
    assert got.ttl_values == {33} and got.tos_values == {0x10}
    assert (got.duplicates, got.reordered, got.seqs_missing) == (0, 0, 0)
    assert got.sources == {address: 20}
    assert {p.dst for p in got.packets} == {address}
    assert got.packets[3].sha256 == hashlib.sha256(make_payload(3, 200)).hexdigest()
    # The JSON form round-trips exactly.
    assert ReceiveResult.from_dict(json.loads(got.to_json())) == got


def test_counts_loss_duplicates_reordering_and_foreign() -> None:
    port, result = receive_in_thread("127.0.0.1", duration=5, idle=0.3, max_records=5)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for seq in (0, 1, 2, 5, 4, 4, 9):  # 3, 6, 7, 8 missing; 4 duplicated; 4 late
            s.sendto(make_payload(seq), ("127.0.0.1", port))
        s.sendto(b"not a test payload", ("127.0.0.1", port))
        s.sendto(make_payload(0, stream=PROBE_STREAM), ("127.0.0.1", port))
    got = result()
    assert got.reason == "idle"
    assert got.count == 8 and got.foreign == 1 and got.probes == 1
    assert got.intact == 7
    assert got.duplicates == 1
    assert got.reordered == 2  # 4 after 5, twice
    assert got.seqs_missing == 4
    assert (got.first_seq, got.last_seq) == (0, 9)
    assert len(got.packets) == 5 and got.truncated


def test_rate_paces_sending() -> None:
    port, result = receive_in_thread("127.0.0.1", count=10, duration=5)
    sent = traffic.send("127.0.0.1", port, count=10, rate=100)
    assert 0.08 <= sent.duration < 1.0  # 9 intervals of 10 ms
    assert result().count == 10


def test_cli_recv_and_send() -> None:
    recv = subprocess.Popen(
        [*TRAFFIC, "recv", "127.0.0.1", "0", "--count", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=python_env(),
    )
    try:
        assert recv.stderr is not None
        assert recv.stderr.readline().strip() == traffic.READY_LINE
        # Port 0 is the kernel's choice; find it from /proc rather than guessing.
        port = wait_for(lambda: _udp_port_of(recv.pid), timeout=5, what="receiver port")
        out = subprocess.run(
            [*TRAFFIC, "send", "127.0.0.1", str(port), "--count", "3", "--tos", "0x20"],
            capture_output=True,
            text=True,
            check=True,
            env=python_env(),
        ).stdout
        assert json.loads(out)["sent"] == 3
        stdout, _ = recv.communicate(timeout=10)
        got = ReceiveResult.from_dict(json.loads(stdout))
        assert got.count == 3 and got.tos_values == {0x20}
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
    bad = subprocess.run(
        [*TRAFFIC, "recv", "239.1.1.1", "5000"],
        capture_output=True,
        text=True,
        env=python_env(),
    )
    assert bad.returncode == 2 and "needs an interface" in bad.stderr


def test_stop_on_signal_returns_partial_result() -> None:
    recv = subprocess.Popen(
        [*TRAFFIC, "recv", "127.0.0.1", "0", "--duration", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=python_env(),
    )
    try:
        assert recv.stderr is not None
        assert recv.stderr.readline().strip() == traffic.READY_LINE
        port = wait_for(lambda: _udp_port_of(recv.pid), timeout=5, what="receiver port")
        traffic.send("127.0.0.1", port, count=2)
        recv.terminate()
        stdout, _ = recv.communicate(timeout=10)
        got = ReceiveResult.from_dict(json.loads(stdout))
        assert got.count == 2 and got.reason == "signal SIGTERM"
        assert recv.returncode == 0
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()


def _udp_port_of(pid: int) -> int | None:
    """Local port of the first UDP socket owned by pid (IPv4, /proc/net/udp)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    with open(f"/proc/{pid}/net/udp") as f:
        for line in f.readlines()[1:]:
            cols = line.split()
            if cols[9] in inodes:
                return int(cols[1].split(":")[1], 16)
    return None
