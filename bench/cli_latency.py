"""How long one ``mcrelay`` call takes, and 1,000 routes one call each vs one batch.

    python -m bench.cli_latency [--runs N] [--routes N] [--cli PATH]

A script that adds rules one ``mcrelay`` call at a time pays the CLI's
start-up on every call (issue 12: ``status`` and ``route add`` should take at
most 50 ms of wall time; ``mcrelay -b`` should add 1,000 routes at least as
fast as 1,000 ``smcroutectl add`` calls, about 1 s). The daemon here is the
unit tests' fake one (tests/unit/fake_daemon.py) on a Unix socket in /tmp, so
the figures are the client's own cost: Python start-up, imports, parsing, one
JSON-RPC round trip. It needs no root and no namespaces.

Prints JSON on stdout (medians of ``--runs`` calls, after two warm-up calls
so that bytecode caches exist, as they do for an installed package) and a
short summary with MET/MISS against the goals on stderr. It reports; it does
not assert: timings on a shared machine move too much for a pass/fail test.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FAKE_DAEMON = ROOT / "tests" / "unit" / "fake_daemon.py"
GOAL_CALL_MS = 50.0  # issue 12, point 5
GOAL_BATCH_S = 0.97  # 1,000 `smcroutectl add` calls, as measured in issue 12


def load_fake_daemon() -> ModuleType:
    """tests/unit/fake_daemon.py as a module (tests/ is not a package)."""
    spec = importlib.util.spec_from_file_location("fake_daemon", FAKE_DAEMON)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {FAKE_DAEMON}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli_command(path: str | None) -> list[str]:
    """The installed ``mcrelay`` script next to this Python (what users run), or -m."""
    if path:
        return [path]
    script = Path(sys.executable).with_name("mcrelay")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "mcrelay.cli"]


def child_env(socket_path: str) -> dict[str, str]:
    """The environment of each call: the fake daemon's socket, bytecode caches allowed."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # an installed CLI has its .pyc files
    env["MCRELAY_SOCKET"] = socket_path
    return env


def wall(argv: Sequence[str], env: dict[str, str]) -> float:
    """Seconds from spawning ``argv`` to its exit; a failed call stops the benchmark."""
    started = time.perf_counter()
    res = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - started
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {res.returncode}: {res.stderr.decode()}")
    return elapsed


def timings_ms(argvs: Sequence[Sequence[str]], env: dict[str, str]) -> dict[str, float]:
    """Median, min and max wall time of the calls, in ms, after two warm-up calls."""
    for argv in argvs[:2]:
        wall(argv, env)
    samples = [wall(argv, env) * 1000 for argv in argvs]
    return {
        "median": round(statistics.median(samples), 1),
        "min": round(min(samples), 1),
        "max": round(max(samples), 1),
    }


def route_add(cli: list[str], i: int) -> list[str]:
    return [
        *cli,
        "route",
        "add",
        "up0",
        f"239.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}",
        "dn1",
    ]


def one_by_one_s(cli: list[str], env: dict[str, str], routes: int) -> float:
    started = time.perf_counter()
    for i in range(routes):
        wall(route_add(cli, i), env)
    return time.perf_counter() - started


def batch_s(cli: list[str], env: dict[str, str], routes: int, workdir: Path) -> float:
    commands = workdir / "routes.batch"
    commands.write_text("".join(" ".join(route_add([], i)) + "\n" for i in range(routes)))
    return wall([*cli, "-b", str(commands)], env)


def verdict(value: float, goal: float) -> str:
    return "MET" if value <= goal else "MISS"


def run(runs: int, routes: int, cli_path: str | None) -> dict[str, Any]:
    fake_daemon = load_fake_daemon()
    workdir = Path(tempfile.mkdtemp(prefix="mcrelay-cli-bench.", dir="/tmp"))
    daemon = fake_daemon.FakeDaemon(workdir / "mcrelay.sock")
    try:
        daemon.replies["daemon.status"] = {"version": "bench", "pid": os.getpid(), "uptime": 1}
        daemon.replies["route.add"] = fake_daemon.echo_route
        env = child_env(daemon.path)
        cli = cli_command(cli_path)
        python = timings_ms([[sys.executable, "-c", "pass"]] * runs, env)
        status = timings_ms([[*cli, "status"]] * runs, env)
        add = timings_ms([route_add(cli, i) for i in range(runs)], env)
        one_by_one = one_by_one_s(cli, env, routes)
        before = daemon.connections
        batch = min(batch_s(cli, env, routes, workdir) for _ in range(3))
        batch_connections = (daemon.connections - before) / 3
    finally:
        daemon.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
        },
        "cli": cli,
        "runs": runs,
        "python_startup_ms": python,
        "status_ms": status,
        "route_add_ms": add,
        "routes": routes,
        "routes_one_call_each_s": round(one_by_one, 2),
        "routes_one_batch_s": round(batch, 3),
        "batch_connections_per_run": batch_connections,
        "goals": {"call_ms": GOAL_CALL_MS, "batch_1000_s": GOAL_BATCH_S},
    }


def summary(result: dict[str, Any]) -> list[str]:
    status, add = result["status_ms"]["median"], result["route_add_ms"]["median"]
    batch, routes = result["routes_one_batch_s"], result["routes"]
    lines = [
        f"python -c pass      {result['python_startup_ms']['median']:7.1f} ms (this machine)",
        f"mcrelay status      {status:7.1f} ms  {verdict(status, GOAL_CALL_MS)} (<= 50 ms)",
        f"mcrelay route add   {add:7.1f} ms  {verdict(add, GOAL_CALL_MS)} (<= 50 ms)",
        f"{routes} routes, one call each  {result['routes_one_call_each_s']:7.2f} s",
        f"{routes} routes, one batch      {batch:7.3f} s",
    ]
    if routes == 1000:
        lines[-1] += f"  {verdict(batch, GOAL_BATCH_S)} (<= {GOAL_BATCH_S} s, smcroutectl)"
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21, help="calls per median (default 21)")
    parser.add_argument("--routes", type=int, default=1000, help="routes to add (default 1000)")
    parser.add_argument("--cli", metavar="PATH", help="the mcrelay to run (default: installed)")
    args = parser.parse_args(argv)
    result = run(max(args.runs, 3), max(args.routes, 1), args.cli)
    print(json.dumps(result, indent=2, sort_keys=True))
    for line in summary(result):
        print(line, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
