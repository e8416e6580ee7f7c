"""The multicast routing socket: the one channel to the kernel MFC, per family.

IPv4 uses a raw IGMP socket with ``MRT_*`` options, IPv6 a raw ICMPv6 socket
with ``MRT6_*`` options. Besides programming VIFs/MIFs and MFC entries the same
socket receives the kernel's upcalls (NOCACHE and friends), so it is also a
readable file descriptor for the supervisor's event loop.

Every ``OSError`` from the kernel leaves this module as :class:`KernelRefused`
naming the operation, so callers never have to guess what failed.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import logging
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from ..errors import KernelRefused
from . import structs as s

log = logging.getLogger(__name__)

_RECV_SIZE = 65536
# A burst of real IGMP/MLD or upcalls is drained per call up to this many
# datagrams, so one busy socket cannot starve the event loop.
_MAX_READ = 256


class UpcallKind(enum.IntEnum):
    """Upcall message types; the v4 and v6 numbers coincide."""

    NOCACHE = 1
    WRONGVIF = 2
    WHOLEPKT = 3
    WRVIFWHOLE = 4


@dataclass(frozen=True, slots=True)
class Upcall:
    """A kernel report about a packet from ``source`` to ``group`` that arrived on ``vif``.

    NOCACHE: no MFC entry exists yet (the (*,G) learning trigger); WRONGVIF:
    it came in on a VIF other than the entry's parent (only with MRT_ASSERT).
    """

    family: int
    kind: UpcallKind | int
    vif: int
    source: str
    group: str


class MrouteApi(Protocol):
    """What the engine needs from a multicast routing socket (real or fake)."""

    @property
    def family(self) -> int: ...

    def fileno(self) -> int: ...

    def add_vif(self, slot: int, ifindex: int) -> None: ...

    def del_vif(self, slot: int) -> None: ...

    def add_mfc(self, source: str, group: str, parent: int, oifs: Mapping[int, int]) -> None: ...

    def del_mfc(self, source: str, group: str) -> None: ...

    def sg_count(self, source: str, group: str) -> s.SgCount | None: ...

    def read_upcalls(self) -> list[Upcall]: ...

    def close(self) -> None: ...


def _refused(op: str, exc: OSError, detail: str = "") -> KernelRefused:
    return KernelRefused(op, exc.errno if exc.errno is not None else errno.EIO, detail)


class MrouteSocket:
    """The kernel multicast routing socket of one address family (4 or 6).

    Opening it performs ``MRT_INIT``/``MRT6_INIT``, which makes this process the
    multicast router of the network namespace (only one per namespace and
    table: a second one gets EADDRINUSE). :meth:`close` undoes it.

    ``table`` (non-zero) binds the socket to that multicast routing table with
    ``MRT_TABLE``/``MRT6_TABLE`` before the init, so several daemons can route
    side by side (``ip mrule`` picks the table per packet); 0 is the kernel's
    default table.
    """

    def __init__(self, family: int, table: int = 0) -> None:
        if family not in (4, 6):
            raise ValueError(f"family must be 4 or 6, got {family}")
        self._family = family
        if family == 4:
            self._level = socket.IPPROTO_IP
            self._init_op, self._init_name = s.MRT_INIT, "MRT_INIT"
            af, proto = socket.AF_INET, socket.IPPROTO_IGMP
        else:
            self._level = socket.IPPROTO_IPV6
            self._init_op, self._init_name = s.MRT6_INIT, "MRT6_INIT"
            af, proto = socket.AF_INET6, socket.IPPROTO_ICMPV6
        try:
            self._sock = socket.socket(af, socket.SOCK_RAW, proto)
        except OSError as exc:
            raise _refused("socket", exc, f"raw IPv{family} mroute socket") from exc
        try:
            self._sock.setblocking(False)
            if table:
                opt, name = (
                    (s.MRT_TABLE, "MRT_TABLE") if family == 4 else (s.MRT6_TABLE, "MRT6_TABLE")
                )
                try:
                    self._sock.setsockopt(self._level, opt, struct.pack("=I", table))
                except OSError as exc:
                    detail = f"table {table}"
                    if exc.errno == errno.ENOPROTOOPT:
                        detail += ": this kernel has no multiple multicast routing tables"
                    raise _refused(name, exc, detail) from exc
            try:
                self._sock.setsockopt(self._level, self._init_op, s.INT.pack(1))
            except OSError as exc:
                detail = ""
                if exc.errno == errno.EADDRINUSE:
                    detail = (
                        "another multicast router (smcroute, pimd, mcrelayd?) already runs here"
                    )
                raise _refused(self._init_name, exc, detail) from exc
            if family == 6:
                # Upcalls are queued to the socket directly and bypass the
                # ICMPv6 type filter; blocking every type keeps ping, ND and
                # MLD traffic out of our receive queue.
                self._sock.setsockopt(s.SOL_ICMPV6, s.ICMPV6_FILTER, b"\xff" * s.ICMP6_FILTER_SIZE)
        except BaseException:
            self._sock.close()
            raise
        self._closed = False

    @property
    def family(self) -> int:
        """4 or 6."""
        return self._family

    def fileno(self) -> int:
        """The socket's file descriptor, readable when upcalls are queued."""
        return self._sock.fileno()

    def _setopt(self, opt: int, name: str, value: bytes, detail: str = "") -> None:
        try:
            self._sock.setsockopt(self._level, opt, value)
        except OSError as exc:
            raise _refused(name, exc, detail) from exc

    def add_vif(self, slot: int, ifindex: int) -> None:
        """Create VIF/MIF ``slot`` on interface ``ifindex``."""
        detail = f"slot {slot}, ifindex {ifindex}"
        if self._family == 4:
            self._setopt(s.MRT_ADD_VIF, "MRT_ADD_VIF", s.pack_vifctl(slot, ifindex), detail)
        else:
            if ifindex > 0xFFFF:
                # mif6ctl.mif6c_pifi is a __u16.
                raise KernelRefused("MRT6_ADD_MIF", errno.ERANGE, f"{detail}: index over 65535")
            self._setopt(s.MRT6_ADD_MIF, "MRT6_ADD_MIF", s.pack_mif6ctl(slot, ifindex), detail)

    def del_vif(self, slot: int) -> None:
        """Delete VIF/MIF ``slot``."""
        if self._family == 4:
            self._setopt(s.MRT_DEL_VIF, "MRT_DEL_VIF", s.pack_vifctl(slot, 0), f"slot {slot}")
        else:
            self._setopt(s.MRT6_DEL_MIF, "MRT6_DEL_MIF", s.MIFI.pack(slot), f"slot {slot}")

    def add_mfc(self, source: str, group: str, parent: int, oifs: Mapping[int, int]) -> None:
        """Add or replace the MFC entry (source, group) arriving on ``parent``.

        ``oifs`` maps output slot -> TTL threshold. IPv6 has no thresholds in
        the MFC; there only the set of slots counts.
        """
        f = self._family
        src, grp = s.addr_bytes(f, source), s.addr_bytes(f, group)
        detail = f"({source}, {group}) iif slot {parent}"
        if f == 4:
            self._setopt(
                s.MRT_ADD_MFC, "MRT_ADD_MFC", s.pack_mfcctl(src, grp, parent, oifs), detail
            )
        else:
            buf = s.pack_mf6cctl(src, grp, parent, oifs.keys())
            self._setopt(s.MRT6_ADD_MFC, "MRT6_ADD_MFC", buf, detail)

    def del_mfc(self, source: str, group: str) -> None:
        """Delete the MFC entry (source, group); the kernel keys it without the iif."""
        f = self._family
        src, grp = s.addr_bytes(f, source), s.addr_bytes(f, group)
        detail = f"({source}, {group})"
        if f == 4:
            self._setopt(s.MRT_DEL_MFC, "MRT_DEL_MFC", s.pack_mfcctl(src, grp, 0, {}), detail)
        else:
            self._setopt(s.MRT6_DEL_MFC, "MRT6_DEL_MFC", s.pack_mf6cctl(src, grp, 0, ()), detail)

    def sg_count(self, source: str, group: str) -> s.SgCount | None:
        """Kernel counters of (source, group); None when the kernel has no such entry."""
        f = self._family
        src, grp = s.addr_bytes(f, source), s.addr_bytes(f, group)
        if f == 4:
            req, op = s.pack_sioc_sg_req(src, grp), s.SIOCGETSGCNT
        else:
            req, op = s.pack_sioc_sg_req6(src, grp), s.SIOCGETSGCNT_IN6
        try:
            out = fcntl.ioctl(self._sock.fileno(), op, req)
        except OSError as exc:
            if exc.errno in (errno.EADDRNOTAVAIL, errno.ENOENT):
                return None
            raise _refused("SIOCGETSGCNT", exc, f"({source}, {group})") from exc
        return s.unpack_sg_count(f, out)

    def vif_count(self, slot: int) -> s.VifCount | None:
        """Kernel counters of VIF/MIF ``slot``; None when the slot is empty."""
        op = s.SIOCGETVIFCNT if self._family == 4 else s.SIOCGETMIFCNT_IN6
        try:
            out = fcntl.ioctl(self._sock.fileno(), op, s.pack_sioc_vif_req(slot))
        except OSError as exc:
            if exc.errno in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.EINVAL):
                return None
            raise _refused("SIOCGETVIFCNT", exc, f"slot {slot}") from exc
        return s.unpack_vif_count(out)

    def read_upcalls(self) -> list[Upcall]:
        """Drain queued datagrams without blocking; return the upcalls among them.

        Real IGMP (IPv4) arrives on the same socket and is skipped.
        """
        decode = s.unpack_igmpmsg if self._family == 4 else s.unpack_mrt6msg
        result: list[Upcall] = []
        for _ in range(_MAX_READ):
            try:
                data = self._sock.recv(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            raw = decode(data)
            if raw is None:
                continue
            try:
                kind: UpcallKind | int = UpcallKind(raw.msgtype)
            except ValueError:
                kind = raw.msgtype
            result.append(
                Upcall(
                    self._family,
                    kind,
                    raw.vif,
                    s.addr_text(self._family, raw.source),
                    s.addr_text(self._family, raw.group),
                )
            )
        return result

    def close(self) -> None:
        """``MRT_DONE``/``MRT6_DONE`` (the kernel drops our VIFs and MFC) and close."""
        if self._closed:
            return
        self._closed = True
        done, name = (s.MRT_DONE, "MRT_DONE") if self._family == 4 else (s.MRT6_DONE, "MRT6_DONE")
        try:
            self._sock.setsockopt(self._level, done, s.INT.pack(0))
        except OSError as exc:
            log.warning("%s failed: %s", name, exc)
        finally:
            self._sock.close()
