"""The lab itself: topology, real packets across it, and leaving nothing behind."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from mcrelay.lab import Lab, LabError, StandardLab, auto_link_spec, traffic, wait_for
from mcrelay.lab.netns import NETNS_DIR, LinkSpec, python_env

pytestmark = pytest.mark.netns


def lab_namespaces(prefix: str) -> list[str]:
    return sorted(p.name for p in NETNS_DIR.glob(prefix + "*"))


def test_standard_topology(lab: StandardLab) -> None:
    assert lab_namespaces(lab.prefix) == sorted(lab.namespaces)
    assert [lab.role(n) for n in lab.namespaces] == ["src", "router", "rcv1", "rcv2"]
    assert lab.router == lab.prefix + "router"
    assert sorted(lab.interfaces("router")) == ["dn1", "dn2", "lo", "up0"]
    for host in ("src", "rcv1", "rcv2"):
        assert sorted(lab.interfaces(host)) == ["lo", "veth0"]
    assert lab.addr("router", "up0") == "192.0.2.1"
    assert lab.addr("router", "dn1", 6) == "2001:db8:11::1"
    assert lab.addr("rcv2", "veth0") == "203.0.113.2"
    assert lab.get_sysctl("router", "net.ipv4.ip_forward") == "1"
    assert lab.get_sysctl("router", "net.ipv6.conf.all.forwarding") == "1"
    assert lab.get_sysctl("router", "net.ipv4.conf.dn2.rp_filter") == "0"
    for ns in lab.namespaces:
        for ifname in set(lab.interfaces(ns)) - {"lo"}:  # lo has no DAD (-1)
            assert lab.get_sysctl(ns, f"net.ipv6.conf.{ifname}.accept_dad") == "0"
    # The in-thread sysctl view agrees with a process inside the namespace.
    out = lab.run("router", "sysctl", "-n", "net.ipv4.ip_forward").stdout
    assert out.strip() == "1"
    # Every link end is up and carries its addresses, no tentative IPv6.
    for info in lab.ip_json("router", "addr", "show"):
        if info["ifname"] == "lo":
            continue
        assert "UP" in info["flags"]
        assert not any(a.get("tentative") for a in info["addr_info"])


def test_set_rp_filter_and_refusals(lab: StandardLab) -> None:
    lab.set_rp_filter("router", 1, ["up0"])
    assert lab.get_sysctl("router", "net.ipv4.conf.all.rp_filter") == "1"
    assert lab.get_sysctl("router", "net.ipv4.conf.up0.rp_filter") == "1"
    assert lab.get_sysctl("router", "net.ipv4.conf.dn1.rp_filter") == "0"
    with pytest.raises(LabError, match="does not belong"):
        lab.run("somebody-elses-ns", "true")
    with pytest.raises(LabError, match="only net"):
        lab.set_sysctl("router", "kernel.panic", 1)
    with pytest.raises(LabError, match="eth0"):
        lab.add_link("router", "eth0", "src", "x1")


def test_ipv4_unicast_to_router_and_through_it(lab: StandardLab) -> None:
    near = lab.receiver("router", "192.0.2.1", 7000, count=3)
    far = lab.receiver("rcv1", "0.0.0.0", 7001, count=3)
    assert lab.send("src", "192.0.2.1", 7000, count=3).sent == 3
    assert lab.send("src", "198.51.100.2", 7001, count=3, ttl=30).sent == 3
    got = near.result()
    assert (got.count, got.intact, got.seqs) == (3, 3, [0, 1, 2])
    assert got.sources == {"192.0.2.2": 3}
    routed = far.result()
    assert routed.count == 3 and routed.intact == 3
    assert routed.ttl_values == {29}  # one hop through the router
    assert {p.dst for p in routed.packets} == {"198.51.100.2"}


def test_ipv4_multicast_on_the_src_link(lab: StandardLab) -> None:
    rx = lab.receiver("router", "239.1.2.3", 5000, "up0", count=10)
    other = lab.receiver("router", "239.9.9.9", 5000, "up0", duration=1.0)
    sent = lab.send("src", "239.1.2.3", 5000, iface="veth0", count=10, ttl=5, tos=0xB8, size=300)
    assert (sent.sent, sent.errors) == (10, 0)
    got = rx.result()
    assert got.count == 10 and got.intact == 10 and got.seqs_missing == 0
    assert got.ttl_values == {5} and got.tos_values == {0xB8}
    assert {p.dst for p in got.packets} == {"239.1.2.3"}
    assert {p.len for p in got.packets} == {300}
    assert {p.sha256 for p in got.packets} == {
        hashlib.sha256(traffic.make_payload(i, 300)).hexdigest() for i in range(10)
    }
    # IP_MULTICAST_ALL=0: a socket joined elsewhere on the same port sees nothing.
    assert other.result().count == 0
    # Nothing leaks to a namespace that is not on the link.
    assert lab.receiver("rcv1", "239.1.2.3", 5000, "veth0", duration=0.3).result().count == 0


def test_source_specific_join(lab: StandardLab) -> None:
    right = lab.receiver("router", "232.1.1.1", 5002, "up0", sources=["192.0.2.2"], count=4)
    wrong = lab.receiver("router", "232.1.1.1", 5003, "up0", sources=["192.0.2.99"], duration=1)
    lab.send("src", "232.1.1.1", 5002, iface="veth0", count=4)
    lab.send("src", "232.1.1.1", 5003, iface="veth0", count=4)
    assert right.result().count == 4
    assert wrong.result().count == 0


def test_ipv6_link_unicast_and_multicast(lab: StandardLab) -> None:
    uni = lab.receiver("router", "2001:db8:1::1", 7002, count=2)
    mc = lab.receiver("router", "ff3e::4242", 5000, "up0", count=5)
    assert lab.send("src", "2001:db8:1::1", 7002, count=2).sent == 2
    lab.send("src", "ff3e::4242", 5000, iface="veth0", count=5, ttl=3, tos=0x28)
    got = uni.result()
    assert got.count == 2 and got.sources == {"2001:db8:1::2": 2}
    m = mc.result()
    assert m.count == 5 and m.intact == 5
    assert m.ttl_values == {3} and m.tos_values == {0x28}
    assert {p.dst for p in m.packets} == {"ff3e::4242"}
    # Routed IPv6 unicast, hop limit decremented once.
    far = lab.receiver("rcv2", "::", 7003, count=1)
    lab.send("src", "2001:db8:12::2", 7003, ttl=10)
    assert far.result().ttl_values == {9}


def test_probe_until_forwarded(lab: StandardLab) -> None:
    took = lab.probe_until_forwarded("src", "ff3e::77", 5010, "veth0", "router", "up0")
    assert 0 <= took < 5
    # No multicast routing in the router yet: nothing reaches rcv1.
    with pytest.raises(TimeoutError, match="no probe"):
        lab.probe_until_forwarded("src", "239.7.7.7", 5011, "veth0", "rcv1", "veth0", timeout=0.3)
    # Probes are counted apart from test traffic.
    rx = lab.receiver("router", "239.7.7.8", 5012, "up0", count=2, duration=3)
    lab.send("src", "239.7.7.8", 5012, iface="veth0", stream=traffic.PROBE_STREAM, count=3)
    lab.send("src", "239.7.7.8", 5012, iface="veth0", count=2)
    got = rx.result()
    assert (got.count, got.probes) == (2, 3)


def _minimal_mroute6(up: str, down: str, source: str, group: str) -> socket.socket:
    """Just enough MRT6 for one (S,G) up -> down (layouts from linux/mroute6.h).

    The kernel engine is tested on its own; this only gives the lab's probe
    helper a real forwarding path through the router to wait for.
    """

    def sin6(addr: str) -> bytes:
        return struct.pack("=HHI16sI", socket.AF_INET6, 0, 0, ipaddress.IPv6Address(addr).packed, 0)

    sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    sock.setsockopt(socket.IPPROTO_IPV6, 200, 1)  # MRT6_INIT
    for mifi, name in enumerate((up, down)):
        mif = struct.pack("=HBBHxxI", mifi, 0, 1, socket.if_nametoindex(name), 0)
        sock.setsockopt(socket.IPPROTO_IPV6, 202, mif)  # MRT6_ADD_MIF
    ifset = (1 << 1).to_bytes(4, sys.byteorder) + bytes(28)
    mfc = sin6(source) + sin6(group) + struct.pack("=Hxx", 0) + ifset
    sock.setsockopt(socket.IPPROTO_IPV6, 204, mfc)  # MRT6_ADD_MFC
    return sock


def test_probe_through_forwarding_router(lab: StandardLab) -> None:
    mroute = lab.in_ns("router", _minimal_mroute6, "up0", "dn1", "2001:db8:1::2", "ff3e::99")
    try:
        took = lab.probe_until_forwarded("src", "ff3e::99", 5000, "veth0", "rcv1", "veth0")
        assert took < 5
        rx1 = lab.receiver("rcv1", "ff3e::99", 5000, "veth0", count=20)
        rx2 = lab.receiver("rcv2", "ff3e::99", 5000, "veth0", duration=0.5)
        lab.send("src", "ff3e::99", 5000, iface="veth0", count=20, ttl=8)
        got = rx1.result()
        assert (got.count, got.intact, got.probes) == (20, 20, 0)
        assert got.ttl_values == {7}  # forwarded: hop limit decremented once
        assert got.sources == {"2001:db8:1::2": 20}
        assert rx2.result().count == 0  # dn2 is not in the route
    finally:
        mroute.close()


def test_receiver_stop_and_cli(lab: StandardLab) -> None:
    rx = lab.receiver("rcv1", "198.51.100.2", 7004, duration=30)
    lab.send("src", "198.51.100.2", 7004, count=2)
    wait_for(lambda: rx.running, timeout=1)
    t0 = time.monotonic()
    got = rx.stop()
    assert time.monotonic() - t0 < 5
    assert got.count == 2 and got.reason.startswith("signal")
    # The command-line sender inside a namespace, as scripts would use it.
    rx2 = lab.receiver("rcv1", "198.51.100.2", 7005, count=4)
    out = lab.run(
        "src",
        *lab.traffic_argv("send", "198.51.100.2", "7005", "--count", "4", "--rate", "200"),
        env=python_env(),
    ).stdout
    assert traffic.SendResult.from_dict(json.loads(out)).sent == 4
    assert rx2.result().count == 4


def test_many_links_in_batches(make_lab: Callable[[], Lab]) -> None:
    lab = make_lab()
    lab.add_ns("router", "sink")
    t0 = time.monotonic()
    links = lab.add_links(
        [auto_link_spec("router", f"o{i}", "sink", f"i{i}", i) for i in range(40)]
    )
    assert time.monotonic() - t0 < 15
    assert len(links) == 40
    assert len(lab.interfaces("router")) == 41 and len(lab.interfaces("sink")) == 41
    assert lab.addr("sink", "i39") == "198.18.39.2"
    assert lab.addr("router", "o39", 6) == "2001:db8:100:27::1"
    up = [i["ifname"] for i in lab.ip_json("sink", "link", "show") if "UP" in i["flags"]]
    assert len(up) == 41
    rx = lab.receiver("sink", "239.3.3.3", 5000, "i37", count=1)
    lab.send("router", "239.3.3.3", 5000, iface="o37")
    assert rx.result().count == 1


def test_cleanup_when_block_raises(make_lab: Callable[[], Lab]) -> None:
    holder: list[StandardLab] = []
    with pytest.raises(RuntimeError, match="boom"), Lab.standard() as lab:
        holder.append(lab)
        # A process left running inside a namespace must not keep it alive.
        lab.run("router", "sh", "-c", "sleep 300 >/dev/null 2>&1 &")
        assert lab.run("router", "ip", "netns", "identify").returncode == 0
        assert lab_namespaces(lab.prefix)
        raise RuntimeError("boom")
    assert lab_namespaces(holder[0].prefix) == []
    holder[0].cleanup()  # idempotent


def test_cleanup_after_half_built_lab(
    make_lab: Callable[[], Lab], monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = f"mcl{os.urandom(3).hex()}-"

    def fail(self: Lab, ns: str) -> None:
        raise LabError("injected failure")

    monkeypatch.setattr(StandardLab, "enable_forwarding", fail)
    with pytest.raises(LabError, match="injected"):
        Lab.standard(prefix=prefix)
    assert lab_namespaces(prefix) == []
    lab = make_lab()
    lab.add_ns("a")
    with pytest.raises(LabError):
        lab.add_links([LinkSpec("a", "x0", "a", "x0")])  # both ends same name
    lab.cleanup()
    assert lab_namespaces(lab.prefix) == []


def test_sigterm_removes_lab(make_lab: Callable[[], Lab]) -> None:
    """A process that builds a lab and gets SIGTERM removes it on the way out."""
    prefix = f"mcl{os.urandom(3).hex()}-"
    code = (
        "import sys, time\n"
        "from mcrelay.lab import Lab\n"
        f"lab = Lab.standard(prefix={prefix!r})\n"
        "print('up', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=python_env()
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "up"
        assert len(lab_namespaces(prefix)) == 4
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == -signal.SIGTERM
        assert lab_namespaces(prefix) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for name in lab_namespaces(prefix):
            subprocess.run(["ip", "netns", "del", name], check=False)
