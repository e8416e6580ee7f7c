"""The rule service: executes validated commands against both engines and the state file.

This is where "never lose a rule" is enforced. Every mutation writes the new
rules to the state file first (a change that cannot be persisted is refused
before anything is touched), then applies them as one transaction; if a step
fails, what was applied is undone in reverse order and the old rules are
written back, so the kernel, the workers and the state file never disagree.
Dry runs go through the same validation and planning and change nothing.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Protocol

from . import __version__
from .errors import InvalidParams, NoSuchRule, RuleExists, RuleInFile, Unavailable
from .model import MAX_OUTPUTS, GroupJoin, Relay, Route, RouteKey, RuleSet
from .protocol import (
    ApplyCommand,
    Command,
    GroupCommand,
    NameCommand,
    RelayCommand,
    RouteCommand,
    RouteKeyCommand,
)
from .rulefiles import RuleFiles, merge, overlap
from .state import export_dict
from .transaction import Transaction

log = logging.getLogger("mcrelay.service")


class Diff(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


class KernelRoutes(Protocol):
    """What the service needs of the kernel engine (kernel/engine.py)."""

    def add_route(self, route: Route, dry_run: bool = False) -> None: ...
    def update_route(self, route: Route, dry_run: bool = False) -> None: ...
    def del_route(self, key: RouteKey, dry_run: bool = False) -> None: ...
    def replace(self, routes: Sequence[Route], dry_run: bool = False) -> Diff: ...
    def routes(self) -> Sequence[Any]: ...


class Relays(Protocol):
    """What the service needs of the relay manager (relay/manager.py)."""

    def add(self, relay: Relay, dry_run: bool = False) -> None: ...
    def delete(self, name: str, dry_run: bool = False) -> None: ...
    def replace(self, relays: Sequence[Relay], dry_run: bool = False) -> dict[str, list[Any]]: ...
    def relays(self) -> list[dict[str, Any]]: ...
    def workers(self) -> list[dict[str, Any]]: ...
    def warnings(self) -> list[str]: ...
    def trace_start(self, name: str) -> int | None: ...
    def trace_stop(self, name: str) -> None: ...
    def trace_read(self, name: str, cursor: int) -> tuple[list[dict[str, Any]], int]: ...


class Groups(Protocol):
    """Standing memberships the user asked for (`group join`)."""

    def join(self, join: GroupJoin) -> None: ...
    def leave(self, join: GroupJoin) -> None: ...
    def list(self) -> list[dict[str, Any]]: ...


class Store(Protocol):
    def save(self, rules: RuleSet) -> None: ...


class RuleService:
    """Owns the current rule set; turns commands into engine changes plus a state write."""

    def __init__(
        self,
        kernel: KernelRoutes,
        relays: Relays,
        groups: Groups,
        store: Store,
        status_extra: Callable[[], dict[str, Any]] | None = None,
        interfaces: Callable[[], list[dict[str, Any]]] | None = None,
        reload: Callable[..., dict[str, Any]] | None = None,
    ) -> None:
        self.kernel = kernel
        self.relay_engine = relays
        self.groups = groups
        self.store = store
        self.rules = RuleSet()  # the runtime layer: what the state file holds
        self.files = RuleFiles()  # the rule-file layer (see rulefiles.py)
        self._effective: tuple[RuleSet, RuleFiles, RuleSet] | None = None
        self.started = time.monotonic()
        self._status_extra = status_extra or dict
        self._interfaces = interfaces or list
        self._reload = reload

    # ------------------------------------------------------------ start-up

    @property
    def effective(self) -> RuleSet:
        """The rules in force: the runtime layer plus the rule files (rebuilt when either moves)."""
        cached = self._effective
        if cached is None or cached[0] is not self.rules or cached[1] is not self.files:
            cached = self._effective = (self.rules, self.files, merge(self.rules, self.files.rules))
        return cached[2]

    def restore(self, rules: RuleSet, files: RuleFiles | None = None) -> None:
        """Install the state file's rules and the rule files' (raises if the kernel refuses)."""
        files = files or RuleFiles()
        clash = overlap(rules, files)
        if clash:
            raise RuleInFile(*clash[0])
        both = merge(rules, files.rules)
        with Transaction("restoring saved rules") as tx:
            self.kernel.replace(both.routes)
            tx.on_failure("remove restored routes", lambda: self.kernel.replace(()))
            self.relay_engine.replace(both.relays)
            tx.on_failure("remove restored relays", lambda: self.relay_engine.replace(()))
            for g in both.groups:
                self.groups.join(g)
                tx.on_failure(f"leave {g}", lambda g=g: self.groups.leave(g))  # type: ignore[misc]
        self.rules, self.files = rules, files
        log.info(
            "restored %d route(s), %d relay(s), %d group(s) (%d of them from %d rule file(s))",
            len(both.routes),
            len(both.relays),
            len(both.groups),
            len(files.rules.routes) + len(files.rules.relays) + len(files.rules.groups),
            len(files.files),
        )

    def load_files(self, files: RuleFiles, dry_run: bool = False) -> dict[str, Any]:
        """Make ``files`` the rule-file layer in one transaction; the diff it made.

        The runtime layer is untouched, so outputs that stay never lose a
        packet (the engines only apply differences); nothing is written to the
        state file, which holds the runtime layer only.
        """
        clash = overlap(self.rules, files)
        if clash:
            raise RuleInFile(*clash[0])
        old, new = self.effective, merge(self.rules, files.rules)
        route_diff = self.kernel.replace(new.routes, True)
        relay_diff = self.relay_engine.replace(new.relays, True)
        group_diff = self._replace_groups(old.groups, new.groups, True, Transaction("plan"))
        if not dry_run:
            with Transaction("reload rule files") as tx:
                self.kernel.replace(new.routes)
                tx.on_failure("restore routes", lambda: self.kernel.replace(old.routes))
                self.relay_engine.replace(new.relays)
                tx.on_failure("restore relays", lambda: self.relay_engine.replace(old.relays))
                self._replace_groups(old.groups, new.groups, False, tx)
            self.files = files
        return {
            "routes": route_diff.to_dict(),
            "relays": _relay_diff_rules(relay_diff, old.relays, new.relays),
            "groups": group_diff,
        }

    def _not_in_file(self, identity: Any, text: str) -> None:
        where = self.files.origins.get(identity)
        if where is not None:
            raise RuleInFile(text, where)

    # ------------------------------------------------------------ dispatch

    def execute(self, cmd: Command) -> Any:
        """Run one command; raises McrelayError subclasses for refusals."""
        handler = getattr(self, "_" + cmd.method.replace(".", "_"))
        return handler(cmd)

    def _persist_then(self, what: str, new: RuleSet, apply: Callable[[Transaction], None]) -> None:
        """Write ``new`` to the state file, then apply it; a refusal changes nothing.

        The state file is written *first*: a change that cannot be persisted
        (disk full, read-only) is refused before the kernel or any worker is
        touched, so it costs no packet and resets no counter. If applying then
        fails, the engines are rolled back by ``apply``'s transaction and the
        old rules are written back.
        """
        self.store.save(new)  # StateWriteFailed: refused, nothing touched
        try:
            with Transaction(what) as tx:
                apply(tx)
        except BaseException:
            try:
                self.store.save(self.rules)
            except Exception as exc:
                log.critical(
                    "%s was refused by the kernel and the state file could not be restored "
                    "(%s): it may hold a rule that is not installed",
                    what,
                    exc,
                )
            raise
        self.rules = new

    # ------------------------------------------------------------ routes

    def _route_add(self, cmd: RouteCommand) -> Any:
        route = cmd.route
        assert route is not None
        self._not_in_file(route.key, str(route.key))
        old = next((r for r in self.rules.routes if r.key == route.key), None)
        if old is not None:
            return self._route_extend(old, route, cmd.dry_run)
        self.kernel.add_route(route, dry_run=True)  # refusals the plan can see: no state write
        if not cmd.dry_run:

            def apply(tx: Transaction) -> None:
                self.kernel.add_route(route)
                tx.on_failure("delete route", lambda: self.kernel.del_route(route.key))

            new = replace(self.rules, routes=(*self.rules.routes, route))
            self._persist_then(f"add {route.key}", new, apply)
        return {"route": route.to_dict(), "dry_run": cmd.dry_run}

    def _route_extend(self, old: Route, more: Route, dry_run: bool) -> Any:
        """``route add`` of an existing route adds its new outputs, as ``smcroutectl add`` does."""
        have = {o.name for o in old.oifs}
        added = tuple(o for o in more.oifs if o.name not in have)
        if not added:
            raise RuleExists(f"{old.key} (with these outputs)")
        if len(old.oifs) + len(added) > MAX_OUTPUTS:
            raise InvalidParams("oifs", f"a route has at most {MAX_OUTPUTS} outputs")
        route = replace(old, oifs=(*old.oifs, *added))
        self.kernel.update_route(route, dry_run=True)
        if not dry_run:

            def apply(tx: Transaction) -> None:
                self.kernel.update_route(route)
                tx.on_failure("restore outputs", lambda: self.kernel.update_route(old))

            rest = tuple(route if r.key == old.key else r for r in self.rules.routes)
            self._persist_then(f"extend {old.key}", replace(self.rules, routes=rest), apply)
        return {
            "route": route.to_dict(),
            "extended": [o.to_dict() for o in added],
            "dry_run": dry_run,
        }

    def _route_del(self, cmd: RouteKeyCommand) -> Any:
        key = cmd.key
        assert key is not None
        self._not_in_file(key, str(key))
        old = next((r for r in self.rules.routes if r.key == key), None)
        if old is None:
            raise NoSuchRule(str(key))
        self.kernel.del_route(key, dry_run=True)
        if not cmd.dry_run:

            def apply(tx: Transaction) -> None:
                self.kernel.del_route(key)
                tx.on_failure("re-add route", lambda: self.kernel.add_route(old))

            rest = tuple(r for r in self.rules.routes if r.key != key)
            self._persist_then(f"delete {key}", replace(self.rules, routes=rest), apply)
        return {"route": old.to_dict(), "dry_run": cmd.dry_run}

    def _route_list(self, cmd: Command) -> Any:
        out = []
        for status in self.kernel.routes():
            d = status.to_dict()
            route = getattr(status, "route", None)
            d["origin"] = self.files.origins.get(getattr(route, "key", None), "state")
            out.append(d)
        return {"routes": out}

    # ------------------------------------------------------------ relays

    def _relay_add(self, cmd: RelayCommand) -> Any:
        relay = cmd.relay
        assert relay is not None
        self._not_in_file(relay.name, f"relay {relay.name!r}")
        for r in self.effective.relays:
            if r.name == relay.name:
                raise RuleExists(f"relay {relay.name!r}")
            shared = sorted(r.input_keys() & relay.input_keys())
            if shared:
                iif, group, port = shared[0]
                raise RuleExists(f"relay input {group}:{port}@{iif} (used by relay {r.name!r})")
        self.relay_engine.add(relay, dry_run=True)
        if not cmd.dry_run:

            def apply(tx: Transaction) -> None:
                self.relay_engine.add(relay)
                tx.on_failure("delete relay", lambda: self.relay_engine.delete(relay.name))

            new = replace(self.rules, relays=(*self.rules.relays, relay))
            self._persist_then(f"add relay {relay.name}", new, apply)
        return {"relay": relay.to_dict(), "dry_run": cmd.dry_run}

    def _relay_del(self, cmd: NameCommand) -> Any:
        self._not_in_file(cmd.name, f"relay {cmd.name!r}")
        old = next((r for r in self.rules.relays if r.name == cmd.name), None)
        if old is None:
            raise NoSuchRule(f"relay {cmd.name!r}")
        self.relay_engine.delete(cmd.name, dry_run=True)
        if not cmd.dry_run:

            def apply(tx: Transaction) -> None:
                self.relay_engine.delete(cmd.name)
                tx.on_failure("re-add relay", lambda: self.relay_engine.add(old))

            rest = tuple(r for r in self.rules.relays if r.name != cmd.name)
            self._persist_then(f"delete relay {cmd.name}", replace(self.rules, relays=rest), apply)
        return {"relay": old.to_dict(), "dry_run": cmd.dry_run}

    def _relay_list(self, cmd: Command) -> Any:
        return {"relays": self.relay_engine.relays()}

    def _worker_list(self, cmd: Command) -> Any:
        return {"workers": self.relay_engine.workers()}

    # ------------------------------------------------------------ groups

    def _group_join(self, cmd: GroupCommand) -> Any:
        join = cmd.join
        assert join is not None
        self._not_in_file(join, str(join))
        if join in self.rules.groups:
            raise RuleExists(str(join))
        if not cmd.dry_run:

            def apply(tx: Transaction) -> None:
                self.groups.join(join)
                tx.on_failure("leave", lambda: self.groups.leave(join))

            new = replace(self.rules, groups=(*self.rules.groups, join))
            self._persist_then(f"join {join}", new, apply)
        return {"group": join.to_dict(), "dry_run": cmd.dry_run}

    def _group_leave(self, cmd: GroupCommand) -> Any:
        join = cmd.join
        assert join is not None
        self._not_in_file(join, str(join))
        if join not in self.rules.groups:
            raise NoSuchRule(str(join))
        if not cmd.dry_run:

            def apply(tx: Transaction) -> None:
                self.groups.leave(join)
                tx.on_failure("re-join", lambda: self.groups.join(join))

            rest = tuple(g for g in self.rules.groups if g != join)
            self._persist_then(f"leave {join}", replace(self.rules, groups=rest), apply)
        return {"group": join.to_dict(), "dry_run": cmd.dry_run}

    def _group_list(self, cmd: Command) -> Any:
        return {"groups": self.groups.list()}

    # ------------------------------------------------------------ whole set

    def _config_apply(self, cmd: ApplyCommand) -> Any:
        new = cmd.rules
        dry = cmd.dry_run
        clash = overlap(new, self.files)
        if clash:
            raise RuleInFile(*clash[0])
        # The engines see both layers; apply replaces the runtime layer only.
        old, both = self.effective, merge(new, self.files.rules)
        # Plan first (validates against the kernel's limits, gives the diff), touch nothing.
        route_diff = self.kernel.replace(both.routes, True)
        relay_diff = self.relay_engine.replace(both.relays, True)
        group_diff = self._replace_groups(old.groups, both.groups, True, Transaction("plan"))
        if not dry:

            def apply(tx: Transaction) -> None:
                self.kernel.replace(both.routes)
                tx.on_failure("restore routes", lambda: self.kernel.replace(old.routes))
                self.relay_engine.replace(both.relays)
                tx.on_failure("restore relays", lambda: self.relay_engine.replace(old.relays))
                self._replace_groups(old.groups, both.groups, False, tx)

            self._persist_then("apply", new, apply)
        return {
            "diff": {
                "routes": route_diff.to_dict(),
                "relays": _relay_diff_rules(relay_diff, old.relays, both.relays),
                "groups": group_diff,
            },
            "dry_run": dry,
        }

    def _replace_groups(
        self,
        old: Sequence[GroupJoin],
        new: Sequence[GroupJoin],
        dry: bool,
        tx: Transaction,
    ) -> dict[str, list[Any]]:
        removed = [g for g in old if g not in new]
        added = [g for g in new if g not in old]
        if not dry:
            for g in removed:
                self.groups.leave(g)
                tx.on_failure(f"re-join {g}", lambda g=g: self.groups.join(g))  # type: ignore[misc]
            for g in added:
                self.groups.join(g)
                tx.on_failure(f"leave {g}", lambda g=g: self.groups.leave(g))  # type: ignore[misc]
        return {
            "added": [g.to_dict() for g in added],
            "removed": [g.to_dict() for g in removed],
            "changed": [],
        }

    def _config_export(self, cmd: Command) -> Any:
        # Exactly the state file's content (version, lists in a stable order), so
        # two exports of the same rules are identical and apply reads either.
        return export_dict(self.rules)

    # ------------------------------------------------------------ observation

    def _interface_list(self, cmd: Command) -> Any:
        return {"interfaces": self._interfaces()}

    def _stats_get(self, cmd: Command) -> Any:
        return {
            "routes": self._route_list(cmd)["routes"],
            "relays": self.relay_engine.relays(),
            "workers": self.relay_engine.workers(),
            "daemon": self._daemon_status(cmd),
        }

    def _daemon_status(self, cmd: Command) -> Any:
        workers = self.relay_engine.workers()
        status: dict[str, Any] = {
            "version": __version__,
            "pid": os.getpid(),
            "uptime": round(time.monotonic() - self.started, 1),
            "routes": len(self.effective.routes),
            "relays": len(self.effective.relays),
            "groups": len(self.effective.groups),
            "workers": {
                "configured": len(workers),
                "running": sum(1 for w in workers if w.get("state") == "running"),
                "restarts": sum(int(w.get("restarts", 0)) for w in workers),
            },
            "warnings": [*self._route_warnings(), *self.relay_engine.warnings()],
        }
        extra = dict(self._status_extra())
        status["warnings"] = [*extra.pop("warnings", []), *status["warnings"]]
        status.update(extra)
        return status

    def _route_warnings(self) -> list[str]:
        """Kernel routes waiting or partial, with the reason (an engine without them: none)."""
        warnings = getattr(self.kernel, "warnings", None)
        return list(warnings()) if callable(warnings) else []

    def _daemon_reload(self, cmd: Command) -> Any:
        """Re-read the settings (the supervisor's reload, also run on SIGHUP); what changed."""
        if self._reload is None:
            raise Unavailable("this daemon cannot reload")
        return self._reload(dry_run=cmd.dry_run)

    # ------------------------------------------------------------ tracing

    def _require_relay(self, name: str) -> None:
        if not any(r.name == name for r in self.effective.relays):
            raise NoSuchRule(f"relay {name!r}")

    def _trace_start(self, cmd: NameCommand) -> Any:
        self._require_relay(cmd.name)
        cursor = self.relay_engine.trace_start(cmd.name)
        result: dict[str, Any] = {"name": cmd.name, "tracing": True}
        if cursor is not None:
            result["cursor"] = cursor  # read from here: records of this trace only
        return result

    def _trace_stop(self, cmd: NameCommand) -> Any:
        self._require_relay(cmd.name)
        self.relay_engine.trace_stop(cmd.name)
        return {"name": cmd.name, "tracing": False}

    def _trace_read(self, cmd: NameCommand) -> Any:
        self._require_relay(cmd.name)
        records, cursor = self.relay_engine.trace_read(cmd.name, cmd.cursor)
        return {"records": records, "cursor": cursor}


def _relay_diff_rules(
    diff: dict[str, list[Any]], old: Sequence[Relay], new: Sequence[Relay]
) -> dict[str, list[Any]]:
    """The relay engine reports names; clients get whole rules, as for routes."""
    before = {r.name: r.to_dict() for r in old}
    after = {r.name: r.to_dict() for r in new}
    return {
        "added": [after[n] for n in diff.get("added", []) if n in after],
        "removed": [before[n] for n in diff.get("removed", []) if n in before],
        "changed": [after[n] for n in diff.get("changed", []) if n in after],
    }
