"""Logging to stderr that journald stores at the right priority.

Under systemd, stderr is a stream socket to journald (``JOURNAL_STREAM`` names
its device and inode). journald stores every line at the unit's default
priority (6, info) unless the line starts with a syslog priority prefix such as
``<3>``; without one, ``journalctl -p warning`` shows no errors at all. So when
stderr *is* that stream, each line gets ``<N>`` from the record's level and no
timestamp (the journal has its own); anywhere else (a terminal, a file, a test
capturing stderr) lines keep a timestamp and carry no prefix, which would only
be noise there.

The check compares stderr's device and inode with ``JOURNAL_STREAM``, as
sd_journal_stream_fd's users are told to: a daemon started by a unit whose
stderr was redirected to a file inherits the variable but must not write
``<3>`` into the file. Every process (daemon, control process, relay workers)
calls :func:`configure` with its own name, so a child's errors are stored as
errors too.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

#: syslog priorities (RFC 5424) for Python's levels; NOTICE (5) has no Python level.
PRIORITIES: tuple[tuple[int, int], ...] = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)
DEBUG_PRIORITY = 7


def priority(levelno: int) -> int:
    """The syslog priority for a Python level; levels between two map to the less severe."""
    for threshold, prio in PRIORITIES:
        if levelno >= threshold:
            return prio
    return DEBUG_PRIORITY


class JournalFormatter(logging.Formatter):
    """Prefixes every line of a record with ``<N>``, tracebacks included.

    journald splits the stream on newlines and reads a prefix per line, so a
    traceback's continuation lines need their own prefix or they are stored
    at info level, away from the error they explain.
    """

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in text.split("\n"))


def stream_is_journal(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """True if ``stream`` is the journald stream named by ``JOURNAL_STREAM`` (``DEV:INODE``)."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False  # not a real file (pytest capture, closed stream)
    return st.st_dev == int(dev) and st.st_ino == int(ino)


def prefix(levelno: int, stream: TextIO | None = None) -> str:
    """``<N>`` for a line written directly to ``stream`` (default stderr) before
    logging is set up, e.g. a fatal settings error; empty off the journal."""
    return f"<{priority(levelno)}>" if stream_is_journal(stream or sys.stderr) else ""


def make_handler(
    name: str, stream: TextIO | None = None, environ: Mapping[str, str] | None = None
) -> logging.Handler:
    """A stderr handler formatting ``NAME: LEVEL message``, journald-aware."""
    out = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(out)
    if stream_is_journal(out, environ):
        handler.setFormatter(JournalFormatter(f"{name}: %(levelname)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {name}: %(levelname)s %(message)s"))
    return handler


def configure(
    name: str,
    level: str | int = logging.INFO,
    stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Make the root logger write to stderr (or ``stream``) as :func:`make_handler` does.

    Replaces any handler set before, so calling it again (tests, a re-exec)
    never doubles every line.
    """
    if isinstance(level, str):
        level = level.upper()
    logging.basicConfig(level=level, handlers=[make_handler(name, stream, environ)], force=True)
