"""The Python client of the mcrelayd control socket (the ``mcrelay`` CLI is built on it).

One :class:`Client` holds one connection to the daemon's Unix socket and speaks
JSON-RPC 2.0 on it, one JSON object per line. A call returns the ``result``
member of the reply; an ``error`` reply raises :class:`RemoteError` carrying
the server's code, message and data unchanged, so a script can branch on
``exc.code`` (the codes are in :mod:`mcrelay.errors`). A daemon that cannot be
reached raises :class:`DaemonUnreachable`, whose message names the socket and
says how to start the daemon.

    with Client() as mc:
        mc.route_add("eth0", "239.1.1.1", ["eth1", "eth2"], source="10.0.0.1")
        for route in mc.routes():
            print(route["group"], route["packets"])

The connection is opened on the first call and reused; if the daemon closed an
idle connection in between, the next call quietly opens a new one (nothing had
been sent on the old one, so nothing can be applied twice).

``timeout`` bounds connecting and, by default, each reply. A daemon that is
busy (a large ``apply``) is not gone: with ``wait_while_connected=True`` a
reply slower than ``timeout`` is waited for as long as the connection lives,
and ``on_wait(seconds)`` is called every ``timeout`` seconds so a person can be
told; only a failed connect or a dropped connection is ``DaemonUnreachable``.

The exchange is logged at DEBUG on logger ``mcrelay.client``. The module does
not import :mod:`logging` itself (it costs a short-lived CLI call more than the
call's own work): if nothing else imported it, no handler can be listening.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import select
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

from .errors import UNAVAILABLE, McrelayError

__all__ = [
    "DEFAULT_SOCKET",
    "Client",
    "DaemonUnreachable",
    "ProtocolError",
    "RemoteError",
    "default_socket_path",
]

DEFAULT_SOCKET = "/run/mcrelay/mcrelay.sock"
SOCKET_ENV = "MCRELAY_SOCKET"
MAX_REPLY = 256 * 1024 * 1024  # a 20,000-relay listing is a few tens of MiB at most

LOGGER = "mcrelay.client"

JSONObject = dict[str, Any]


def _debug(fmt: str, *args: Any) -> None:
    """Log at DEBUG on ``mcrelay.client`` if :mod:`logging` is in use in this process at all."""
    logging = sys.modules.get("logging")
    if logging is not None:
        logging.getLogger(LOGGER).debug(fmt, *args)


def default_socket_path() -> str:
    """``$MCRELAY_SOCKET`` if set and non-empty, else ``/run/mcrelay/mcrelay.sock``."""
    return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


class RemoteError(McrelayError):
    """The daemon answered with a JSON-RPC error; code, message and data are the server's."""

    def __init__(self, code: int, message: str, data: Mapping[str, Any] | None = None) -> None:
        super().__init__(message, dict(data or {}))
        self.code = code

    def __repr__(self) -> str:
        return f"RemoteError({self.code}, {self.message!r}, {self.data!r})"


class DaemonUnreachable(McrelayError):
    """No daemon answers on the socket (missing, refused, no permission, timed out, hung up)."""

    code = UNAVAILABLE

    def __init__(self, path: str, reason: str) -> None:
        hint = (
            "is mcrelayd running? Start it with `systemctl start mcrelay` or run `mcrelayd` "
            f"(another socket: --socket PATH or {SOCKET_ENV})"
        )
        if "permission denied" in reason:
            hint = (
                "the socket belongs to group mcrelay: add your user to it "
                "(`usermod -aG mcrelay $USER`, then log in again) or run as root"
            )
        super().__init__(
            f"cannot reach mcrelayd at {path}: {reason}; {hint}",
            {"socket": path, "reason": reason},
        )
        self.path = path
        self.reason = reason


class ProtocolError(McrelayError):
    """The daemon's reply is not a JSON-RPC 2.0 response (version mismatch or a bug)."""


def _reason(exc: OSError) -> str:
    """A short, engineer-readable reason for a socket error."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    code = exc.errno
    if code == errno.ENOENT:
        return "no such socket"
    if code == errno.ECONNREFUSED:
        return "connection refused (stale socket, daemon not running)"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if code in (errno.EPIPE, errno.ECONNRESET):
        return "connection closed by the daemon"
    if code == errno.ENOTSOCK:
        return "not a socket"
    return exc.strerror or str(exc)


class Client:
    """A connection to mcrelayd's control socket (JSON-RPC 2.0, newline-delimited).

    ``socket_path`` defaults to ``$MCRELAY_SOCKET`` or ``/run/mcrelay/mcrelay.sock``;
    ``timeout`` bounds connecting and waiting for each reply, in seconds. With
    ``wait_while_connected`` a slower reply is awaited as long as the connection
    is open (``on_wait(seconds waited)`` every ``timeout`` seconds meanwhile).
    """

    def __init__(
        self,
        socket_path: str | None = None,
        timeout: float = 10.0,
        *,
        wait_while_connected: bool = False,
        on_wait: Callable[[float], None] | None = None,
    ) -> None:
        self.socket_path = socket_path or default_socket_path()
        self.timeout = timeout
        self.wait_while_connected = wait_while_connected
        self.on_wait = on_wait
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._ids = itertools.count(1)

    # ------------------------------------------------------------ connection

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (a later call opens a new one)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buf.clear()

    def _unreachable(self, reason: str) -> DaemonUnreachable:
        self.close()
        return DaemonUnreachable(self.socket_path, reason)

    def _connect(self) -> socket.socket:
        if self._sock is not None and not self._peer_hung_up(self._sock):
            return self._sock
        self.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError as exc:
            sock.close()
            raise self._unreachable(_reason(exc)) from None
        self._sock = sock
        return sock

    @staticmethod
    def _peer_hung_up(sock: socket.socket) -> bool:
        """True if the daemon closed this idle connection (e.g. its idle timeout)."""
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                return False
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except OSError:
            return True

    # ------------------------------------------------------------ calls

    def call(self, method: str, /, **params: Any) -> Any:
        """Call ``method`` with by-name ``params`` and return the reply's ``result``."""
        return self.request(method, params)

    def request(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        """Like :meth:`call`, with the parameters as one mapping."""
        rid = next(self._ids)
        msg: JSONObject = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params:
            msg["params"] = dict(params)
        line = json.dumps(msg, separators=(",", ":")).encode() + b"\n"
        sock = self._connect()
        _debug("> %s", line.decode().rstrip())
        try:
            sock.sendall(line)
        except OSError as exc:
            raise self._unreachable(_reason(exc)) from None
        reply = self._read_reply(sock, rid)
        if "error" in reply:
            err = reply["error"]
            if not isinstance(err, dict):
                raise ProtocolError(f"malformed error reply from mcrelayd: {err!r}")
            data = err.get("data")
            raise RemoteError(
                int(err.get("code", 0)),
                str(err.get("message", "unknown error")),
                data if isinstance(data, dict) else ({"data": data} if data is not None else None),
            )
        if "result" not in reply:
            raise ProtocolError("reply from mcrelayd has neither result nor error")
        return reply["result"]

    def _read_reply(self, sock: socket.socket, rid: int) -> JSONObject:
        started = time.monotonic()
        while True:
            line = self._read_line(sock, started)
            _debug("< %s", line.decode(errors="replace").rstrip())
            try:
                reply = json.loads(line)
            except ValueError as exc:
                self.close()
                raise ProtocolError(f"reply from mcrelayd is not JSON: {exc}") from None
            if not isinstance(reply, dict) or reply.get("jsonrpc") != "2.0":
                self.close()
                raise ProtocolError("reply from mcrelayd is not a JSON-RPC 2.0 object")
            if reply.get("id") == rid:
                return reply
            if reply.get("id") is None and "error" in reply:
                # The server could not read our request at all (parse error): its
                # reply carries id null, and it is about us (one request in flight).
                return reply
            # Anything else (a stale reply, a notification) is not ours: skip it.

    def _read_line(self, sock: socket.socket, started: float) -> bytes:
        """The next line from the daemon; waits in steps of ``timeout`` (see :meth:`_recv`)."""
        deadline = started + self.timeout
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                line = bytes(self._buf[: end + 1])
                del self._buf[: end + 1]
                return line
            if len(self._buf) > MAX_REPLY:
                self.close()
                raise ProtocolError(f"reply from mcrelayd longer than {MAX_REPLY} bytes")
            chunk = self._recv(sock, deadline)
            if chunk is None:  # a whole step without a byte, on a live connection
                self._still_waiting(time.monotonic() - started)
                deadline = time.monotonic() + self.timeout
                continue
            self._buf += chunk

    def _recv(self, sock: socket.socket, deadline: float) -> bytes | None:
        """Bytes from the daemon, or None when ``deadline`` passed without any.

        A closed or reset connection is the daemon gone (unreachable); silence
        is not, so it is left to :meth:`_still_waiting` to decide.
        """
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(1 << 16)
        except TimeoutError:
            return None
        except OSError as exc:
            raise self._unreachable(_reason(exc)) from None
        if not chunk:
            raise self._unreachable("connection closed by the daemon before it replied")
        return chunk

    def _still_waiting(self, waited: float) -> None:
        """No reply yet after ``waited`` s: give up, unless told to wait while connected."""
        if not self.wait_while_connected:
            raise self._unreachable(f"no reply within {self.timeout:g} s")
        if self.on_wait is not None:
            self.on_wait(waited)

    # ------------------------------------------------------------ kernel routes

    def route_add(
        self,
        iif: str,
        group: str,
        oifs: Sequence[str | Mapping[str, Any]],
        source: str | None = None,
        dry_run: bool = False,
    ) -> JSONObject:
        """Add a static kernel route; ``source`` None is (*,G). ``oifs``: names or {name, ttl}."""
        params: JSONObject = {"iif": iif}
        if source is not None and source != "*":
            params["source"] = source
        params["group"] = group
        params["oifs"] = [o if isinstance(o, str) else dict(o) for o in oifs]
        params["dry_run"] = dry_run
        return self._obj(self.request("route.add", params))

    def route_del(
        self, iif: str, group: str, source: str | None = None, dry_run: bool = False
    ) -> JSONObject:
        """Delete the kernel route (iif, source, group); ``source`` None is (*,G)."""
        params: JSONObject = {"iif": iif}
        if source is not None and source != "*":
            params["source"] = source
        params["group"] = group
        params["dry_run"] = dry_run
        return self._obj(self.request("route.del", params))

    def routes(self) -> list[JSONObject]:
        """Kernel routes with state and counters (``route.list``)."""
        return self._list(self.call("route.list"), "routes")

    # ------------------------------------------------------------ relays

    def relay_add(
        self,
        name: str | None,
        input: Mapping[str, Any],
        outputs: Sequence[Mapping[str, Any]],
        mode: str | None = None,
        dry_run: bool = False,
    ) -> JSONObject:
        """Add a relay: ``input`` {iif, group, port, sources?}, ``outputs`` [{address, port, ...}].

        ``name`` None lets the daemon derive it from the input (GROUP:PORT@IIF);
        ``mode`` None is the daemon's default (``packet``).
        """
        params: JSONObject = {}
        if name is not None:
            params["name"] = name
        params["input"] = dict(input)
        params["outputs"] = [dict(o) for o in outputs]
        if mode is not None:
            params["mode"] = mode
        params["dry_run"] = dry_run
        return self._obj(self.request("relay.add", params))

    def reflector_add(
        self, name: str, reflect: Mapping[str, Any], dry_run: bool = False
    ) -> JSONObject:
        """Add a discovery reflector: ``reflect`` {proto | group+port, on, listen_only?,
        source?, allow?} (see docs/discovery.md)."""
        params: JSONObject = {"name": name, "reflect": dict(reflect), "dry_run": dry_run}
        return self._obj(self.request("relay.add", params))

    def relay_del(self, name: str, dry_run: bool = False) -> JSONObject:
        """Delete the relay called ``name``."""
        return self._obj(self.request("relay.del", {"name": name, "dry_run": dry_run}))

    def relays(self) -> list[JSONObject]:
        """Relays with state, per-output counters and drop counters (``relay.list``)."""
        return self._list(self.call("relay.list"), "relays")

    # ------------------------------------------------------------ memberships

    def group_join(
        self, iface: str, group: str, source: str | None = None, dry_run: bool = False
    ) -> JSONObject:
        """Hold an IGMP/MLD membership of ``group`` (from ``source`` for SSM) on ``iface``."""
        return self._obj(self.request("group.join", self._group(iface, group, source, dry_run)))

    def group_leave(
        self, iface: str, group: str, source: str | None = None, dry_run: bool = False
    ) -> JSONObject:
        """Drop a membership held with :meth:`group_join`."""
        return self._obj(self.request("group.leave", self._group(iface, group, source, dry_run)))

    def groups(self) -> list[JSONObject]:
        """Memberships the daemon holds, with the rules that use them (``group.list``)."""
        return self._list(self.call("group.list"), "groups")

    @staticmethod
    def _group(iface: str, group: str, source: str | None, dry_run: bool) -> JSONObject:
        params: JSONObject = {"iface": iface, "group": group}
        if source is not None and source != "*":
            params["source"] = source
        params["dry_run"] = dry_run
        return params

    # ------------------------------------------------------------ read-only views

    def interfaces(self) -> list[JSONObject]:
        """Interfaces with their VIF/MIF slots (``interface.list``)."""
        return self._list(self.call("interface.list"), "interfaces")

    def workers(self) -> list[JSONObject]:
        """Relay worker processes (``worker.list``)."""
        return self._list(self.call("worker.list"), "workers")

    def stats(self) -> JSONObject:
        """All counters: routes, relays, workers, daemon (``stats.get``)."""
        return self._obj(self.call("stats.get"))

    def status(self) -> JSONObject:
        """Daemon health and summary (``daemon.status``)."""
        return self._obj(self.call("daemon.status"))

    def reload(self, dry_run: bool = False) -> JSONObject:
        """Re-read the settings file (``daemon.reload``); answers when done, with what changed."""
        return self._obj(self.request("daemon.reload", {"dry_run": dry_run}))

    # ------------------------------------------------------------ whole rule set

    def apply(self, rules: Mapping[str, Any], dry_run: bool = False) -> JSONObject:
        """Replace the rule set ({routes, relays, groups}) in one transaction; returns the diff."""
        return self._obj(self.request("config.apply", {"rules": dict(rules), "dry_run": dry_run}))

    def export(self) -> JSONObject:
        """The current rule set in the format :meth:`apply` and ``mcrelay apply`` read."""
        return self._obj(self.call("config.export"))

    # ------------------------------------------------------------ tracing

    def trace_start(self, name: str) -> JSONObject:
        """Start recording the packets of relay ``name``."""
        return self._obj(self.call("trace.start", name=name))

    def trace_stop(self, name: str) -> JSONObject:
        """Stop recording the packets of relay ``name``."""
        return self._obj(self.call("trace.stop", name=name))

    def trace_read(self, name: str, cursor: int = 0) -> JSONObject:
        """Records after ``cursor``: {"records": [...], "cursor": next cursor}."""
        return self._obj(self.call("trace.read", name=name, cursor=cursor))

    # ------------------------------------------------------------ helpers

    @staticmethod
    def _obj(result: Any) -> JSONObject:
        if not isinstance(result, dict):
            raise ProtocolError(f"expected an object from mcrelayd, got {type(result).__name__}")
        return result

    @staticmethod
    def _list(result: Any, key: str) -> list[JSONObject]:
        if not isinstance(result, dict) or not isinstance(result.get(key), list):
            raise ProtocolError(f"expected {{{key!r}: [...]}} from mcrelayd")
        return list(result[key])
