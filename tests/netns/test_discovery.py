"""Discovery reflectors end to end, with the real clients users run (Debian's packages).

Avahi (avahi-daemon with its own configuration, a private D-Bus and its own
runtime directory, mounted only in the daemon's mount namespace), python3-zeroconf,
MiniDLNA found by a GSSDP browser (libgssdp, the library of gssdp-discover),
and wakeonlan, each inside the lab's namespaces only; one ``--reflect`` rule in
the router. Plus what a reflector must never do: send a segment its own
packets back, or storm when two boxes reflect the same segments.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mcrelay.lab import Lab, StandardLab, wait_for
from mcrelay.lab.daemon import DaemonProcess
from mcrelay.lab.netns import python_env

CLIENTS = str(Path(__file__).with_name("discovery_clients.py"))
# The clients are third-party programs on Debian's own Python with Debian's
# python3-zeroconf and python3-gi, whichever interpreter (and pyroute2) runs
# the tests: the suite also runs from a PyPI-only virtualenv.
PY = "/usr/bin/python3"
MEDIA_SERVER = "urn:schemas-upnp-org:device:MediaServer:1"


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run make setup (installs TEST_DEBS)")


def reflect(daemon: DaemonProcess, name: str, *args: str) -> None:
    res = daemon.cli("relay", "add", name, "--reflect", *args)
    assert res.returncode == 0, res.stderr


def client(lab: Lab, ns: str, *args: str, timeout: float = 40) -> Any:
    res = lab.run(ns, PY, CLIENTS, *args, env=python_env(), timeout=timeout)
    return json.loads(res.stdout.strip().splitlines()[-1])


def relay_row(daemon: DaemonProcess, name: str) -> dict[str, Any]:
    rows = daemon.cli_json("show", "relays")["relays"]
    return next(r for r in rows if r["name"] == name)  # type: ignore[no-any-return]


# ---------------------------------------------------------------- Avahi


class Avahi:
    """avahi-daemon in one namespace: private D-Bus, runtime and service directories."""

    def __init__(self, lab: Lab, ns: str, tmp: Path, host: str, service: str | None) -> None:
        self.dir = tmp / ns
        (self.dir / "services").mkdir(parents=True)
        (self.dir / "run").mkdir()
        (self.dir / "dbus.conf").write_text(
            '<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"'
            ' "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">\n'
            f"<busconfig><type>system</type><listen>unix:path={self.dir}/bus</listen>"
            "<auth>EXTERNAL</auth><policy context='default'><allow user='*'/><allow own='*'/>"
            "<allow send_destination='*'/><allow receive_sender='*'/></policy></busconfig>\n"
        )
        (self.dir / "avahi.conf").write_text(
            f"[server]\nhost-name={host}\nuse-ipv4=yes\nuse-ipv6=yes\nallow-interfaces=veth0\n"
            "enable-dbus=yes\n[wide-area]\nenable-wide-area=no\n"
            "[publish]\npublish-hinfo=no\npublish-workstation=no\n"
            "[reflector]\nenable-reflector=no\n"
        )
        if service:
            (self.dir / "services" / "test.service").write_text(
                "<?xml version='1.0' standalone='no'?>\n"
                f"<service-group><name>{service}</name><service><type>_mcrelay-test._tcp</type>"
                "<port>8631</port></service></service-group>\n"
            )
        self.env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=f"unix:path={self.dir}/bus")
        lab.popen(
            ns,
            ["dbus-daemon", f"--config-file={self.dir}/dbus.conf", "--nofork", "--nopidfile"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: (self.dir / "bus").exists(), timeout=10, what="private D-Bus socket")
        # ip netns exec gives the command its own mount namespace: these mounts
        # (pid file and socket directory, static services) exist only there.
        os.makedirs("/run/avahi-daemon", exist_ok=True)
        script = (
            f"mount --bind {self.dir}/run /run/avahi-daemon && "
            f'mount --bind {self.dir}/services /etc/avahi/services && exec "$@"'
        )
        argv = ["avahi-daemon", "-f", f"{self.dir}/avahi.conf", "--no-drop-root", "--no-chroot"]
        argv += ["--no-rlimits", "--no-proc-title"]
        self.log = open(self.dir / "avahi.log", "w")  # noqa: SIM115
        lab.popen(ns, ["sh", "-c", script, "sh", *argv], env=self.env, stderr=self.log)
        self.lab, self.ns = lab, ns

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return self.lab.run(self.ns, *argv, env=self.env, check=False, timeout=30)

    def browse(self) -> list[list[str]]:
        """Resolved services of our type: (interface, family, name, host, address, port)."""
        for _ in range(10):
            out = self.run("avahi-browse", "-r", "-t", "-p", "_mcrelay-test._tcp").stdout
            got = [line.split(";")[1:] for line in out.splitlines() if line.startswith("=")]
            if got:
                return [[g[0], g[1], g[2].replace("\\032", " "), g[5], g[6], g[7]] for g in got]
            time.sleep(1)
        return []


@pytest.fixture
def tmp(tmp_path: Path) -> Iterator[Path]:
    os.chmod(tmp_path, 0o755)
    yield tmp_path


def test_avahi_service_is_browsed_and_resolved_from_two_other_segments(
    lab: StandardLab, daemon: DaemonProcess, tmp: Path
) -> None:
    """Avahi drops mDNS answers not from port 5353 or with TTL != 255: the reflector keeps both."""
    need("avahi-daemon", "avahi-browse", "avahi-resolve", "dbus-daemon")
    reflect(daemon, "mdns", "mdns", "--on", "up0,dn1,dn2")
    Avahi(lab, "src", tmp, "avahi-src", "Avahi printer")
    browsers = [Avahi(lab, ns, tmp, f"avahi-{ns}", None) for ns in ("rcv1", "rcv2")]
    for b in browsers:
        found = b.browse()
        assert ["veth0", "IPv4", "Avahi printer", "avahi-src.local", "192.0.2.2", "8631"] in found
        assert ["veth0", "IPv6", "Avahi printer", "avahi-src.local", "2001:db8:1::2", "8631"] in (
            found
        )
        res = b.run("avahi-resolve", "-4", "-n", "avahi-src.local")
        assert res.stdout.split() == ["avahi-src.local", "192.0.2.2"], res.stderr
    row = relay_row(daemon, "mdns")
    assert row["state"] == "active" and all(m["packets"] > 0 for m in row["members"])


def test_zeroconf_service_is_browsed_and_resolved_from_two_other_segments(
    lab: StandardLab, daemon: DaemonProcess
) -> None:
    reflect(daemon, "mdns", "mdns", "--on", "up0,dn1,dn2")
    reg = lab.popen(
        "rcv2",
        [PY, CLIENTS, "zc-register", "zc-printer", "631", "203.0.113.2", "40"],
        stdout=subprocess.PIPE,
        text=True,
        env=python_env(),
    )
    assert reg.stdout is not None and reg.stdout.readline().strip() == "registered"
    for ns, addr in (("src", "192.0.2.2"), ("rcv1", "198.51.100.2")):
        got = client(lab, ns, "zc-browse", addr, "10")
        assert got["names"] == ["zc-printer._mcrelay-test._tcp.local."], (ns, got)
        (res,) = got["resolved"]
        assert res["port"] == 631 and res["addresses"] == ["203.0.113.2"], (ns, got)
    reg.kill()


# ---------------------------------------------------------------- SSDP: MiniDLNA and GSSDP


def minidlna(lab: Lab, ns: str, tmp: Path) -> subprocess.Popen[Any]:
    """minidlnad with its own configuration, in ``ns`` only; NOTIFYs only at start-up."""
    d = tmp / "minidlna"
    for sub in ("media", "db", "log"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    (d / "minidlna.conf").write_text(
        f"media_dir={d}/media\ndb_dir={d}/db\nlog_dir={d}/log\nnetwork_interface=veth0\n"
        "port=8200\nfriendly_name=mcrelay-test\nnotify_interval=900\ninotify=no\n"
    )
    log = open(d / "out.log", "w")  # noqa: SIM115
    argv = ["minidlnad", "-f", f"{d}/minidlna.conf", "-P", f"{d}/pid", "-d"]
    return lab.popen(ns, argv, stdout=log, stderr=subprocess.STDOUT)


def ssdp_browse(lab: Lab, ns: str, seconds: float) -> subprocess.Popen[str]:
    argv = [PY, CLIENTS, "ssdp-browse", "veth0", str(seconds), MEDIA_SERVER]
    return lab.popen(ns, argv, stdout=subprocess.PIPE, text=True, env=python_env())


def found(proc: subprocess.Popen[str]) -> list[dict[str, Any]]:
    out, _ = proc.communicate(timeout=40)
    return json.loads(out.strip().splitlines()[-1])["found"]  # type: ignore[no-any-return]


def test_minidlna_is_found_by_its_notify_through_an_ssdp_reflector(
    lab: StandardLab, daemon: DaemonProcess, tmp: Path
) -> None:
    """The browser listens first; MiniDLNA's start-up NOTIFYs cross (own source: no
    M-SEARCH answer could come back, so this is the NOTIFY path alone)."""
    need("minidlnad")
    reflect(daemon, "ssdp", "ssdp", "--on", "up0,dn1,dn2", "--source", "own")
    browser = ssdp_browse(lab, "rcv1", 6)
    time.sleep(1.5)  # its own M-SEARCHes find nothing yet
    minidlna(lab, "src", tmp)
    (res,) = found(browser)
    assert res["locations"] == ["http://192.0.2.2:8200/rootDesc.xml"]


def test_minidlna_started_earlier_answers_m_search_straight_to_the_client(
    lab: StandardLab, daemon: DaemonProcess, tmp: Path
) -> None:
    """MiniDLNA answers M-SEARCH by unicast to its source: with keep (the reflector
    default) that is the client, with own the router, where the answer dies."""
    need("minidlnad")
    reflect(daemon, "ssdp", "ssdp", "--on", "up0,dn1,dn2", "--source", "own")
    minidlna(lab, "src", tmp)
    time.sleep(3)  # the start-up NOTIFYs are over; the next come in 900 s
    assert found(ssdp_browse(lab, "rcv1", 5)) == [], "own source: the answer went to the router"
    daemon.cli("relay", "del", "ssdp", check=True)
    reflect(daemon, "ssdp", "ssdp", "--on", "up0,dn1,dn2")
    for ns in ("rcv1", "rcv2"):
        (res,) = found(ssdp_browse(lab, ns, 5))
        assert res["locations"] == ["http://192.0.2.2:8200/rootDesc.xml"], ns


# ---------------------------------------------------------------- Wake-on-LAN


def test_wakeonlan_reaches_a_listener_on_another_segment(
    lab: StandardLab, daemon: DaemonProcess
) -> None:
    need("wakeonlan")
    reflect(daemon, "wol", "wol", "--on", "up0,dn1")
    listener = lab.popen(
        "rcv1",
        [PY, CLIENTS, "udp-listen", "9", "4"],
        stdout=subprocess.PIPE,
        text=True,
        env=python_env(),
    )
    time.sleep(0.5)
    lab.run("src", "wakeonlan", "-i", "255.255.255.255", "-p", "9", "02:00:5e:10:00:01")
    out, _ = listener.communicate(timeout=20)
    (got,) = json.loads(out.strip().splitlines()[-1])["packets"]
    assert got["src"] == ["192.0.2.2", got["src"][1]] and got["dst"] == "255.255.255.255"
    assert bytes.fromhex(got["data"]) == b"\xff" * 6 + bytes.fromhex("02005e100001") * 16


def test_a_directed_broadcast_is_relayed_as_a_broadcast_on_the_output(
    lab: StandardLab, daemon: DaemonProcess
) -> None:
    """wakeonlan -i 192.0.2.255 (up0's directed broadcast) to a broadcast on dn2."""
    need("wakeonlan")
    for ns, ifname, cidr in (("router", "up0", "192.0.2.1/24"), ("src", "veth0", "192.0.2.2/24")):
        lab.ip(ns, "addr", "del", cidr, "dev", ifname)  # ip sets no broadcast by default
        lab.ip(ns, "addr", "add", cidr, "brd", "+", "dev", ifname)
    res = daemon.cli(
        "relay", "add", "wold", "--in", "192.0.2.255:9@up0", "--out", "255.255.255.255:9@dn2"
    )
    assert res.returncode == 0, res.stderr
    wait_for(lambda: relay_row(daemon, "wold")["state"] == "active", timeout=5, what="active")
    listener = lab.popen(
        "rcv2", [PY, CLIENTS, "udp-listen", "9", "3"], stdout=subprocess.PIPE, text=True,
        env=python_env(),
    )  # fmt: skip
    time.sleep(0.5)
    lab.run("src", "wakeonlan", "-i", "192.0.2.255", "-p", "9", "02:00:5e:10:00:02")
    out, _ = listener.communicate(timeout=20)
    (got,) = json.loads(out.strip().splitlines()[-1])["packets"]
    assert got["dst"] == "255.255.255.255" and got["src"][0] == "203.0.113.1"  # src=own
    assert bytes.fromhex(got["data"]) == b"\xff" * 6 + bytes.fromhex("02005e100002") * 16


# ---------------------------------------------------------------- on the wire, rules


def test_what_leaves_allow_fe80_sources_and_a_restart_with_apply(
    lab: StandardLab, daemon: DaemonProcess, tmp: Path
) -> None:
    """mDNS from any source port leaves from 5353 with hop limit 255; an fe80:: sender
    leaves as the router's link-local address on the output; --allow drops other
    sources as filtered; the reflector survives a restart (state file) and an apply."""
    reflect(daemon, "disc", "mdns", "--on", "up0,dn1,dn2", "--allow", "192.0.2.0/24,fe80::/10")
    rcv = lab.receiver("rcv1", "ff02::fb", 5353, "veth0", duration=3, idle=1.5)
    lab.send("src", "ff02::fb", 5353, iface="veth0", count=5, ttl=7, sport=40000, rate=100)
    got = rcv.result()
    dn1 = next(
        a["local"]
        for a in lab.ip_json("router", "-6", "addr", "show", "dn1")[0]["addr_info"]
        if a["local"].startswith("fe80")
    )
    assert got.count == 5 and got.sources == {dn1: 5} and got.ttls == {"255": 5}
    assert {p.sport for p in got.packets} == {5353}
    v4 = lab.receiver("rcv1", "224.0.0.251", 5353, "veth0", duration=3, idle=1.5)
    lab.send("rcv2", "224.0.0.251", 5353, iface="veth0", count=4, ttl=255, rate=100)
    lab.send("src", "224.0.0.251", 5353, iface="veth0", count=3, ttl=255, rate=100)
    assert v4.result().sources == {"192.0.2.2": 3}, "only the allowed source is reflected"
    wait_for(lambda: relay_row(daemon, "disc")["drops"]["filtered"] == 4, timeout=5,
             what="4 filtered")  # fmt: skip

    daemon.stop()
    daemon.start()
    (row,) = daemon.cli_json("show", "relays")["relays"]
    assert row["reflect"]["allow"] == ["192.0.2.0/24", "fe80::/10"] and row["state"] == "active"
    rules = daemon.cli_json("export")
    rules["relays"][0]["reflect"]["on"] = ["up0", "dn2"]
    (tmp / "rules.json").write_text(json.dumps(rules))
    res = daemon.cli("apply", str(tmp / "rules.json"))
    assert res.returncode == 0, res.stderr
    (row,) = daemon.cli_json("show", "relays")["relays"]
    assert [m["name"] for m in row["members"]] == ["up0", "dn2"]
    far = lab.receiver("rcv2", "224.0.0.251", 5353, "veth0", duration=3, idle=1.5)
    near = lab.receiver("rcv1", "224.0.0.251", 5353, "veth0", duration=3, idle=1.5)
    lab.send("src", "224.0.0.251", 5353, iface="veth0", count=3, ttl=255, rate=100)
    assert (far.result().count, near.result().count) == (3, 0)


# ---------------------------------------------------------------- never back, never a storm


def test_a_member_that_goes_down_leaves_and_rejoins(
    lab: StandardLab, daemon: DaemonProcess
) -> None:
    reflect(daemon, "disc", "239.255.255.250:1900", "--on", "up0,dn1,dn2")

    def through(count: int) -> int:
        rcv = lab.receiver("rcv1", "239.255.255.250", 1900, "veth0", duration=3, idle=1.5)
        lab.send("src", "239.255.255.250", 1900, iface="veth0", count=count, ttl=1, rate=100)
        return rcv.result().count

    assert through(5) == 5
    lab.ip("router", "link", "set", "dn1", "down")
    wait_for(
        lambda: relay_row(daemon, "disc")["members"][1]["state"] == "waiting",
        timeout=5,
        what="dn1 waiting",
    )
    lab.ip("router", "link", "set", "dn1", "up")
    wait_for(lambda: relay_row(daemon, "disc")["state"] == "active", timeout=5, what="active")
    wait_for(lambda: through(3) == 3, timeout=15, what="dn1 back in the reflector")


def test_no_interface_receives_a_relayed_copy_of_its_own_packets(
    lab: StandardLab, daemon: DaemonProcess
) -> None:
    """Receivers on the sender's segment (IPv4 and IPv6) and on a listen-only member get
    nothing relayed; the members that should, get every packet once. Source own: a host
    drops packets that carry its own address as the source, so a kept-source echo would
    not be seen on the sender's host (the two-box test below has a second host there)."""
    own = ("--source", "own")
    reflect(daemon, "disc", "239.255.255.250:1900", "--on", "up0,dn1", "--listen-only", "dn2", *own)
    reflect(daemon, "disc6", "[ff02::c]:1900", "--on", "up0,dn1", "--listen-only", "dn2", *own)
    for group in ("239.255.255.250", "ff02::c"):
        home = lab.receiver("src", group, 1900, "veth0", duration=4, idle=2)
        other = lab.receiver("rcv1", group, 1900, "veth0", duration=4, idle=2)
        quiet = lab.receiver("rcv2", group, 1900, "veth0", duration=4, idle=2)
        lab.send("src", group, 1900, iface="veth0", count=20, ttl=1, rate=100)
        assert other.result().count == 20, group
        assert home.result().count == 0, f"{group}: the sender's segment got its own packets"
        assert quiet.result().count == 0, f"{group}: a listen-only member was sent to"
    heard = lab.receiver("src", "239.255.255.250", 1900, "veth0", duration=4, idle=2)
    lab.send("rcv2", "239.255.255.250", 1900, iface="veth0", count=10, ttl=1, rate=100)
    assert heard.result().count == 10, "a listen-only member is heard"


def test_two_boxes_reflecting_the_same_segments_do_not_storm(make_lab: Any) -> None:
    """Routers r1 and r2 both reflect segments A and B (two bridges). Each packet from A
    reaches B once per box, never comes back to A (host ha2 there sees only the
    originals), and each box counts the other's copy as a loop; without that, the two
    would relay each other's copies for ever."""
    lab: Lab = make_lab()
    lab.add_ns("sw", "r1", "r2", "ha", "ha2", "hb")
    lab.ip_batch("sw", [f"link add br{x} type bridge mcast_snooping 0" for x in "ab"])
    lab.ip_batch("sw", [f"link set br{x} up" for x in "ab"])
    links = [
        ("r1", "sega", "r1a", "a", "192.0.2.1/24"),
        ("r1", "segb", "r1b", "b", "198.51.100.1/24"),
        ("r2", "sega", "r2a", "a", "192.0.2.3/24"),
        ("r2", "segb", "r2b", "b", "198.51.100.3/24"),
        ("ha", "veth0", "ha", "a", "192.0.2.2/24"),
        ("ha2", "veth0", "ha2", "a", "192.0.2.4/24"),
        ("hb", "veth0", "hb", "b", "198.51.100.2/24"),
    ]
    for ns, ifname, port, seg, v4 in links:
        lab.add_link(ns, ifname, "sw", port, v4_a=v4)
        lab.ip("sw", "link", "set", port, "master", f"br{seg}")
    daemons = [DaemonProcess(lab, r, workers=1).start() for r in ("r1", "r2")]
    try:
        for d in daemons:
            reflect(d, "ssdp", "239.255.255.250:1900", "--on", "sega,segb")
        home = lab.receiver("ha2", "239.255.255.250", 1900, "veth0", duration=5, idle=3)
        far = lab.receiver("hb", "239.255.255.250", 1900, "veth0", duration=5, idle=3)
        lab.send("ha", "239.255.255.250", 1900, iface="veth0", count=10, ttl=1, rate=20)
        got_far, got_home = far.result(), home.result()
        assert got_home.count == 10, "a copy came back to the segment it came from"
        assert 10 <= got_far.count <= 20, f"{got_far.count} copies of 10 packets: a storm"
        for d in daemons:
            drops = relay_row(d, "ssdp")["drops"]
            assert drops["loop"] + drops["duplicate"] >= 10, drops
    finally:
        for d in daemons:
            d.close()
