"""Typed messages between the supervisor and its children, framed on a socketpair.

The socketpair is ``SOCK_SEQPACKET`` so each datagram is one frame and file
descriptors (``SCM_RIGHTS``) stay attached to the message they belong to.
A message larger than one frame (a 10,000-relay table) is split into
fragments: the first byte of each frame says whether more follow.

Messages are frozen dataclasses registered with :func:`message`. They travel as
JSON (never pickle: a child is less trusted than the supervisor) and are
rebuilt field by field: a class whose fields are not plain JSON values
provides ``to_wire()``/``from_wire()``.
"""

from __future__ import annotations

import array
import collections
import dataclasses
import json
import os
import socket
from collections.abc import Callable
from typing import Any, ClassVar, Protocol, TypeVar

FRAME = 32 * 1024
MAX_MESSAGE = 64 * 1024 * 1024
MAX_FDS = 250  # SCM_MAX_FD is 253
_MORE = b"\x01"
_LAST = b"\x00"


class Message(Protocol):
    """What a registered message class provides."""

    __dataclass_fields__: ClassVar[dict[str, Any]]


M = TypeVar("M")
_REGISTRY: dict[str, type[Any]] = {}


def message(cls: type[M]) -> type[M]:
    """Register a dataclass as a message type (decorator)."""
    _REGISTRY[cls.__name__] = cls
    return cls


class ProtocolViolation(Exception):
    """The peer sent something that is not a well-formed message."""


def encode(msg: Any) -> bytes:
    to_wire = getattr(msg, "to_wire", None)
    body = to_wire() if to_wire is not None else dataclasses.asdict(msg)
    return json.dumps({"t": type(msg).__name__, "m": body}, separators=(",", ":")).encode()


def decode(data: bytes) -> Any:
    try:
        obj = json.loads(data)
        cls = _REGISTRY[obj["t"]]
        body = obj["m"]
        from_wire: Callable[[Any], Any] | None = getattr(cls, "from_wire", None)
        if from_wire is not None:
            return from_wire(body)
        return cls(**body)
    except Exception as exc:  # any malformed input is one kind of failure
        raise ProtocolViolation(f"bad message: {exc}") from exc


@message
@dataclasses.dataclass(frozen=True)
class Ping:
    """Liveness check; the peer answers with a Pong carrying the same seq."""

    seq: int


@message
@dataclasses.dataclass(frozen=True)
class Pong:
    seq: int


class Channel:
    """One end of a supervisor<->child socketpair."""

    def __init__(self, sock: socket.socket, *, takes_fds: bool = True) -> None:
        """``takes_fds=False``: this end never expects descriptors, so any that
        arrive are closed here and receivers always get an empty list."""
        self.sock = sock
        self.takes_fds = takes_fds
        self._parts: list[bytes] = []
        self._fds: list[int] = []
        self._size = 0
        self._outbox: collections.deque[tuple[bytes, list[int]]] = collections.deque()

    @staticmethod
    def pair(*, takes_fds: bool = True) -> tuple[Channel, Channel]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return Channel(a, takes_fds=takes_fds), Channel(b, takes_fds=takes_fds)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        for _, held in self._outbox:
            for fd in held:
                os.close(fd)
        self._outbox.clear()

    def send(self, msg: Any, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Send one message (blocking), file descriptors attached to its first frame."""
        if len(fds) > MAX_FDS:
            raise ValueError(f"at most {MAX_FDS} descriptors per message")
        data = encode(msg)
        chunks = [data[i : i + FRAME] for i in range(0, len(data), FRAME)] or [b""]
        for i, chunk in enumerate(chunks):
            flag = _LAST if i == len(chunks) - 1 else _MORE
            anc = []
            if i == 0 and fds:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            self.sock.sendmsg([flag, chunk], anc)

    def post(self, msg: Any, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Queue a message and send what the socket takes now, never blocking.

        For peers that must never stall each other: call :meth:`flush` when the
        socket is writable again while :attr:`wants_write` is true. Descriptors
        are duplicated when queued (the caller may close its own at once) and
        travel with the message's first frame.
        """
        if len(fds) > MAX_FDS:
            raise ValueError(f"at most {MAX_FDS} descriptors per message")
        data = encode(msg)
        chunks = [data[i : i + FRAME] for i in range(0, len(data), FRAME)] or [b""]
        held = [os.dup(fd) for fd in fds]
        for i, chunk in enumerate(chunks):
            flag = _LAST if i == len(chunks) - 1 else _MORE
            self._outbox.append((flag + chunk, held if i == 0 else []))
        self.flush()

    def flush(self) -> None:
        """Send queued frames until the socket would block (raises OSError if the peer is gone)."""
        while self._outbox:
            frame, fds = self._outbox[0]
            anc = []
            if fds:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            try:
                self.sock.sendmsg([frame], anc, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            self._outbox.popleft()
            for fd in fds:
                os.close(fd)

    @property
    def queued(self) -> int:
        """Frames waiting in the outbox (a peer that stopped reading lets this grow)."""
        return len(self._outbox)

    @property
    def wants_write(self) -> bool:
        return bool(self._outbox)

    def recv(self) -> tuple[Any, list[int]] | None:
        """Read one frame; return a whole message when complete, None if more is needed.

        Raises EOFError when the peer closed, ProtocolViolation on garbage (the
        descriptors received with it are closed).
        """
        fd_size = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
        data, anc, flags, _ = self.sock.recvmsg(FRAME + 1, fd_size)
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                self._fds.extend(fds)
        if not data:
            raise EOFError("peer closed the channel")
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            self._drop()
            raise ProtocolViolation("truncated frame")
        self._parts.append(data[1:])
        self._size += len(data) - 1
        if self._size > MAX_MESSAGE:
            self._drop()
            raise ProtocolViolation("message too large")
        if data[:1] == _MORE:
            return None
        body = b"".join(self._parts)
        fds_out = self._fds
        self._parts, self._fds, self._size = [], [], 0
        if not self.takes_fds:
            for fd in fds_out:
                os.close(fd)
            fds_out = []
        try:
            return decode(body), fds_out
        except ProtocolViolation:
            for fd in fds_out:
                os.close(fd)
            raise

    def recv_message(self) -> tuple[Any, list[int]]:
        """Blocking: read frames until one whole message has arrived."""
        while True:
            got = self.recv()
            if got is not None:
                return got

    def _drop(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._parts, self._fds, self._size = [], [], 0


def expect(msg: Any, cls: type[M]) -> M:
    """Narrow a decoded message to the class the caller needs."""
    if not isinstance(msg, cls):
        raise ProtocolViolation(f"expected {cls.__name__}, got {type(msg).__name__}")
    return msg
