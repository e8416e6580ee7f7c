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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import __version__, protocol, rulefiles
from .children import Backoff, describe_status
from .config import (
    Settings,
    admin_gid,
    apply_reload,
    load_settings,
    reloadable_changes,
    restart_required,
    socket_gid,
)
from .control_messages import Call, ControlSettings, Reply
from .errors import INTERNAL_ERROR, ConfigError, McrelayError, SettingsInvalid, StateFileError
from .ipc import Channel, ProtocolViolation
from .kernel.engine import KernelEngine
from .kernel.mrdisc import Advertiser
from .kernel.mroute import MrouteSocket
from .membership import GroupJoins, Membership
from .netlink import InterfaceTable
from .reconcile import Reconciler
from .relay.manager import RelayManager
from .sdnotify import Notifier
from .service import RuleService
from .state import StateStore
from .stats import MetricsExporter

log = logging.getLogger("mcrelay")

TICK = 0.5
# Listings of relay counters first pull fresh ones from the workers, without
# ever blocking the loop: the call waits (parked) at most this long.
REFRESH_TIMEOUT = 0.25
# A child whose back-off has doubled this many times in a row is crash-looping.
CRASH_LOOP_STREAK = 3
FRESH_COUNTER_METHODS = frozenset({"relay.list", "stats.get"})

Handler = Callable[[int, float], None]  # (selector event mask, now)


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


@dataclass
class ControlChild:
    """The control process and its restart bookkeeping."""

    proc: subprocess.Popen[bytes] | None = None
    channel: Channel | None = None
    restarts: int = 0
    backoff: Backoff = field(default_factory=Backoff)
    next_start: float = 0.0
    started: float = 0.0
    last_exit: str = ""


@dataclass
class ParkedCall:
    """A listing waiting (without blocking anything) for the workers' fresh counters."""

    call: Call
    asked: dict[int, int]
    deadline: float


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
        self.interfaces: InterfaceTable | None = None
        self.kernel: KernelEngine | None = None
        self.membership: Membership | None = None
        self.relays: RelayManager | None = None
        self.reconciler = Reconciler([])
        self._dynamic: dict[int, tuple[int, Handler]] = {}  # worker channels in the selector
        self._parked: list[ParkedCall] = []
        self._mrdisc_interfaces: tuple[str, ...] = ()  # from rule files (phyint ... mrdisc)
        self.mrdisc: Advertiser | None = None

    # ------------------------------------------------------------ start-up

    def run(self) -> int:
        try:
            rules = self.store.load()
        except StateFileError as exc:
            log.critical("%s", exc)
            log.critical("refusing to start; the state file was left as it is")
            return 1
        self._install_signals()
        try:
            return self._run(rules)
        finally:
            self._shutdown()

    def _run(self, rules: Any) -> int:
        interfaces = self.interfaces = InterfaceTable()
        table = self.settings.table
        kernel = self.kernel = KernelEngine(
            interfaces.ifindex_of,
            learned_expiry=self.settings.learned_expiry,
            socket_factory=lambda family: MrouteSocket(family, table),
            names=lambda: [i.name for i in interfaces.all()],
            explain=interfaces.why_unusable,
        )
        try:
            kernel.open()
        except McrelayError as exc:
            log.critical("cannot open the kernel multicast routing sockets: %s", exc)
            log.critical("is another multicast routing daemon (smcroute, pimd) running here?")
            return 1
        membership = self.membership = Membership(
            interfaces.ifindex_of, logging.getLogger("mcrelay.membership")
        )
        relays = self.relays = RelayManager(
            workers=self.settings.workers,
            user=self.settings.user,
            ifindex_of=interfaces.ifindex_of,
            membership=membership,
            log=logging.getLogger("mcrelay.relay"),
            why_unusable=interfaces.why_unusable,
            receives_on=interfaces.receives_on,
        )
        group_joins = GroupJoins(membership, lambda: [i.name for i in interfaces.all()])
        # Each engine converges on its own; memberships first so that a relay
        # input's group is joined by the time its socket opens.
        self.reconciler = Reconciler(
            [
                ("wildcard group joins", group_joins.reconcile),
                ("group memberships", membership.reconcile),
                ("kernel routes", kernel.reconcile),
                ("relays", relays.reconcile),
            ]
        )
        self.service = RuleService(
            kernel,
            relays,
            group_joins,
            self.store,
            status_extra=self._status_extra,
            interfaces=self._interface_list,
            reload=self.reload,
        )
        relays.start()
        try:
            files = rulefiles.load(self.settings.rules)
        except ConfigError as exc:
            log.critical("%s", exc)
            log.critical("refusing to start; check the rule files with 'mcrelayd --check'")
            return 1
        self._mrdisc_interfaces = files.mrdisc
        self.mrdisc = Advertiser(lambda: [(i.name, i.ifindex) for i in interfaces.all() if i.up])
        self._configure_mrdisc()
        try:
            self.service.restore(rules, files)
        except McrelayError as exc:
            log.critical("cannot re-apply the saved rules from %s: %s", self.settings.state, exc)
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
            exporter = self.metrics
            self.sel.register(
                exporter.fileno(),
                selectors.EVENT_READ,
                lambda mask, now: exporter.answer(self._metrics_snapshot),
            )

    def _metrics_snapshot(self) -> dict[str, Any]:
        """What one scrape shows, built in the loop when a scrape asks (stats.py), never idle.

        Plain dicts only: the exporter's thread renders them without touching
        the engines. Worker counters are those of the last periodic pull
        (at most a second old), so a scrape never waits for a worker.
        """
        assert self.kernel is not None and self.relays is not None
        rules = self.service.rules
        processes = {"supervisor": os.getpid()}
        if self.control.proc is not None:
            processes["control"] = self.control.proc.pid
        workers = self.relays.workers()
        for w in workers:
            if w.get("pid"):
                processes[f"worker{w['index']}"] = int(w["pid"])
        return {
            "routes": [s.to_dict() for s in self.kernel.routes()],
            "relays": self.relays.relays(),
            "per_relay": self.settings.metrics_per_relay,
            "workers": workers,
            "rules": {
                "routes": len(rules.routes),
                "relays": len(rules.relays),
                "groups": len(rules.groups),
            },
            "control_restarts": self.control.restarts,
            "processes": processes,
        }

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
        """The descriptors that live as long as the daemon, each with its handler."""
        assert self.interfaces is not None and self.kernel is not None
        interfaces, kernel = self.interfaces, self.kernel
        self.sel.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        self.sel.register(
            interfaces.fileno(),
            selectors.EVENT_READ,
            lambda mask, now: interfaces.handle_readable(),
        )
        for fd in kernel.fds():
            self.sel.register(
                fd, selectors.EVENT_READ, lambda mask, now, fd=fd: kernel.handle_readable(fd, now)
            )

    def _on_wake(self, mask: int, now: float) -> None:
        with contextlib.suppress(BlockingIOError):
            self._wake_r.recv(4096)

    # ------------------------------------------------------------ loop

    def _loop(self) -> None:
        assert self.interfaces is not None
        next_tick = 0.0
        while not self.stopping:
            self._sync_watches()
            now = time.monotonic()
            timeout = max(0.0, min(next_tick, self._next_due(now)) - now)
            try:
                events = self.sel.select(timeout)
            except InterruptedError:
                events = []
            now = time.monotonic()
            for key, mask in events:
                try:
                    key.data(mask, now)
                except Exception:
                    log.exception("error handling an event on fd %d", key.fd)
            if self.interfaces.stale:
                try:
                    self.interfaces.refresh()
                except Exception as exc:  # netlink itself failing: try again next round
                    log.warning("cannot re-read interfaces: %s", exc)
            self.reconciler.run(now, self.interfaces.generation)
            self._reap()
            self._answer_parked(now)
            if self.reload_requested:
                self.reload_requested = False
                self._reload()
            if now >= next_tick:
                next_tick = now + TICK
                self._tick(now)

    def _next_due(self, now: float) -> float:
        due = [p.retry_at for p in self.reconciler.parts if p.failing is not None]
        due += [p.deadline for p in self._parked]
        return min(due, default=now + TICK)

    def _sync_watches(self) -> None:
        """Keep the selector level with the worker channels (restarts replace them)."""
        assert self.relays is not None
        wanted = self.relays.watches()
        for fd, (_, handler) in list(self._dynamic.items()):
            if wanted.get(fd, (None, None))[1] is not handler:
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self.sel.unregister(fd)
                del self._dynamic[fd]
        for fd, (events, handler) in wanted.items():
            have = self._dynamic.get(fd)
            if have is None:
                self.sel.register(fd, events, handler)
            elif have[0] != events:
                self.sel.modify(fd, events, handler)
            self._dynamic[fd] = (events, handler)

    def _tick(self, now: float) -> None:
        assert self.kernel is not None and self.relays is not None
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
        if self.mrdisc is not None:
            try:
                self.mrdisc.tick(now)
            except Exception:
                log.exception("multicast router discovery failed")
        interval = self.notifier.watchdog_interval()
        if interval is not None and now - self._last_watchdog >= interval:
            self._last_watchdog = now
            self.notifier.watchdog()

    def _reap(self) -> None:
        assert self.relays is not None
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
        self.sel.register(ours.sock, selectors.EVENT_READ, self._on_control)
        log.debug("control process started (pid %d)", proc.pid)

    def _schedule_control(self, now: float, ran_for: float = 0.0) -> float:
        delay = self.control.backoff.next_delay(ran_for)
        self.control.next_start = now + delay
        return delay

    def _on_control(self, mask: int, now: float) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush_control()
        if mask & selectors.EVENT_READ:
            self._from_control(now)

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
        self._parked.clear()  # their connections went with the control process
        if self.relays is not None:
            self.relays.trace_stop_all()  # no client can be reading a trace any more
        if self.stopping:
            return
        self.control.restarts += 1
        self.control.last_exit = describe_status(status)
        delay = self._schedule_control(now, now - self.control.started)
        log.warning(
            "control process exited (%s); restarting in %.1fs (restart #%d)",
            self.control.last_exit,
            delay,
            self.control.restarts,
        )

    def _from_control(self, now: float) -> None:
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
        if msg.method in FRESH_COUNTER_METHODS and self.relays is not None:
            asked = self.relays.request_stats(now)
            if not self.relays.stats_answered(asked):
                self._parked.append(ParkedCall(msg, asked, now + REFRESH_TIMEOUT))
                return
        self._reply(self._execute(msg))

    def _reply(self, reply: Reply) -> None:
        # Never block on the control process: a stuck control child must not
        # stall kernel upcalls, netlink or the workers.
        chan = self.control.channel
        if chan is None:
            return
        try:
            chan.post(reply)
        except OSError as exc:
            log.warning("control channel: %s", exc)
        self._watch_control()

    def _answer_parked(self, now: float) -> None:
        if not self._parked:
            return
        assert self.relays is not None
        waiting = []
        for parked in self._parked:
            if now >= parked.deadline or self.relays.stats_answered(parked.asked):
                self._reply(self._execute(parked.call))
            else:
                waiting.append(parked)
        self._parked = waiting

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
            self.sel.modify(chan.sock, events, self._on_control)

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
        assert self.kernel is not None
        families = self.kernel.families()
        return {
            "socket": self.settings.socket,
            "state_file": self.settings.state,
            "kernel": {"ipv4": 4 in families, "ipv6": 6 in families},
            "control_restarts": self.control.restarts,
            "control_last_exit": self.control.last_exit or None,
            "warnings": [*self._crash_loop_warnings(), *self.reconciler.warnings()],
        }

    def _crash_loop_warnings(self) -> list[str]:
        """Children restarted again and again without ever running stably, and why.

        The back-off doubles with each quick death (children.py); from the
        third one in a row the child is crash-looping, and `status` says so
        with its last exit reason, which the log gives once per restart.
        """
        out = []
        looping = CRASH_LOOP_STREAK
        if self.control.backoff.streak >= looping:
            out.append(
                f"the control process keeps exiting ({self.control.restarts} restarts, last: "
                f"{self.control.last_exit}); see the log"
            )
        if self.relays is not None:
            for slot in self.relays.pool.slots:
                if slot.backoff.streak >= looping:
                    out.append(
                        f"relay worker {slot.index} keeps exiting ({slot.restarts} restarts, "
                        f"last: {slot.last_exit}); see the log"
                    )
        return out

    def _interface_list(self) -> list[dict[str, Any]]:
        assert self.kernel is not None and self.interfaces is not None
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

    def _reload_steps(self) -> list[Callable[[str, bool], dict[str, Any]]]:
        """What a reload does, in order; each step returns its part of the answer.

        A step that fails raises :class:`McrelayError` after logging why: the
        steps after it do not run and the caller (SIGHUP or `daemon.reload`)
        gets that error. Further steps (re-applying rule files) are added here.
        """
        return [self._reload_settings, self._reload_rule_files]

    def reload(self, origin: str = "mcrelay reload", dry_run: bool = False) -> dict[str, Any]:
        """Re-read what can be re-read (SIGHUP and `daemon.reload`); the merged answers.

        Runs in the loop, so the answer is sent when everything is applied;
        systemd hears RELOADING=1 before and READY=1 after (also on failure:
        the daemon keeps running with its old settings). A dry run changes
        nothing and says what a reload would change.
        """
        if not dry_run:
            self.notifier.reloading()
        try:
            answer: dict[str, Any] = {"dry_run": dry_run}
            for step in self._reload_steps():
                answer.update(step(origin, dry_run))
            return answer
        finally:
            if not dry_run:
                self.notifier.ready()
                self._status_line()

    def _reload(self) -> None:
        """SIGHUP: as `mcrelay reload`; a failure is only logged (nobody waits for an answer)."""
        with contextlib.suppress(McrelayError):
            self.reload("SIGHUP")

    def _configure_mrdisc(self) -> None:
        if self.mrdisc is not None:
            names = (*self.settings.mrdisc, *self._mrdisc_interfaces)
            self.mrdisc.configure(names, self.settings.mrdisc_interval)

    def _reload_rule_files(self, origin: str, dry_run: bool) -> dict[str, Any]:
        """Rule-file step: re-read the files ``rules`` names, apply the difference at once."""
        try:
            files = rulefiles.load(self.settings.rules)
        except ConfigError as exc:
            log.error("%s: rule files not reloaded, keeping the current rules: %s", origin, exc)
            raise SettingsInvalid(
                f"rule files not reloaded, keeping the current rules: {exc}"
            ) from None
        diff = self.service.load_files(files, dry_run=dry_run)
        if not dry_run:
            self._mrdisc_interfaces = files.mrdisc
            self._configure_mrdisc()
            counts = {k: sum(len(v) for v in d.values()) for k, d in diff.items()}
            log.info(
                "%s: %d rule file(s) re-read (%s)",
                origin,
                len(files.files),
                ", ".join(f"{n} {k} changed" for k, n in counts.items()),
            )
        return {"rule_files": list(files.files), "rules": diff}

    def _reload_settings(self, origin: str, dry_run: bool) -> dict[str, Any]:
        """Settings step: apply the reloadable keys now, name the ones needing a restart."""
        try:
            new = load_settings(self.config_path, self.overrides)
        except ConfigError as exc:
            log.error("%s: settings not reloaded, keeping the current ones: %s", origin, exc)
            raise SettingsInvalid(
                f"settings not reloaded, keeping the current ones: {exc}"
            ) from None
        applied = reloadable_changes(self.settings, new)
        needs = restart_required(self.settings, new)
        answer = {
            "config": new.config_path,
            "changed": applied,
            "restart_required": needs,
        }
        if dry_run:
            return answer
        if needs:
            log.warning("%s: %s change(s) need a restart to take effect", origin, ", ".join(needs))
        logging.getLogger().setLevel(new.log_level.upper())
        if self.kernel is not None:
            self.kernel.learned_expiry = new.learned_expiry
        self.settings = apply_reload(self.settings, new)
        if self.control.channel is not None:
            self.control.channel.post(self._control_settings())
            self._watch_control()
        log.info(
            "%s: settings re-read%s",
            origin,
            f" (changed: {', '.join(applied)})" if applied else " (no change applied)",
        )
        return answer

    # ------------------------------------------------------------ shutdown

    def _shutdown(self) -> None:
        self.notifier.stopping()
        log.info("stopping: removing installed routes and relays")
        if self.control.proc is not None:
            with contextlib.suppress(OSError):
                self.control.proc.terminate()
            with contextlib.suppress(Exception):
                self.control.proc.wait(timeout=2)
        if self.relays is not None:
            with contextlib.suppress(Exception):
                self.relays.stop()
        if self.kernel is not None:
            try:
                self.kernel.close()
            except Exception:
                log.exception("removing kernel routes failed")
        if self.membership is not None:
            with contextlib.suppress(Exception):
                self.membership.close()
        if self.interfaces is not None:
            with contextlib.suppress(Exception):
                self.interfaces.close()
        if self.mrdisc is not None:
            self.mrdisc.close()
        if self.listener is not None:
            self.listener.close()
            with contextlib.suppress(OSError):
                os.unlink(self.settings.socket)


def _brief(params: dict[str, Any]) -> str:
    text = str({k: v for k, v in params.items() if k != "rules"})
    return text if len(text) < 200 else text[:197] + "..."
