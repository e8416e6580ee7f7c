"""Prometheus metrics: the daemon's counters on `metrics_listen` (optional).

The exporter's HTTP thread never touches the engines: the supervisor's loop
publishes a snapshot (plain dicts from stats.get) every few seconds and the
collector only reads the latest one, so no lock is needed and a slow scrape
cannot stall forwarding. prometheus-client is imported only when metrics are
enabled, so it stays an optional dependency.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("mcrelay.stats")

DROP_REASONS = ("no_buffer", "send_error", "fragment", "filtered", "queue")


class MetricsExporter:
    """Serves the latest published snapshot in Prometheus text format."""

    def __init__(self, host: str, port: int) -> None:
        from prometheus_client import start_http_server
        from prometheus_client.registry import CollectorRegistry

        self.snapshot: dict[str, Any] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)  # type: ignore[arg-type]
        start_http_server(port, addr=host, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", host, port)

    def publish(self, snapshot: dict[str, Any]) -> None:
        self.snapshot = snapshot  # one reference swap: atomic for the reader thread

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snap = self.snapshot
        route_labels = ["iif", "source", "group"]
        packets = CounterMetricFamily(
            "mcrelay_route_packets", "Packets forwarded by a kernel route", labels=route_labels
        )
        octets = CounterMetricFamily(
            "mcrelay_route_bytes", "Bytes forwarded by a kernel route", labels=route_labels
        )
        wrong = CounterMetricFamily(
            "mcrelay_route_wrong_if",
            "Packets of a kernel route that arrived on the wrong interface",
            labels=route_labels,
        )
        for r in snap.get("routes", []):
            labels = [str(r.get("iif")), str(r.get("source")), str(r.get("group"))]
            packets.add_metric(labels, r.get("packets", 0))
            octets.add_metric(labels, r.get("bytes", 0))
            wrong.add_metric(labels, r.get("wrong_if", 0))
        yield from (packets, octets, wrong)

        rp = CounterMetricFamily(
            "mcrelay_relay_packets", "Packets received by a relay", labels=["relay"]
        )
        rb = CounterMetricFamily(
            "mcrelay_relay_bytes", "Bytes received by a relay", labels=["relay"]
        )
        drops = CounterMetricFamily(
            "mcrelay_relay_drops", "Packets a relay dropped, by reason", labels=["relay", "reason"]
        )
        op = CounterMetricFamily(
            "mcrelay_relay_output_packets", "Packets sent to one output", labels=["relay", "output"]
        )
        for r in snap.get("relays", []):
            name = str(r.get("name"))
            rp.add_metric([name], r.get("packets", 0))
            rb.add_metric([name], r.get("bytes", 0))
            for reason in DROP_REASONS:
                drops.add_metric([name, reason], (r.get("drops") or {}).get(reason, 0))
            for o in r.get("outputs", []):
                output = f"{o.get('address')}:{o.get('port')}@{o.get('oif') or ''}"
                op.add_metric([name, output], o.get("packets", 0))
        yield from (rp, rb, drops, op)

        restarts = CounterMetricFamily(
            "mcrelay_worker_restarts", "Times a relay worker was restarted", labels=["worker"]
        )
        for w in snap.get("workers", []):
            restarts.add_metric([str(w.get("index"))], w.get("restarts", 0))
        yield restarts

        daemon = snap.get("daemon", {})
        rules = GaugeMetricFamily("mcrelay_rules", "Configured rules by kind", labels=["kind"])
        for kind in ("routes", "relays", "groups"):
            rules.add_metric([kind], daemon.get(kind, 0))
        yield rules
        yield CounterMetricFamily(
            "mcrelay_control_restarts",
            "Times the control process was restarted",
            value=daemon.get("control_restarts", 0),
        )
