"""Constants and binary layouts of the Linux multicast routing API.

Everything here is transcribed from the installed UAPI headers
(``linux/mroute.h``, ``linux/mroute6.h``, ``linux/in6.h``, ``linux/icmpv6.h``,
``linux/sockios.h``) and packed with :mod:`struct` using native alignment,
which is what the kernel expects from a process of the same ABI. The unit tests
compile the real headers and compare sizes, so a layout mistake cannot hide.

Addresses cross this module as packed network-order bytes (4 or 16 bytes);
conversion from text lives in :func:`addr_bytes` / :func:`addr_text`.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

# --- linux/sockios.h -------------------------------------------------------
SIOCPROTOPRIVATE: Final = 0x89E0

# --- linux/mroute.h (IPv4, socket level IPPROTO_IP) ------------------------
MRT_BASE: Final = 200
MRT_INIT: Final = MRT_BASE
MRT_DONE: Final = MRT_BASE + 1
MRT_ADD_VIF: Final = MRT_BASE + 2
MRT_DEL_VIF: Final = MRT_BASE + 3
MRT_ADD_MFC: Final = MRT_BASE + 4
MRT_DEL_MFC: Final = MRT_BASE + 5
MRT_VERSION: Final = MRT_BASE + 6
MRT_ASSERT: Final = MRT_BASE + 7
MRT_PIM: Final = MRT_BASE + 8
MRT_TABLE: Final = MRT_BASE + 9
MRT_ADD_MFC_PROXY: Final = MRT_BASE + 10
MRT_DEL_MFC_PROXY: Final = MRT_BASE + 11
MRT_FLUSH: Final = MRT_BASE + 12

SIOCGETVIFCNT: Final = SIOCPROTOPRIVATE
SIOCGETSGCNT: Final = SIOCPROTOPRIVATE + 1
SIOCGETRPF: Final = SIOCPROTOPRIVATE + 2

MRT_FLUSH_MFC: Final = 1
MRT_FLUSH_MFC_STATIC: Final = 2
MRT_FLUSH_VIFS: Final = 4
MRT_FLUSH_VIFS_STATIC: Final = 8

MAXVIFS: Final = 32

VIFF_TUNNEL: Final = 0x1
VIFF_SRCRT: Final = 0x2
VIFF_REGISTER: Final = 0x4
VIFF_USE_IFINDEX: Final = 0x8

IGMPMSG_NOCACHE: Final = 1
IGMPMSG_WRONGVIF: Final = 2
IGMPMSG_WHOLEPKT: Final = 3
IGMPMSG_WRVIFWHOLE: Final = 4

# --- linux/mroute6.h (IPv6, socket level IPPROTO_IPV6) ---------------------
MRT6_BASE: Final = 200
MRT6_INIT: Final = MRT6_BASE
MRT6_DONE: Final = MRT6_BASE + 1
MRT6_ADD_MIF: Final = MRT6_BASE + 2
MRT6_DEL_MIF: Final = MRT6_BASE + 3
MRT6_ADD_MFC: Final = MRT6_BASE + 4
MRT6_DEL_MFC: Final = MRT6_BASE + 5
MRT6_VERSION: Final = MRT6_BASE + 6
MRT6_ASSERT: Final = MRT6_BASE + 7
MRT6_PIM: Final = MRT6_BASE + 8
MRT6_TABLE: Final = MRT6_BASE + 9
MRT6_ADD_MFC_PROXY: Final = MRT6_BASE + 10
MRT6_DEL_MFC_PROXY: Final = MRT6_BASE + 11
MRT6_FLUSH: Final = MRT6_BASE + 12

SIOCGETMIFCNT_IN6: Final = SIOCPROTOPRIVATE
SIOCGETSGCNT_IN6: Final = SIOCPROTOPRIVATE + 1

MAXMIFS: Final = 32
MIFF_REGISTER: Final = 0x1
IF_SETSIZE: Final = 256
NIFBITS: Final = 32  # bits in one if_mask (__u32)

MRT6MSG_NOCACHE: Final = 1
MRT6MSG_WRONGMIF: Final = 2
MRT6MSG_WHOLEPKT: Final = 3
MRT6MSG_WRMIFWHOLE: Final = 4

# --- linux/icmpv6.h ----------------------------------------------------------
SOL_ICMPV6: Final = 58  # == IPPROTO_ICMPV6
ICMPV6_FILTER: Final = 1
ICMP6_FILTER_SIZE: Final = 32  # struct icmp6_filter { __u32 data[8]; }

# --- layouts ----------------------------------------------------------------
# struct vifctl: vifi_t(u16) flags(u8) threshold(u8) rate_limit(uint)
#   union{in_addr lcl_addr; int lcl_ifindex} in_addr rmt_addr   -> 16 bytes
VIFCTL: Final = struct.Struct("@HBBIi4s")
# struct mfcctl: in_addr origin, in_addr group, vifi_t parent, u8 ttls[32],
#   then 2 bytes of padding before uint pkt_cnt, byte_cnt, wrong_if, int expire
MFCCTL: Final = struct.Struct(f"@4s4sH{MAXVIFS}sIIIi")
# struct sioc_sg_req: in_addr src, grp; unsigned long pktcnt, bytecnt, wrong_if
SIOC_SG_REQ: Final = struct.Struct("@4s4sLLL")
# struct sioc_vif_req: vifi_t vifi (+6 pad); unsigned long icount ocount ibytes obytes
SIOC_VIF_REQ: Final = struct.Struct("@HLLLL")
# struct igmpmsg: u32 unused1, unused2; u8 msgtype, mbz, vif, vif_hi; in_addr src, dst.
# It is overlaid on the IPv4 header: im_mbz is the protocol byte, src/dst are
# the header's addresses.
IGMPMSG: Final = struct.Struct("@IIBBBB4s4s")

# struct sockaddr_in6: u16 family, be16 port, be32 flowinfo, in6_addr, u32 scope_id
SOCKADDR_IN6: Final = struct.Struct("@HHI16sI")
# struct mif6ctl: mifi_t mifi, u8 flags, u8 threshold, u16 pifi (ifindex!), (2 pad),
#   uint rate_limit -> 12 bytes
MIF6CTL: Final = struct.Struct("@HBBHI")
# struct mf6cctl: sockaddr_in6 origin, sockaddr_in6 group, mifi_t parent, (2 pad),
#   if_set { u32 ifs_bits[8] } -> 92 bytes
MF6CCTL: Final = struct.Struct(
    f"@{SOCKADDR_IN6.size}s{SOCKADDR_IN6.size}sH{IF_SETSIZE // NIFBITS}I"
)
# struct sioc_sg_req6: sockaddr_in6 src, grp; unsigned long pktcnt, bytecnt, wrong_if
SIOC_SG_REQ6: Final = struct.Struct(f"@{SOCKADDR_IN6.size}s{SOCKADDR_IN6.size}sLLL")
# struct sioc_mif_req6: same shape as sioc_vif_req
SIOC_MIF_REQ6: Final = struct.Struct("@HLLLL")
# struct mrt6msg: u8 mbz, u8 msgtype, u16 mif, u32 pad, in6_addr src, dst.
# Delivered as the ICMPv6 payload; im6_mbz sits where an ICMPv6 type would.
MRT6MSG: Final = struct.Struct("@BBHI16s16s")
# MRT6_DEL_MIF takes a bare mifi_t.
MIFI: Final = struct.Struct("@H")
INT: Final = struct.Struct("@i")


def addr_bytes(family: int, text: str | None) -> bytes:
    """Pack a textual address (None = the unspecified address) for the kernel."""
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    if text is None:
        return bytes(4 if family == 4 else 16)
    return socket.inet_pton(af, text)


def addr_text(family: int, raw: bytes) -> str:
    """Unpack a kernel address into canonical text."""
    return socket.inet_ntop(socket.AF_INET if family == 4 else socket.AF_INET6, raw)


def _sockaddr_in6(addr: bytes) -> bytes:
    return SOCKADDR_IN6.pack(socket.AF_INET6, 0, 0, addr, 0)


def pack_vifctl(vifi: int, ifindex: int, threshold: int = 1) -> bytes:
    """A ``vifctl`` that names the interface by index (VIFF_USE_IFINDEX)."""
    return VIFCTL.pack(vifi, VIFF_USE_IFINDEX, threshold, 0, ifindex, bytes(4))


def pack_mfcctl(origin: bytes, group: bytes, parent: int, ttls: Mapping[int, int]) -> bytes:
    """An ``mfcctl``; ``ttls`` maps vif slot -> TTL threshold (absent = not forwarded)."""
    arr = bytearray(MAXVIFS)
    for vifi, ttl in ttls.items():
        arr[vifi] = ttl
    return MFCCTL.pack(origin, group, parent, bytes(arr), 0, 0, 0, 0)


def pack_sioc_sg_req(src: bytes, grp: bytes) -> bytes:
    """Request buffer for ``SIOCGETSGCNT``."""
    return SIOC_SG_REQ.pack(src, grp, 0, 0, 0)


def pack_sioc_vif_req(vifi: int) -> bytes:
    """Request buffer for ``SIOCGETVIFCNT`` (and ``SIOCGETMIFCNT_IN6``)."""
    return SIOC_VIF_REQ.pack(vifi, 0, 0, 0, 0)


def pack_mif6ctl(mifi: int, ifindex: int, threshold: int = 1) -> bytes:
    """A ``mif6ctl`` for a plain (non-register) MIF on interface ``ifindex``."""
    return MIF6CTL.pack(mifi, 0, threshold, ifindex, 0)


def pack_mf6cctl(origin: bytes, group: bytes, parent: int, oifs: Iterable[int]) -> bytes:
    """An ``mf6cctl``; IPv6 has no per-MIF threshold in the MFC, only a bitmap."""
    bits = [0] * (IF_SETSIZE // NIFBITS)
    for mifi in oifs:
        bits[mifi // NIFBITS] |= 1 << (mifi % NIFBITS)
    return MF6CCTL.pack(_sockaddr_in6(origin), _sockaddr_in6(group), parent, *bits)


def pack_sioc_sg_req6(src: bytes, grp: bytes) -> bytes:
    """Request buffer for ``SIOCGETSGCNT_IN6``."""
    return SIOC_SG_REQ6.pack(_sockaddr_in6(src), _sockaddr_in6(grp), 0, 0, 0)


@dataclass(frozen=True, slots=True)
class SgCount:
    """Kernel counters of one MFC entry."""

    packets: int
    bytes: int
    wrong_if: int


@dataclass(frozen=True, slots=True)
class VifCount:
    """Kernel counters of one VIF/MIF."""

    in_packets: int
    out_packets: int
    in_bytes: int
    out_bytes: int


def unpack_sg_count(family: int, buf: bytes) -> SgCount:
    """Counters from a filled ``sioc_sg_req`` / ``sioc_sg_req6``."""
    layout = SIOC_SG_REQ if family == 4 else SIOC_SG_REQ6
    _src, _grp, pkts, nbytes, wrong = layout.unpack(buf)
    return SgCount(pkts, nbytes, wrong)


def unpack_vif_count(buf: bytes) -> VifCount:
    """Counters from a filled ``sioc_vif_req`` / ``sioc_mif_req6``."""
    _vifi, icount, ocount, ibytes, obytes = SIOC_VIF_REQ.unpack(buf)
    return VifCount(icount, ocount, ibytes, obytes)


@dataclass(frozen=True, slots=True)
class RawUpcall:
    """An upcall decoded from the wire, addresses still packed."""

    msgtype: int
    vif: int
    source: bytes
    group: bytes


def unpack_igmpmsg(data: bytes) -> RawUpcall | None:
    """Decode an IPv4 upcall; None for real IGMP (``im_mbz`` is the IP protocol, 2)."""
    if len(data) < IGMPMSG.size:
        return None
    _u1, _u2, msgtype, mbz, vif, vif_hi, src, dst = IGMPMSG.unpack_from(data)
    if mbz != 0:
        return None
    return RawUpcall(msgtype, vif | (vif_hi << 8), src, dst)


def unpack_mrt6msg(data: bytes) -> RawUpcall | None:
    """Decode an IPv6 upcall; None for real ICMPv6 (``im6_mbz`` is the ICMPv6 type)."""
    if len(data) < MRT6MSG.size:
        return None
    mbz, msgtype, mif, _pad, src, dst = MRT6MSG.unpack_from(data)
    if mbz != 0:
        return None
    return RawUpcall(msgtype, mif, src, dst)
