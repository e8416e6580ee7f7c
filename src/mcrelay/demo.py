"""`make demo`: a throwaway lab, a real mcrelayd, real multicast through it.

It builds network namespaces  src -- router -- rcv1, rcv2  (nothing outside
them is touched), starts mcrelayd in the router, adds an IPv4 and an IPv6
kernel route and a translating relay with the `mcrelay` CLI, sends real
traffic, shows what arrived and the daemon's counters, and removes it all.
"""

from __future__ import annotations

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


def stream(
    lab: StandardLab,
    group: str,
    port: int,
    rcv: str,
    out: tuple[str, int] | None = None,
) -> None:
    """Send COUNT datagrams from src to group:port and report what rcv got (on out, if given)."""
    listen, listen_port = out or (group, port)
    lab.probe_until_forwarded(
        "src", group, port, "veth0", rcv, "veth0",
        recv_address=listen, recv_port=listen_port, timeout=10,
    )  # fmt: skip
    receiver = lab.receiver(rcv, listen, listen_port, "veth0", count=COUNT, duration=5, idle=1.5)
    sent = lab.send("src", group, port, iface="veth0", count=COUNT, ttl=8, rate=5000)
    got = receiver.result()
    ttls = ", ".join(f"TTL {t}: {n}" for t, n in sorted(got.ttls.items()))
    dscps = ", ".join(f"DSCP {int(t) >> 2}: {n}" for t, n in sorted(got.toss.items()))
    print(
        f"   sent {sent.sent} to {group}:{port} from src; {rcv} received {got.count} "
        f"on {listen}:{listen_port} ({got.intact} byte-identical; {ttls or 'nothing'}; "
        f"{dscps or 'no DSCP'})",
        flush=True,
    )
    if got.count < COUNT * 0.95:
        raise SystemExit(f"demo failed: only {got.count}/{COUNT} datagrams arrived")


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
        stream(lab, "239.1.1.1", 5000, "rcv1")
        stream(lab, "ff3e::1:1", 5000, "rcv2")

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
        stream(lab, "239.5.5.5", 5000, "rcv2", out=("239.6.6.6", 6000))

        say("what the daemon counted")
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
