"""Struct layouts and constants checked against the installed kernel headers."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
from pathlib import Path

import pytest

from mcrelay.kernel import structs as s

C_PROGRAM = r"""
#include <stdio.h>
#include <stddef.h>
#include <netinet/in.h>
#include <linux/mroute.h>
#include <linux/mroute6.h>
#include <linux/icmpv6.h>
#define P(x) printf(#x " %ld\n", (long)(x))
int main(void) {
    P(sizeof(struct vifctl)); P(sizeof(struct mfcctl)); P(sizeof(struct sioc_sg_req));
    P(sizeof(struct sioc_vif_req)); P(sizeof(struct igmpmsg));
    P(sizeof(struct mif6ctl)); P(sizeof(struct mf6cctl)); P(sizeof(struct sioc_sg_req6));
    P(sizeof(struct sioc_mif_req6)); P(sizeof(struct mrt6msg)); P(sizeof(struct sockaddr_in6));
    P(offsetof(struct vifctl, vifc_lcl_ifindex)); P(offsetof(struct vifctl, vifc_rmt_addr));
    P(offsetof(struct mfcctl, mfcc_parent)); P(offsetof(struct mfcctl, mfcc_ttls));
    P(offsetof(struct mfcctl, mfcc_pkt_cnt));
    P(offsetof(struct sioc_sg_req, pktcnt)); P(offsetof(struct sioc_vif_req, icount));
    P(offsetof(struct igmpmsg, im_msgtype)); P(offsetof(struct igmpmsg, im_mbz));
    P(offsetof(struct igmpmsg, im_vif)); P(offsetof(struct igmpmsg, im_src));
    P(offsetof(struct mif6ctl, mif6c_pifi)); P(offsetof(struct mif6ctl, vifc_rate_limit));
    P(offsetof(struct mf6cctl, mf6cc_parent)); P(offsetof(struct mf6cctl, mf6cc_ifset));
    P(offsetof(struct sioc_sg_req6, pktcnt));
    P(offsetof(struct mrt6msg, im6_mif)); P(offsetof(struct mrt6msg, im6_src));
    P(MRT_INIT); P(MRT_DONE); P(MRT_ADD_VIF); P(MRT_DEL_VIF); P(MRT_ADD_MFC); P(MRT_DEL_MFC);
    P(MRT_ASSERT); P(MRT_TABLE); P(MRT_FLUSH);
    P(MRT6_INIT); P(MRT6_DONE); P(MRT6_ADD_MIF); P(MRT6_DEL_MIF); P(MRT6_ADD_MFC);
    P(MRT6_DEL_MFC); P(MRT6_ASSERT); P(MRT6_FLUSH);
    P(SIOCGETVIFCNT); P(SIOCGETSGCNT); P(SIOCGETMIFCNT_IN6); P(SIOCGETSGCNT_IN6);
    P(MAXVIFS); P(MAXMIFS); P(VIFF_USE_IFINDEX); P(VIFF_REGISTER); P(MIFF_REGISTER);
    P(IGMPMSG_NOCACHE); P(IGMPMSG_WRONGVIF); P(IGMPMSG_WHOLEPKT); P(IGMPMSG_WRVIFWHOLE);
    P(MRT6MSG_NOCACHE); P(MRT6MSG_WRONGMIF); P(MRT6MSG_WHOLEPKT); P(MRT6MSG_WRMIFWHOLE);
    P(ICMPV6_FILTER); P(sizeof(struct icmp6_filter));
    return 0;
}
"""


@pytest.fixture(scope="module")
def header_facts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not Path("/usr/include/linux/mroute.h").exists():
        pytest.skip("needs a C compiler and the kernel headers")
    d = tmp_path_factory.mktemp("hdr")
    (d / "facts.c").write_text(C_PROGRAM)
    subprocess.run([cc, "-o", str(d / "facts"), str(d / "facts.c")], check=True)
    out = subprocess.run([str(d / "facts")], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.rsplit(" ", 1) for line in out.splitlines())}


def test_sizes_match_headers(header_facts: dict[str, int]) -> None:
    h = header_facts
    assert s.VIFCTL.size == h["sizeof(struct vifctl)"]
    assert s.MFCCTL.size == h["sizeof(struct mfcctl)"]
    assert s.SIOC_SG_REQ.size == h["sizeof(struct sioc_sg_req)"]
    assert s.SIOC_VIF_REQ.size == h["sizeof(struct sioc_vif_req)"]
    assert s.IGMPMSG.size == h["sizeof(struct igmpmsg)"]
    assert s.MIF6CTL.size == h["sizeof(struct mif6ctl)"]
    assert s.MF6CCTL.size == h["sizeof(struct mf6cctl)"]
    assert s.SIOC_SG_REQ6.size == h["sizeof(struct sioc_sg_req6)"]
    assert s.SIOC_MIF_REQ6.size == h["sizeof(struct sioc_mif_req6)"]
    assert s.MRT6MSG.size == h["sizeof(struct mrt6msg)"]
    assert s.SOCKADDR_IN6.size == h["sizeof(struct sockaddr_in6)"]
    assert h["sizeof(struct icmp6_filter)"] == s.ICMP6_FILTER_SIZE


def test_constants_match_headers(header_facts: dict[str, int]) -> None:
    names = [k for k in header_facts if not k.startswith(("sizeof", "offsetof"))]
    assert len(names) > 30
    for name in names:
        assert getattr(s, name) == header_facts[name], name


def test_field_offsets_match_headers(header_facts: dict[str, int]) -> None:
    h = header_facts
    # Offsets the pack helpers rely on, located by packing marker values.
    vif = s.pack_vifctl(3, 0x01020304)
    assert struct.unpack_from("@i", vif, h["offsetof(struct vifctl, vifc_lcl_ifindex)"]) == (
        0x01020304,
    )
    assert vif[h["offsetof(struct vifctl, vifc_rmt_addr)"] :] == bytes(4)
    mfc = s.pack_mfcctl(b"\x01" * 4, b"\x02" * 4, 7, {0: 9, 31: 200})
    assert struct.unpack_from("@H", mfc, h["offsetof(struct mfcctl, mfcc_parent)"]) == (7,)
    ttls = h["offsetof(struct mfcctl, mfcc_ttls)"]
    assert mfc[ttls] == 9 and mfc[ttls + 31] == 200 and mfc[ttls + 1 : ttls + 31] == bytes(30)
    assert mfc[h["offsetof(struct mfcctl, mfcc_pkt_cnt)"] :] == bytes(16)
    mif = s.pack_mif6ctl(2, 0xBEEF)
    assert struct.unpack_from("@H", mif, h["offsetof(struct mif6ctl, mif6c_pifi)"]) == (0xBEEF,)
    mf6 = s.pack_mf6cctl(b"\x01" * 16, b"\x02" * 16, 5, [0, 3, 31])
    assert struct.unpack_from("@H", mf6, h["offsetof(struct mf6cctl, mf6cc_parent)"]) == (5,)
    ifset = h["offsetof(struct mf6cctl, mf6cc_ifset)"]
    assert struct.unpack_from("@I", mf6, ifset) == ((1 << 0) | (1 << 3) | (1 << 31),)
    assert mf6[ifset + 4 :] == bytes(28)
    sg = s.SIOC_SG_REQ.pack(bytes(4), bytes(4), 0xA1, 0, 0)
    assert struct.unpack_from("@L", sg, h["offsetof(struct sioc_sg_req, pktcnt)"]) == (0xA1,)
    sg6 = s.SIOC_SG_REQ6.pack(bytes(28), bytes(28), 0xA2, 0, 0)
    assert struct.unpack_from("@L", sg6, h["offsetof(struct sioc_sg_req6, pktcnt)"]) == (0xA2,)
    vc = s.SIOC_VIF_REQ.pack(1, 0xA3, 0, 0, 0)
    assert struct.unpack_from("@L", vc, h["offsetof(struct sioc_vif_req, icount)"]) == (0xA3,)
    assert h["offsetof(struct igmpmsg, im_mbz)"] == 9  # the IPv4 protocol byte
    assert h["offsetof(struct igmpmsg, im_src)"] == 12  # the IPv4 source address
    assert h["offsetof(struct mrt6msg, im6_src)"] == 8


def test_sockaddr_in6_inside_mf6cctl() -> None:
    grp = socket.inet_pton(socket.AF_INET6, "ff3e::1")
    buf = s.pack_mf6cctl(bytes(16), grp, 0, [])
    fam, port, flow, addr, scope = s.SOCKADDR_IN6.unpack_from(buf, s.SOCKADDR_IN6.size)
    assert (fam, port, flow, addr, scope) == (socket.AF_INET6, 0, 0, grp, 0)


def test_vifctl_uses_ifindex() -> None:
    slot, flags, threshold, rate, ifindex, rmt = s.VIFCTL.unpack(s.pack_vifctl(4, 17))
    assert (slot, flags, threshold, rate, ifindex, rmt) == (
        4,
        s.VIFF_USE_IFINDEX,
        1,
        0,
        17,
        bytes(4),
    )


def test_igmpmsg_decoding() -> None:
    src, dst = socket.inet_aton("192.0.2.1"), socket.inet_aton("239.1.2.3")
    # An upcall: the IP header copy with protocol (im_mbz) zeroed, vif in the checksum bytes.
    up = struct.pack("!BBHHHBBBB4s4s", 0x45, 0, 48, 0, 0, 64, 0, 5, 1, src, dst)
    # The kernel writes im_msgtype over the TTL byte and the vif in host order bytes.
    up = up[:8] + bytes([s.IGMPMSG_NOCACHE, 0, 5, 1]) + up[12:] + b"payload"
    raw = s.unpack_igmpmsg(up)
    assert raw is not None
    assert (raw.msgtype, raw.vif, raw.source, raw.group) == (s.IGMPMSG_NOCACHE, 0x105, src, dst)
    # Real IGMP: protocol byte is 2.
    igmp = up[:9] + b"\x02" + up[10:]
    assert s.unpack_igmpmsg(igmp) is None
    assert s.unpack_igmpmsg(up[:19]) is None


def test_mrt6msg_decoding() -> None:
    src = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    dst = socket.inet_pton(socket.AF_INET6, "ff3e::1")
    msg = s.MRT6MSG.pack(0, s.MRT6MSG_NOCACHE, 7, 0, src, dst)
    raw = s.unpack_mrt6msg(msg)
    assert raw is not None and (raw.msgtype, raw.vif, raw.source, raw.group) == (1, 7, src, dst)
    # ICMPv6 echo request (type 128) is not an upcall.
    assert s.unpack_mrt6msg(bytes([128]) + msg[1:]) is None
    assert s.unpack_mrt6msg(msg[:39]) is None


def test_counter_unpacking() -> None:
    buf = s.SIOC_SG_REQ.pack(bytes(4), bytes(4), 10, 2000, 3)
    assert s.unpack_sg_count(4, buf) == s.SgCount(10, 2000, 3)
    buf6 = s.SIOC_SG_REQ6.pack(bytes(28), bytes(28), 11, 2100, 4)
    assert s.unpack_sg_count(6, buf6) == s.SgCount(11, 2100, 4)
    assert s.unpack_vif_count(s.SIOC_VIF_REQ.pack(1, 1, 2, 3, 4)) == s.VifCount(1, 2, 3, 4)


def test_address_helpers() -> None:
    assert s.addr_bytes(4, "239.1.2.3") == bytes([239, 1, 2, 3])
    assert s.addr_bytes(4, None) == bytes(4)
    assert s.addr_bytes(6, None) == bytes(16)
    assert s.addr_text(6, s.addr_bytes(6, "ff3e:0::1")) == "ff3e::1"
