"""`make demo`: a throwaway lab, a real mcrelayd, real multicast through it.

It builds network namespaces  src -- router -- rcv1, rcv2  (nothing outside
them is touched), starts mcrelayd in the router, adds an IPv4 and an IPv6
kernel route and a translating relay with the `mcrelay` CLI, sends real
traffic, shows what arrived and the daemon's counters, and removes it all.

Before each stream of COUNT datagrams it sends probe datagrams until one gets
through (a fresh IPv6 link forwards only after about a second), so the path
is known to be up. The rules count those probes too; the demo says how many
each rule counted, so its counters add up: probes + COUNT.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time

from mcrelay.lab import Lab, StandardLab
from mcrelay.lab.daemon import DaemonProcess

SRC4, SRC6 = "192.0.2.2", "2001:db8:1::2"
COUNT = 200


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def mcrelay(d: DaemonProcess, *args: str) -> None:
    """Run the real CLI and show the command and its output, as a user would see it."""
    print(f"$ mcrelay {shlex.join(args)}", flush=True)
    res = d.cli(*args)
    sys.stdout.write(res.stdout)
    sys.stderr.write(res.stderr)
    if res.returncode != 0:
        raise SystemExit(f"demo failed: mcrelay {' '.join(args)} exited {res.returncode}")


def counted(d: DaemonProcess, view: str, *rule_filter: str) -> int:
    """Packets the daemon counted for the rules of ``view`` that match ``rule_filter``."""
    res = d.cli("-o", "json", "show", view, *rule_filter)
    if res.returncode != 0:
        raise SystemExit(f"demo failed: mcrelay show {view} exited {res.returncode}: {res.stderr}")
    rules = json.loads(res.stdout).get(view) or []
    return sum(int(r.get("packets") or 0) for r in rules)


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def stream(
    lab: StandardLab,
    daemon: DaemonProcess,
    rule: tuple[str, ...],
    group: str,
    port: int,
    rcv: str,
    out: tuple[str, int] | None = None,
) -> int:
    """Probe, then send COUNT datagrams from src to group:port; report what rcv got.

    ``rule`` is the ``show`` view and filter of the rule the stream goes
    through; returns how many probes that rule counted before the COUNT.
    """
    listen, listen_port = out or (group, port)
    lab.probe_until_forwarded(
        "src", group, port, "veth0", rcv, "veth0",
        recv_address=listen, recv_port=listen_port, timeout=10,
    )  # fmt: skip
    probes = counted(daemon, *rule)
    receiver = lab.receiver(rcv, listen, listen_port, "veth0", count=COUNT, duration=5, idle=1.5)
    sent = lab.send("src", group, port, iface="veth0", count=COUNT, ttl=8, rate=5000)
    got = receiver.result()
    ttls = ", ".join(f"TTL {t}: {n}" for t, n in sorted(got.ttls.items()))
    dscps = ", ".join(f"DSCP {int(t) >> 2}: {n}" for t, n in sorted(got.toss.items()))
    print(
        f"   sent {sent.sent} to {group}:{port} from src (+{plural(probes, 'probe')} "
        f"before them); {rcv} received {got.count} "
        f"on {listen}:{listen_port} ({got.intact} byte-identical; {ttls or 'nothing'}; "
        f"{dscps or 'no DSCP'})",
        flush=True,
    )
    if got.count < COUNT * 0.95:
        raise SystemExit(f"demo failed: only {got.count}/{COUNT} datagrams arrived")
    return probes


def main() -> int:
    if os.geteuid() != 0:
        print("make demo needs root (it creates network namespaces)", file=sys.stderr)
        return 1
    started = time.monotonic()
    say("building a lab: src -- router -- rcv1, rcv2 (network namespaces, veth pairs)")
    with Lab.standard() as lab, DaemonProcess(lab, "router", workers=2) as daemon:
        print(f"   namespaces: {', '.join(lab.namespaces)}")
        say("starting mcrelayd in the router namespace")
        daemon.start()
        print(f"   $ mcrelayd {shlex.join(daemon.argv()[3:])}  (pid {daemon.pid})")
        mcrelay(daemon, "status")

        say("kernel routes: IPv4 (S,G) to rcv1 and IPv6 (*,G) to rcv2")
        mcrelay(daemon, "route", "add", "up0", SRC4, "239.1.1.1", "dn1")
        mcrelay(daemon, "route", "add", "up0", "ff3e::1:1", "dn2")
        print(f"   each stream: probes until one arrives, then {COUNT} counted datagrams")
        probes = {
            "route (192.0.2.2, 239.1.1.1)": stream(
                lab, daemon, ("routes", "group", "239.1.1.1"), "239.1.1.1", 5000, "rcv1"
            ),
            "route (*, ff3e::1:1)": stream(
                lab, daemon, ("routes", "group", "ff3e::1:1"), "ff3e::1:1", 5000, "rcv2"
            ),
        }

        say("a relay: 239.5.5.5:5000 from src republished as 239.6.6.6:6000 to rcv2, DSCP EF")
        mcrelay(
            daemon,
            "relay",
            "add",
            "translate",
            "--in",
            "239.5.5.5:5000@up0",
            "--out",
            "239.6.6.6:6000@dn2,ttl=4,dscp=EF",
        )
        probes["relay translate"] = stream(
            lab, daemon, ("relays", "translate"), "239.5.5.5", 5000, "rcv2", out=("239.6.6.6", 6000)
        )

        say(f"what the daemon counted: each rule's probes + the {COUNT} sent")
        for rule, n in probes.items():
            print(f"   {rule}: {plural(n, 'probe')} + {COUNT} = {n + COUNT} packets")
        mcrelay(daemon, "show", "routes")
        mcrelay(daemon, "show", "relays")
        mcrelay(daemon, "show", "workers")

        say("stopping mcrelayd (SIGTERM): it removes its kernel routes")
        code = daemon.stop()
        left = lab.run("router", "cat", "/proc/net/ip_mr_cache").stdout.splitlines()[1:]
        print(f"   exit code {code}; MFC entries left in the router: {len(left)}")
    say(f"lab removed; demo done in {time.monotonic() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
