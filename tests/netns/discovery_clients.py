"""Real discovery clients run inside lab namespaces by test_discovery.py.

``python discovery_clients.py zc-register NAME PORT IFADDR SECONDS`` publishes
``NAME._mcrelay-test._tcp.local.`` with python3-zeroconf (Debian's) on the
interface address IFADDR; ``zc-browse IFADDR SECONDS`` browses that type and
resolves each name found, printing one JSON object; ``ssdp-browse IFACE
SECONDS TARGET`` runs a GSSDP resource browser (Debian's libgssdp through
GObject introspection, the library behind gssdp-discover) and prints what it
found. These are the clients' own stacks: our traffic tool is not involved.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from typing import Any

SERVICE_TYPE = "_mcrelay-test._tcp.local."
IP_PKTINFO = 8  # linux/in.h (not exported by Python's socket module)


def zc_register(name: str, port: int, ifaddr: str, seconds: float) -> None:
    from zeroconf import IPVersion, ServiceInfo, Zeroconf

    v6 = ":" in ifaddr
    zc = Zeroconf(interfaces=[ifaddr], ip_version=IPVersion.V6Only if v6 else IPVersion.V4Only)
    fam = socket.AF_INET6 if v6 else socket.AF_INET
    info = ServiceInfo(
        SERVICE_TYPE,
        f"{name}.{SERVICE_TYPE}",
        addresses=[socket.inet_pton(fam, ifaddr)],
        port=port,
        properties={"path": "/mcrelay"},
        server=f"{name}.local.",
    )
    zc.register_service(info)
    print("registered", flush=True)
    time.sleep(seconds)
    zc.unregister_service(info)
    zc.close()


def zc_browse(ifaddr: str, seconds: float) -> None:
    from zeroconf import IPVersion, ServiceBrowser, ServiceStateChange, Zeroconf

    v6 = ":" in ifaddr
    zc = Zeroconf(interfaces=[ifaddr], ip_version=IPVersion.V6Only if v6 else IPVersion.V4Only)
    names: list[str] = []

    def changed(zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        if state_change is ServiceStateChange.Added and name not in names:
            names.append(name)

    ServiceBrowser(zc, SERVICE_TYPE, handlers=[changed])
    end = time.monotonic() + seconds
    while not names and time.monotonic() < end:
        time.sleep(0.1)
    found = []
    for name in names:
        info = zc.get_service_info(
            SERVICE_TYPE, name, timeout=int(max(1.0, end - time.monotonic()) * 1000)
        )
        if info is not None:
            found.append({"name": name, "port": info.port, "addresses": info.parsed_addresses(),
                          "server": info.server})  # fmt: skip
    zc.close()
    print(json.dumps({"names": names, "resolved": found}), flush=True)


def ssdp_browse(iface: str, seconds: float, target: str) -> None:
    import gi

    gi.require_version("GSSDP", "1.6")
    from gi.repository import GSSDP, GLib

    client = GSSDP.Client.new_full(iface, None, 1900, GSSDP.UDAVersion.VERSION_1_0)
    browser = GSSDP.ResourceBrowser.new(client, target)
    seen: list[dict[str, Any]] = []

    def available(_b: Any, usn: str, locations: Any) -> None:
        seen.append({"usn": usn, "locations": list(locations)})

    browser.connect("resource-available", available)
    browser.set_active(True)
    loop = GLib.MainLoop()
    GLib.timeout_add(int(seconds * 1000), loop.quit)
    loop.run()
    print(json.dumps({"found": seen}), flush=True)


def udp_listen(port: int, seconds: float) -> None:
    """Every UDP datagram to ``port`` (broadcast included) for ``seconds``."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    s.bind(("", port))
    s.settimeout(0.2)
    got = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            data, anc, _flags, src = s.recvmsg(65535, 256)
        except TimeoutError:
            continue
        dst = "?"
        for level, kind, value in anc:
            if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
                dst = socket.inet_ntoa(value[8:12])  # struct in_pktinfo: ifindex, spec_dst, addr
        got.append({"src": list(src), "dst": dst, "data": data.hex()})
    print(json.dumps({"packets": got}), flush=True)


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    if cmd == "zc-register":
        zc_register(args[0], int(args[1]), args[2], float(args[3]))
    elif cmd == "zc-browse":
        zc_browse(args[0], float(args[1]))
    elif cmd == "udp-listen":
        udp_listen(int(args[0]), float(args[1]))
    elif cmd == "ssdp-browse":
        ssdp_browse(args[0], float(args[1]), args[2])
    else:
        sys.exit(f"unknown command {cmd}")
