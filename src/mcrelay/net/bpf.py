"""Classic BPF filters compiled from relay rules, for the AF_PACKET ingress sockets.

A packet socket of type ``SOCK_DGRAM`` runs its filter on the network header
(offset 0 is the first byte of the IPv4/IPv6 header), so the programs below load
absolute offsets into the IP header and, through the X register, into the UDP
header that follows it.

Three tiers, chosen by size:

- *exact*: UDP, not a later fragment, and (destination address, destination
  port) in the rule set. Only traffic a rule wants reaches Python.
- *ports*: UDP, not a later fragment, destination port in the set (when the
  exact program would exceed ``BPF_MAXINSNS``).
- *udp*: any UDP that is not a later fragment.

The first fragment of a fragmented datagram passes (it carries the UDP header)
so the worker can count it as a ``fragment`` drop; later fragments never do.
Whatever a coarse tier lets through, the worker's dict does the exact match.

Constants and ``struct sock_filter``/``struct sock_fprog`` come from
``linux/filter.h`` and ``linux/bpf_common.h``.
"""

from __future__ import annotations

import ctypes
import ipaddress
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
# A block of port comparisons must stay within one 8-bit jump.
_PORTS_PER_BLOCK = 200


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


def _port_block(a: _Asm, ports: list[int]) -> None:
    """Accept if the UDP destination port is one of ``ports``; otherwise fall through."""
    accept, nxt = a.fresh(), a.fresh()
    a.stmt(BPF_LD | BPF_H | BPF_IND, 2)  # UDP destination port
    for p in ports:
        a.jump(BPF_JMP | BPF_JEQ | BPF_K, p, accept, 0)
    a.ja(nxt)
    a.label(accept)
    a.stmt(BPF_RET | BPF_K, ACCEPT)
    a.label(nxt)


def _chunks(items: list[int], size: int) -> Iterable[list[int]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _exact(family: int, keys: dict[bytes, list[int]]) -> list[Insn]:
    a = _Asm()
    (_v4_header if family == 4 else _v6_header)(a)
    base = 16 if family == 4 else 24
    for addr, ports in sorted(keys.items()):
        words = struct.unpack(f"!{len(addr) // 4}I", addr)
        for chunk in _chunks(sorted(set(ports)), _PORTS_PER_BLOCK):
            skip = a.fresh()
            for i, w in enumerate(words):
                a.stmt(BPF_LD | BPF_W | BPF_ABS, base + 4 * i)
                a.jump(BPF_JMP | BPF_JEQ | BPF_K, w, 0, skip)
            _port_block(a, chunk)
            a.label(skip)
    a.stmt(BPF_RET | BPF_K, DROP)
    return a.assemble()


def _ports(family: int, ports: set[int]) -> list[Insn]:
    a = _Asm()
    (_v4_header if family == 4 else _v6_header)(a)
    for chunk in _chunks(sorted(ports), _PORTS_PER_BLOCK):
        _port_block(a, chunk)
    a.stmt(BPF_RET | BPF_K, DROP)
    return a.assemble()


def _udp(family: int) -> list[Insn]:
    a = _Asm()
    (_v4_header if family == 4 else _v6_header)(a)
    a.stmt(BPF_RET | BPF_K, ACCEPT)
    return a.assemble()


def compile_filter(family: int, keys: Iterable[tuple[str, int]]) -> Program:
    """The tightest program of at most BPF_MAXINSNS for (destination address, port) keys."""
    by_addr: dict[bytes, list[int]] = {}
    for addr, port in keys:
        by_addr.setdefault(ipaddress.ip_address(addr).packed, []).append(port)
    if not by_addr:
        return drop_all()
    exact = _exact(family, by_addr)
    if len(exact) <= BPF_MAXINSNS:
        return Program(tuple(exact), "exact")
    ports = _ports(family, {p for ps in by_addr.values() for p in ps})
    if len(ports) <= BPF_MAXINSNS:
        return Program(tuple(ports), "ports")
    return Program(tuple(_udp(family)), "udp")


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
            elif op == BPF_JSET:
                pc += jt if a & k else jf
            else:
                raise ValueError(f"unsupported jump {code:#x}")
        else:
            raise ValueError(f"unsupported opcode {code:#x}")
