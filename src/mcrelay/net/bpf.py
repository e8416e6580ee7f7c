"""Classic BPF filters compiled from relay rules, for the AF_PACKET ingress sockets.

A packet socket of type ``SOCK_DGRAM`` runs its filter on the network header
(offset 0 is the first byte of the IPv4/IPv6 header), so the programs below load
absolute offsets into the IP header and, through the X register, into the UDP
header that follows it.

Three tiers, the tightest that fits (at most ``BPF_MAXINSNS`` instructions
and at most a budget of the socket's option memory, see :func:`charge`):

- *exact*: UDP, not a later fragment, and (destination address, destination
  port) in the rule set, by binary search on the port, then the address.
  Only traffic a rule wants reaches Python.
- *ports*: UDP, not a later fragment, destination port in the set.
- *udp*: any UDP that is not a later fragment.

The budget matters more than the instruction limit: the kernel charges the
eBPF translation of a filter (several times the classic size) against
``net.core.optmem_max`` and, while SO_ATTACH_FILTER replaces a filter, the
old one too, so an unbounded program fails with ENOMEM well before 4096
instructions (issue 12: the 281st relay on one interface).

The first fragment of a fragmented datagram passes (it carries the UDP header)
so the worker can count it as a ``fragment`` drop; later fragments never do.
Whatever a coarse tier lets through, the worker's dict does the exact match.

Constants and ``struct sock_filter``/``struct sock_fprog`` come from
``linux/filter.h`` and ``linux/bpf_common.h``.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

# linux/bpf_common.h
BPF_LD = 0x00
BPF_LDX = 0x01
BPF_JMP = 0x05
BPF_RET = 0x06
BPF_W = 0x00
BPF_H = 0x08
BPF_B = 0x10
BPF_IMM = 0x00
BPF_ABS = 0x20
BPF_IND = 0x40
BPF_MSH = 0xA0
BPF_JA = 0x00
BPF_JEQ = 0x10
BPF_JGE = 0x30
BPF_JSET = 0x40
BPF_K = 0x00
BPF_MAXINSNS = 4096

# asm-generic/socket.h
SO_ATTACH_FILTER = 26

ACCEPT = 0x40000  # snap length returned for an accepted packet
DROP = 0

Insn = tuple[int, int, int, int]  # code, jt, jf, k  (struct sock_filter)
_INSN = struct.Struct("HBBI")  # struct sock_filter: __u16 code; __u8 jt; __u8 jf; __u32 k;

_MAX_JUMP = 255

# What a program costs the socket. The kernel converts a classic program to
# eBPF and charges the result against the socket's option memory
# (``net.core.optmem_max``); while SO_ATTACH_FILTER replaces a filter, the old
# one is still charged. Bytes per classic instruction, measured on 6.18 by
# attaching programs of one kind until ENOMEM (a load of a word becomes about
# 14 eBPF instructions, of a byte or half word 8, a return 2, a jump 1 or 2),
# rounded up, plus the program's header.
_CHARGE_LD_W = 120
_CHARGE_LD_SHORT = 72
_CHARGE_RET = 16
_CHARGE_JUMP_BOTH = 16
_CHARGE_OTHER = 8
_CHARGE_FIXED = 512
OPTMEM_MAX_PATH = "/proc/sys/net/core/optmem_max"
OPTMEM_MAX_DEFAULT = 20480  # the kernel's default before 6.9 (128 KiB since)


class _Asm:
    """A tiny assembler: conditional jumps name labels, resolved when the program ends."""

    def __init__(self) -> None:
        self.code: list[tuple[int, str | int, str | int, int]] = []
        self.labels: dict[str, int] = {}
        self._n = 0

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def fresh(self) -> str:
        self._n += 1
        return f"_L{self._n}"

    def stmt(self, code: int, k: int = 0) -> None:
        self.code.append((code, 0, 0, k))

    def jump(self, code: int, k: int, jt: str | int, jf: str | int) -> None:
        self.code.append((code, jt, jf, k))

    def ja(self, target: str) -> None:
        # k = -1 marks "resolve jt as the unconditional 32-bit offset".
        self.code.append((BPF_JMP | BPF_JA, target, 0, -1))

    def assemble(self) -> list[Insn]:
        out: list[Insn] = []
        for pc, (code, jt, jf, k) in enumerate(self.code):
            if code == BPF_JMP | BPF_JA and k == -1:
                out.append((code, 0, 0, self._offset(pc, jt, unbounded=True)))
                continue
            if code & 0x07 == BPF_JMP:
                out.append((code, self._offset(pc, jt), self._offset(pc, jf), k))
            else:
                out.append((code, 0, 0, k))
        return out

    def _offset(self, pc: int, target: str | int, unbounded: bool = False) -> int:
        if isinstance(target, int):
            return target
        off = self.labels[target] - pc - 1
        if off < 0 or (off > _MAX_JUMP and not unbounded):
            raise OverflowError(f"BPF jump of {off} does not fit")
        return off


@dataclass(frozen=True)
class Program:
    """A compiled filter: instructions plus which tier produced it."""

    insns: tuple[Insn, ...]
    tier: str

    def __len__(self) -> int:
        return len(self.insns)

    def pack(self) -> bytes:
        return b"".join(_INSN.pack(*i) for i in self.insns)


def charge(prog: Program) -> int:
    """Bytes of option memory the kernel charges for ``prog`` (an upper estimate)."""
    total = _CHARGE_FIXED
    for code, jt, jf, _ in prog.insns:
        cls = code & 0x07
        if cls in (BPF_LD, BPF_LDX) and code & 0xE0 in (BPF_ABS, BPF_IND, BPF_MSH):
            total += _CHARGE_LD_W if cls == BPF_LD and code & 0x18 == BPF_W else _CHARGE_LD_SHORT
        elif cls == BPF_RET:
            total += _CHARGE_RET
        elif cls == BPF_JMP and jt and jf:
            total += _CHARGE_JUMP_BOTH
        else:
            total += _CHARGE_OTHER
    return total


def optmem_max(path: str = OPTMEM_MAX_PATH) -> int:
    """This network namespace's ``net.core.optmem_max`` (the default if unreadable)."""
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return OPTMEM_MAX_DEFAULT


def default_budget(optmem: int | None = None) -> int:
    """The most one filter may cost: the old and the new one together, while
    SO_ATTACH_FILTER replaces it, within three quarters of ``optmem_max`` (the
    rest is headroom for whatever else the socket has charged)."""
    return (optmem if optmem is not None else optmem_max()) * 3 // 8


def drop_all() -> Program:
    """A filter that accepts nothing: membership and port-holder sockets are never read."""
    return Program(((BPF_RET | BPF_K, 0, 0, DROP),), "drop")


def _v4_header(a: _Asm) -> None:
    """UDP, fragment offset 0; leaves X = IP header length."""
    a.stmt(BPF_LD | BPF_B | BPF_ABS, 9)  # protocol
    a.jump(BPF_JMP | BPF_JEQ | BPF_K, socket.IPPROTO_UDP, 1, 0)
    a.stmt(BPF_RET | BPF_K, DROP)
    a.stmt(BPF_LD | BPF_H | BPF_ABS, 6)  # flags + fragment offset
    a.jump(BPF_JMP | BPF_JSET | BPF_K, 0x1FFF, 0, 1)
    a.stmt(BPF_RET | BPF_K, DROP)
    a.stmt(BPF_LDX | BPF_B | BPF_MSH, 0)  # X = 4 * (ihl)


def _v6_header(a: _Asm) -> None:
    """UDP directly after the fixed header or after a first-fragment header; X = UDP offset."""
    drop, udp40, match = a.fresh(), a.fresh(), a.fresh()
    a.stmt(BPF_LD | BPF_B | BPF_ABS, 6)  # next header
    a.jump(BPF_JMP | BPF_JEQ | BPF_K, socket.IPPROTO_UDP, udp40, 0)
    a.jump(BPF_JMP | BPF_JEQ | BPF_K, 44, 0, drop)  # IPPROTO_FRAGMENT
    a.stmt(BPF_LD | BPF_H | BPF_ABS, 42)  # fragment offset << 3 | res | M
    a.jump(BPF_JMP | BPF_JSET | BPF_K, 0xFFF8, drop, 0)
    a.stmt(BPF_LD | BPF_B | BPF_ABS, 40)  # next header after the fragment header
    a.jump(BPF_JMP | BPF_JEQ | BPF_K, socket.IPPROTO_UDP, 0, drop)
    a.stmt(BPF_LDX | BPF_W | BPF_IMM, 48)
    a.ja(match)
    a.label(drop)
    a.stmt(BPF_RET | BPF_K, DROP)
    a.label(udp40)
    a.stmt(BPF_LDX | BPF_W | BPF_IMM, 40)
    a.label(match)


def _split(a: _Asm, vals: list[int], far: bool) -> tuple[list[int], list[int], str]:
    """Emit the root of a search tree (``A >= vals[mid]`` goes right); the halves and its label."""
    mid = len(vals) // 2
    right = a.fresh()
    if far:  # the left half may be longer than an 8-bit jump: hop with a 32-bit ``ja``
        a.jump(BPF_JMP | BPF_JGE | BPF_K, vals[mid], 0, 1)
        a.ja(right)
    else:
        a.jump(BPF_JMP | BPF_JGE | BPF_K, vals[mid], right, 0)
    return vals[:mid], vals[mid:], right


def _dispatch(a: _Asm, vals: list[int], then: list[str]) -> None:
    """If A == ``vals[i]`` (sorted, distinct) go on at ``then[i]`` (any distance), else DROP.

    A binary search over ``BPF_JGE``: log2(n) compares a packet. Each leaf
    compares up to four values and hops to its targets with 32-bit ``ja``.
    """
    if len(vals) <= 4:
        hops = [a.fresh() for _ in vals]
        for v, h in zip(vals, hops, strict=True):
            a.jump(BPF_JMP | BPF_JEQ | BPF_K, v, h, 0)
        a.stmt(BPF_RET | BPF_K, DROP)
        for h, t in zip(hops, then, strict=True):
            a.label(h)
            a.ja(t)
        return
    left, right, label = _split(a, vals, far=True)
    _dispatch(a, left, then[: len(left)])
    a.label(label)
    _dispatch(a, right, then[len(left) :])


def _member(a: _Asm, vals: list[int]) -> None:
    """ACCEPT if A is one of ``vals`` (sorted, distinct), else DROP; about two insns a value."""
    if len(vals) <= 4:
        accept = a.fresh()
        for v in vals:
            a.jump(BPF_JMP | BPF_JEQ | BPF_K, v, accept, 0)
        a.stmt(BPF_RET | BPF_K, DROP)
        a.label(accept)
        a.stmt(BPF_RET | BPF_K, ACCEPT)
        return
    left, right, label = _split(a, vals, far=len(vals) // 2 > 40)
    _member(a, left)
    a.label(label)
    _member(a, right)


def _exact(family: int, keys: dict[bytes, list[int]]) -> list[Insn]:
    """Port first, then address, each by binary search.

    ``A = destination port``; a tree over the distinct ports hops to the
    block of that port's address set (ports with the same set share one).
    A block loads the destination address: IPv4 one word, searched in a tree;
    IPv6 per /96 prefix three word compares, then a tree over the last word.
    """
    a = _Asm()
    (_v4_header if family == 4 else _v6_header)(a)
    base = 16 if family == 4 else 24
    by_port: dict[int, set[bytes]] = {}
    for addr, ports in keys.items():
        for p in ports:
            by_port.setdefault(p, set()).add(addr)
    sets = sorted({frozenset(v) for v in by_port.values()}, key=sorted)
    block = {s: a.fresh() for s in sets}
    ports = sorted(by_port)
    a.stmt(BPF_LD | BPF_H | BPF_IND, 2)  # UDP destination port
    _dispatch(a, ports, [block[frozenset(by_port[p])] for p in ports])
    for s in sets:
        a.label(block[s])
        by_prefix: dict[bytes, list[int]] = {}
        for addr in s:
            by_prefix.setdefault(addr[:-4], []).append(struct.unpack("!I", addr[-4:])[0])
        for prefix, lasts in sorted(by_prefix.items()):
            nxt = a.fresh()
            for i, w in enumerate(struct.unpack(f"!{len(prefix) // 4}I", prefix)):
                a.stmt(BPF_LD | BPF_W | BPF_ABS, base + 4 * i)
                a.jump(BPF_JMP | BPF_JEQ | BPF_K, w, 1, 0)
                a.ja(nxt)
            a.stmt(BPF_LD | BPF_W | BPF_ABS, base + len(prefix))
            _member(a, sorted(lasts))
            a.label(nxt)
        a.stmt(BPF_RET | BPF_K, DROP)
    return a.assemble()


def _ports(family: int, ports: set[int]) -> list[Insn]:
    a = _Asm()
    (_v4_header if family == 4 else _v6_header)(a)
    a.stmt(BPF_LD | BPF_H | BPF_IND, 2)  # UDP destination port
    _member(a, sorted(ports))
    return a.assemble()


def _udp(family: int) -> list[Insn]:
    a = _Asm()
    (_v4_header if family == 4 else _v6_header)(a)
    a.stmt(BPF_RET | BPF_K, ACCEPT)
    return a.assemble()


def compile_filter(
    family: int, keys: Iterable[tuple[str, int]], budget: int | None = None
) -> Program:
    """The tightest program for (destination address, port) keys that fits.

    Fits: at most ``BPF_MAXINSNS`` instructions and at most ``budget`` bytes
    of :func:`charge` (default :func:`default_budget`). ``budget`` 0 gives the
    *udp* tier, which always fits.
    """
    by_addr: dict[bytes, list[int]] = {}
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    for addr, port in keys:
        by_addr.setdefault(socket.inet_pton(af, addr), []).append(port)
    if not by_addr:
        return drop_all()
    limit = default_budget() if budget is None else budget
    # Each key costs at least one compare (8 bytes): skip building what cannot fit.
    pairs = sum(len(set(ps)) for ps in by_addr.values())
    if limit > 0 and pairs <= min(BPF_MAXINSNS, limit // _CHARGE_OTHER):
        exact = Program(tuple(_exact(family, by_addr)), "exact")
        if len(exact) <= BPF_MAXINSNS and charge(exact) <= limit:
            return exact
    if limit > 0:
        ports = Program(tuple(_ports(family, {p for ps in by_addr.values() for p in ps})), "ports")
        if len(ports) <= BPF_MAXINSNS and charge(ports) <= limit:
            return ports
    return Program(tuple(_udp(family)), "udp")


def coarser(family: int, keys: Iterable[tuple[str, int]], prog: Program) -> Program | None:
    """The next tier down from ``prog`` (when the kernel refused it), None below *udp*."""
    if prog.tier in ("udp", "drop"):
        return None
    return compile_filter(family, keys, charge(prog) - 1 if prog.tier == "exact" else 0)


class _SockFprog(ctypes.Structure):
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def attach(sock: socket.socket, prog: Program) -> None:
    """SO_ATTACH_FILTER: replaces any filter already on the socket, atomically."""
    raw = ctypes.create_string_buffer(prog.pack(), len(prog) * _INSN.size)
    fprog = _SockFprog(len(prog), ctypes.addressof(raw))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(fprog))
    # The kernel copied the program; ``raw`` may now be freed.


def run(prog: Program, packet: bytes) -> int:
    """Interpret a program the way the kernel does (only the opcodes emitted here).

    Used by the tests to check generated programs without a kernel, and handy for
    debugging. An out-of-bounds load returns 0, as in the kernel.
    """
    a = x = 0
    pc = 0
    insns = prog.insns
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        cls = code & 0x07
        if cls == BPF_RET:
            return k
        if cls == BPF_LD:
            size = {BPF_W: 4, BPF_H: 2, BPF_B: 1}[code & 0x18]
            off = k + (x if code & 0xE0 == BPF_IND else 0)
            if off + size > len(packet):
                return 0
            a = int.from_bytes(packet[off : off + size], "big")
        elif cls == BPF_LDX:
            if code & 0xE0 == BPF_MSH:
                if k >= len(packet):
                    return 0
                x = 4 * (packet[k] & 0x0F)
            else:
                x = k
        elif cls == BPF_JMP:
            op = code & 0xF0
            if op == BPF_JA:
                pc += k
            elif op == BPF_JEQ:
                pc += jt if a == k else jf
            elif op == BPF_JGE:
                pc += jt if a >= k else jf
            elif op == BPF_JSET:
                pc += jt if a & k else jf
            else:
                raise ValueError(f"unsupported jump {code:#x}")
        else:
            raise ValueError(f"unsupported opcode {code:#x}")
