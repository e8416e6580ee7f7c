"""The kernel engine against the real kernel, inside a throw-away network namespace.

Lab: namespace ``mcrk-<hex>-src`` holds the sender on ``s0``; its veth peer
``a1`` in the router namespace ``mcrk-<hex>`` is the routes' input and the veth
pair ``b0``/``b1`` there gives an output. The engine runs in a child process
inside the router namespace, so the root namespace's multicast routing is never
touched. Both namespaces are deleted even on failure.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.netns

SRC = Path(__file__).resolve().parents[2] / "src"

CHILD = r"""
import ctypes, json, os, select, socket, sys, time
from mcrelay.kernel.engine import KernelEngine
from mcrelay.model import Oif, Route

def idx(name):
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None

def proc(name):
    with open("/proc/net/" + name) as f:
        return f.read().splitlines()[1:]

libc = ctypes.CDLL(None, use_errno=True)

def enter(ns):
    fd = os.open("/run/netns/" + ns, os.O_RDONLY)
    try:
        if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), "setns " + ns)
    finally:
        os.close(fd)

router_ns, src_ns = sys.argv[1:3]
# Sender sockets live in the source namespace; they stay there after we leave.
enter(src_ns)
s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s4.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("192.0.2.1"))
s4.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 8)
s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, idx("s0"))
s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 8)
s6.bind(("2001:db8:a::1", 0))
enter(router_ns)

out = {}
eng = KernelEngine(idx, learned_expiry=0.5)
eng.open()
out["families"] = eng.families()
from mcrelay.errors import KernelRefused
from mcrelay.kernel.mroute import MrouteSocket
try:
    MrouteSocket(4).close()
    out["second_router"] = None
except KernelRefused as exc:
    out["second_router"] = [exc.errno, exc.data["op"]]
eng.add_route(Route("a1", "192.0.2.1", "239.1.1.1", (Oif("b0"),)))
eng.add_route(Route("a1", "2001:db8:a::1", "ff3e::1:1", (Oif("b0"),)))
eng.add_route(Route("a1", None, "239.2.2.2", (Oif("b0"),)))
eng.add_route(Route("a1", None, "ff3e::2:2", (Oif("b0"), Oif("not-yet"))))
out["static"] = {k: proc(k) for k in ("ip_mr_vif", "ip_mr_cache", "ip6_mr_vif", "ip6_mr_cache")}

def learned():
    return {s.route.group: [ls.source for ls in s.learned] for s in eng.routes()}

deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    got = learned()
    if got["239.2.2.2"] and got["ff3e::2:2"]:
        break
    s4.sendto(b"x" * 100, ("239.2.2.2", 5000))
    s6.sendto(b"y" * 100, ("ff3e::2:2", 5000))
    ready, _, _ = select.select(eng.fds(), [], [], 0.2)
    for fd in ready:
        eng.handle_readable(fd, time.monotonic())
for _ in range(3):
    s4.sendto(b"z" * 100, ("239.1.1.1", 5000))
    s6.sendto(b"z" * 100, ("ff3e::1:1", 5000))
    s4.sendto(b"z" * 100, ("239.2.2.2", 5000))
time.sleep(0.3)
out["status"] = [s.to_dict() for s in eng.routes()]
out["learned"] = {k: proc(k) for k in ("ip_mr_vif", "ip_mr_cache", "ip6_mr_cache")}

eng.expire(time.monotonic())  # counters moved since learning: still active
time.sleep(0.7)
out["expired"] = [[str(k), s] for k, s in eng.expire(time.monotonic())]
out["after_expiry"] = {k: proc(k) for k in ("ip_mr_cache", "ip6_mr_cache")}
eng.close()
out["closed"] = {k: proc(k) for k in ("ip_mr_vif", "ip_mr_cache", "ip6_mr_vif", "ip6_mr_cache")}
print(json.dumps(out))
"""


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


@pytest.fixture
def netns() -> Iterator[tuple[str, str]]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2")
    router = "mcrk-" + secrets.token_hex(4)
    src = router + "-src"
    created: list[str] = []
    try:
        for ns in (router, src):
            sh("ip", "netns", "add", ns)
            created.append(ns)
            for key in ("all", "default"):
                sh("ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{key}.accept_dad=0")
                sh("ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv4.conf.{key}.rp_filter=0")
        sh(
            "ip",
            "-n",
            router,
            "link",
            "add",
            "a1",
            "type",
            "veth",
            "peer",
            "name",
            "s0",
            "netns",
            src,
        )
        sh("ip", "-n", router, "link", "add", "b0", "type", "veth", "peer", "name", "b1")
        sh("ip", "-n", src, "addr", "add", "192.0.2.1/24", "dev", "s0")
        sh("ip", "-n", src, "addr", "add", "2001:db8:a::1/64", "dev", "s0", "nodad")
        sh("ip", "-n", router, "addr", "add", "192.0.2.2/24", "dev", "a1")
        sh("ip", "-n", router, "addr", "add", "2001:db8:a::2/64", "dev", "a1", "nodad")
        sh("ip", "-n", router, "addr", "add", "198.51.100.1/24", "dev", "b0")
        for ns, dev in [(src, "lo"), (src, "s0"), *((router, d) for d in ("lo", "a1", "b0", "b1"))]:
            sh("ip", "-n", ns, "link", "set", dev, "up")
        yield router, src
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], check=False)


def mfc4(lines: list[str]) -> dict[tuple[str, str], list[str]]:
    """/proc/net/ip_mr_cache rows keyed by (origin, group); addresses are %08X of a __be32."""
    rows = {}
    for line in lines:
        f = line.split()
        grp, org = (socket.inet_ntoa(struct.pack("=I", int(x, 16))) for x in f[:2])
        rows[(org, grp)] = f[2:]
    return rows


def mfc6(lines: list[str]) -> dict[tuple[str, str], list[str]]:
    """/proc/net/ip6_mr_cache rows keyed by (origin, group)."""
    rows = {}
    for line in lines:
        f = line.split()
        grp, org = (str(ipaddress.ip_address(x)) for x in f[:2])
        rows[(org, grp)] = f[2:]
    return rows


def vifs(lines: list[str]) -> dict[str, list[str]]:
    return {line.split()[1]: line.split() for line in lines}


def test_engine_programs_real_kernel(netns: tuple[str, str]) -> None:
    router, src = netns
    env = dict(os.environ, PYTHONPATH=str(SRC))
    proc = subprocess.run(
        ["ip", "netns", "exec", router, sys.executable, "-c", CHILD, router, src],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout)
    assert out["families"] == [4, 6]
    # Only one multicast router per namespace: a second MRT_INIT is refused.
    assert out["second_router"] == [errno.EADDRINUSE, "MRT_INIT"]

    # Static (S,G) routes: VIF 0 = a1 (iif), VIF 1 = b0 (oif, threshold 1).
    st = out["static"]
    assert set(vifs(st["ip_mr_vif"])) == {"a1", "b0"}
    assert set(vifs(st["ip6_mr_vif"])) == {"a1", "b0"}
    assert mfc4(st["ip_mr_cache"])[("192.0.2.1", "239.1.1.1")][0] == "0"
    assert mfc4(st["ip_mr_cache"])[("192.0.2.1", "239.1.1.1")][-1] == "1:1"
    assert mfc6(st["ip6_mr_cache"])[("2001:db8:a::1", "ff3e::1:1")][0] == "0"
    assert mfc6(st["ip6_mr_cache"])[("2001:db8:a::1", "ff3e::1:1")][-1] == "1:1"
    # (*,G) routes install nothing until a source is seen.
    assert len(mfc4(st["ip_mr_cache"])) == 1 and len(mfc6(st["ip6_mr_cache"])) == 1

    # NOCACHE upcalls taught the engine the sources of the (*,G) routes.
    status = {s["group"]: s for s in out["status"]}
    assert [ls["source"] for ls in status["239.2.2.2"]["learned"]] == ["192.0.2.1"]
    assert [ls["source"] for ls in status["ff3e::2:2"]["learned"]] == ["2001:db8:a::1"]
    # every route in place; the one naming an interface that does not exist yet is partial
    assert {g: s["state"] for g, s in status.items()} == {
        "239.1.1.1": "active",
        "ff3e::1:1": "active",
        "239.2.2.2": "active",
        "ff3e::2:2": "partial",
    }
    assert status["ff3e::2:2"]["reason"] == "not-yet interface missing"
    learned4 = mfc4(out["learned"]["ip_mr_cache"])
    assert learned4[("192.0.2.1", "239.2.2.2")][0] == "0"
    assert mfc6(out["learned"]["ip6_mr_cache"])[("2001:db8:a::1", "ff3e::2:2")][-1] == "1:1"
    # Counters from SIOCGETSGCNT agree with the kernel's table and really moved.
    sg4 = status["239.1.1.1"]
    assert sg4["packets"] >= 3 and sg4["bytes"] >= 3 * 128
    assert int(learned4[("192.0.2.1", "239.1.1.1")][1]) == sg4["packets"]
    assert status["ff3e::1:1"]["packets"] >= 3
    assert status["239.2.2.2"]["learned"][0]["packets"] >= 3
    # And the kernel really forwarded out of b0.
    assert int(vifs(out["learned"]["ip_mr_vif"])["b0"][5]) >= 6

    # Idle learned sources expire; static entries stay.
    assert sorted(s for _k, s in out["expired"]) == ["192.0.2.1", "2001:db8:a::1"]
    assert set(mfc4(out["after_expiry"]["ip_mr_cache"])) == {("192.0.2.1", "239.1.1.1")}
    assert set(mfc6(out["after_expiry"]["ip6_mr_cache"])) == {("2001:db8:a::1", "ff3e::1:1")}

    # close() leaves nothing behind.
    assert all(lines == [] for lines in out["closed"].values()), out["closed"]
