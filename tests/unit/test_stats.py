"""Metrics: the text exposition, per-relay vs totals, and the scrape handshake with the loop."""

from __future__ import annotations

import os
import threading
import urllib.request
from typing import Any

from mcrelay import stats

RELAY: dict[str, Any] = {
    "name": 'tv"1',
    "state": "active",
    "packets": 10,
    "bytes": 1000,
    "drops": {"no_buffer": 1, "send_error": 2, "fragment": 0, "filtered": 0, "queue": 0},
    "outputs": [
        {"address": "239.2.2.2", "port": 6000, "oif": "dn1", "packets": 9, "errors": 1},
        {"address": "192.0.2.9", "port": 7000, "oif": None, "packets": 8, "errors": 0},
    ],
}
SNAP: dict[str, Any] = {
    "routes": [
        {"iif": "up0", "source": "*", "group": "239.1.1.1", "state": "waiting", "packets": 5},
    ],
    "relays": [RELAY, {**RELAY, "name": "tv2", "state": "waiting"}],
    "per_relay": True,
    "workers": [{"index": 0, "restarts": 3, "state": "backoff"}],
    "rules": {"routes": 1, "relays": 2, "groups": 0},
    "control_restarts": 2,
}


def samples(text: str) -> dict[str, str]:
    """name{labels} -> value; also checks each family is announced once before its samples."""
    out: dict[str, str] = {}
    typed: list[str] = []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name = line.split()[2]
            assert name not in typed, f"{name} announced twice"
            typed.append(name)
        elif not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            assert key.split("{")[0].removesuffix("_total") == typed[-1], line
            out[key] = value
    return out


def test_per_relay_series_with_output_errors_waiting_rules_and_restarts() -> None:
    got = samples(stats.render(SNAP, {"supervisor": {"cpu": 1.5, "rss": 4096.0}}))
    assert got['mcrelay_relay_packets_total{relay="tv\\"1"}'] == "10"
    assert got['mcrelay_relay_drops_total{reason="send_error",relay="tv2"}'] == "2"
    out = 'output="239.2.2.2:6000@dn1",relay="tv2"'
    assert got[f"mcrelay_relay_output_packets_total{{{out}}}"] == "9"
    assert got[f"mcrelay_relay_output_errors_total{{{out}}}"] == "1"
    assert got['mcrelay_relay_output_errors_total{output="192.0.2.9:7000@",relay="tv2"}'] == "0"
    assert got['mcrelay_route_packets_total{group="239.1.1.1",iif="up0",source="*"}'] == "5"
    assert got['mcrelay_rules_waiting{kind="routes"}'] == "1"
    assert got['mcrelay_rules_waiting{kind="relays"}'] == "1"
    assert got['mcrelay_rules{kind="relays"}'] == "2"
    assert got['mcrelay_worker_restarts_total{worker="0"}'] == "3"
    assert got['mcrelay_worker_running{worker="0"}'] == "0"
    assert got["mcrelay_control_restarts_total"] == "2"
    assert got['mcrelay_process_cpu_seconds_total{process="supervisor"}'] == "1.5"
    assert got['mcrelay_process_resident_memory_bytes{process="supervisor"}'] == "4096.0"
    assert got["mcrelay_scrape_complete"] == "1"


def test_totals_only_drop_the_relay_and_output_labels() -> None:
    got = samples(stats.render({**SNAP, "per_relay": False}, {}))
    assert not any("relay=" in k or "output=" in k for k in got)
    assert got["mcrelay_relay_packets_total"] == "20"
    assert got['mcrelay_relay_drops_total{reason="no_buffer"}'] == "2"
    assert got["mcrelay_relay_output_packets_total"] == "34"
    assert got["mcrelay_relay_output_errors_total"] == "2"
    assert got['mcrelay_rules_waiting{kind="relays"}'] == "1"


def test_an_unanswered_scrape_says_so() -> None:
    got = samples(stats.render({}, {}))
    assert got["mcrelay_scrape_complete"] == "0"


def test_process_usage_reads_proc_and_skips_gone_processes() -> None:
    usage = stats.process_usage({"me": os.getpid(), "gone": 2**22 + 12345})
    assert set(usage) == {"me"}
    assert usage["me"]["rss"] > 0 and usage["me"]["cpu"] >= 0


def test_a_scrape_is_answered_by_the_loop_and_nothing_is_built_without_one() -> None:
    """The HTTP thread waits for the loop; the loop builds only when a scrape asks."""
    exporter = stats.MetricsExporter("127.0.0.1", 0, timeout=5)
    built: list[int] = []

    def build() -> dict[str, Any]:
        built.append(threading.get_ident())
        return {**SNAP, "processes": {"supervisor": os.getpid()}}

    stop = threading.Event()

    def loop() -> None:  # the supervisor's selector, reduced to the exporter's fd
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(exporter.fileno(), selectors.EVENT_READ)
        while not stop.is_set():
            if sel.select(0.05):
                exporter.answer(build)

    try:
        assert exporter.answer(build) == 0 and built == []  # idle: nothing built
        t = threading.Thread(target=loop)
        t.start()
        url = f"http://127.0.0.1:{exporter.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            body = reply.read().decode()
            assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert 'mcrelay_relay_packets_total{relay="tv2"} 10' in body
        assert 'mcrelay_process_cpu_seconds_total{process="supervisor"}' in body
        assert built and built[0] == t.ident  # built in the loop's thread, not the HTTP one
        stop.set()
        t.join()
    finally:
        stop.set()
        exporter.close()


def test_a_loop_that_does_not_answer_gives_an_incomplete_scrape() -> None:
    exporter = stats.MetricsExporter("127.0.0.1", 0, timeout=0.2)
    try:
        url = f"http://127.0.0.1:{exporter.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            assert "mcrelay_scrape_complete 0" in reply.read().decode()
    finally:
        exporter.close()
