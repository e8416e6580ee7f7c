"""What Prometheus metrics cost a daemon holding many relays: idle CPU and scrape time.

Starts a real mcrelayd in a namespace lab with ``metrics_listen`` set, applies
``--relays`` idle packet-mode relays in one ``config.apply`` (no traffic ever
flows), lets it settle, then measures:

- the on-CPU time of each daemon process (supervisor, control process,
  workers) over ``--idle`` seconds with nobody scraping, as a percentage of one
  CPU (``/proc/PID/stat`` utime + stime);
- the wall time of ``--scrapes`` consecutive ``GET /metrics`` from inside the
  router namespace (median, min, max) and the size of one answer.

Prints one JSON object. Benchmarks print figures; no test asserts on them.
Run it only under ``flock /tmp/mcrelay-netns.lock`` (the namespace lock), as
root: ``flock /tmp/mcrelay-netns.lock .venv/bin/python -m bench.metrics_cost``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from mcrelay.client import Client
from mcrelay.lab import StandardLab
from mcrelay.lab.daemon import DaemonProcess

METRICS = "127.0.0.1:9479"

# Runs inside the router namespace: N scrapes, each timed, as JSON on stdout.
_SCRAPER = """
import json, sys, time, urllib.request
url, n = sys.argv[1], int(sys.argv[2])
times, size = [], 0
for _ in range(n):
    t = time.perf_counter()
    body = urllib.request.urlopen(url, timeout=60).read()
    times.append(time.perf_counter() - t)
    size = len(body)
print(json.dumps({"times": times, "bytes": size, "lines": body.count(b"\\n")}))
"""


def relay_rules(count: int, mode: str) -> dict[str, Any]:
    """``count`` relays on up0, each with its own group, one output on dn1; never any traffic."""
    relays = [
        {
            "name": f"idle{i}",
            "input": {"iif": "up0", "group": f"239.100.{i // 250}.{i % 250 + 1}", "port": 5000},
            "outputs": [{"address": "239.3.3.3", "port": 7000, "oif": "dn1", "ttl": 16}],
            "mode": mode,
        }
        for i in range(count)
    ]
    return {"routes": [], "relays": relays, "groups": []}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """Percent of one CPU each process used over ``seconds`` of wall time."""
    before = {k: cpu_seconds(p) for k, p in pids.items()}
    t0 = time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - t0
    return {k: round(100 * (cpu_seconds(p) - before[k]) / wall, 2) for k, p in pids.items()}


def daemon_pids(d: DaemonProcess) -> dict[str, int]:
    pids = {"supervisor": d.pid}
    for w in d.call("worker.list")["workers"]:
        if w.get("pid"):
            pids[f"worker{w['index']}"] = int(w["pid"])
    for child in d.children():
        if child not in pids.values():
            pids["control"] = child
    return pids


def median(xs: list[float]) -> float:
    s = sorted(xs)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def run(args: argparse.Namespace) -> dict[str, Any]:
    config = f'metrics_listen = "{METRICS}"\n'
    if args.per_relay is not None:
        config += f"metrics_per_relay = {args.per_relay}\n"
    lab = StandardLab.standard()
    try:
        with DaemonProcess(lab, "router", workers=args.workers, config=config) as d:
            d.start(timeout=60)
            t0 = time.monotonic()
            with Client(d.socket, timeout=600) as c:
                c.call("config.apply", rules=relay_rules(args.relays, args.mode))
            apply_s = time.monotonic() - t0
            time.sleep(args.settle)
            pids = daemon_pids(d)
            cpu = idle_cpu(pids, args.idle)
            url = f"http://{METRICS}/metrics"
            out = lab.run("router", sys.executable, "-c", _SCRAPER, url, str(args.scrapes)).stdout
            scrape = json.loads(out)
            times = [round(t * 1000, 1) for t in scrape["times"]]
            return {
                "bench": "metrics_cost",
                "relays": args.relays,
                "mode": args.mode,
                "workers": args.workers,
                "metrics_per_relay": args.per_relay or "default",
                "apply_s": round(apply_s, 2),
                "idle_s": args.idle,
                "idle_cpu_percent": cpu,
                "scrape_ms": {
                    "median": median(times),
                    "min": min(times),
                    "max": max(times),
                    "all": times,
                },
                "scrape_bytes": scrape["bytes"],
                "scrape_lines": scrape["lines"],
            }
    finally:
        lab.cleanup()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.metrics_cost", description=__doc__.splitlines()[0])
    ap.add_argument("--relays", type=int, default=10_000)
    ap.add_argument("--mode", choices=["packet", "socket"], default="packet")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--idle", type=float, default=20.0, help="seconds of idle CPU measured")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds after apply before it")
    ap.add_argument("--scrapes", type=int, default=5)
    ap.add_argument(
        "--per-relay",
        choices=["true", "false"],
        help="metrics_per_relay setting (omitted: not written, the daemon's default)",
    )
    print(json.dumps(run(ap.parse_args(argv)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
