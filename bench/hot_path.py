"""Python cost of the worker's hot path per packet, without the network: JSON on stdout.

A worker is built in this process around a dummy ingress socket and a
loopback egress whose ``sendmmsg`` is replaced by a no-op, so what is timed is
parsing, lookup and queueing: the whole-run path against the per-packet
path, by batch size, for one flow among 1 and 10,000 installed relays, and
for eight flows interleaved packet by packet or in bunches. The
system calls, the kernel and the network are what ``bench.relay_throughput``
measures; this isolates the Python part of them.

    python -m bench.hot_path [--rounds-packets N]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import socket
import sys
import time
from typing import Any

from mcrelay.ipc import Channel
from mcrelay.lab.headers import ipv4_udp
from mcrelay.relay import messages as m
from mcrelay.relay.mmsg import I_LEN, I_STRIDE
from mcrelay.relay.worker import Worker

SIZES = (1, 2, 4, 5, 8, 16, 32, 64)


def build_worker(relays: int) -> tuple[Worker, Channel]:
    """A running worker with one packet-mode IPv4 ingress and ``relays`` relays on it."""
    ours, theirs = Channel.pair()
    w = Worker(theirs)
    dummy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    w.handle(m.AddIngress((m.IngressSpec(1, "packet", 4, 1),)), [dummy.detach()])
    out = (m.OutputSpec("127.0.0.1", 9, 0, 5, 0),)
    entries = tuple(
        m.TableEntry(i, f"r{i}", 1, f"239.{i // 250}.{i % 250}.1", 5000, (), out)
        for i in range(relays)
    )
    w.handle(m.SetTable(1, entries), [])
    w.running = True
    w.rebuild()
    for sq in w.egress.values():
        sq.sv.send = lambda fd, start, count: count  # type: ignore[method-assign]
    return w, ours


def per_packet_us(
    w: Worker, n: int, bulk: bool, packets: int, flows: int = 1, burst: int = 1
) -> float:
    """Mean µs per packet of batch_v4 + flush for batches of n packets.

    Packet i belongs to flow (i // burst) % flows: one flow, or several
    interleaved packet by packet (burst 1) or in bunches.
    """
    rv = w.rv_packet
    for i in range(n):
        flow = (i // burst) % flows
        pkt = ipv4_udp("192.0.2.2", f"239.0.{flow}.1", 5000, b"p" * 64)
        ctypes.memmove(rv.buf_addr + i * rv.size, pkt, len(pkt))
        rv.u32[i * I_STRIDE + I_LEN] = len(pkt)
    w.bulk = bulk
    inn = w.ingress[1]
    rounds = max(packets // n, 50)
    t0 = time.perf_counter()
    for _ in range(rounds):
        w.batch_v4(inn, rv, n)
        for sq in w.dirty:
            sq.flush()
        w.dirty.clear()
    return (time.perf_counter() - t0) / (rounds * n) * 1e6


def run(packets: int) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    for relays in (1, 10000):
        w, _keep = build_worker(relays)
        for n in SIZES:
            row: dict[str, Any] = {"relays": relays, "batch": n}
            for bulk in (True, False):
                key = "whole_batch_us" if bulk else "per_packet_us"
                row[key] = round(per_packet_us(w, n, bulk, packets), 3)
            results.append(row)
    w, _keep = build_worker(10000)
    for burst in (1, 4, 16):
        row = {"relays": 10000, "batch": 64, "flows": 8, "burst": burst}
        for bulk in (True, False):
            key = "whole_batch_us" if bulk else "per_packet_us"
            row[key] = round(per_packet_us(w, 64, bulk, packets, flows=8, burst=burst), 3)
        results.append(row)
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "note": "µs of Python per packet, sendmmsg stubbed, 64-byte payloads; one flow "
        "unless flows/burst say otherwise (packet i in flow (i // burst) % flows)",
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.hot_path", description=__doc__)
    ap.add_argument("--packets", type=int, default=200_000, help="packets per measurement")
    args = ap.parse_args(argv)
    doc = run(args.packets)
    print(json.dumps(doc, indent=1))
    head = (
        f"{'relays':>6} {'batch':>5} {'flows':>5} {'burst':>5} {'whole-run':>9} {'per-packet':>10}"
    )
    print(head, file=sys.stderr)
    for r in doc["results"]:
        print(
            f"{r['relays']:>6} {r['batch']:>5} {r.get('flows', 1):>5} {r.get('burst', '-'):>5} "
            f"{r['whole_batch_us']:>9.3f} {r['per_packet_us']:>10.3f}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
