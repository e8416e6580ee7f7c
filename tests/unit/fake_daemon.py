"""A fake mcrelayd for client and CLI tests: a thread answering JSON-RPC on a Unix socket."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


class RpcError(Exception):
    """A canned error reply."""

    def __init__(self, code: int, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.error: dict[str, Any] = {"code": code, "message": message}
        if data is not None:
            self.error["data"] = data


Reply = Any  # a result, an RpcError, or a callable(params) -> result


class FakeDaemon:
    """Serves canned replies per method and records every request it reads."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.replies: dict[str, Reply] = {}
        self.requests: list[dict[str, Any]] = []
        self.raw: Callable[[dict[str, Any]], bytes | None] | None = None
        self.connections = 0
        self.close_after_reply = False  # like the daemon's idle timeout, at once
        self.delays: dict[str, float] = {}  # method -> seconds to work before replying
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(self.path)
        self._server.listen(8)
        self._server.settimeout(0.02)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    def methods(self) -> list[str]:
        return [r["method"] for r in self.requests]

    def last(self, method: str) -> dict[str, Any]:
        """The last request for ``method``."""
        return next(r for r in reversed(self.requests) if r["method"] == method)

    def close(self) -> None:
        self._stop.set()
        self._accept.join(2)
        for t in self._threads:
            t.join(2)
        self._server.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            t = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(0.02)
        buf = b""
        with conn:
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    request = json.loads(line)
                    self.requests.append(request)
                    if self.raw is not None:
                        raw = self.raw(request)
                        if raw is None:
                            return  # hang up without replying
                        conn.sendall(raw)
                        continue
                    if request["method"] in self.delays:  # a busy daemon, not a dead one
                        time.sleep(self.delays[request["method"]])
                    try:
                        conn.sendall(json.dumps(self._reply(request)).encode() + b"\n")
                    except OSError:
                        return  # the client gave up waiting and closed
                    if self.close_after_reply:
                        return

    def _reply(self, request: dict[str, Any]) -> dict[str, Any]:
        base = {"jsonrpc": "2.0", "id": request["id"]}
        method = request["method"]
        if method not in self.replies:
            return {**base, "error": {"code": -32601, "message": f"unknown method {method!r}"}}
        reply = self.replies[method]
        try:
            result = reply(request.get("params", {})) if callable(reply) else reply
        except RpcError as exc:
            return {**base, "error": exc.error}
        if isinstance(result, RpcError):
            return {**base, "error": result.error}
        return {**base, "result": result}


def echo_route(params: dict[str, Any]) -> dict[str, Any]:
    route = {k: v for k, v in params.items() if k != "dry_run"}
    return {"route": route, "dry_run": params.get("dry_run", False)}
