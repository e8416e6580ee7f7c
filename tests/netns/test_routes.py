"""Kernel multicast routes end to end: real daemon, real CLI, real kernel MFC, real packets.

Topology (tests/netns/conftest.py `lab`):  src --up0 [router] dn1-- rcv1
                                                           dn2-- rcv2
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
from pathlib import Path

from mcrelay.lab import Lab, LinkSpec, StandardLab, wait_for
from mcrelay.lab.daemon import DaemonProcess

SRC4 = "192.0.2.2"
SRC6 = "2001:db8:1::2"
PORT = 5000


def mr_cache(lab: Lab, family: int = 4) -> str:
    """The router's kernel MFC as /proc shows it, header stripped."""
    name = "ip_mr_cache" if family == 4 else "ip6_mr_cache"
    text = lab.run("router", "cat", f"/proc/net/{name}").stdout
    return "".join(text.splitlines(keepends=True)[1:])


def mfc_entries(lab: Lab) -> set[tuple[str, str]]:
    """(group, origin) pairs of the router's IPv4 MFC (/proc prints raw big-endian words)."""
    entries = set()
    for line in mr_cache(lab).splitlines():
        group, origin = line.split()[:2]
        as_ip = [socket.inet_ntoa(struct.pack("<I", int(x, 16))) for x in (group, origin)]
        entries.add((as_ip[0], as_ip[1]))
    return entries


def forward(lab: StandardLab, group: str, *, count: int = 40, ttl: int = 8, family: int = 4):
    """Send count datagrams from src and return what rcv1 and rcv2 received."""
    r1 = lab.receiver("rcv1", group, PORT, "veth0", count=count, duration=4, idle=1.5)
    r2 = lab.receiver("rcv2", group, PORT, "veth0", count=count, duration=4, idle=1.5)
    sent = lab.send("src", group, PORT, iface="veth0", count=count, ttl=ttl, rate=2000)
    assert sent.sent == count
    return r1.result(), r2.result()


def wait_path(lab: StandardLab, group: str, rcv: str = "rcv1") -> None:
    """Probe until the kernel forwards the group to rcv (IPv6 needs ~1 s on fresh links)."""
    lab.probe_until_forwarded("src", group, PORT, "veth0", rcv, "veth0", timeout=10)


def test_sg_route_forwards_only_to_its_oifs_with_ttl_decremented(
    lab: StandardLab, daemon: DaemonProcess
) -> None:
    res = daemon.cli("route", "add", "up0", SRC4, "239.1.1.1", "dn1")
    assert res.returncode == 0, res.stderr
    assert ("239.1.1.1", SRC4) in mfc_entries(lab)
    wait_path(lab, "239.1.1.1")

    got1, got2 = forward(lab, "239.1.1.1", count=40, ttl=8)

    assert got1.count == 40 and got1.intact == 40
    assert got1.ttls == {"7": 40}, "the kernel decrements TTL by exactly one"
    assert got1.sources == {SRC4: 40}
    assert got2.count == 0, "dn2 is not an oif of this route"
    routes = daemon.cli_json("show", "routes")["routes"]
    (route,) = routes
    assert route["source"] == SRC4 and route["group"] == "239.1.1.1"
    assert route["state"] == "active"
    assert route["packets"] >= 40 and route["bytes"] > 0


def test_star_g_route_learns_sources_and_forwards_to_two_oifs(
    lab: StandardLab, daemon: DaemonProcess
) -> None:
    daemon.cli("route", "add", "up0", "239.2.2.2", "dn1", "dn2", check=True)
    wait_path(lab, "239.2.2.2", "rcv1")
    wait_path(lab, "239.2.2.2", "rcv2")

    got1, got2 = forward(lab, "239.2.2.2", count=30, ttl=5)

    assert got1.count == 30 and got1.intact == 30 and got1.ttls == {"4": 30}
    assert got2.count == 30 and got2.intact == 30 and got2.ttls == {"4": 30}
    (route,) = daemon.cli_json("show", "routes")["routes"]
    assert route["source"] == "*"
    assert [entry["source"] for entry in route["learned"]] == [SRC4]
    assert route["learned"][0]["packets"] >= 30
    assert ("239.2.2.2", SRC4) in mfc_entries(lab)  # the learned (S,G) is in the kernel


def test_ipv6_sg_and_star_g_routes(lab: StandardLab, daemon: DaemonProcess) -> None:
    daemon.cli("route", "add", "up0", SRC6, "ff3e::4321:1", "dn1", check=True)
    daemon.cli("route", "add", "up0", "ff3e::4321:2", "dn2", check=True)
    wait_path(lab, "ff3e::4321:1", "rcv1")
    wait_path(lab, "ff3e::4321:2", "rcv2")

    sg1, sg2 = forward(lab, "ff3e::4321:1", count=25, ttl=9)
    assert sg1.count == 25 and sg1.intact == 25 and sg1.ttls == {"8": 25}
    assert sg2.count == 0

    star1, star2 = forward(lab, "ff3e::4321:2", count=25, ttl=9)
    assert star2.count == 25 and star2.intact == 25 and star2.ttls == {"8": 25}
    assert star1.count == 0
    assert mr_cache(lab, 6).count("ff3e") >= 2


def test_delete_stops_forwarding(lab: StandardLab, daemon: DaemonProcess) -> None:
    daemon.cli("route", "add", "up0", SRC4, "239.1.1.3", "dn1", check=True)
    wait_path(lab, "239.1.1.3")
    daemon.cli("route", "del", "up0", SRC4, "239.1.1.3", check=True)

    assert ("239.1.1.3", SRC4) not in mfc_entries(lab)
    got1, _ = forward(lab, "239.1.1.3", count=20)
    assert got1.count == 0
    assert daemon.cli_json("show", "routes")["routes"] == []


def test_dry_run_changes_nothing_in_the_kernel(lab: StandardLab, daemon: DaemonProcess) -> None:
    before = mr_cache(lab)
    res = daemon.cli("--dry-run", "route", "add", "up0", SRC4, "239.1.1.4", "dn1", "dn2")
    assert res.returncode == 0, res.stderr
    assert mr_cache(lab) == before
    assert daemon.cli_json("show", "routes")["routes"] == []
    got1, got2 = forward(lab, "239.1.1.4", count=10)
    assert got1.count == 0 and got2.count == 0


def test_bad_input_is_refused_with_exit_1_and_the_daemon_keeps_running(
    lab: StandardLab, daemon: DaemonProcess
) -> None:
    cases = {
        ("route", "add", "up0", SRC4, "10.1.1.1", "dn1"): "group",
        ("route", "add", "up0", SRC4, "224.0.0.9", "dn1"): "link-local",
        ("route", "add", "up0", SRC4, "239.1.1.5", "up0"): "input interface",
        ("route", "add", "up0", SRC4, "239.1.1.5", "dn1", "dn1"): "duplicate",
        ("route", "add", "a/b", SRC4, "239.1.1.5", "dn1"): "iif",
        ("route", "add", "up0", "ff3e::1", "239.1.1.5", "dn1"): "SOURCE is a unicast",
        ("route", "add", "up0", "2001:db8:1::2", "239.1.1.5", "dn1"): "source",
        ("route", "del", "up0", SRC4, "239.9.9.9"): "no such rule",
    }
    for argv, expected in cases.items():
        res = daemon.cli(*argv)
        assert res.returncode == 1, (argv, res.stdout, res.stderr)
        assert expected in res.stderr, (argv, res.stderr)
    status = daemon.cli_json("status")
    assert status["routes"] == 0
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_sigterm_removes_every_mfc_entry_and_exits_0(
    lab: StandardLab, daemon: DaemonProcess
) -> None:
    daemon.cli("route", "add", "up0", SRC4, "239.1.1.6", "dn1", check=True)
    daemon.cli("route", "add", "up0", SRC6, "ff3e::6", "dn1", check=True)
    assert mr_cache(lab).strip() and mr_cache(lab, 6).strip()
    vifs = lab.run("router", "cat", "/proc/net/ip_mr_vif").stdout
    assert "up0" in vifs and "dn1" in vifs

    assert daemon.stop(signal.SIGTERM) == 0

    assert mr_cache(lab).strip() == ""
    assert mr_cache(lab, 6).strip() == ""
    assert len(lab.run("router", "cat", "/proc/net/ip_mr_vif").stdout.splitlines()) <= 1
    assert not Path(daemon.socket).exists()


def test_the_32_vif_boundary(lab: StandardLab) -> None:
    """All 32 VIFs can be used; a route needing a 33rd is refused and changes nothing."""
    lab.add_ns("sink")
    lab.add_links(
        [LinkSpec("router", f"v{i}", "sink", f"s{i}") for i in range(31)]  # + up0 = 32
        + [LinkSpec("router", "extra", "sink", "sx")]
    )
    with DaemonProcess(lab, "router") as d:
        d.start()
        oifs = [f"v{i}" for i in range(31)]
        res = d.cli("route", "add", "up0", SRC4, "239.3.3.3", *oifs)
        assert res.returncode == 0, res.stderr
        vif_lines = lab.run("router", "cat", "/proc/net/ip_mr_vif").stdout.splitlines()[1:]
        assert len(vif_lines) == 32
        before = mr_cache(lab)

        res = d.cli("route", "add", "up0", SRC4, "239.3.3.4", "extra")
        assert res.returncode == 1
        assert "VIF table is full" in res.stderr and "extra" in res.stderr

        assert mr_cache(lab) == before
        assert len(lab.run("router", "cat", "/proc/net/ip_mr_vif").stdout.splitlines()[1:]) == 32
        assert len(d.cli_json("show", "routes")["routes"]) == 1
        # Freeing one oif makes room again.
        d.cli("route", "del", "up0", SRC4, "239.3.3.3", check=True)
        d.cli("route", "add", "up0", SRC4, "239.3.3.4", "extra", check=True)


def control_pid(d: DaemonProcess) -> int:
    """PID of the control child (the one running `mcrelay.control`)."""
    for pid in d.children():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"mcrelay.control" in cmdline:
            return pid
    raise AssertionError("no control process found")


def test_kernel_routes_keep_forwarding_while_the_control_process_restarts(
    lab: StandardLab, daemon: DaemonProcess
) -> None:
    daemon.cli("route", "add", "up0", SRC4, "239.1.1.7", "dn1", check=True)
    wait_path(lab, "239.1.1.7")
    first = control_pid(daemon)
    receiver = lab.receiver("rcv1", "239.1.1.7", PORT, "veth0", count=600, duration=6, idle=2)

    os.kill(first, signal.SIGKILL)
    lab.send("src", "239.1.1.7", PORT, iface="veth0", count=600, ttl=8, rate=1000)

    assert receiver.result().count == 600, "the kernel forwarded every packet meanwhile"
    res = daemon.cli("status")
    assert res.returncode == 0, (res.stderr, daemon.log()[-2000:])
    assert control_pid(daemon) != first
    assert daemon.cli_json("status")["control_restarts"] == 1
    assert "control process exited (killed by SIGKILL)" in daemon.log()


def test_learned_star_g_sources_expire_when_idle(lab: StandardLab) -> None:
    with DaemonProcess(lab, "router", config="learned_expiry = 2\n") as d:
        d.start()
        d.cli("route", "add", "up0", "239.2.2.8", "dn1", check=True)
        wait_path(lab, "239.2.2.8")
        assert ("239.2.2.8", SRC4) in mfc_entries(lab)

        wait_for(
            lambda: ("239.2.2.8", SRC4) not in mfc_entries(lab),
            timeout=8,
            what="the idle learned (S,G) to leave the kernel",
        )
        (route,) = d.cli_json("show", "routes")["routes"]
        assert route["learned"] == [] and route["state"] == "active"
        wait_path(lab, "239.2.2.8")  # a new packet installs it again
        assert ("239.2.2.8", SRC4) in mfc_entries(lab)


def test_a_route_waits_while_its_interface_is_gone_and_returns_with_it(
    lab: StandardLab, daemon: DaemonProcess
) -> None:
    daemon.cli("route", "add", "up0", SRC4, "239.1.1.9", "dn1", check=True)
    wait_path(lab, "239.1.1.9")

    lab.ip("router", "link", "del", "dn1")  # takes rcv1's veth0 with it
    wait_for(
        lambda: "dn1" not in lab.run("router", "cat", "/proc/net/ip_mr_vif").stdout,
        timeout=5,
        what="the dn1 VIF to go",
    )
    (route,) = daemon.cli_json("show", "routes")["routes"]
    assert [(o["name"], o["ttl"]) for o in route["oifs"]] == [("dn1", 1)], "kept as written"
    assert (route["state"], route["reason"]) == ("waiting", "dn1 interface missing")

    lab.add_link(
        "router", "dn1", "rcv1", "veth0",
        v4_a="198.51.100.1/24", v4_b="198.51.100.2/24",
    )  # fmt: skip
    wait_path(lab, "239.1.1.9")  # re-created with a new ifindex: VIF and MFC rebuilt
    got1, got2 = forward(lab, "239.1.1.9", count=20)
    assert got1.count == 20 and got2.count == 0
    assert daemon.cli_json("show", "routes")["routes"][0]["state"] == "active"


def test_the_control_process_runs_unprivileged_and_holds_no_kernel_socket(
    daemon: DaemonProcess,
) -> None:
    pid = control_pid(daemon)
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    assert status["Uid"].split() == ["65534"] * 4
    assert status["Groups"].strip() == ""
    assert int(status["CapEff"].strip(), 16) == 0
    assert status["NoNewPrivs"].strip() == "1"
    # Every socket it holds is a Unix socket (listener, supervisor channel,
    # clients): never an mroute, AF_PACKET or netlink socket.
    inodes = socket_inodes(pid)
    # A connection accepted from a client in another network namespace (the
    # test's own, here) is listed in the client's namespace, not the daemon's.
    unix = {
        line.split()[6]
        for table in (f"/proc/{pid}/net/unix", "/proc/self/net/unix")
        for line in Path(table).read_text().splitlines()[1:]
    }
    # A client connection closed between the reads is gone from both by now;
    # a socket of another family stays in the fd table and is caught.
    other = (inodes - unix) & socket_inodes(pid)
    assert inodes and not other, other


def socket_inodes(pid: int) -> set[str]:
    """Inode numbers of the sockets process ``pid`` holds open."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed while we looked
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                found.add(link[len("socket:[") : -1])
    return found
