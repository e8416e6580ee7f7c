"""A real daemon: `mcrelay reload` answers with what changed, bad settings stop it at start,
crash-looping children are reported, and the metrics carry the new gauges."""

from __future__ import annotations

import os
from pathlib import Path

from mcrelay.lab import StandardLab, wait_for
from mcrelay.lab.daemon import DaemonProcess


def scrape(lab: StandardLab, port: int) -> str:
    code = (
        "import urllib.request;"
        f"print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics', timeout=10)"
        ".read().decode())"
    )
    return lab.run("router", "python3", "-c", code).stdout


def test_reload_applies_the_edited_file_and_answers_with_what_changed(lab: StandardLab) -> None:
    with DaemonProcess(lab, "router", config="idle_timeout = 300\n") as d:
        d.start()
        assert d.config is not None
        Path(d.config).write_text('idle_timeout = 120\nmetrics_listen = "127.0.0.1:9478"\n')
        res = d.cli("reload", check=True)
        assert "applied: idle_timeout" in res.stdout
        assert "need a restart (systemctl restart mcrelay): metrics_listen" in res.stdout
        answer = d.cli_json("reload")
        assert answer["changed"] == [] and answer["restart_required"] == ["metrics_listen"]
        assert answer["config"] == d.config
        assert "mcrelay reload: settings re-read (changed: idle_timeout)" in d.log()
        # A bad value: refused with the key named, exit 1, the daemon keeps serving.
        Path(d.config).write_text("idle_timeout = 0\n")
        res = d.cli("reload")
        assert res.returncode == 1
        assert "idle_timeout" in res.stderr and d.config in res.stderr
        assert d.call("daemon.status")["pid"] == d.pid


def test_a_user_that_does_not_exist_stops_the_daemon_before_ready(lab: StandardLab) -> None:
    with DaemonProcess(lab, "router", args=("--user", "nosuchuser")) as d:
        d.start(wait=False)
        assert d.proc is not None
        code = d.proc.wait(timeout=20)
        assert code != 0
        log = d.log()
        assert "--user: user 'nosuchuser' does not exist" in log
        assert "ready" not in log and "Traceback" not in log
        assert not os.path.exists(d.socket)
        d.proc = None  # already gone: nothing to stop


def test_crash_looping_worker_is_one_line_per_restart_and_shown_in_status(
    lab: StandardLab,
) -> None:
    """A worker that cannot drop privileges (its user vanished after start) exits 78."""
    with DaemonProcess(lab, "router") as d:
        d.start()
        pid = next(w["pid"] for w in d.call("worker.list")["workers"])
        # Kill it a few times quickly: a crash loop as the back-off sees it.
        for _ in range(4):
            os.kill(pid, 9)
            pid = wait_for(
                lambda old=pid: next(
                    (
                        w["pid"]
                        for w in d.call("worker.list")["workers"]
                        if w["pid"] not in (None, old)
                    ),
                    None,
                ),
                timeout=15,
                what="the worker restarted",
            )
        status = d.call("daemon.status")
        looping = [w for w in status["warnings"] if "relay worker 0 keeps exiting" in w]
        assert looping and "4 restarts, last: " in looping[0], status["warnings"]
        lines = [line for line in d.log().splitlines() if "relay worker 0 (pid" in line]
        assert len(lines) == 4 and all("restart #" in line for line in lines)
        assert "Traceback" not in d.log()


def test_metrics_show_waiting_rules_output_errors_and_process_usage(lab: StandardLab) -> None:
    with DaemonProcess(lab, "router", config='metrics_listen = "127.0.0.1:9476"\n') as d:
        d.start()
        d.cli("relay", "add", "r1", "--in", "239.1.1.2:5000@up0", "--out", "239.8.8.8:6000@dn2",
              check=True)  # fmt: skip
        d.cli("relay", "add", "r2", "--in", "239.1.1.3:5000@nope0", "--out", "239.8.8.9:6000@dn1",
              check=True)  # fmt: skip
        text = scrape(lab, 9476)
        assert 'mcrelay_rules_waiting{kind="relays"} 1' in text
        assert 'mcrelay_relay_output_errors_total{output="239.8.8.8:6000@dn2",relay="r1"} 0' in text
        for process in ("supervisor", "control", "worker0"):
            assert f'mcrelay_process_cpu_seconds_total{{process="{process}"}}' in text
            assert f'mcrelay_process_resident_memory_bytes{{process="{process}"}}' in text
        assert "mcrelay_scrape_complete 1" in text
        # Totals only, after a reload: no relay label left.
        assert d.config is not None
        Path(d.config).write_text('metrics_listen = "127.0.0.1:9476"\nmetrics_per_relay = false\n')
        assert d.cli_json("reload")["changed"] == ["metrics_per_relay"]
        text = scrape(lab, 9476)
        assert "relay=" not in text and "mcrelay_relay_output_errors_total 0" in text
