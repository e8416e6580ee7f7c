"""Run a real mcrelayd inside a lab namespace and drive it with the real CLI.

Used by the integration tests, the demo and the benchmarks: the daemon is the
installed code started as a process (``python -m mcrelay.daemon``), the CLI is
``python -m mcrelay.cli`` talking to its socket, exactly as a user would.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from mcrelay.client import Client, DaemonUnreachable
from mcrelay.lab.netns import Lab, python_env

CLI = [sys.executable, "-c", "import sys; from mcrelay.cli import main; sys.exit(main())"]


class DaemonError(Exception):
    """The daemon did not start or stop as expected; carries its log."""


class DaemonProcess:
    """One mcrelayd in a namespace, with its own socket, state file and log."""

    def __init__(
        self,
        lab: Lab,
        ns: str,
        *,
        workers: int = 1,
        workdir: str | Path | None = None,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        config: str | None = None,
        wrapper: Sequence[str] = (),
        state: str | None = None,
    ) -> None:
        """``config``: TOML text written to ``workdir/mcrelay.toml`` and passed with
        ``--config``. ``wrapper``: argv run in front of the daemon inside the
        namespace, which must end by exec'ing its arguments (e.g. ``sh -c 'mount
        ... && exec "$@"' sh``); ``ip netns exec`` gives the daemon its own mount
        namespace, so mounts made there are private to it. ``state``: state file
        path (default ``workdir/state.json``)."""
        self.lab = lab
        self.ns = ns
        self.workers = workers
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="mcrelayd-")
        self.workdir = Path(workdir or self._tmp.name)  # type: ignore[union-attr]
        os.chmod(self.workdir, 0o755)
        self.socket = str(self.workdir / "mcrelay.sock")
        self.state = state or str(self.workdir / "state.json")
        self.config: str | None = None
        if config is not None:
            self.config = str(self.workdir / "mcrelay.toml")
            Path(self.config).write_text(config)
            os.chmod(self.config, 0o644)
        self.wrapper = list(wrapper)
        self.logfile = self.workdir / "mcrelayd.log"
        self.args = args
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------ life cycle

    def argv(self) -> list[str]:
        config = ["--config", self.config] if self.config else []
        return [
            *self.wrapper,
            sys.executable,
            "-m",
            "mcrelay.daemon",
            "--socket",
            self.socket,
            "--state",
            self.state,
            "--workers",
            str(self.workers),
            "--log-level",
            "debug",
            *config,
            *self.args,
        ]

    def start(self, timeout: float = 20.0, wait: bool = True) -> DaemonProcess:
        env = python_env()
        if self.env:
            env.update(self.env)
        log = open(self.logfile, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = self.lab.popen(
                self.ns, self.argv(), stdout=log, stderr=subprocess.STDOUT, env=env
            )
        finally:
            log.close()
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise DaemonError(
                    f"mcrelayd exited with {self.proc.returncode} while starting:\n{self.log()}"
                )
            try:
                with Client(self.socket, timeout=2) as c:
                    c.call("daemon.status")
                return
            except (DaemonUnreachable, OSError):
                time.sleep(0.05)
        raise DaemonError(f"mcrelayd not ready after {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the daemon and wait; returns its exit code (negative: killed by signal)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            # `ip netns exec` execs the daemon, so proc.pid is mcrelayd itself.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise DaemonError(f"mcrelayd ignored signal {sig}:\n{self.log()}") from None
        code = self.proc.returncode
        self.proc = None
        return code

    def kill_all(self) -> None:
        """kill -9 the daemon and every child it started (a crash, as far as it can tell)."""
        if self.proc is None:
            return
        pids = [*self.children(), self.proc.pid]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.02)

    def children(self) -> list[int]:
        """PIDs of the daemon's child processes (control, workers)."""
        if self.proc is None:
            return []
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return [int(p) for p in path.read_text().split()]
        except OSError:
            return []

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        try:
            if self.proc is not None:
                self.stop()
        finally:
            if self._tmp is not None:
                self._tmp.cleanup()

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------ talking to it

    def client(self) -> Client:
        return Client(self.socket)

    def call(self, method: str, **params: Any) -> Any:
        with self.client() as c:
            return c.call(method, **params)

    @property
    def pid(self) -> int:
        """PID of mcrelayd itself (``ip netns exec`` and wrappers exec it)."""
        if self.proc is None:
            raise DaemonError("mcrelayd is not running")
        return self.proc.pid

    def in_mount_ns(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """Run argv in the daemon's private mount namespace (``nsenter -m``)."""
        return subprocess.run(
            ["nsenter", "-t", str(self.pid), "-m", *argv],
            capture_output=True,
            text=True,
            timeout=30,
        )

    def cli(
        self,
        *args: str,
        check: bool = False,
        user: str | int | None = None,
        group: str | int | None = None,
        extra_groups: Sequence[str | int] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `mcrelay --socket SOCK ARGS...` and return its completed process.

        ``user``/``group``/``extra_groups`` run it as another user (as subprocess
        does: setgroups, setgid, setuid before exec), to test the socket's access rules.
        """
        res = subprocess.run(
            [*CLI, "--socket", self.socket, *args],
            capture_output=True,
            text=True,
            env=python_env(),
            timeout=60,
            input=input,
            user=user,
            group=group,
            extra_groups=extra_groups,
        )
        if check and res.returncode != 0:
            raise DaemonError(
                f"mcrelay {' '.join(args)} exited {res.returncode}:\n{res.stdout}{res.stderr}"
            )
        return res

    def cli_json(self, *args: str) -> Any:
        res = self.cli("--output", "json", *args, check=True)
        return json.loads(res.stdout)
