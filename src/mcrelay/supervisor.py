"""The privileged supervisor: owns the kernel, the sockets and the children.

One single-threaded event loop over: the control channel (typed commands in),
the relay workers' channels, the mroute sockets (kernel upcalls), netlink
(interface changes), and a self-pipe for signals. It never reads client bytes
itself: those are parsed by the unprivileged control process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from . import __version__, protocol
from .config import (
    Settings,
    admin_gid,
    apply_reload,
    load_settings,
    restart_required,
    socket_gid,
)
from .control_messages import Call, ControlSettings, Reply
from .errors import INTERNAL_ERROR, McrelayError, StateFileError
from .ipc import Channel, ProtocolViolation
from .kernel.engine import KernelEngine
from .membership import Membership
from .model import GroupJoin
from .netlink import InterfaceTable
from .relay.manager import RelayManager
from .sdnotify import Notifier
from .service import RuleService
from .state import StateStore
from .stats import MetricsExporter

log = logging.getLogger("mcrelay")

BACKOFF_START = 0.1
BACKOFF_CAP = 5.0
TICK = 0.5
METRICS_EVERY = 2.0


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


@dataclass
class ControlChild:
    """The control process and its restart bookkeeping."""

    proc: subprocess.Popen[bytes] | None = None
    channel: Channel | None = None
    restarts: int = 0
    backoff: float = BACKOFF_START
    next_start: float = 0.0
    started: float = 0.0


class GroupJoins:
    """`group join` rules on top of the shared membership sockets."""

    def __init__(self, membership: Membership) -> None:
        self.membership = membership

    def join(self, join: GroupJoin) -> None:
        self.membership.join(join.iface, join.group, join.source)

    def leave(self, join: GroupJoin) -> None:
        self.membership.leave(join.iface, join.group, join.source)

    def list(self) -> list[dict[str, Any]]:
        return self.membership.list()


def bind_control_socket(path: str, gid: int) -> socket.socket:
    """Create the listening socket: mode 0660, owner root, the configured group."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o755, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise StartupError(f"{path} exists and is not a socket; remove it or pick --socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale socket of a daemon that is gone
        else:
            raise StartupError(f"another mcrelayd is already serving {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chown(path, 0, gid)
    os.chmod(path, 0o660)
    sock.listen(128)
    return sock


class Supervisor:
    """mcrelayd: runs until SIGTERM/SIGINT, then removes everything it installed."""

    def __init__(
        self, settings: Settings, config_path: str | None, overrides: dict[str, Any]
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self.overrides = overrides
        self.notifier = Notifier()
        self.sel = selectors.DefaultSelector()
        self.stopping = False
        self.reload_requested = False
        self.control = ControlChild()
        self.listener: socket.socket | None = None
        self.socket_gid = 0
        self.store = StateStore(settings.state)
        self._wake_r, self._wake_w = socket.socketpair()
        self._last_watchdog = 0.0
        self.metrics: MetricsExporter | None = None
        self._last_metrics = -METRICS_EVERY

    # ------------------------------------------------------------ start-up

    def run(self) -> int:
        try:
            rules = self.store.load()
        except StateFileError as exc:
            log.critical("%s", exc)
            log.critical("refusing to start; the state file was left as it is")
            return 1
        self._install_signals()
        self.interfaces = InterfaceTable()
        self.kernel = KernelEngine(
            self.interfaces.ifindex_of, learned_expiry=self.settings.learned_expiry
        )
        try:
            self.kernel.open()
        except McrelayError as exc:
            log.critical("cannot open the kernel multicast routing sockets: %s", exc)
            log.critical("is another multicast routing daemon (smcroute, pimd) running here?")
            return 1
        self.membership = Membership(
            self.interfaces.ifindex_of, logging.getLogger("mcrelay.membership")
        )
        self.relays = RelayManager(
            workers=self.settings.workers,
            user=self.settings.user,
            ifindex_of=self.interfaces.ifindex_of,
            membership=self.membership,
            log=logging.getLogger("mcrelay.relay"),
        )
        self.interfaces.listeners += [
            self.kernel.interface_changed,
            self.relays.interface_changed,  # also drops/rejoins the memberships
        ]
        self.service = RuleService(
            self.kernel,
            self.relays,
            GroupJoins(self.membership),
            self.store,
            status_extra=self._status_extra,
            interfaces=self._interface_list,
        )
        try:
            self.relays.start()
            try:
                self.service.restore(rules)
            except McrelayError as exc:
                log.critical(
                    "cannot re-apply the saved rules from %s: %s", self.settings.state, exc
                )
                log.critical("refusing to start; the state file was left as it is")
                return 1
            try:
                self.listener = self._open_listener()
            except (StartupError, OSError) as exc:
                log.critical("cannot serve the control socket: %s", exc)
                return 1
            self._start_control(time.monotonic())
            self._start_metrics()
            self._register()
            self.notifier.ready()
            self._status_line()
            log.info(
                "mcrelayd %s ready on %s (%d worker(s), state %s)",
                __version__,
                self.settings.socket,
                self.settings.workers,
                self.settings.state,
            )
            self._loop()
            return 0
        finally:
            self._shutdown()

    def _start_metrics(self) -> None:
        address = self.settings.metrics_address
        if address is None:
            return
        try:
            self.metrics = MetricsExporter(*address)
        except ImportError:
            log.error("metrics_listen is set but prometheus-client is not installed; no metrics")
        except OSError as exc:
            log.error("cannot serve metrics on %s: %s", self.settings.metrics_listen, exc)
        else:
            self._publish_metrics(time.monotonic())

    def _publish_metrics(self, now: float) -> None:
        if self.metrics is None or now - self._last_metrics < METRICS_EVERY:
            return
        self._last_metrics = now
        try:
            self.metrics.publish(self.service.execute(protocol.Command("stats.get")))
        except Exception:
            log.exception("collecting metrics failed")

    def _open_listener(self) -> socket.socket:
        gid, warning = socket_gid(self.settings)
        if warning:
            log.warning("%s", warning)
        self.socket_gid = gid
        return bind_control_socket(self.settings.socket, gid)

    def _control_settings(self) -> ControlSettings:
        admin, warning = admin_gid(self.settings)
        if warning:
            log.warning("%s", warning)
        return ControlSettings(
            socket_gid=self.socket_gid,
            admin_gid=admin,
            max_line=self.settings.max_line,
            max_connections=self.settings.max_connections,
            idle_timeout=float(self.settings.idle_timeout),
            log_level=self.settings.log_level,
        )

    def _install_signals(self) -> None:
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the loop; reaped there
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def _on_stop(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _on_hup(self, signum: int, frame: object) -> None:
        self.reload_requested = True

    def _register(self) -> None:
        self.sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self.sel.register(self.interfaces.fileno(), selectors.EVENT_READ, ("netlink", None))
        for fd in self.kernel.fds():
            self.sel.register(fd, selectors.EVENT_READ, ("kernel", fd))

    # ------------------------------------------------------------ loop

    def _loop(self) -> None:
        next_tick = 0.0
        while not self.stopping:
            self._sync_relay_fds()
            now = time.monotonic()
            timeout = max(0.0, min(TICK, next_tick - now))
            try:
                events = self.sel.select(timeout)
            except InterruptedError:
                events = []
            now = time.monotonic()
            for key, mask in events:
                kind, arg = key.data
                try:
                    self._dispatch(kind, arg, now, mask)
                except Exception:
                    log.exception("error handling %s event", kind)
            self._reap()
            if self.reload_requested:
                self.reload_requested = False
                self._reload()
            if now >= next_tick:
                next_tick = now + TICK
                self._tick(now)

    def _dispatch(self, kind: str, arg: Any, now: float, mask: int) -> None:
        if kind == "wake":
            with contextlib.suppress(BlockingIOError):
                self._wake_r.recv(4096)
        elif kind == "netlink":
            self.interfaces.handle_readable()
        elif kind == "kernel":
            self.kernel.handle_readable(arg, now)
        elif kind == "control":
            if mask & selectors.EVENT_WRITE:
                self._flush_control()
            if mask & selectors.EVENT_READ:
                self._from_control()
        elif kind == "relay":
            self.relays.handle_readable(arg, now)

    def _sync_relay_fds(self) -> None:
        wanted = set(self.relays.fds())
        registered = {k.fd for k in self.sel.get_map().values() if k.data[0] == "relay"}
        for fd in registered - wanted:
            self.sel.unregister(fd)
        for fd in wanted - registered:
            self.sel.register(fd, selectors.EVENT_READ, ("relay", fd))

    def _tick(self, now: float) -> None:
        try:
            self.kernel.expire(now)
        except Exception:
            log.exception("expiring learned kernel entries failed")
        try:
            self.relays.tick(now)
        except Exception:
            log.exception("relay manager tick failed")
        if self.control.proc is None and now >= self.control.next_start:
            self._start_control(now)
        self._publish_metrics(now)
        interval = self.notifier.watchdog_interval()
        if interval is not None and now - self._last_watchdog >= interval:
            self._last_watchdog = now
            self.notifier.watchdog()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.control.proc is not None and pid == self.control.proc.pid:
                self._control_exited(status)
            elif not self.relays.child_exited(pid, status):
                log.debug("reaped unknown child %d", pid)

    # ------------------------------------------------------------ control child

    def _start_control(self, now: float) -> None:
        assert self.listener is not None
        ours, theirs = Channel.pair(takes_fds=False)
        cmd = [
            sys.executable,
            "-m",
            "mcrelay.control",
            "--listen-fd",
            str(self.listener.fileno()),
            "--channel-fd",
            str(theirs.fileno()),
            "--user",
            self.settings.user,
        ]
        try:
            proc = subprocess.Popen(cmd, pass_fds=(self.listener.fileno(), theirs.fileno()))
        except OSError as exc:
            log.error("cannot start the control process: %s", exc)
            ours.close()
            theirs.close()
            self._schedule_control(now)
            return
        theirs.close()
        ours.send(self._control_settings())
        self.control.proc, self.control.channel = proc, ours
        self.control.started = now
        self.sel.register(ours.sock, selectors.EVENT_READ, ("control", None))
        log.debug("control process started (pid %d)", proc.pid)

    def _schedule_control(self, now: float) -> None:
        self.control.next_start = now + self.control.backoff
        self.control.backoff = min(BACKOFF_CAP, self.control.backoff * 2)

    def _control_exited(self, status: int) -> None:
        now = time.monotonic()
        proc, chan = self.control.proc, self.control.channel
        self.control.proc, self.control.channel = None, None
        if proc is not None:
            proc.returncode = os.waitstatus_to_exitcode(status)
        if chan is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(chan.sock)
            chan.close()
        if self.stopping:
            return
        if now - self.control.started > 10:
            self.control.backoff = BACKOFF_START
        self.control.restarts += 1
        log.warning(
            "control process exited (%s); restarting in %.1fs (restart #%d)",
            _describe_status(status),
            self.control.backoff,
            self.control.restarts,
        )
        self._schedule_control(now)

    def _from_control(self) -> None:
        chan = self.control.channel
        if chan is None:
            return
        try:
            got = chan.recv()
        except (EOFError, ConnectionError, ProtocolViolation) as exc:
            log.warning("control channel: %s", exc)
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(chan.sock)
            # os.kill, not Popen.kill: Popen polls (and so reaps) first, and the
            # exit would then never reach _reap and the restart logic.
            if self.control.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.control.proc.pid, signal.SIGKILL)
            return
        if got is None:
            return
        msg, _ = got
        if not isinstance(msg, Call):
            log.warning("unexpected message from control: %s", type(msg).__name__)
            return
        # Never block on the control process: a stuck control child must not
        # stall kernel upcalls, netlink or the workers.
        try:
            chan.post(self._execute(msg))
        except OSError as exc:
            log.warning("control channel: %s", exc)
        self._watch_control()

    def _flush_control(self) -> None:
        chan = self.control.channel
        if chan is None:
            return
        try:
            chan.flush()
        except OSError as exc:
            log.warning("control channel: %s", exc)
        self._watch_control()

    def _watch_control(self) -> None:
        chan = self.control.channel
        if chan is None:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if chan.wants_write else 0)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.modify(chan.sock, events, ("control", None))

    def _execute(self, call: Call) -> Reply:
        try:
            command = protocol.parse_command(call.method, call.params)
            result = self.service.execute(command)
        except McrelayError as exc:
            return Reply(call.seq, error=exc.to_error())
        except Exception as exc:
            log.exception("internal error executing %s", call.method)
            return Reply(
                call.seq,
                error={"code": INTERNAL_ERROR, "message": f"internal error: {exc}"},
            )
        if protocol.METHODS[call.method].access == "admin" and call.method not in ("trace.read",):
            log.info("uid %d: %s %s", call.uid, call.method, _brief(call.params))
        self._status_line()
        return Reply(call.seq, result=result)

    # ------------------------------------------------------------ status & reload

    def _status_extra(self) -> dict[str, Any]:
        return {
            "socket": self.settings.socket,
            "state_file": self.settings.state,
            "kernel": {"ipv4": 4 in self.kernel.families(), "ipv6": 6 in self.kernel.families()},
            "control_restarts": self.control.restarts,
        }

    def _interface_list(self) -> list[dict[str, Any]]:
        out = []
        for itf in self.interfaces.all():
            d = itf.to_dict()
            for fam in (4, 6):
                vifs = self.kernel.vifs(fam) if fam in self.kernel.families() else None
                d[f"vif{fam}"] = vifs.slot_of(itf.name) if vifs is not None else None
            out.append(d)
        return out

    def _status_line(self) -> None:
        rules = self.service.rules
        self.notifier.status(
            f"{len(rules.routes)} route(s), {len(rules.relays)} relay(s), "
            f"{len(rules.groups)} group(s)"
        )

    def _reload(self) -> None:
        self.notifier.reloading()
        try:
            new = load_settings(self.config_path, self.overrides)
        except Exception as exc:
            log.error("SIGHUP: settings not reloaded, keeping the current ones: %s", exc)
            self.notifier.ready()
            return
        needs = restart_required(self.settings, new)
        if needs:
            log.warning("SIGHUP: %s change(s) need a restart to take effect", ", ".join(needs))
        logging.getLogger().setLevel(new.log_level.upper())
        self.kernel.learned_expiry = new.learned_expiry
        self.settings = apply_reload(self.settings, new)
        if self.control.channel is not None:
            self.control.channel.post(self._control_settings())
            self._watch_control()
        log.info("SIGHUP: settings re-read")
        self.notifier.ready()

    # ------------------------------------------------------------ shutdown

    def _shutdown(self) -> None:
        self.notifier.stopping()
        log.info("stopping: removing installed routes and relays")
        if self.control.proc is not None:
            with contextlib.suppress(OSError):
                self.control.proc.terminate()
            with contextlib.suppress(Exception):
                self.control.proc.wait(timeout=2)
        if hasattr(self, "relays"):
            with contextlib.suppress(Exception):
                self.relays.stop()
        if hasattr(self, "kernel"):
            try:
                self.kernel.close()
            except Exception:
                log.exception("removing kernel routes failed")
        if hasattr(self, "membership"):
            with contextlib.suppress(Exception):
                self.membership.close()
        if self.listener is not None:
            self.listener.close()
            with contextlib.suppress(OSError):
                os.unlink(self.settings.socket)


def _brief(params: dict[str, Any]) -> str:
    text = str({k: v for k, v in params.items() if k != "rules"})
    return text if len(text) < 200 else text[:197] + "..."


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return f"killed by {signal.Signals(sig).name}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"
