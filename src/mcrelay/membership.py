"""Standing IGMP/MLD memberships held by the supervisor.

For each (interface, group[, source]) one UDP socket is joined to the group so
the kernel sends reports and switches deliver the stream; the relay itself
reads from AF_PACKET or its own socket. These sockets are never read: a drop-all
BPF filter and a one-byte receive buffer keep them from queueing anything.

A join is reference-counted (relays and explicit ``group join`` share it). The
kernel allows ``net.ipv4.igmp_max_memberships`` (20 by default) groups per
socket, so joins are spread over as many sockets as needed, never putting the
same group on one socket twice (which also keeps ASM and SSM joins of one group
apart).

Interfaces come and go: :meth:`Membership.reconcile` (called by the
supervisor after every interface change and retried until it succeeds)
makes every join match its interface's current index, whoever asked for the
join, so a standing ``group join`` on a missing or flapping interface comes
back as surely as a relay's.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from mcrelay.errors import KernelRefused
from mcrelay.model import GroupJoin, ifname_matches, is_wildcard
from mcrelay.net import bpf
from mcrelay.net.mcast import join as mcast_join
from mcrelay.net.mcast import leave as mcast_leave

GROUPS_PER_SOCKET = 20

JoinKey = tuple[str, str, str | None]  # iface, group, source


@dataclass
class _Sock:
    sock: socket.socket
    groups: set[str] = field(default_factory=set)


@dataclass
class _Join:
    refs: int
    ifindex: int | None = None
    sock: _Sock | None = None
    error: str | None = None
    errno: int = 0


class Membership:
    """Refcounted group joins per (interface, group, source), packed into sockets."""

    def __init__(self, ifindex_of: Callable[[str], int | None], log: logging.Logger) -> None:
        self._ifindex_of = ifindex_of
        self._log = log
        self._joins: dict[JoinKey, _Join] = {}
        self._socks: dict[tuple[str, int], list[_Sock]] = {}  # (iface, family)

    def join(self, iface: str, group: str, source: str | None = None) -> None:
        """Take a reference; the first one joins (now, or when the interface appears).

        Raises KernelRefused if the kernel refuses the join on a present interface;
        the reference is not taken then.
        """
        key = (iface, group, source)
        j = self._joins.get(key)
        if j is not None:
            j.refs += 1
            return
        j = _Join(1)
        ifindex = self._ifindex_of(iface)
        if ifindex is not None:
            self._do_join(key, j, ifindex)
            if j.error is not None:
                raise KernelRefused(f"join {group} on {iface}", j.errno, j.error)
        self._joins[key] = j

    def leave(self, iface: str, group: str, source: str | None = None) -> bool:
        """Drop a reference; the last one leaves. False if there was no such join."""
        key = (iface, group, source)
        j = self._joins.get(key)
        if j is None:
            return False
        j.refs -= 1
        if j.refs <= 0:
            self._undo_join(key, j)
            del self._joins[key]
        return True

    def refs(self, iface: str, group: str, source: str | None = None) -> int:
        j = self._joins.get((iface, group, source))
        return 0 if j is None else j.refs

    def reconcile(self) -> None:
        """Make every join match its interface now: joined on its current index, or waiting.

        Raises KernelRefused (after trying every interface) if a join on a
        present interface failed, so the caller retries later.
        """
        failed: list[str] = []
        for iface in sorted({key[0] for key in self._joins}):
            ifindex = self._ifindex_of(iface)
            joins = [(key, j) for key, j in self._joins.items() if key[0] == iface]
            if ifindex is None:
                if any(j.sock is not None or j.error for _, j in joins):
                    self.drop(iface)
                continue
            if any(j.ifindex not in (None, ifindex) for _, j in joins):
                self.drop(iface)  # re-created under the same name: the old index is dead
            for key, j in joins:
                if j.sock is None:
                    self._do_join(key, j, ifindex)
                    if j.error is not None:
                        failed.append(f"{key[1]} on {iface}: {j.error}")
        if failed:
            raise KernelRefused(f"join {'; '.join(failed)}", 0, "will retry")

    def rejoin(self, iface: str, ifindex: int) -> None:
        """The interface (re)appeared, possibly with a new index: join everything on it again."""
        self.drop(iface)
        for key, j in self._joins.items():
            if key[0] == iface:
                self._do_join(key, j, ifindex)

    def drop(self, iface: str) -> None:
        """The interface went away: close its sockets; the joins wait for :meth:`rejoin`."""
        for key, j in self._joins.items():
            if key[0] == iface:
                j.sock, j.ifindex, j.error = None, None, None
        for fam in (4, 6):
            for s in self._socks.pop((iface, fam), []):
                s.sock.close()

    def close(self) -> None:
        for socks in self._socks.values():
            for s in socks:
                s.sock.close()
        self._socks.clear()
        self._joins.clear()

    def list(self) -> list[dict[str, Any]]:
        """For ``show groups``: one entry per join, with its state and reference count."""
        out = []
        for (iface, group, source), j in sorted(
            self._joins.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or "")
        ):
            state = "joined" if j.sock else ("error" if j.error else "waiting")
            d: dict[str, Any] = {
                "iface": iface,
                "group": group,
                "source": source or "*",
                "refs": j.refs,
                "state": state,
            }
            if j.error:
                d["error"] = j.error
            out.append(d)
        return out

    def sockets(self) -> int:
        """Number of membership sockets open (for tests and status)."""
        return sum(len(v) for v in self._socks.values())

    # ------------------------------------------------------------ internals

    def _do_join(self, key: JoinKey, j: _Join, ifindex: int) -> None:
        iface, group, source = key
        family = 6 if ":" in group else 4
        pool = self._socks.setdefault((iface, family), [])
        slot = next(
            (s for s in pool if group not in s.groups and len(s.groups) < GROUPS_PER_SOCKET),
            None,
        )
        try:
            if slot is None:
                slot = _Sock(self._open(family))
                pool.append(slot)
            mcast_join(slot.sock, family, ifindex, group, source)
        except OSError as exc:
            j.error, j.errno = f"{exc.strerror or exc}", exc.errno or 0
            self._log.warning("cannot join %s on %s: %s", group, iface, j.error)
            if slot is not None and not slot.groups:
                pool.remove(slot)
                slot.sock.close()
            return
        slot.groups.add(group)
        j.sock, j.ifindex, j.error = slot, ifindex, None

    def _undo_join(self, key: JoinKey, j: _Join) -> None:
        iface, group, _ = key
        slot = j.sock
        if slot is None:
            return
        family = 6 if ":" in group else 4
        slot.groups.discard(group)
        try:
            mcast_leave(slot.sock, family, j.ifindex or 0, group, key[2])
        except OSError as exc:
            self._log.debug("leave %s on %s: %s", group, iface, exc)
        if not slot.groups:
            pool = self._socks.get((iface, family), [])
            if slot in pool:
                pool.remove(slot)
            slot.sock.close()

    @staticmethod
    def _open(family: int) -> socket.socket:
        s = socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            bpf.attach(s, bpf.drop_all())
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        except BaseException:
            s.close()
            raise
        return s


class GroupJoins:
    """`group join` rules on top of the shared membership sockets (the service's view).

    A rule on a wildcard (``vlan+``) holds its joins on every interface whose
    name matches, now and later: :meth:`reconcile` (a part of the
    supervisor's reconciler) joins on interfaces that appear and leaves those
    that are gone. ``names`` lists the interface names there are.
    """

    def __init__(self, membership: Membership, names: Callable[[], Iterable[str]] = tuple) -> None:
        self.membership = membership
        self._names = names
        self._wild: dict[GroupJoin, set[str]] = {}  # wildcard rule -> interfaces it holds

    def join(self, join: GroupJoin) -> None:
        """Join every (group, source) of the rule, or none of them."""
        if is_wildcard(join.iface):
            self._wild[join] = set()
            try:
                self._follow(join)
            except BaseException:
                self.leave(join)
                raise
            return
        self._join_on(join, join.iface)

    def leave(self, join: GroupJoin) -> None:
        if is_wildcard(join.iface):
            for iface in self._wild.pop(join, set()):
                self._leave_on(join, iface)
            return
        self._leave_on(join, join.iface)

    def reconcile(self) -> None:
        """Wildcard rules follow the interfaces: join on new matches, leave vanished ones."""
        for join in list(self._wild):
            self._follow(join)

    def list(self) -> list[dict[str, Any]]:
        return self.membership.list()

    def _follow(self, join: GroupJoin) -> None:
        held = self._wild[join]
        present = {n for n in self._names() if ifname_matches(join.iface, n)}
        for iface in sorted(held - present):
            self._leave_on(join, iface)
            held.discard(iface)
        for iface in sorted(present - held):
            self._join_on(join, iface)
            held.add(iface)

    def _join_on(self, join: GroupJoin, iface: str) -> None:
        done: list[tuple[str, str | None]] = []
        try:
            for group, source in join.expand():
                self.membership.join(iface, group, source)
                done.append((group, source))
        except BaseException:
            for group, source in done:
                self.membership.leave(iface, group, source)
            raise

    def _leave_on(self, join: GroupJoin, iface: str) -> None:
        for group, source in join.expand():
            self.membership.leave(iface, group, source)
