"""Prometheus metrics: the daemon's counters on `metrics_listen` (optional).

Nothing is collected while nobody scrapes. A scrape runs in the exporter's
HTTP thread, which must never touch the engines (the supervisor's loop owns
them, single-threaded, without locks). So the thread asks the loop: it queues
a :class:`_Scrape`, writes one byte to a socketpair the loop watches
(:meth:`MetricsExporter.fileno`), and waits, at most :data:`SCRAPE_TIMEOUT`,
for the loop to build a snapshot of plain dicts (:meth:`MetricsExporter.answer`).
The thread then renders that snapshot and reads the processes' CPU and memory
from /proc itself. An idle daemon therefore spends nothing on metrics, and a
slow scrape costs the loop one snapshot build, never a stall.

The text format (0.0.4) is written here and served by the standard
library's ``http.server``, not by prometheus-client: at 10,000 relays a scrape
is ~100,000 samples, and prometheus-client's one Python object per sample
took most of a second; and with no third-party module, metrics work after
any install (before, a Debian install without the Recommends served nothing).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("mcrelay.stats")

DROP_REASONS = ("no_buffer", "send_error", "fragment", "filtered", "queue")
#: Seconds a scrape waits for the supervisor's loop before answering without counters.
SCRAPE_TIMEOUT = 5.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Snapshot = dict[str, Any]


class _Scrape:
    """One scrape waiting for the loop: the snapshot (or None) and when it is there."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.snapshot: Snapshot | None = None


def _escape(value: str) -> str:
    """A label value as the text exposition format wants it."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: Any) -> str:
    """A sample value: integers as integers (exact at any size), anything else as float."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    try:
        return repr(float(value))
    except (TypeError, ValueError):
        return "0"


def _family(
    name: str, kind: str, help_: str, samples: Iterable[tuple[str, Any]], suffix: str = ""
) -> Iterator[str]:
    """One metric family in text format 0.0.4: HELP, TYPE, then ``name{labels} value`` lines.

    ``samples`` are (label text without braces, value); counters get ``_total``.
    """
    sample = name + ("_total" if kind == "counter" else suffix)
    yield f"# HELP {name} {help_}\n# TYPE {name} {kind}\n"
    for labels, value in samples:
        if labels:
            yield f"{sample}{{{labels}}} {_number(value)}\n"
        else:
            yield f"{sample} {_number(value)}\n"


def render(snap: Mapping[str, Any], processes: Mapping[str, Mapping[str, float]]) -> str:
    """The whole scrape body for one snapshot (see :meth:`MetricsExporter.answer`)."""
    return "".join(_render(snap, processes))


def _render(snap: Mapping[str, Any], processes: Mapping[str, Mapping[str, float]]) -> Iterator[str]:
    routes = snap.get("routes", [])
    rlabels = [
        (
            f'group="{_escape(str(r.get("group")))}",iif="{_escape(str(r.get("iif")))}",'
            f'source="{_escape(str(r.get("source")))}"',
            r,
        )
        for r in routes
    ]
    yield from _family(
        "mcrelay_route_packets",
        "counter",
        "Packets forwarded by a kernel route",
        ((lab, r.get("packets", 0)) for lab, r in rlabels),
    )
    yield from _family(
        "mcrelay_route_bytes",
        "counter",
        "Bytes forwarded by a kernel route",
        ((lab, r.get("bytes", 0)) for lab, r in rlabels),
    )
    yield from _family(
        "mcrelay_route_wrong_if",
        "counter",
        "Packets of a kernel route that arrived on the wrong interface",
        ((lab, r.get("wrong_if", 0)) for lab, r in rlabels),
    )
    yield from _render_relays(snap.get("relays", []), bool(snap.get("per_relay", True)))

    yield from _family(
        "mcrelay_worker_restarts",
        "counter",
        "Times a relay worker was restarted",
        ((f'worker="{w.get("index")}"', w.get("restarts", 0)) for w in snap.get("workers", [])),
    )
    yield from _family(
        "mcrelay_worker_running",
        "gauge",
        "1 if the relay worker is running, 0 while it starts or waits to be restarted",
        (
            (f'worker="{w.get("index")}"', 1 if w.get("state") == "running" else 0)
            for w in snap.get("workers", [])
        ),
    )
    rules = snap.get("rules", {})
    yield from _family(
        "mcrelay_rules",
        "gauge",
        "Configured rules by kind",
        ((f'kind="{k}"', rules.get(k, 0)) for k in ("routes", "relays", "groups")),
    )
    waiting = {
        "routes": sum(1 for r in routes if r.get("state", "active") != "active"),
        "relays": sum(1 for r in snap.get("relays", []) if r.get("state") != "active"),
    }
    yield from _family(
        "mcrelay_rules_waiting",
        "gauge",
        "Rules not (fully) in place, waiting for an interface or a kernel resource",
        ((f'kind="{k}"', v) for k, v in waiting.items()),
    )
    yield from _family(
        "mcrelay_control_restarts",
        "counter",
        "Times the control process was restarted",
        [("", snap.get("control_restarts", 0))],
    )
    yield from _family(
        "mcrelay_process_cpu_seconds",
        "counter",
        "CPU time (user + system) of each daemon process",
        ((f'process="{_escape(p)}"', v["cpu"]) for p, v in processes.items()),
    )
    yield from _family(
        "mcrelay_process_resident_memory_bytes",
        "gauge",
        "Resident memory of each daemon process",
        ((f'process="{_escape(p)}"', v["rss"]) for p, v in processes.items()),
    )
    yield from _family(
        "mcrelay_scrape_complete",
        "gauge",
        "1 if the daemon answered this scrape with its counters, 0 if it timed out",
        [("", 1 if snap else 0)],
    )


def _output_name(o: Mapping[str, Any]) -> str:
    return _escape(f"{o.get('address')}:{o.get('port')}@{o.get('oif') or ''}")


def _render_relays(relays: list[dict[str, Any]], per_relay: bool) -> Iterator[str]:
    """Relay families: one series per relay (and output), or only totals without those labels."""
    packets_help = "Packets received by a relay"
    bytes_help = "Bytes received by a relay"
    drops_help = "Packets a relay dropped, by reason"
    out_help = "Packets sent to one output"
    err_help = "Send errors of one output (the packet was not sent there)"
    if not per_relay:
        drops = dict.fromkeys(DROP_REASONS, 0)
        packets = octets = out_packets = out_errors = 0
        for r in relays:
            packets += r.get("packets", 0)
            octets += r.get("bytes", 0)
            d = r.get("drops") or {}
            for reason in DROP_REASONS:
                drops[reason] += d.get(reason, 0)
            for o in r.get("outputs", []):
                out_packets += o.get("packets", 0)
                out_errors += o.get("errors", 0)
        yield from _family("mcrelay_relay_packets", "counter", packets_help, [("", packets)])
        yield from _family("mcrelay_relay_bytes", "counter", bytes_help, [("", octets)])
        yield from _family(
            "mcrelay_relay_drops",
            "counter",
            drops_help,
            ((f'reason="{k}"', v) for k, v in drops.items()),
        )
        yield from _family("mcrelay_relay_output_packets", "counter", out_help, [("", out_packets)])
        yield from _family("mcrelay_relay_output_errors", "counter", err_help, [("", out_errors)])
        return
    names = [(f'relay="{_escape(str(r.get("name")))}"', r) for r in relays]
    yield from _family(
        "mcrelay_relay_packets",
        "counter",
        packets_help,
        ((lab, r.get("packets", 0)) for lab, r in names),
    )
    yield from _family(
        "mcrelay_relay_bytes", "counter", bytes_help, ((lab, r.get("bytes", 0)) for lab, r in names)
    )
    yield from _family(
        "mcrelay_relay_drops",
        "counter",
        drops_help,
        (
            (f'reason="{reason}",{lab}', (r.get("drops") or {}).get(reason, 0))
            for lab, r in names
            for reason in DROP_REASONS
        ),
    )
    outputs = [
        (f'output="{_output_name(o)}",{lab}', o) for lab, r in names for o in r.get("outputs", [])
    ]
    yield from _family(
        "mcrelay_relay_output_packets",
        "counter",
        out_help,
        ((lab, o.get("packets", 0)) for lab, o in outputs),
    )
    yield from _family(
        "mcrelay_relay_output_errors",
        "counter",
        err_help,
        ((lab, o.get("errors", 0)) for lab, o in outputs),
    )


def process_usage(pids: Mapping[str, int]) -> dict[str, dict[str, float]]:
    """CPU seconds and resident bytes of each named process, from /proc (gone: left out)."""
    tick = os.sysconf("SC_CLK_TCK")
    page = os.sysconf("SC_PAGE_SIZE")
    out: dict[str, dict[str, float]] = {}
    for name, pid in pids.items():
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{pid}/statm", "rb") as f:
                rss_pages = int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        out[name] = {
            "cpu": round((int(fields[11]) + int(fields[12])) / tick, 2),
            "rss": float(rss_pages * page),
        }
    return out


class _Handler(BaseHTTPRequestHandler):
    """GET /metrics (and /): one scrape; anything else is 404. Never logs a request."""

    exporter: MetricsExporter  # set on the per-exporter subclass
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self.send_error(404, "only /metrics is served here")
            return
        body = self.exporter.scrape_text().encode()
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every 15 s is not news for the journal


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsExporter:
    """Serves ``/metrics`` from a thread; every scrape asks the supervisor's loop for a snapshot.

    Only the standard library is used (``http.server``): metrics work on any
    install, with no optional dependency to forget.
    """

    def __init__(self, host: str, port: int, timeout: float = SCRAPE_TIMEOUT) -> None:
        self.timeout = timeout
        self._pending: queue.SimpleQueue[_Scrape] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        handler = type("Handler", (_Handler,), {"exporter": self})
        server_class = _Server6 if ":" in host else _Server
        try:
            self._server = server_class((host, port), handler)
        except OSError:
            self.close()
            raise
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics", daemon=True
        )
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics", host, self._server.server_address[1])

    @property
    def port(self) -> int:
        """The port served (useful when 0 was asked for)."""
        return int(self._server.server_address[1])

    # ------------------------------------------------------------ loop side

    def fileno(self) -> int:
        """Readable when a scrape waits for a snapshot (watched by the supervisor's selector)."""
        return self._wake_r.fileno()

    def answer(self, build: Callable[[], Snapshot]) -> int:
        """In the loop: build one snapshot for every waiting scrape; returns how many waited.

        A snapshot that cannot be built is logged and the scrapes get an
        empty one (they report ``mcrelay_scrape_complete 0``) rather than hang.
        """
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        waiting: list[_Scrape] = []
        while True:
            try:
                waiting.append(self._pending.get_nowait())
            except queue.Empty:
                break
        if not waiting:
            return 0
        try:
            snapshot = build()
        except Exception:
            log.exception("collecting metrics failed")
            snapshot = {}
        for scrape in waiting:
            scrape.snapshot = snapshot
            scrape.done.set()
        return len(waiting)

    # ------------------------------------------------------------ HTTP thread side

    def snapshot(self) -> Snapshot:
        """In the HTTP thread: ask the loop and wait; {} if it did not answer in time."""
        scrape = _Scrape()
        self._pending.put(scrape)
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")  # full: the loop has wake-ups queued already
        if not scrape.done.wait(self.timeout):
            log.warning("metrics: the daemon did not answer a scrape within %.0f s", self.timeout)
            return {}
        return scrape.snapshot or {}

    def scrape_text(self) -> str:
        """The full ``/metrics`` body of one scrape."""
        snap = self.snapshot()
        return render(snap, process_usage(snap.get("processes", {})))

    def close(self) -> None:
        """Stop serving (the thread ends) and close the wake-up pair."""
        server = getattr(self, "_server", None)
        if server is not None:
            server.shutdown()
            server.server_close()
        self._wake_r.close()
        self._wake_w.close()
