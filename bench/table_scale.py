"""Large rule tables: apply/remove time, status latency meanwhile, one add at 1 vs N, RSS.

    flock /tmp/mcrelay-netns.lock python -m bench.table_scale [--count N] [--routes N]

Issue 12, points 3, 4 and 6. A namespace lab (the standard one: src -- up0:
router :dn1 -- rcv1) and a real ``mcrelayd`` in the router namespace. For each
kind of rule (packet-mode relays, socket-mode relays, (S,G) routes), all on
one input interface (up0):

- *apply*: one ``config.apply`` of ``--count`` rules onto an empty table,
  timed; then one ``config.apply`` of an empty set, timed (removal);
- *status*: a second client thread calls ``daemon.status`` every 20 ms while
  each apply runs; the slowest answer and the 99th percentile are reported;
- *one add*: ``relay add``/``route add`` of one more rule (and its delete)
  with one rule installed and with ``--count`` installed, median of
  ``--adds`` rounds;
- *RSS* of every daemon process (supervisor, control, each worker; VmRSS and
  PSS from /proc) with one relay and with ``--count`` packet-mode relays.

JSON on stdout, MET/MISS lines on stderr. It reports, never asserts.
Run it only under the namespace lock (see the README's Performance section).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from mcrelay.client import Client
from mcrelay.lab import Lab
from mcrelay.lab.daemon import DaemonProcess

GOAL_APPLY_S = 10.0
GOAL_STATUS_MS = 100.0
GOAL_ADD_RATIO = 1.5  # "costs the same": within half again of the one-rule figure
GOAL_RSS_1_MIB = 60.0
GOAL_RSS_N_MIB = 150.0


def group(i: int) -> str:
    return f"239.{100 + i // 62500}.{(i // 250) % 250}.{i % 250 + 1}"


def relay(i: int, mode: str) -> dict[str, Any]:
    return {
        "name": f"r{i}",
        "mode": mode,
        "input": {"iif": "up0", "group": group(i), "port": 5000},
        "outputs": [{"address": "239.3.3.3", "port": 7000, "oif": "dn1", "ttl": 16}],
    }


def route(i: int) -> dict[str, Any]:
    return {"iif": "up0", "source": "192.0.2.2", "group": group(i), "oifs": ["dn1"]}


def rules(kind: str, n: int, first: int = 0) -> dict[str, Any]:
    if kind == "route":
        return {"routes": [route(i) for i in range(first, first + n)], "relays": [], "groups": []}
    return {"routes": [], "relays": [relay(i, kind) for i in range(first, first + n)], "groups": []}


class StatusSampler:
    """``daemon.status`` every ``interval`` s from its own connection, latencies kept."""

    def __init__(self, sock: str, interval: float = 0.02) -> None:
        self.sock = sock
        self.interval = interval
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> StatusSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def _run(self) -> None:
        with Client(self.sock, timeout=120) as c:
            while not self._stop.is_set():
                t = time.perf_counter()
                try:
                    c.call("daemon.status")
                except Exception as exc:  # reported, not raised: this is a measurement
                    self.errors.append(str(exc))
                self.latencies.append(time.perf_counter() - t)
                self._stop.wait(self.interval)

    def summary(self) -> dict[str, Any]:
        ls = sorted(self.latencies)
        if not ls:
            return {"samples": 0}
        return {
            "samples": len(ls),
            "max_ms": round(ls[-1] * 1000, 1),
            "p99_ms": round(ls[min(len(ls) - 1, int(len(ls) * 0.99))] * 1000, 1),
            "median_ms": round(statistics.median(ls) * 1000, 2),
            "errors": self.errors[:3],
        }


def timed_apply(d: DaemonProcess, body: dict[str, Any]) -> dict[str, Any]:
    with StatusSampler(d.socket) as s, Client(d.socket, timeout=900) as c:
        time.sleep(0.1)
        t = time.perf_counter()
        error = None
        try:
            c.call("config.apply", rules=body)
        except Exception as exc:
            error = str(exc)[:200]
        took = time.perf_counter() - t
        time.sleep(0.1)
    return {"seconds": round(took, 3), "error": error, "status": s.summary()}


def one_add(d: DaemonProcess, kind: str, index: int, rounds: int) -> dict[str, Any]:
    """Median wall time of one add and of one delete over ``rounds`` rounds (one connection)."""
    adds, dels = [], []
    error = None
    with Client(d.socket, timeout=300) as c:
        for k in range(rounds):
            i = index + k
            try:
                t = time.perf_counter()
                if kind == "route":
                    c.call("route.add", **route(i))
                    adds.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    r = route(i)
                    c.call("route.del", iif=r["iif"], source=r["source"], group=r["group"])
                else:
                    c.call("relay.add", **relay(i, kind))
                    adds.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    c.call("relay.del", name=f"r{i}")
                dels.append(time.perf_counter() - t)
            except Exception as exc:
                error = str(exc)[:200]
                break
    return {
        "add_ms": round(statistics.median(adds) * 1000, 2) if adds else None,
        "del_ms": round(statistics.median(dels) * 1000, 2) if dels else None,
        "error": error,
    }


def _kib(pid: int, file: str, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss(d: DaemonProcess) -> dict[str, Any]:
    """VmRSS and PSS (MiB) of the supervisor and each child, and their sums."""
    procs = []
    for pid in [d.pid, *d.children()]:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        role = "supervisor" if pid == d.pid else b" ".join(cmd[1:3]).decode(errors="replace")
        procs.append(
            {
                "pid": pid,
                "role": role,
                "rss_mib": round(_kib(pid, "status", "VmRSS") / 1024, 1),
                "pss_mib": round(_kib(pid, "smaps_rollup", "Pss") / 1024, 1),
            }
        )
    return {
        "processes": procs,
        "rss_mib": round(sum(p["rss_mib"] for p in procs), 1),
        "pss_mib": round(sum(p["pss_mib"] for p in procs), 1),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "kernel": platform.release()},
        "count": args.count,
        "routes": args.routes,
        "workers": args.workers,
        "kinds": {},
    }
    with Lab.standard() as lab:
        d = DaemonProcess(lab, "router", workers=args.workers)
        d.start(timeout=30)
        try:
            d.call("config.apply", rules=rules("packet", 1))
            time.sleep(0.5)
            out["rss_1"] = rss(d)
            d.call("config.apply", rules=rules("packet", 0))
            for kind in args.kinds:
                n = args.routes if kind == "route" else args.count
                print(f"table_scale: {kind} x {n}", file=sys.stderr)
                res: dict[str, Any] = {"n": n}
                d.call("config.apply", rules=rules(kind, 1))
                res["one_add_at_1"] = one_add(d, kind, n + 10, args.adds)
                d.call("config.apply", rules=rules(kind, 0))
                res["apply"] = timed_apply(d, rules(kind, n))
                print(f"  apply {res['apply']}", file=sys.stderr)
                res["one_add_at_n"] = one_add(d, kind, n + 10, args.adds)
                print(f"  add {res['one_add_at_1']} -> {res['one_add_at_n']}", file=sys.stderr)
                if kind == "packet":
                    time.sleep(0.5)
                    res["rss_n"] = out["rss_n"] = rss(d)
                res["remove"] = timed_apply(d, rules(kind, 0))
                print(f"  remove {res['remove']}", file=sys.stderr)
                out["kinds"][kind] = res
        finally:
            d.stop()
    return out


def verdicts(r: dict[str, Any]) -> list[str]:
    lines = []

    def line(ok: bool | None, text: str) -> None:
        lines.append(f"{'MET ' if ok else 'MISS'} {text}")

    for kind, res in r["kinds"].items():
        for phase in ("apply", "remove"):
            a = res[phase]
            ok = a["error"] is None and a["seconds"] <= GOAL_APPLY_S
            what = a["error"] or f"{a['seconds']:.2f} s"
            line(ok, f"{phase} {res['n']} {kind}: {what} (goal <= {GOAL_APPLY_S:.0f} s)")
            st = a["status"].get("max_ms")
            line(
                st is not None and st <= GOAL_STATUS_MS,
                f"daemon.status during {phase} of {res['n']} {kind}: max {st} ms, "
                f"p99 {a['status'].get('p99_ms')} ms (goal <= {GOAL_STATUS_MS:.0f} ms)",
            )
        a1, an = res["one_add_at_1"]["add_ms"], res["one_add_at_n"]["add_ms"]
        ok = a1 is not None and an is not None and an <= GOAL_ADD_RATIO * max(a1, 1.0)
        line(ok, f"one {kind} add: {a1} ms at 1, {an} ms at {res['n']} (same cost)")
    for key, goal, label in (("rss_1", GOAL_RSS_1_MIB, "1"), ("rss_n", GOAL_RSS_N_MIB, "N")):
        if key in r:
            v = r[key]["rss_mib"]
            line(v <= goal, f"RSS at {label} relay(s): {v} MiB (PSS {r[key]['pss_mib']}) <= {goal}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=10000, help="relays per mode")
    ap.add_argument("--routes", type=int, default=10000)
    ap.add_argument("--adds", type=int, default=5, help="rounds of one add + delete")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--kinds", nargs="+", default=["packet", "socket", "route"])
    args = ap.parse_args(argv)
    r = run(args)
    r["verdicts"] = verdicts(r)
    print(json.dumps(r, indent=2))
    for v in r["verdicts"]:
        print(v, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
