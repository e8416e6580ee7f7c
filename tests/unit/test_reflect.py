"""Reflectors: the rule (presets, validation, legs), the manager's legs, raw headers, and the
worker's loop/duplicate/allow checks on real buffers (sends captured, no raw socket)."""

from __future__ import annotations

import socket
import struct
from typing import Any

import pytest
from test_relay_manager import Setup

from mcrelay.errors import InvalidParams
from mcrelay.model import (
    RelayOutput,
    parse_output_spec,
    parse_reflect_spec,
    parse_relay,
    parse_ruleset,
)
from mcrelay.net import rawsend
from mcrelay.relay import messages as m
from mcrelay.relay import reflect as rf
from mcrelay.relay.mmsg import RecvVec
from mcrelay.relay.qos import Output


def reflector(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"proto": "mdns", "on": ["up0", "dn1", "dn2"]}
    base.update(spec)
    return {"name": "disc", "reflect": base}


# ---------------------------------------------------------------- the rule


def test_a_preset_expands_into_one_leg_per_member_and_family_never_back_to_itself() -> None:
    r = parse_relay(reflector())
    legs = r.legs()
    assert len(legs) == 6  # 3 members x (224.0.0.251, ff02::fb)
    for leg in legs:
        oifs = [o.oif for o in leg.outputs]
        assert leg.input.iif not in oifs and len(oifs) == 2
        assert all(o.ttl == 255 and o.src == "keep" for o in leg.outputs)  # mDNS: TTL 255
    assert {leg.input.group for leg in legs} == {"224.0.0.251", "ff02::fb"}
    assert parse_relay(r.to_dict()) == r  # export / state file round trip


def test_listen_only_members_are_heard_but_never_sent_to() -> None:
    r = parse_relay(reflector(on=["up0", "dn1"], listen_only=["guest"], proto="ssdp"))
    by_iif = {(leg.input.iif, leg.input.family): leg for leg in r.legs()}
    assert [o.oif for o in by_iif[("guest", 4)].outputs] == ["up0", "dn1"]
    assert all("guest" not in [o.oif for o in leg.outputs] for leg in r.legs())
    assert all(o.ttl == 0 for leg in r.legs() for o in leg.outputs)  # the input's TTL


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        ({"proto": "bonjour"}, "reflect.proto", "mdns, ssdp, llmnr, wsd, wol"),
        ({"on": ["up0"]}, "reflect.on", "at least two"),
        ({"on": ["up0", "up0"]}, "reflect.on[1]", "duplicate"),
        ({"listen_only": ["dn1"]}, "reflect.listen_only[0]", "already in on"),
        ({"source": "theirs"}, "reflect.source", "keep, own"),
        ({"allow": ["10.0.0.0/33"]}, "reflect.allow[0]", "not a source prefix"),
        ({"proto": None, "group": "10.1.1.1", "port": 9}, "reflect.group", "neither multicast"),
    ],
)
def test_refusals_name_the_field_and_the_allowed_values(
    spec: dict[str, Any], field: str, words: str
) -> None:
    with pytest.raises(InvalidParams) as err:
        parse_relay(reflector(**spec))
    assert err.value.field == field and words in str(err.value)


def test_a_reflector_is_packet_mode_and_named() -> None:
    with pytest.raises(InvalidParams, match="packet mode only"):
        parse_relay({**reflector(), "mode": "socket"})
    with pytest.raises(InvalidParams, match="needs a name"):
        parse_relay({"reflect": reflector()["reflect"]})


def test_two_rules_may_not_listen_on_the_same_member_group_and_port() -> None:
    plain = {"name": "p", "input": {"iif": "dn1", "group": "224.0.0.251", "port": 5353},
             "outputs": [{"address": "224.0.0.251", "port": 5353, "oif": "dn2"}]}  # fmt: skip
    with pytest.raises(InvalidParams, match="duplicate relay input"):
        parse_ruleset({"relays": [reflector(), plain]})


def test_cli_spellings() -> None:
    assert parse_reflect_spec("mDNS") == {"proto": "mdns"}
    assert parse_reflect_spec("broadcast:9") == {"group": "255.255.255.255", "port": "9"}
    assert parse_reflect_spec("[ff05::c]:1900") == {"group": "ff05::c", "port": "1900"}
    with pytest.raises(InvalidParams, match="--on"):
        parse_reflect_spec("239.1.1.1:5000@eth0")
    out = parse_output_spec("255.255.255.255:9@dn1,src=keep")
    assert out == {"address": "255.255.255.255", "port": "9", "oif": "dn1", "src": "keep"}


def test_broadcast_outputs_need_an_interface_and_keep_needs_packet_mode() -> None:
    inp = {"iif": "up0", "group": "255.255.255.255", "port": 9}
    with pytest.raises(InvalidParams, match="broadcast output needs an interface"):
        parse_relay({"input": inp, "outputs": [{"address": "255.255.255.255", "port": 9}]})
    keep = {"address": "239.1.1.1", "port": 9, "oif": "dn1", "src": "keep"}
    with pytest.raises(InvalidParams, match="src=keep needs --mode packet"):
        parse_relay({"input": inp, "outputs": [keep], "mode": "socket"})
    r = parse_relay({"input": inp, "outputs": [keep]})
    assert r.outputs[0] == RelayOutput("239.1.1.1", 9, "dn1", 16, 0, "keep")


# ---------------------------------------------------------------- the manager


def test_the_manager_installs_legs_shares_counters_and_opens_raw_sockets_once() -> None:
    s = Setup()
    s.ifaces["dn2"] = 12
    s.mgr.add(parse_relay(reflector()))
    raws = [x for x in s.openers.open_now() if x.what.startswith("raw")]
    assert sorted(x.what for x in raws) == ["raw 4", "raw 6"]
    ((add_raw, fds),) = s.pool.of_type(0, m.AddRaw)
    assert add_raw.families == (4, 6) and len(fds) == 2
    entries = s.last_table().entries
    assert len(entries) == 6 and len({e.reflect for e in entries}) == 1
    assert all(o.src == m.SRC_KEEP and o.ttl == 255 for e in entries for o in e.outputs)
    assert s.membership.refs[("dn2", "ff02::fb", None)] == 1
    # a worker restarted later gets the raw sockets first
    assert type(s.mgr.initial_messages(1)[0][0]) is m.AddRaw
    e = next(e for e in entries if e.group == "224.0.0.251" and e.outputs[0].ifindex == 11)
    counters = (7, 700, 0, 0, 0, 0, 0, 2, 1)
    outs = ((7, 700, 0), (7, 700, 0))
    s.mgr.on_message(0, m.Stats(1, (m.RelayStats(e.id, counters, outs),), {}, 0.1, {}), 0.0)
    (row,) = s.mgr.relays()
    assert row["packets"] == 7 and row["drops"]["loop"] == 2 and row["drops"]["duplicate"] == 1
    members = {x["name"]: x for x in row["members"]}
    assert members["up0"]["received"] == 7 and members["dn1"]["packets"] == 7


def test_a_member_that_goes_away_leaves_and_rejoins() -> None:
    s = Setup()
    s.ifaces["dn2"] = 12
    s.mgr.add(parse_relay(reflector(proto="ssdp")))
    del s.ifaces["dn2"]
    s.mgr.reconcile()
    entries = s.last_table().entries
    assert all(all(o.ifindex != 12 for o in e.outputs) for e in entries)
    assert len(entries) == 4  # dn2's own legs are gone while it is away
    assert s.mgr.relays()[0]["members"][2]["state"] == "waiting"
    s.ifaces["dn2"] = 22
    s.mgr.reconcile()
    entries = s.last_table().entries
    assert len(entries) == 6 and any(o.ifindex == 22 for e in entries for o in e.outputs)


def test_plain_mdns_outputs_go_through_the_raw_socket_so_they_leave_from_5353() -> None:
    s = Setup()
    s.mgr.add(parse_relay({"name": "m", "input": {"iif": "up0", "group": "224.0.0.251",
              "port": 5353}, "outputs": [{"address": "224.0.0.251", "port": 5353,
              "oif": "dn1"}]}))  # fmt: skip
    (e,) = s.last_table().entries
    assert e.outputs[0].src == m.SRC_OWN_RAW and e.outputs[0].ttl == 255


def test_plain_relays_keep_the_udp_path_and_need_no_raw_socket() -> None:
    s = Setup()
    s.mgr.add(parse_relay({"name": "tv", "input": {"iif": "up0", "group": "239.1.1.1",
              "port": 5000}, "outputs": [{"address": "239.2.2.2", "port": 5000,
              "oif": "dn1"}]}))  # fmt: skip
    assert s.pool.of_type(0, m.AddRaw) == []
    assert s.last_table().entries[0].outputs[0].src == m.SRC_OWN


# ---------------------------------------------------------------- headers


def _slow_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@pytest.mark.parametrize("payload", [b"", b"x", b"hello mdns", bytes(range(256)) * 5, b"\xff" * 7])
def test_checksums_match_the_word_by_word_definition(payload: bytes) -> None:
    assert rawsend.checksum(payload + b"\x01") == _slow_sum(payload + b"\x01")
    src, dst = socket.inet_aton("192.0.2.2"), socket.inet_aton("224.0.0.251")
    hdr = rawsend.udp4_header(src, dst, 5353, 5353, 255, 0, payload)
    assert _slow_sum(hdr[:20]) == 0  # a correct IP header sums to zero
    pseudo = src + dst + struct.pack("!BBH", 0, 17, 8 + len(payload))
    assert _slow_sum(pseudo + hdr[20:] + payload) in (0, 0xFFFF)
    s6 = socket.inet_pton(socket.AF_INET6, "2001:db8:1::2")
    d6 = socket.inet_pton(socket.AF_INET6, "ff02::fb")
    h6 = rawsend.udp6_header(s6, d6, 5353, 5353, 255, 0, payload)
    p6 = s6 + d6 + struct.pack("!I3xB", 8 + len(payload), 17)
    assert len(h6) == 48 and _slow_sum(p6 + h6[40:] + payload) in (0, 0xFFFF)
    assert h6[7] == 255 and struct.unpack_from("!H", h6, 4)[0] == 8 + len(payload)


# ---------------------------------------------------------------- the worker's checks


class FakeSender(rf.RawSender):
    def __init__(self, family: int) -> None:
        super().__init__(None, family, rf.Sources())  # type: ignore[arg-type]
        self.sent: list[tuple[str, bytes, int, bytes]] = []

    def send(self, out: Output, p: rf.Parsed, now: float) -> tuple[bytes, int] | None:
        self.sent.append((out.dest.address, p.src, p.sport, p.payload))
        out.oc[0] += 1
        return p.src, p.sport


def _packet(rv: RecvVec, slot: int, src: str, payload: bytes, sport: int = 5353) -> int:
    off = slot * rv.size
    hdr = rawsend.udp4_header(
        socket.inet_aton(src), socket.inet_aton("224.0.0.251"), sport, 5353, 255, 0, payload
    )
    rv.view[off : off + 28] = hdr
    rv.view[off + 28 : off + 28 + len(payload)] = payload
    return rv.buf_addr + off + 28


def _leg(sender: FakeSender, rv: RecvVec, state: rf.ReflectState, ifindex: int, c: list[int],
         allow: tuple[str, ...] = ()) -> tuple[Output, list[Output]]:  # fmt: skip
    members = []
    for ix in (1, 2, 3):
        if ix != ifindex:
            d = rf.RawDest(4, "224.0.0.251", 5353, ix, 255, -1, m.SRC_KEEP)
            members.append(Output(None, d, 0, [0, 0, 0, c]))  # type: ignore[arg-type]
    q = rf.ReflectQueue(sender, rv, state, members, allow, ifindex)
    return rf.fan_output(q, c, "disc"), members


def _hand_over(out: Output, paddr: int, plen: int) -> None:
    c = out.oc[3]
    c[m.PACKETS] += 1  # as the hot path does before calling the queue
    c[m.BYTES] += plen
    out.sq.add(out, paddr, plen)


def test_a_reflected_packet_that_comes_back_is_a_loop_and_a_repeat_is_a_duplicate() -> None:
    rv = RecvVec(4, 2048)
    sender = FakeSender(4)
    state = rf.ReflectState()
    c1 = [0] * m.N_COUNTERS
    c2 = [0] * m.N_COUNTERS
    leg1, _ = _leg(sender, rv, state, 1, c1)
    leg2, _ = _leg(sender, rv, state, 2, c2)
    p = _packet(rv, 0, "192.0.2.2", b"query")
    _hand_over(leg1, p, 5)
    assert [s[0] for s in sender.sent] == ["224.0.0.251"] * 2 and c1[m.PACKETS] == 1
    # the copy we put on member 2 comes back in there (another relay box): a loop
    _hand_over(leg2, _packet(rv, 1, "192.0.2.2", b"query"), 5)
    assert c2[m.LOOP] == 1 and c2[m.PACKETS] == 0 and len(sender.sent) == 2
    # the same packet heard again on member 1 moments later: a duplicate
    _hand_over(leg1, _packet(rv, 2, "192.0.2.2", b"query"), 5)
    assert c1[m.DUPLICATE] == 1 and c1[m.PACKETS] == 1 and len(sender.sent) == 2
    assert leg1.sq.last == "duplicate" and leg2.sq.last == "loop"  # type: ignore[attr-defined]
    # another sender's identical payload is its own packet
    _hand_over(leg1, _packet(rv, 3, "192.0.2.3", b"query"), 5)
    assert c1[m.PACKETS] == 2 and len(sender.sent) == 4


def test_allow_drops_other_sources_as_filtered() -> None:
    rv = RecvVec(2, 2048)
    sender = FakeSender(4)
    c = [0] * m.N_COUNTERS
    leg, _ = _leg(sender, rv, rf.ReflectState(), 1, c, allow=("192.0.2.0/28",))
    _hand_over(leg, _packet(rv, 0, "192.0.2.200", b"no"), 2)
    _hand_over(leg, _packet(rv, 1, "192.0.2.2", b"yes"), 3)
    assert c[m.FILTERED] == 1 and c[m.PACKETS] == 1 and [s[3] for s in sender.sent] == [b"yes"] * 2


def test_memory_forgets_after_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(rf.time, "monotonic", lambda: now[0])
    mem = rf.Memory()
    mem.add(1, now[0])
    assert 1 in mem
    now[0] += rf.WINDOW + 0.1
    assert 1 not in mem
    for k in range(rf.MEMORY + 10):
        mem.add(k + 10, now[0])
    assert len(mem._seen) <= rf.MEMORY
