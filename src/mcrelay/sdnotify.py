"""Minimal sd_notify(3): tell systemd we are ready, reloading, stopping, alive.

Why not python3-systemd: the protocol is one datagram of ``KEY=value`` lines
sent to the AF_UNIX socket named in ``$NOTIFY_SOCKET``; a dozen lines of stdlib
do it, and the daemon then has no optional dependency whose absence silently
turns ``Type=notify`` into a start timeout.

Everything is a no-op when ``NOTIFY_SOCKET`` is unset (run by hand, in tests).
Sending never raises: a notification that cannot be delivered is logged at
debug level, it must not take the router down.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify messages to the socket systemd gave us.

    ``env`` defaults to ``os.environ`` and is read once, at construction.
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        raw = env.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None
        if not raw:
            self._address = None
        elif raw.startswith("@"):
            # Abstract namespace: a leading NUL instead of '@'.
            self._address = b"\0" + raw[1:].encode()
        else:
            self._address = raw
        self._watchdog_usec: int | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            # WATCHDOG_PID names the process systemd expects pings from; a child
            # that inherited the environment must not ping on the parent's behalf.
            self._watchdog_usec = int(usec)

    @property
    def enabled(self) -> bool:
        """True when running under systemd with a notify socket."""
        return self._address is not None

    def notify(self, *lines: str) -> bool:
        """Send ``KEY=value`` lines as one datagram; True if it was sent."""
        if self._address is None:
            return False
        message = "\n".join(lines).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, self._address)
        except OSError as e:
            log.debug("sd_notify %r to %r failed: %s", message, self._address, e)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Startup (or a reload) is complete: rules applied, socket listening."""
        lines = ["READY=1"]
        if status is not None:
            lines.append(_status_line(status))
        return self.notify(*lines)

    def status(self, text: str) -> bool:
        """A one-line status shown by ``systemctl status mcrelay``."""
        return self.notify(_status_line(text))

    def stopping(self) -> bool:
        """Shutdown has begun (installed routes are being removed)."""
        return self.notify("STOPPING=1")

    def reloading(self) -> bool:
        """A SIGHUP reload has begun; send :meth:`ready` when it is done.

        MONOTONIC_USEC lets systemd's ``Type=notify-reload`` match the reload.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def watchdog(self) -> bool:
        """Keep-alive ping; send every :meth:`watchdog_interval` seconds."""
        if self._watchdog_usec is None:
            return False
        return self.notify("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half of WatchdogSec), or None if no watchdog."""
        if self._address is None or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2_000_000


def _status_line(text: str) -> str:
    # A newline would start a new KEY=value assignment in the datagram.
    return "STATUS=" + " ".join(text.splitlines())
