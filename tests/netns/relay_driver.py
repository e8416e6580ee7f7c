"""A minimal supervisor around RelayManager, for the relay netns tests.

Run inside the router namespace (``python relay_driver.py --workers N``), it
builds a Membership and a RelayManager, then serves one JSON command per stdin
line and answers one JSON line on stdout, while running the supervisor's job:
polling worker channels, ticking, reaping children. :class:`Driver` is the
test-side client.

Commands: {"op": "add"|"replace", "relay(s)": ...}, {"op": "del", "name"},
"relays", "workers", "warnings", "groups", "kill_workers",
{"op": "iface", "name"}, {"op": "trace_start"|"trace_stop", "name"},
{"op": "trace_read", "name", "cursor"}, "quit".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import select
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _ifindex(name: str) -> int | None:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


def serve(workers: int, user: str) -> int:
    from mcrelay.errors import McrelayError
    from mcrelay.membership import Membership
    from mcrelay.model import parse_relay
    from mcrelay.relay.manager import RelayManager

    logging.basicConfig(level=logging.INFO, format="driver %(levelname)s %(message)s")
    log = logging.getLogger("driver")
    memb = Membership(_ifindex, log)
    mgr = RelayManager(workers=workers, user=user, ifindex_of=_ifindex, membership=memb, log=log)
    mgr.start()
    stdin = sys.stdin.fileno()
    buf = b""
    try:
        while True:
            for _ in _poll(mgr, [stdin], 0.05):
                chunk = os.read(stdin, 65536)
                if not chunk:
                    return 0
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    cmd = json.loads(line)
                    if cmd["op"] == "quit":
                        return 0
                    try:
                        result: Any = _command(mgr, memb, cmd, parse_relay)
                        reply = {"ok": True, "result": result}
                    except McrelayError as exc:
                        reply = {"ok": False, "error": exc.message, "type": type(exc).__name__}
                    sys.stdout.write(json.dumps(reply) + "\n")
                    sys.stdout.flush()
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                mgr.child_exited(pid, status)
            mgr.tick(time.monotonic())
    finally:
        mgr.stop()
        memb.close()


def _poll(mgr: Any, extra: list[int], timeout: float) -> list[int]:
    """One round of the supervisor's job: worker channels handled; ready ``extra`` fds returned."""
    watches = mgr.watches()
    sel = selectors.DefaultSelector()
    try:
        for fd in extra:
            sel.register(fd, selectors.EVENT_READ, None)
        for fd, (events, handler) in watches.items():
            sel.register(fd, events, handler)
        ready = []
        now = time.monotonic()
        for key, mask in sel.select(timeout):
            if key.data is None:
                ready.append(key.fd)
            else:
                key.data(mask, now)
        return ready
    finally:
        sel.close()


def _fresh_counters(mgr: Any) -> None:
    """What the supervisor does before a listing: pull counters, wait (boundedly) for them."""
    asked = mgr.request_stats(time.monotonic())
    deadline = time.monotonic() + 0.5
    while not mgr.stats_answered(asked) and time.monotonic() < deadline:
        _poll(mgr, [], 0.02)


def _command(mgr: Any, memb: Any, cmd: dict[str, Any], parse_relay: Any) -> Any:
    op = cmd["op"]
    if op == "add":
        mgr.add(parse_relay(cmd["relay"]), cmd.get("dry_run", False))
        return None
    if op == "del":
        mgr.delete(cmd["name"])
        return None
    if op == "replace":
        return mgr.replace([parse_relay(r) for r in cmd["relays"]], cmd.get("dry_run", False))
    if op == "relays":
        _fresh_counters(mgr)
        return mgr.relays()
    if op == "workers":
        return mgr.workers()
    if op == "warnings":
        return mgr.warnings()
    if op == "groups":
        return memb.list()
    if op == "kill_workers":
        pids = [w["pid"] for w in mgr.workers() if w["pid"]]
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return pids
    if op == "iface":
        memb.reconcile()
        mgr.reconcile()
        return None
    if op == "trace_start":
        mgr.trace_start(cmd["name"])
        return None
    if op == "trace_stop":
        mgr.trace_stop(cmd["name"])
        return None
    if op == "trace_read":
        recs, cursor = mgr.trace_read(cmd["name"], cmd.get("cursor", 0))
        return {"records": recs, "cursor": cursor}
    raise ValueError(f"unknown op {op}")


class Driver:
    """Client for a driver process started in a lab namespace."""

    def __init__(self, lab: Any, ns: str, workers: int = 2, user: str = "nobody") -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = SRC + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = lab.popen(
            ns,
            [sys.executable, __file__, "--workers", str(workers), "--user", user],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )

    def call(self, op: str, timeout: float = 10.0, **kw: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps({"op": op, **kw}) + "\n").encode())
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"driver did not answer {op}")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"driver exited (rc {self.proc.poll()})")
        reply = json.loads(line)
        if not reply["ok"]:
            raise RuntimeError(f"{reply['type']}: {reply['error']}")
        return reply["result"]

    def relay(self, name: str) -> dict[str, Any]:
        return next(r for r in self.call("relays") if r["name"] == name)

    def wait_workers(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Until n workers are running (ready, unprivileged)."""
        deadline = time.monotonic() + timeout
        while True:
            ws = self.call("workers")
            if sum(1 for w in ws if w["state"] == "running") >= n:
                return list(ws)
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers not running: {ws}")
            time.sleep(0.05)

    def wait_counter(self, name: str, packets: int, timeout: float = 5.0) -> dict[str, Any]:
        """Until relay ``name`` has counted at least ``packets`` (or ``timeout`` passes)."""
        deadline = time.monotonic() + timeout
        while True:
            r = self.relay(name)
            if r["packets"] >= packets or time.monotonic() > deadline:
                return r
            time.sleep(0.1)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(TimeoutError, RuntimeError, BrokenPipeError, ValueError):
                self.call("quit", timeout=2)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--user", default="nobody")
    a = ap.parse_args()
    sys.exit(serve(a.workers, a.user))
