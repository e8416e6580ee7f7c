"""Interface watcher: the supervisor's view of links and addresses (pyroute2).

Engines ask :meth:`InterfaceTable.ifindex_of` whether an interface is usable
(present and administratively up) and are told through a callback when one
appears, vanishes, is renamed or comes back with a new index, so that rules
naming it switch between ``active`` and ``waiting`` without being dropped.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.rtnl import (
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_LINK,
)

IFF_UP = 0x1

log = logging.getLogger("mcrelay.netlink")

Listener = Callable[[str, int | None], None]


@dataclass
class Interface:
    """What we know of one link."""

    name: str
    ifindex: int
    up: bool
    addresses: set[str] = field(default_factory=set)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ifindex": self.ifindex,
            "up": self.up,
            "addresses": sorted(self.addresses),
        }


class InterfaceTable:
    """Links and addresses of the daemon's network namespace, kept current by netlink."""

    def __init__(self) -> None:
        self.by_index: dict[int, Interface] = {}
        self.listeners: list[Listener] = []
        self._events = IPRoute()
        self._events.bind(groups=RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR)
        self._dump()

    def close(self) -> None:
        self._events.close()

    def fileno(self) -> int:
        return int(self._events.fileno())

    def _dump(self) -> None:
        with IPRoute() as ipr:
            for msg in ipr.get_links():
                self._link(msg, notify=False)
            for msg in ipr.get_addr():
                self._addr(msg)

    # ------------------------------------------------------------ queries

    def ifindex_of(self, name: str) -> int | None:
        """The index of a present, administratively up interface, else None."""
        for itf in self.by_index.values():
            if itf.name == name:
                return itf.ifindex if itf.up else None
        return None

    def get(self, name: str) -> Interface | None:
        return next((i for i in self.by_index.values() if i.name == name), None)

    def has_address(self, address: str) -> bool:
        return any(address in i.addresses for i in self.by_index.values())

    def all(self) -> list[Interface]:
        return sorted(self.by_index.values(), key=lambda i: i.ifindex)

    # ------------------------------------------------------------ events

    def handle_readable(self) -> None:
        """Read pending netlink events and tell listeners what changed."""
        try:
            messages = self._events.get()
        except OSError as exc:  # ENOBUFS: we lost events, so re-read everything
            log.warning("netlink event queue overflowed (%s); re-reading interfaces", exc)
            before = {i.name: i.ifindex if i.up else None for i in self.by_index.values()}
            self.by_index.clear()
            self._dump()
            after = {i.name: i.ifindex if i.up else None for i in self.by_index.values()}
            for name in set(before) | set(after):
                if before.get(name) != after.get(name):
                    self._notify(name, after.get(name))
            return
        for msg in messages:
            event = msg.get("event")
            if event in ("RTM_NEWLINK", "RTM_DELLINK"):
                self._link(msg, notify=True)
            elif event in ("RTM_NEWADDR", "RTM_DELADDR"):
                self._addr(msg)

    def _link(self, msg: Any, *, notify: bool) -> None:
        index = int(msg["index"])
        name = msg.get_attr("IFLA_IFNAME")
        old = self.by_index.get(index)
        if msg["event"] == "RTM_DELLINK":
            if old is not None:
                del self.by_index[index]
                if notify:
                    self._notify(old.name, None)
            return
        if name is None:
            return
        up = bool(msg["flags"] & IFF_UP)
        new = Interface(name, index, up, old.addresses if old else set())
        self.by_index[index] = new
        if not notify:
            return
        if old is not None and old.name != name:
            log.info("interface %s renamed to %s", old.name, name)
            self._notify(old.name, None)
        if old is None or old.name != name or old.up != up:
            self._notify(name, index if up else None)

    def _addr(self, msg: Any) -> None:
        itf = self.by_index.get(int(msg["index"]))
        address = msg.get_attr("IFA_ADDRESS")
        if itf is None or address is None:
            return
        if msg["event"] == "RTM_DELADDR":
            itf.addresses.discard(address)
        else:
            itf.addresses.add(address)

    def _notify(self, name: str, ifindex: int | None) -> None:
        state = f"up (index {ifindex})" if ifindex is not None else "gone or down"
        log.info("interface %s is %s", name, state)
        for listener in self.listeners:
            try:
                listener(name, ifindex)
            except Exception:
                log.exception("interface listener failed for %s", name)


def rp_filter(ifname: str) -> int | None:
    """The effective IPv4 rp_filter mode of an interface (max of all and the interface)."""
    values = []
    for scope in ("all", ifname):
        try:
            with open(f"/proc/sys/net/ipv4/conf/{scope}/rp_filter") as f:
                values.append(int(f.read().strip()))
        except (OSError, ValueError):
            return None
    return max(values)


def interface_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True
