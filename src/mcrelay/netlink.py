"""Interface watcher: the supervisor's view of links and addresses.

Level-triggered by design. A plain rtnetlink socket subscribed to link and
address changes is only a *doorbell*: whatever it says, its bytes are drained
and thrown away, and the table is re-read whole from the kernel with a
pyroute2 dump. So an event that was lost (ENOBUFS after a burst), coalesced,
or queued inside some pyroute2 version's own reader can never leave the table
stale, and events are never applied late or out of order: the table is always
what the kernel said last.

Interfaces are identified by (name, ifindex): a link deleted and re-created
under the same name, or renamed away and back, is a change even when it ends
with the same name. :attr:`InterfaceTable.generation` counts changes so that
engines can tell cheaply whether anything moved since they last converged.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pyroute2 import IPRoute

IFF_UP = 0x1
# <linux/rtnetlink.h> multicast groups (RTMGRP_*): the bitmask bind() takes.
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100
NETLINK_ROUTE = 0
DOORBELL_RCVBUF = 1 << 20
LAST_INDEX_MAX = 4096

log = logging.getLogger("mcrelay.netlink")


@dataclass
class Interface:
    """What we know of one link."""

    name: str
    ifindex: int
    up: bool
    addresses: set[str] = field(default_factory=set)
    broadcasts: set[str] = field(default_factory=set)  # IPv4 directed broadcasts (IFA_BROADCAST)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ifindex": self.ifindex,
            "up": self.up,
            "addresses": sorted(self.addresses),
        }


Dump = Callable[[], tuple[list[Any], list[Any]]]


def _pyroute2_dump(ipr: IPRoute) -> Dump:
    def dump() -> tuple[list[Any], list[Any]]:
        return list(ipr.get_links()), list(ipr.get_addr())

    return dump


class InterfaceTable:
    """Links and addresses of the daemon's network namespace, re-read on every change.

    ``dump`` (tests pass a fake) returns the kernel's link and address
    messages; ``doorbell`` False skips the netlink subscription (unit tests).
    """

    def __init__(self, dump: Dump | None = None, *, doorbell: bool = True) -> None:
        self.by_index: dict[int, Interface] = {}
        self._by_name: dict[str, Interface] = {}
        self.generation = 0
        self.stale = False
        # name -> the index it last had, to tell a rename from a deletion;
        # bounded, since names come and go (a burst of veths).
        self._last_index: dict[str, int] = {}
        self._ipr: IPRoute | None = None
        if dump is None:
            self._ipr = IPRoute()
            dump = _pyroute2_dump(self._ipr)
        self._dump = dump
        self._bell: socket.socket | None = None
        if doorbell:
            self._bell = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
            self._bell.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, DOORBELL_RCVBUF)
            self._bell.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
            self._bell.setblocking(False)
        self.refresh(notify=False)

    def close(self) -> None:
        if self._bell is not None:
            self._bell.close()
        if self._ipr is not None:
            self._ipr.close()

    def fileno(self) -> int:
        assert self._bell is not None, "no doorbell socket"
        return self._bell.fileno()

    # ------------------------------------------------------------ queries

    def ifindex_of(self, name: str) -> int | None:
        """The index of a present, administratively up interface, else None."""
        itf = self._by_name.get(name)
        return itf.ifindex if itf is not None and itf.up else None

    def get(self, name: str) -> Interface | None:
        return self._by_name.get(name)

    def has_address(self, address: str) -> bool:
        return any(address in i.addresses for i in self.by_index.values())

    def receives_on(self, address: str) -> bool:
        """True if packets to this unicast or directed broadcast address reach this host."""
        return any(
            address in i.addresses or address in i.broadcasts for i in self.by_index.values()
        )

    def why_unusable(self, name: str) -> str | None:
        """Why a rule cannot use interface ``name`` now (None: present and up).

        ``interface renamed to X`` when the index the name last had now has
        another name; ``interface missing`` for a name never seen or deleted.
        """
        itf = self._by_name.get(name)
        if itf is not None:
            return None if itf.up else "interface down"
        last = self._last_index.get(name)
        moved = self.by_index.get(last) if last is not None else None
        if moved is not None:
            return f"interface renamed to {moved.name}"
        return "interface missing"

    def all(self) -> list[Interface]:
        return sorted(self.by_index.values(), key=lambda i: i.ifindex)

    # ------------------------------------------------------------ events

    def handle_readable(self) -> None:
        """Drain the doorbell; the table is re-read by :meth:`refresh` (see ``stale``)."""
        assert self._bell is not None
        while True:
            try:
                if not self._bell.recv(65536):
                    break
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                # ENOBUFS: events were lost. Nothing to recover: we re-read everything.
                if exc.errno != errno.ENOBUFS:
                    log.warning("netlink doorbell: %s", exc)
            self.stale = True

    def refresh(self, *, notify: bool = True) -> frozenset[str]:
        """Re-read links and addresses; return the names whose (index, up) changed."""
        self.stale = False
        links, addrs = self._dump()
        by_index: dict[int, Interface] = {}
        for msg in links:
            name = msg.get_attr("IFLA_IFNAME")
            if name is None:
                continue
            index = int(msg["index"])
            by_index[index] = Interface(name, index, bool(msg["flags"] & IFF_UP))
        for msg in addrs:
            itf = by_index.get(int(msg["index"]))
            address = msg.get_attr("IFA_ADDRESS")
            if itf is not None and address is not None:
                itf.addresses.add(address)
            brd = msg.get_attr("IFA_BROADCAST") if itf is not None else None
            if itf is not None and brd is not None:
                itf.broadcasts.add(brd)
        before = {i.name: (i.ifindex, i.up) for i in self.by_index.values()}
        after = {i.name: (i.ifindex, i.up) for i in by_index.values()}
        changed = frozenset(
            n for n in before.keys() | after.keys() if before.get(n) != after.get(n)
        )
        addresses_moved = {i.ifindex: i.addresses for i in self.by_index.values()} != {
            i.ifindex: i.addresses for i in by_index.values()
        }
        self.by_index = by_index
        self._by_name = {i.name: i for i in by_index.values()}
        if len(self._last_index) > LAST_INDEX_MAX:
            self._last_index.clear()
        self._last_index.update((i.name, i.ifindex) for i in by_index.values())
        if changed or addresses_moved:
            self.generation += 1
        if changed and notify:
            for name in sorted(changed):
                self._log_change(name, before.get(name), after.get(name))
        return changed

    @staticmethod
    def _log_change(
        name: str, before: tuple[int, bool] | None, after: tuple[int, bool] | None
    ) -> None:
        if after is None:
            log.info("interface %s is gone", name)
        elif before is not None and before[0] != after[0]:
            log.info("interface %s has a new index %d (was %d)", name, after[0], before[0])
        elif after[1]:
            log.info("interface %s is up (index %d)", name, after[0])
        else:
            log.info("interface %s is down (index %d)", name, after[0])


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
