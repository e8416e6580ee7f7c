"""One restart policy for every child the supervisor keeps (control process, relay workers).

A child that dies is started again after a delay that doubles with each quick
death (from :data:`BACKOFF_START` up to :data:`BACKOFF_CAP`), and drops back
to the start once a run has lasted :data:`STABLE_AFTER`. Kernel routes keep
forwarding meanwhile; the supervisor only logs and counts the restarts.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

BACKOFF_START = 0.1
BACKOFF_CAP = 5.0
STABLE_AFTER = 10.0
#: The exit status (EX_CONFIG) of a child that cannot drop to the configured user.
EXIT_CONFIG = 78


@dataclass
class Backoff:
    """The restart delay of one child."""

    start: float = BACKOFF_START
    cap: float = BACKOFF_CAP
    stable_after: float = STABLE_AFTER
    streak: int = 0

    def next_delay(self, ran_for: float) -> float:
        """The delay before the next start of a child that just died after ``ran_for`` s."""
        if ran_for >= self.stable_after:
            self.streak = 0
        delay = min(self.cap, self.start * 2.0**self.streak)
        self.streak += 1
        return delay


def describe_status(status: int) -> str:
    """A wait status as an operator reads it: "killed by SIGKILL", "exit status 1"."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    if os.WIFEXITED(status):
        code = os.WEXITSTATUS(status)
        if code == EXIT_CONFIG:
            return f"exit status {code} (cannot run as the configured user; see its log line)"
        return f"exit status {code}"
    return f"status {status}"


def reap(pid: int) -> bool:
    """Collect ``pid`` if it has exited (never blocks); True when it is gone."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done == pid
