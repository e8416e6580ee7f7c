"""Prometheus metrics on `metrics_listen`: the kernel's and the relays' counters, scraped."""

from __future__ import annotations

from mcrelay.lab import StandardLab, wait_for
from mcrelay.lab.daemon import DaemonProcess

SRC4 = "192.0.2.2"


def scrape(lab: StandardLab) -> str:
    """GET /metrics from inside the router namespace (its own loopback)."""
    code = (
        "import urllib.request;"
        "print(urllib.request.urlopen('http://127.0.0.1:9477/metrics', timeout=5).read().decode())"
    )
    return lab.run("router", "python3", "-c", code).stdout


def test_metrics_expose_route_and_relay_counters(lab: StandardLab) -> None:
    with DaemonProcess(lab, "router", config='metrics_listen = "127.0.0.1:9477"\n') as d:
        d.start()
        d.cli("route", "add", "up0", SRC4, "239.1.1.1", "dn1", check=True)
        d.cli("relay", "add", "r1", "--in", "239.1.1.2:5000@up0", "--out", "239.8.8.8:6000@dn2",
              check=True)  # fmt: skip
        lab.probe_until_forwarded("src", "239.1.1.1", 5000, "veth0", "rcv1", "veth0", timeout=10)
        lab.send("src", "239.1.1.1", 5000, iface="veth0", count=50, rate=2000)

        def counted() -> str | None:
            text = scrape(lab)
            for line in text.splitlines():
                route = line.startswith("mcrelay_route_packets_total{") and "239.1.1.1" in line
                if route and float(line.rsplit(" ", 1)[1]) >= 50:
                    return text
            return None

        text = wait_for(counted, timeout=10, what="route counters in the metrics")
        assert 'mcrelay_rules{kind="routes"} 1' in text
        assert 'mcrelay_rules{kind="relays"} 1' in text
        assert 'mcrelay_relay_drops_total{reason="fragment",relay="r1"} 0' in text
        assert 'mcrelay_worker_restarts_total{worker="0"} 0' in text
