"""recvmmsg/sendmmsg through ctypes, on arrays allocated once.

A :class:`RecvVec` owns ``n`` receive slots in one contiguous buffer; a
:class:`SendVec` owns ``n`` message headers whose iovecs point anywhere, in
practice into a :class:`RecvVec`'s buffer, so a payload is never copied in
Python. The hot loop reads and writes the headers through flat ``memoryview``
casts (word indices computed once from the ctypes layout) rather than through
ctypes attribute access, which would build a proxy object per field.

Layouts are ``struct iovec``, ``struct msghdr`` and ``struct mmsghdr`` from
``bits/socket.h``/``bits/types/struct_iovec.h`` as ctypes declares them; the
offsets below are read from ctypes, not assumed.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from array import array

MSG_DONTWAIT = 0x40
MSG_TRUNC = 0x20

_libc = ctypes.CDLL(None, use_errno=True)
_recvmmsg = _libc.recvmmsg
_recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
_recvmmsg.restype = ctypes.c_int
_sendmmsg = _libc.sendmmsg
_sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
_sendmmsg.restype = ctypes.c_int


class Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class Msghdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),  # socklen_t
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", Msghdr), ("msg_len", ctypes.c_uint)]


STRIDE = ctypes.sizeof(Mmsghdr)
assert STRIDE % 8 == 0 and ctypes.sizeof(Iovec) == 16


def _w64(field: str) -> int:
    off: int = getattr(Msghdr, field).offset
    assert off % 8 == 0
    return off // 8


def _w32(off: int) -> int:
    assert off % 4 == 0
    return off // 4


# Word indices inside one mmsghdr, for the 'Q' (8-byte) and 'I' (4-byte) views.
Q_STRIDE = STRIDE // 8
I_STRIDE = STRIDE // 4
Q_NAME = _w64("msg_name")
Q_IOV = _w64("msg_iov")
Q_IOVLEN = _w64("msg_iovlen")
I_NAMELEN = _w32(Msghdr.msg_namelen.offset)
I_FLAGS = _w32(Msghdr.msg_flags.offset)
I_LEN = _w32(Mmsghdr.msg_len.offset)


def recvmmsg(fd: int, hdrs_addr: int, n: int) -> int:
    """Non-blocking: number of messages received, 0 when none are waiting."""
    r: int = _recvmmsg(fd, hdrs_addr, n, MSG_DONTWAIT, None)
    if r < 0:
        err = ctypes.get_errno()
        if err in (errno.EAGAIN, errno.EINTR):
            return 0
        raise OSError(err, os.strerror(err))
    return r


def sendmmsg(fd: int, hdrs_addr: int, n: int) -> int:
    """Number sent; -errno when the first message failed (never raises)."""
    r: int = _sendmmsg(fd, hdrs_addr, n, MSG_DONTWAIT)
    if r < 0:
        return -ctypes.get_errno()
    return r


# <asm-generic/socket.h> on 64-bit: SO_TIMESTAMPNS (= SCM_TIMESTAMPNS), a struct timespec.
SOL_SOCKET = 1
SO_TIMESTAMPNS = SCM_TIMESTAMPNS = 35
TS_CMSG = struct.Struct("=Qiiqq")  # cmsghdr (len, level, type) + timespec (sec, nsec)
TS_CMSG_SPACE = 32  # CMSG_SPACE(sizeof(struct timespec))
Q_STRIDE = STRIDE // 8
Q_RCONTROLLEN = _w64("msg_controllen")


class RecvVec:
    """``n`` receive slots of ``size`` bytes each, with optional source-address buffers."""

    def __init__(self, n: int, size: int, namelen: int = 0) -> None:
        self.n = n
        self.size = size
        self.namelen = namelen
        self.buf = (ctypes.c_char * (n * size))()
        self.buf_addr = ctypes.addressof(self.buf)
        self.hdrs = (Mmsghdr * n)()
        self.hdrs_addr = ctypes.addressof(self.hdrs)
        self.iovs = (Iovec * n)()
        self.names = (ctypes.c_char * max(1, n * namelen))()
        self.names_addr = ctypes.addressof(self.names)
        for i in range(n):
            self.iovs[i].iov_base = self.buf_addr + i * size
            self.iovs[i].iov_len = size
            h = self.hdrs[i].msg_hdr
            h.msg_iov = ctypes.addressof(self.iovs[i])
            h.msg_iovlen = 1
            if namelen:
                h.msg_name = self.names_addr + i * namelen
                h.msg_namelen = namelen
        self.u32 = memoryview(self.hdrs).cast("B").cast("I")
        self.view = memoryview(self.buf).cast("B")
        # Word views of the slots for reading one header field of every packet
        # with one strided slice (native byte order; slot size is a multiple of 8).
        assert size % 8 == 0
        self.v16 = self.view.cast("H")
        self.v32 = self.view.cast("I")
        self.v64 = self.view.cast("Q")
        self._addrs: dict[int, memoryview] = {}

    def payload_addrs(self, offset: int) -> memoryview:
        """Addresses ``slot i + offset`` for every slot, as a ``'Q'`` memoryview."""
        a = self._addrs.get(offset)
        if a is None:
            base = self.buf_addr + offset
            a = self._addrs[offset] = memoryview(
                array("Q", range(base, base + self.n * self.size, self.size))
            )
        return a

    def recv(self, fd: int) -> int:
        """Fill slots from ``fd``; msg_len of slot i is ``u32[i * I_STRIDE + I_LEN]``."""
        return recvmmsg(fd, self.hdrs_addr, self.n)

    def with_timestamps(self) -> None:
        """Give every slot a control buffer for one SCM_TIMESTAMPNS (traced batches only).

        Sockets without SO_TIMESTAMPNS write nothing there, so untraced
        batches pay nothing; :meth:`arm_timestamps` re-opens the buffers
        before a traced batch (recvmmsg shrinks msg_controllen to what it wrote).
        """
        self.ctl = (ctypes.c_char * (self.n * TS_CMSG_SPACE))()
        self.ctl_addr = ctypes.addressof(self.ctl)
        self.q64 = memoryview(self.hdrs).cast("B").cast("Q")
        for i in range(self.n):
            self.hdrs[i].msg_hdr.msg_control = self.ctl_addr + i * TS_CMSG_SPACE
        self.arm_timestamps(self.n)

    def arm_timestamps(self, count: int) -> None:
        q = self.q64
        for i in range(count):
            q[i * Q_STRIDE + Q_RCONTROLLEN] = TS_CMSG_SPACE

    def timestamp(self, i: int) -> float | None:
        """The kernel's receive time of slot ``i`` (SCM_TIMESTAMPNS), None if it gave none."""
        if self.q64[i * Q_STRIDE + Q_RCONTROLLEN] < TS_CMSG_SPACE:
            return None
        length, level, kind, sec, nsec = TS_CMSG.unpack_from(self.ctl, i * TS_CMSG_SPACE)
        if level != SOL_SOCKET or kind != SCM_TIMESTAMPNS or length < TS_CMSG.size:
            return None
        return float(sec + nsec / 1e9)

    def reset_names(self, count: int) -> None:
        """recvmmsg overwrote msg_namelen of the first ``count`` slots; restore it."""
        u = self.u32
        for i in range(count):
            u[i * I_STRIDE + I_NAMELEN] = self.namelen


class Cmsghdr(ctypes.Structure):
    _fields_ = [
        ("cmsg_len", ctypes.c_size_t),
        ("cmsg_level", ctypes.c_int),
        ("cmsg_type", ctypes.c_int),
    ]


SOL_UDP = 17
UDP_SEGMENT = 103  # linux/udp.h: GSO segment size, a u16 in a cmsg
# CMSG_LEN(sizeof(u16)) and CMSG_SPACE(sizeof(u16)) for the UDP_SEGMENT cmsg
GSO_CMSG_LEN = ctypes.sizeof(Cmsghdr) + 2
GSO_CMSG_SPACE = (GSO_CMSG_LEN + 7) & ~7
Q_CONTROL = _w64("msg_control")
Q_CONTROLLEN = _w64("msg_controllen")


class SendVec:
    """``n`` messages over ``n`` iovecs whose buffers and destinations are set per packet.

    Message ``m`` may gather several consecutive iovecs (``msg_iovlen`` > 1);
    with :meth:`set_gso` it then carries a ``UDP_SEGMENT`` cmsg, so the kernel
    sends the iovecs as that many datagrams of the segment size (UDP GSO), one
    trip through the stack for all of them.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.hdrs = (Mmsghdr * n)()
        self.hdrs_addr = ctypes.addressof(self.hdrs)
        self.iovs = (Iovec * n)()
        self.iovs_addr = ctypes.addressof(self.iovs)
        self.ctl = (ctypes.c_char * (n * GSO_CMSG_SPACE))()
        self.ctl_addr = ctypes.addressof(self.ctl)
        for i in range(n):
            h = self.hdrs[i].msg_hdr
            h.msg_iov = ctypes.addressof(self.iovs[i])
            h.msg_iovlen = 1
            c = Cmsghdr.from_address(self.ctl_addr + i * GSO_CMSG_SPACE)
            c.cmsg_len = GSO_CMSG_LEN
            c.cmsg_level = SOL_UDP
            c.cmsg_type = UDP_SEGMENT
        self.q = memoryview(self.hdrs).cast("B").cast("Q")
        self.u32 = memoryview(self.hdrs).cast("B").cast("I")
        self.iq = memoryview(self.iovs).cast("B").cast("Q")
        self.ctl16 = memoryview(self.ctl).cast("B").cast("H")

    def set(self, i: int, name_addr: int, namelen: int, data_addr: int, length: int) -> None:
        """Point message ``i`` (one iovec, ``i``) at a destination sockaddr and a payload."""
        self.q[i * Q_STRIDE + Q_NAME] = name_addr
        self.u32[i * I_STRIDE + I_NAMELEN] = namelen
        self.q[i * Q_STRIDE + Q_IOV] = self.iovs_addr + 16 * i
        self.q[i * Q_STRIDE + Q_IOVLEN] = 1
        self.q[i * Q_STRIDE + Q_CONTROLLEN] = 0
        self.iq[2 * i] = data_addr
        self.iq[2 * i + 1] = length

    def start(self, m: int, name_addr: int, namelen: int, first_iov: int) -> None:
        """Message ``m`` goes to ``name_addr`` and starts at iovec ``first_iov``."""
        q = self.q
        b = m * Q_STRIDE
        q[b + Q_NAME] = name_addr
        self.u32[m * I_STRIDE + I_NAMELEN] = namelen
        q[b + Q_IOV] = self.iovs_addr + 16 * first_iov

    def finish(self, m: int, iovlen: int, gso_size: int) -> None:
        """Message ``m`` has ``iovlen`` iovecs; segment size ``gso_size`` when > 0."""
        q = self.q
        b = m * Q_STRIDE
        q[b + Q_IOVLEN] = iovlen
        if gso_size:
            off = m * GSO_CMSG_SPACE
            q[b + Q_CONTROL] = self.ctl_addr + off
            q[b + Q_CONTROLLEN] = GSO_CMSG_SPACE
            self.ctl16[(off + ctypes.sizeof(Cmsghdr)) // 2] = gso_size
        else:
            q[b + Q_CONTROLLEN] = 0

    def send(self, fd: int, start: int, count: int) -> int:
        """sendmmsg of messages [start, start+count); see :func:`sendmmsg`."""
        return sendmmsg(fd, self.hdrs_addr + start * STRIDE, count)
