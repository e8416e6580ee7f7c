"""The control process: serves the JSON-RPC socket without privileges.

It accepts clients, enforces the line, connection and idle limits, identifies
peers with SO_PEERCRED, parses and validates every request into a typed
command (protocol.py) and only then forwards it to the supervisor as a
:class:`Call`. Whatever a client sends, the worst outcome is an error reply
and a closed connection: nothing reaches the supervisor unvalidated.

Run by the supervisor as ``python -m mcrelay.control --listen-fd N
--channel-fd M --user USER``.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import protocol
from .children import EXIT_CONFIG
from .control_messages import Call, ControlSettings, Reply
from .errors import InvalidRequest, LimitExceeded, McrelayError, PermissionDenied
from .ipc import Channel, ProtocolViolation, expect

SO_PEERGROUPS = 59  # Linux >= 4.13, asm-generic/socket.h
MAX_OUTBUF = 64 * 1024 * 1024
OUTBUF_HIGH = 1024 * 1024  # stop reading requests of a peer that does not read replies
MAX_INFLIGHT = 1  # requests of one connection at the supervisor at a time
READ_CHUNK = 256 * 1024

log = logging.getLogger("mcrelay.control")


@dataclass
class Peer:
    """One client connection and what we know about who is at the other end."""

    sock: socket.socket
    uid: int
    gid: int
    groups: frozenset[int]
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    last_active: float = 0.0
    closing: bool = False
    inflight: int = 0  # requests forwarded to the supervisor, not yet answered
    events: int = 0  # what the selector watches for this peer (0: not registered)
    traces: set[str] = field(default_factory=set)  # relays this connection is tracing
    handler: Callable[[int], None] | None = None  # its selector callback, once registered

    def may(self, access: str, settings: ControlSettings) -> bool:
        if self.uid == 0:
            return True
        gids = self.groups | {self.gid}
        is_admin = settings.admin_gid is not None and settings.admin_gid in gids
        if access == "admin":
            return is_admin
        return is_admin or settings.socket_gid in gids


def peer_credentials(sock: socket.socket) -> tuple[int, int, int, frozenset[int]]:
    """(pid, uid, gid, supplementary groups) of the process at the other end."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    groups: frozenset[int] = frozenset()
    try:
        # Python caps getsockopt's buffer at 1024 bytes (256 groups); a bigger
        # buflen raises OSError before the kernel is even asked.
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
        arr = array.array("I")
        arr.frombytes(raw[: len(raw) - len(raw) % 4])
        groups = frozenset(arr)
    except OSError:  # more than 256 groups (ERANGE), or a kernel without SO_PEERGROUPS
        groups = _proc_groups(pid)
    return pid, uid, gid, groups


def _proc_groups(pid: int) -> frozenset[int]:
    """Supplementary groups from /proc/PID/status (fallback; empty if unreadable)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return frozenset()


@dataclass
class Pending:
    """A call at the supervisor: whom to answer (None: the control process's own call)."""

    peer: Peer | None
    rid: int | str | None
    notification: bool
    method: str
    params: dict[str, Any] = field(default_factory=dict)


class ControlServer:
    """The select loop of the control process.

    Nothing here ever blocks on one party. Each connection has at most
    :data:`MAX_INFLIGHT` request at the supervisor; further pipelined lines
    wait in its buffer, and the socket is not read while that buffer holds a
    complete line or while unsent replies pile up (:data:`OUTBUF_HIGH`), so a
    flooding or non-reading client is held back by its own socket buffers
    instead of queueing thousands of calls ahead of everybody else. Calls to
    the supervisor go through a non-blocking frame queue: the supervisor may be
    sending replies while we send calls, and neither side may wait for the
    other (that would deadlock both).
    """

    def __init__(
        self, listener: socket.socket, channel: Channel, settings: ControlSettings
    ) -> None:
        self.listener = listener
        self.channel = channel
        self.settings = settings
        self.sel = selectors.DefaultSelector()
        self.peers: dict[int, Peer] = {}
        self.pending: dict[int, Pending] = {}
        # Tracing is leased to connections: relay name -> the peers tracing it.
        # The last one to stop or hang up (even killed with -9) stops it.
        self.tracers: dict[str, set[int]] = {}
        self.seq = 0
        self.running = True
        listener.setblocking(False)
        # Each descriptor is registered with its handler (called with the events).
        self.sel.register(listener, selectors.EVENT_READ, lambda events: self._accept())
        self.sel.register(channel.sock, selectors.EVENT_READ, self._on_channel)

    def run(self) -> None:
        while self.running:
            timeout = self._next_timeout()
            for key, events in self.sel.select(timeout):
                key.data(events)
            self._expire_idle()

    def _on_channel(self, events: int) -> None:
        if events & selectors.EVENT_WRITE:
            self._flush_channel()
        if events & selectors.EVENT_READ:
            self._from_supervisor()

    def _on_peer(self, peer: Peer, events: int) -> None:
        if self.peers.get(peer.sock.fileno()) is not peer:
            return
        if events & selectors.EVENT_WRITE:
            self._flush(peer)
        if events & selectors.EVENT_READ and peer.sock.fileno() in self.peers:
            self._read(peer)
        if peer.sock.fileno() in self.peers:
            self._process(peer)

    # ------------------------------------------------------------ connections

    def _next_timeout(self) -> float:
        return max(0.1, min(1.0, self.settings.idle_timeout / 4))

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: keep serving the others
                log.warning("accept failed: %s", exc)
                return
            sock.setblocking(False)
            _, uid, gid, groups = peer_credentials(sock)
            if len(self.peers) >= self.settings.max_connections:
                self._drop_hung_up()
            if len(self.peers) >= self.settings.max_connections:
                err = LimitExceeded(
                    f"too many connections (limit {self.settings.max_connections}); try again"
                )
                with contextlib.suppress(OSError):
                    sock.send(protocol.encode_line(protocol.error_response(None, err.to_error())))
                sock.close()
                continue
            peer = Peer(sock, uid, gid, groups, last_active=time.monotonic())
            self.peers[sock.fileno()] = peer
            self._watch(peer)

    def _watch(self, peer: Peer) -> None:
        """Point the selector at what this peer needs now (read, write, both, nothing)."""
        fd = peer.sock.fileno()
        if fd < 0 or fd not in self.peers:
            return
        events = 0
        if peer.outbuf:
            events |= selectors.EVENT_WRITE
        if peer.closing or (
            peer.inflight < MAX_INFLIGHT
            and len(peer.outbuf) < OUTBUF_HIGH
            and b"\n" not in peer.inbuf
        ):
            events |= selectors.EVENT_READ
        if events == peer.events:
            return
        if peer.events == 0:
            peer.handler = lambda ev, peer=peer: self._on_peer(peer, ev)
            self.sel.register(peer.sock, events, peer.handler)
        elif events == 0:
            self.sel.unregister(peer.sock)
        else:
            self.sel.modify(peer.sock, events, peer.handler)
        peer.events = events

    def _drop_hung_up(self) -> None:
        """Close peers that already hung up but whose EOF this loop has not read yet.

        Without this, a client that disconnects and reconnects at once can be
        refused for a connection slot it no longer holds.
        """
        for peer in list(self.peers.values()):
            try:
                if peer.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                    self._close(peer)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self._close(peer)

    def _close(self, peer: Peer) -> None:
        for name in sorted(peer.traces):
            if self._release_trace(peer, name):
                self.seq += 1
                self.pending[self.seq] = Pending(None, None, True, "trace.stop")
                self._send_call(Call(self.seq, "trace.stop", {"name": name}, peer.uid))
        fd = peer.sock.fileno()
        if fd in self.peers and self.peers[fd] is peer:
            del self.peers[fd]
            if peer.events:
                self.sel.unregister(peer.sock)
            peer.events = 0
        peer.sock.close()

    def _expire_idle(self) -> None:
        now = time.monotonic()
        for peer in list(self.peers.values()):
            # A peer waiting for the supervisor's answer is not idle.
            if peer.inflight == 0 and now - peer.last_active > self.settings.idle_timeout:
                self._close(peer)

    def _read(self, peer: Peer) -> None:
        try:
            data = peer.sock.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(peer)
            return
        if not data:
            self._close(peer)
            return
        peer.last_active = time.monotonic()
        if peer.closing:
            return
        peer.inbuf += data

    def _process(self, peer: Peer) -> None:
        """Handle the complete lines in the peer's buffer, as far as its limits allow."""
        while not peer.closing and peer.inflight < MAX_INFLIGHT and len(peer.outbuf) < OUTBUF_HIGH:
            nl = peer.inbuf.find(b"\n")
            if nl < 0:
                if len(peer.inbuf) > self.settings.max_line:
                    self._refuse_long_line(peer)
                break
            if nl > self.settings.max_line:
                self._refuse_long_line(peer)
                break
            line = bytes(peer.inbuf[:nl])
            del peer.inbuf[: nl + 1]
            if line.strip():
                self._handle_line(peer, line)
            if peer.sock.fileno() < 0:
                return
        self._watch(peer)

    def _refuse_long_line(self, peer: Peer) -> None:
        err = InvalidRequest(
            f"request line longer than {self.settings.max_line} bytes; connection closed"
        )
        peer.inbuf.clear()
        peer.closing = True
        self._queue(peer, protocol.error_response(None, err.to_error()))

    def _queue(self, peer: Peer, obj: dict[str, object]) -> None:
        if peer.sock.fileno() < 0:
            return
        peer.outbuf += protocol.encode_line(obj)
        if len(peer.outbuf) > MAX_OUTBUF:  # a client that never reads
            self._close(peer)
            return
        self._flush(peer)

    def _flush(self, peer: Peer) -> None:
        if peer.sock.fileno() < 0:
            return
        while peer.outbuf:
            try:
                sent = peer.sock.send(peer.outbuf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._close(peer)
                return
            del peer.outbuf[:sent]
        if peer.closing and not peer.outbuf:
            self._close(peer)
            return
        self._watch(peer)

    # ------------------------------------------------------------ supervisor channel

    def _send_call(self, call: Call) -> None:
        """Queue a call for the supervisor and send what fits now, never blocking."""
        try:
            self.channel.post(call)
        except OSError as exc:
            log.info("supervisor went away (%s); exiting", exc)
            self.running = False
            return
        self._watch_channel()

    def _flush_channel(self) -> None:
        try:
            self.channel.flush()
        except OSError as exc:
            log.info("supervisor went away (%s); exiting", exc)
            self.running = False
            return
        self._watch_channel()

    def _watch_channel(self) -> None:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.channel.wants_write else 0)
        self.sel.modify(self.channel.sock, events, self._on_channel)

    # ------------------------------------------------------------ requests

    def _handle_line(self, peer: Peer, line: bytes) -> None:
        rid: int | str | None = None
        notification = False
        try:
            req = protocol.parse_request(line)
            rid, notification = req.id, req.is_notification
            spec = protocol.METHODS.get(req.method)
            if spec is not None and not peer.may(spec.access, self.settings):
                raise PermissionDenied(
                    f"permission denied: {req.method} needs "
                    + ("root or the admin group" if spec.access == "admin" else "the socket group")
                    + f" (you are uid {peer.uid})",
                    {"method": req.method, "uid": peer.uid},
                )
            command = protocol.parse_command(req.method, req.params)
        except McrelayError as exc:
            if isinstance(exc, InvalidRequest) and "id" in exc.data:
                rid = exc.data.pop("id")
            if not notification:
                self._queue(peer, protocol.error_response(rid, exc.to_error()))
            return
        except Exception as exc:  # a bug must cost one request, never the process
            log.exception("unexpected error parsing a request")
            if not notification:
                err = {"code": -32603, "message": f"internal error: {type(exc).__name__}"}
                self._queue(peer, protocol.error_response(rid, err))
            return
        params = command.params()
        if command.method == "trace.stop" and not self._release_trace(peer, params["name"]):
            # Others still trace this relay: it stays on for them.
            if not notification:
                self._queue(peer, protocol.response(rid, {"name": params["name"], "tracing": True}))
            return
        self.seq += 1
        self.pending[self.seq] = Pending(peer, rid, notification, command.method, params)
        peer.inflight += 1
        self._send_call(Call(self.seq, command.method, params, peer.uid))

    def _release_trace(self, peer: Peer, name: str) -> bool:
        """Drop ``peer``'s lease on tracing ``name``; True when nobody holds it any more."""
        peer.traces.discard(name)
        holders = self.tracers.get(name, set())
        holders.discard(id(peer))
        if holders:
            return False
        self.tracers.pop(name, None)
        return True

    def _from_supervisor(self) -> None:
        try:
            got = self.channel.recv()
        except (EOFError, ConnectionError):
            log.info("supervisor went away; exiting")
            self.running = False
            return
        except ProtocolViolation as exc:
            log.error("bad message from supervisor: %s", exc)
            return
        if got is None:
            return
        msg, _ = got
        if isinstance(msg, ControlSettings):
            self.settings = msg
            logging.getLogger().setLevel(msg.log_level.upper())
            return
        reply = expect(msg, Reply)
        entry = self.pending.pop(reply.seq, None)
        if entry is None or entry.peer is None:
            return
        peer, rid, notification = entry.peer, entry.rid, entry.notification
        peer.inflight -= 1
        if entry.method == "trace.start" and reply.error is None:
            name = str(entry.params.get("name"))
            if peer.sock.fileno() >= 0:
                peer.traces.add(name)
                self.tracers.setdefault(name, set()).add(id(peer))
            elif name not in self.tracers:  # hung up while starting: stop it now
                self.seq += 1
                self.pending[self.seq] = Pending(None, None, True, "trace.stop")
                self._send_call(Call(self.seq, "trace.stop", {"name": name}, peer.uid))
        if peer.sock.fileno() < 0:
            return
        peer.last_active = time.monotonic()
        if not notification:
            if reply.error is not None:
                self._queue(peer, protocol.error_response(rid, reply.error))
            else:
                self._queue(peer, protocol.response(rid, reply.result))
        if peer.sock.fileno() >= 0:
            self._process(peer)  # the next pipelined request, if any


def main(argv: list[str] | None = None) -> int:
    """Entry point of the control child process."""
    parser = argparse.ArgumentParser(prog="mcrelay-control")
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--channel-fd", type=int, required=True)
    parser.add_argument("--user", default="nobody")
    args = parser.parse_args(argv)
    from .logsetup import configure as configure_logging

    configure_logging("mcrelay-control", logging.INFO)  # journald priorities, as mcrelayd
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when we stop
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    listener = socket.socket(fileno=args.listen_fd)
    channel = Channel(socket.socket(fileno=args.channel_fd), takes_fds=False)
    from .privileges import PrivilegeDropFailed, drop_privileges

    if os.geteuid() == 0:
        try:
            drop_privileges(args.user)
        except PrivilegeDropFailed as exc:
            # One line, no traceback: the supervisor logs each restart with its reason.
            log.critical("%s", exc)
            return EXIT_CONFIG
    msg, _ = channel.recv_message()
    settings = expect(msg, ControlSettings)
    logging.getLogger().setLevel(settings.log_level.upper())
    ControlServer(listener, channel, settings).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
