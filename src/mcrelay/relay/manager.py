"""Supervisor side of the relay engine: relay rules -> worker table, the service's face.

The manager holds the relay rules and keeps everything below them level with
them and with the interfaces as they are now:

- :class:`~mcrelay.relay.inputs.Inputs`: the ingress sockets the supervisor owns;
- :class:`~mcrelay.relay.pool.WorkerPool`: the worker processes (never waited on);
- :class:`~mcrelay.relay.counters.Counters`: counters over live and dead workers;
- :class:`~mcrelay.membership.Membership`: a reference on each input group.

:meth:`RelayManager.reconcile` is the one way to converge: rule changes call
it, and the supervisor calls it after every interface change and retries it
while it fails. Every worker gets the whole table; a rule change is a new
``SetTable`` (sent only when the table really changed) and, for a new input,
an ``AddIngress`` with the new sockets. Workers are never restarted for a
rule change.

A reflector (``Relay.reflect``) is installed as its legs (``Relay.legs()``):
one one-way relay per member and endpoint, each with its own table id, all
sharing the reflector's record, counters summed over them. Outputs that write
their own IP header (kept sources, mDNS) send on raw sockets the manager
opens here, the privileged side, and passes to every worker.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mcrelay.errors import KernelRefused, McrelayError, NoSuchRule, RuleExists
from mcrelay.membership import Membership
from mcrelay.model import LIMITED_BROADCAST, MDNS_TTL, Relay, RelayOutput, is_mdns
from mcrelay.netlink import rp_filter
from mcrelay.relay import messages as m
from mcrelay.relay.counters import Counters
from mcrelay.relay.inputs import (
    Closable,
    Inputs,
    Openers,
    PacketInput,
    SocketInput,
    input_text,
)
from mcrelay.relay.pool import Handler, PoolHooks, WorkerPool
from mcrelay.relay.trace import MANAGER_RING, Ring

STATS_INTERVAL = 0.5
DROPS_INTERVAL = 1.0

PoolFactory = Callable[[int, str, PoolHooks, logging.Logger], WorkerPool]


@dataclass
class RelayRecord:
    """One installed relay rule: its version id, its legs' ids and the group joins it holds.

    A plain relay is its own single leg, with the record's id.
    """

    relay: Relay
    id: int
    joins: list[tuple[str, str, str | None]] = field(default_factory=list)
    legs: list[tuple[int, Relay]] = field(default_factory=list)


class RelayManager:
    """The supervisor-side API of the userspace relay engine."""

    def __init__(
        self,
        *,
        workers: int,
        user: str,
        ifindex_of: Callable[[str], int | None],
        membership: Membership,
        log: logging.Logger,
        pool_factory: PoolFactory = WorkerPool,
        openers: Openers | None = None,
        why_unusable: Callable[[str], str | None] | None = None,
        receives_on: Callable[[str], bool] | None = None,
    ) -> None:
        self.nworkers = max(1, workers)
        self._ifindex_of = ifindex_of
        # The interface table's answers (None: tests without one, every address is ours).
        self._why_unusable = why_unusable
        self._receives_on = receives_on
        self._since: dict[str, float] = {}  # relay name -> Unix time its counters start
        self._drops_base: dict[tuple[str, int], int] = {}  # drops of closed packet inputs
        self._membership = membership
        self._log = log
        self._relays: dict[str, RelayRecord] = {}
        self._next_id = 1
        self.pool = pool_factory(self.nworkers, user, self, log)
        self.inputs = Inputs(self.nworkers, log, openers)
        self.counters = Counters(self.nworkers)
        self._traced: set[int] = set()
        self._rings: dict[int, Ring] = {}
        self._table_entries: tuple[m.TableEntry, ...] | None = None
        self._version = 0
        self._last_stats = 0.0
        self._last_drops = 0.0
        self._raw: dict[int, Closable] = {}  # raw IP sockets by family, for every worker
        self._leg_owner: dict[int, int] = {}  # leg id -> record id (traces)

    # ------------------------------------------------------------ pool hooks

    def initial_messages(self, index: int) -> list[tuple[Any, Sequence[int]]]:
        """A (re)started worker: its ingress sockets, the table, the traced relays."""
        msgs: list[tuple[Any, Sequence[int]]] = []
        if self._raw:
            fams = sorted(self._raw)
            msgs.append((m.AddRaw(tuple(fams)), [self._raw[f].fileno() for f in fams]))
        specs = self.inputs.for_worker(index)
        for i in range(0, len(specs), 200):
            chunk = specs[i : i + 200]
            msgs.append((m.AddIngress(tuple(s for s, _ in chunk)), [fd for _, fd in chunk]))
        msgs.append((m.SetTable(self._version, self._entries()), ()))
        msgs.append((m.SetTrace(self._traced_legs()), ()))
        return msgs

    def on_message(self, index: int, msg: Any, now: float) -> None:
        if isinstance(msg, m.Stats):
            self.counters.merge(index, msg, self._leg_owner.__contains__)
            for rid, recs in msg.traces.items():
                ring = self._rings.get(self._leg_owner.get(int(rid), int(rid)))
                if ring is not None:
                    for r in recs:
                        ring.add(r)
        else:
            self._log.warning("relay worker %d sent unexpected %s", index, type(msg).__name__)

    def on_gone(self, index: int) -> None:
        self.counters.retire(index)

    # ------------------------------------------------------------ supervisor loop

    def start(self) -> None:
        """Spawn the workers (idempotent)."""
        self.pool.start()

    def watches(self) -> dict[int, tuple[int, Handler]]:
        """Worker channels to watch: fd -> (events, handler)."""
        return self.pool.watches()

    def tick(self, now: float) -> None:
        """Restarts and liveness (pool), counter pulls, ingress drop counters."""
        self.pool.tick(now)
        if now - self._last_stats >= STATS_INTERVAL:
            self._last_stats = now
            self.pool.request_stats(now)
        if now - self._last_drops >= DROPS_INTERVAL:
            self._last_drops = now
            self.inputs.poll_drops()

    def child_exited(self, pid: int, status: int) -> bool:
        """The supervisor reaped ``pid``; True if it was one of our workers."""
        return self.pool.child_exited(pid, status)

    def request_stats(self, now: float) -> dict[int, int]:
        """Pull fresh counters from every worker without waiting (see :meth:`stats_answered`)."""
        self._last_stats = now
        return self.pool.request_stats(now)

    def stats_answered(self, asked: dict[int, int]) -> bool:
        return self.pool.answered(asked)

    def stop(self) -> None:
        """Stop the workers and close every socket."""
        self.pool.stop()
        self.inputs.close()
        for sock in self._raw.values():
            sock.close()
        self._raw.clear()
        for rec in self._relays.values():
            self._leave(rec)

    # ------------------------------------------------------------ rules

    def add(self, relay: Relay, dry_run: bool = False) -> None:
        """Install a relay; RuleExists on the same name, KernelRefused if its input cannot open."""
        if relay.name in self._relays:
            raise RuleExists(f"relay {relay.name}")
        if dry_run:
            return
        rec = self._record(relay)
        try:
            self._join(rec)
            self._relays[relay.name] = rec
            self._converge()
            self._refuse_unopened(relay)
        except Exception as exc:
            self._relays.pop(relay.name, None)
            self._leave(rec)
            self._converge()
            raise _refused(f"relay {relay.name}", exc) from exc

    def delete(self, name: str, dry_run: bool = False) -> None:
        """Remove a relay; NoSuchRule if there is none of that name."""
        rec = self._relays.get(name)
        if rec is None:
            raise NoSuchRule(f"relay {name}")
        if dry_run:
            return
        self._remove(rec)
        self._since.pop(name, None)
        self._converge()

    def replace(self, relays: Sequence[Relay], dry_run: bool = False) -> dict[str, list[Any]]:
        """Make the relay set exactly ``relays``; returns the names added, removed, changed."""
        names = {r.name: r for r in relays}
        added = sorted(n for n in names if n not in self._relays)
        removed = sorted(n for n in self._relays if n not in names)
        changed = sorted(
            n for n in names if n in self._relays and self._relays[n].relay != names[n]
        )
        diff: dict[str, list[Any]] = {"added": added, "removed": removed, "changed": changed}
        if dry_run or not (added or removed or changed):
            return diff
        old = {n: self._relays[n] for n in removed + changed}
        for n in removed + changed:
            self._remove(self._relays[n])
        done: list[RelayRecord] = []
        try:
            for n in added + changed:
                rec = self._record(names[n])
                self._join(rec)
                self._relays[n] = rec
                done.append(rec)
            self._converge()
            for rec in done:
                self._refuse_unopened(rec.relay)
        except Exception as exc:
            for rec in done:
                self._relays.pop(rec.relay.name, None)
                self._leave(rec)
            for n, rec in old.items():
                with contextlib.suppress(McrelayError):
                    self._join(rec)
                self._relays[n] = rec
            self._converge()
            raise _refused("apply relays", exc) from exc
        return diff

    # ------------------------------------------------------------ convergence

    def reconcile(self) -> None:
        """Bring sockets, BPF filters and the workers' table in line with rules and interfaces.

        Idempotent and cheap when nothing moved. Raises KernelRefused when an
        input that should be open could not be, after doing everything else,
        so the caller retries.
        """
        self._converge()
        if self.inputs.errors:
            name, why = sorted(self.inputs.errors.items())[0]
            raise KernelRefused(f"relay {name}", 0, why)

    def _converge(self) -> None:
        now = time.monotonic()
        idx: dict[str, int | None] = {}

        def ifindex(name: str) -> int | None:
            if name not in idx:
                idx[name] = self._ifindex_of(name)
            return idx[name]

        self._open_raw()
        changes = self.inputs.sync(self._receivable_legs(), ifindex)
        for gone in changes.closed:
            if isinstance(gone, PacketInput) and gone.drops:
                key = (gone.iif, gone.family)
                self._drops_base[key] = self._drops_base.get(key, 0) + gone.drops
            self._tell_removed(gone, now)
        for new in changes.opened:
            self._tell_added(new, now)
        entries = self._entries(ifindex)
        if entries != self._table_entries or changes.opened or changes.closed:
            self._table_entries = entries
            self._version += 1
            self.pool.broadcast(m.SetTable(self._version, entries), now)

    def _tell_added(self, new: PacketInput | SocketInput, now: float) -> None:
        if isinstance(new, PacketInput):
            for i in range(self.nworkers):
                self.pool.send(i, m.AddIngress((new.spec(),)), [new.socks[i].fileno()], now=now)
        else:
            self.pool.send(new.worker, m.AddIngress((new.spec(),)), [new.sock.fileno()], now=now)

    def _tell_removed(self, gone: PacketInput | SocketInput, now: float) -> None:
        if isinstance(gone, PacketInput):
            self.pool.broadcast(m.RemoveIngress((gone.id,)), now)
        else:
            self.pool.send(gone.worker, m.RemoveIngress((gone.id,)), now=now)

    def _all_legs(self) -> list[tuple[int, Relay]]:
        return [leg for rec in self._relays.values() for leg in rec.legs]

    def _receivable_legs(self) -> list[tuple[int, Relay]]:
        """Legs whose input address can receive here: a unicast input whose address the
        host does not have (yet: DHCP, PPPoE) waits instead of opening a deaf socket."""
        return [leg for leg in self._all_legs() if self._address_missing(leg[1]) is None]

    def _address_missing(self, relay: Relay) -> str | None:
        """``address not on this host`` for a unicast input the host cannot receive on."""
        inp = relay.input
        if (
            self._receives_on is None
            or relay.reflect is not None
            or inp.is_multicast
            or inp.group == LIMITED_BROADCAST
            or self._receives_on(inp.group)
        ):
            return None
        return "address not on this host"

    def _why(self, name: str) -> str:
        why = self._why_unusable(name) if self._why_unusable is not None else None
        return why or "interface missing"

    def _input_state(self, name: str, r: Relay) -> tuple[str, str | None]:
        """('active', None) or ('waiting', why) for a relay's input."""
        if self._ifindex_of(r.input.iif) is None:
            return "waiting", f"input {self._why(r.input.iif)}"
        missing = self._address_missing(r)
        if missing is not None:
            return "waiting", f"input {missing}"
        error = self.inputs.errors.get(name)
        if error is not None:
            return "waiting", error
        return "active", None

    def _open_raw(self) -> None:
        """Open the raw socket of each family some output needs, and pass it on; never closed
        while the manager runs (two descriptors, and workers may hold them in flight)."""
        need = {
            o.family
            for _, leg in self._all_legs()
            for o in leg.outputs
            if _src_of(leg, o) != m.SRC_OWN
        }
        new = sorted(f for f in need if f not in self._raw)
        opened = []
        for fam in new:
            try:
                self._raw[fam] = self.inputs.openers.raw(fam)
                opened.append(fam)
            except OSError as exc:
                self._log.warning("cannot open the IPv%d raw socket: %s", fam, exc)
        if opened:
            fds = [self._raw[f].fileno() for f in opened]
            for i in range(self.nworkers):
                self.pool.send(i, m.AddRaw(tuple(opened)), fds, now=time.monotonic())

    def _refuse_unopened(self, relay: Relay) -> None:
        why = self.inputs.errors.get(relay.name)
        if why is not None and relay.mode == "packet":
            raise KernelRefused(f"relay {relay.name}", 0, why)

    def _entries(
        self, ifindex: Callable[[str], int | None] | None = None
    ) -> tuple[m.TableEntry, ...]:
        look = ifindex or self._ifindex_of
        entries = []
        for rec in self._relays.values():
            spec = rec.relay.reflect
            reflect = None if spec is None else m.ReflectSpec(rec.id, spec.allow)
            for lid, r in rec.legs:
                ing = self.inputs.ingress_of(lid, r)
                if ing is None:
                    continue
                outs = []
                for o in r.outputs:
                    ix = 0 if o.oif is None else (look(o.oif) or -1)
                    ttl = MDNS_TTL if is_mdns(o.address, o.port) else o.ttl
                    outs.append(m.OutputSpec(o.address, o.port, ix, ttl, o.dscp, _src_of(r, o)))
                entries.append(
                    m.TableEntry(
                        lid,
                        r.name,
                        ing,
                        r.input.group,
                        r.input.port,
                        r.input.sources,
                        tuple(outs),
                        reflect,
                    )
                )
        return tuple(entries)

    # ------------------------------------------------------------ listings

    def relays(self) -> list[dict[str, Any]]:
        """Every relay: its rule, state, and counters summed over workers past and present."""
        age = self.pool.stats_age(time.monotonic())
        out = []
        for name in sorted(self._relays):
            rec = self._relays[name]
            r = rec.relay
            if r.reflect is not None:
                out.append(self._reflector_row(rec, age))
                continue
            d = r.to_dict()
            c, outs = self.counters.total(rec.id, len(r.outputs))
            state, reason = self._input_state(name, r)
            error = self.inputs.errors.get(name)
            if error is not None:
                d["error"] = error
            d["packets"], d["bytes"] = c[m.PACKETS], c[m.BYTES]
            d["bytes_counted"] = "udp_payload"  # the workers count what they relay
            d["drops"] = {k: c[m.NO_BUFFER + i] for i, k in enumerate(m.DROP_NAMES)}
            waiting = []
            for od, oc, spec in zip(d["outputs"], outs, r.outputs, strict=True):
                od["packets"], od["bytes"], od["errors"] = oc
                missing = spec.oif is not None and self._ifindex_of(spec.oif) is None
                od["state"] = "waiting" if missing else "active"
                if missing and spec.oif is not None:
                    od["reason"] = self._why(spec.oif)
                    waiting.append(f"{spec.oif} {od['reason']}")
            if state == "active" and waiting:
                state, reason = (
                    ("partial" if len(waiting) < len(r.outputs) else "waiting"),
                    ("; ".join(waiting)),
                )
            d["state"] = state
            if reason is not None:
                d["reason"] = reason
            key = (r.input.iif, r.input.family)
            pin = self.inputs.packet.get(key)
            if r.mode == "packet" and (pin is not None or key in self._drops_base):
                d["input_drops"] = (pin.drops if pin is not None else 0) + self._drops_base.get(
                    key, 0
                )
            d["counters_since"] = self._since.get(name)
            d["traced"] = rec.id in self._traced
            d["counters_age"] = age
            out.append(d)
        return out

    def _reflector_row(self, rec: RelayRecord, age: float | None) -> dict[str, Any]:
        """A reflector: totals over its legs, and per member what it heard and was sent."""
        r = rec.relay
        assert r.reflect is not None
        d = r.to_dict()
        total = [0] * m.N_COUNTERS
        heard: dict[str, int] = {}
        sent: dict[str, list[int]] = {}
        for lid, leg in rec.legs:
            c, outs = self.counters.total(lid, len(leg.outputs))
            for i, v in enumerate(c):
                total[i] += v
            heard[leg.input.iif] = heard.get(leg.input.iif, 0) + c[m.PACKETS]
            for o, oc in zip(leg.outputs, outs, strict=True):
                acc = sent.setdefault(o.oif or "", [0, 0, 0])
                for i, v in enumerate(oc):
                    acc[i] += v
        members = []
        for iface in r.reflect.members:
            p, b, e = sent.get(iface, [0, 0, 0])
            members.append(
                {
                    "name": iface,
                    "role": "listen-only" if iface in r.reflect.listen_only else "member",
                    "state": "active" if self._ifindex_of(iface) is not None else "waiting",
                    "received": heard.get(iface, 0),
                    "packets": p,
                    "bytes": b,
                    "errors": e,
                }
            )
        for x in members:
            if x["state"] != "active":
                x["reason"] = self._why(str(x["name"]))
        present = sum(1 for x in members if x["state"] == "active")
        error = self.inputs.errors.get(r.name)
        d["state"] = "active" if present >= 2 and error is None else "waiting"
        if d["state"] == "active" and present < len(members):
            d["state"] = "partial"
        if error is not None:
            d["error"] = error
            d["reason"] = error
        elif d["state"] != "active":
            d["reason"] = "; ".join(f"{x['name']} {x['reason']}" for x in members if "reason" in x)
        d["counters_since"] = self._since.get(r.name)
        d["packets"], d["bytes"] = total[m.PACKETS], total[m.BYTES]
        d["bytes_counted"] = "udp_payload"
        d["drops"] = {k: total[m.NO_BUFFER + i] for i, k in enumerate(m.DROP_NAMES)}
        d["members"] = members
        d["input_drops"] = sum(
            pin.drops for (iif, _fam), pin in self.inputs.packet.items() if iif in r.reflect.members
        ) + sum(v for (iif, _fam), v in self._drops_base.items() if iif in r.reflect.members)
        d["traced"] = rec.id in self._traced
        d["counters_age"] = age
        return d

    def workers(self) -> list[dict[str, Any]]:
        out = []
        for i in range(self.nworkers):
            d = self.pool.describe(i)
            d.update(self.counters.worker(i))
            out.append(d)
        return out

    def warnings(self) -> list[str]:
        """Things that will silently lose traffic: rp_filter on socket-mode inputs, missing oifs."""
        out = []
        for name in sorted(self._relays):
            r = self._relays[name].relay
            if r.reflect is not None:
                gone = [i for i in r.reflect.members if self._ifindex_of(i) is None]
                if gone:
                    out.append(f"reflector {name}: interface(s) {', '.join(gone)} do not exist")
                if name in self.inputs.errors:
                    out.append(f"reflector {name}: input not open: {self.inputs.errors[name]}")
                continue
            if r.mode == "socket" and r.input.family == 4:
                rp = rp_filter(r.input.iif)
                if rp:
                    out.append(
                        f"relay {name}: socket mode on {r.input.iif} with rp_filter={rp}: packets "
                        f"from sources not routed via {r.input.iif} are dropped before the relay "
                        "sees them; use --mode packet or set rp_filter=0"
                    )
            state, reason = self._input_state(name, r)
            if state != "active" and name not in self.inputs.errors:
                out.append(f"relay {name} waits: {reason}")
            for o in r.outputs:
                if o.oif is not None and self._ifindex_of(o.oif) is None:
                    out.append(f"relay {name}: output {o.oif} waits: {self._why(o.oif)}")
            if name in self.inputs.errors:
                out.append(f"relay {name}: input not open: {self.inputs.errors[name]}")
        return out

    # ------------------------------------------------------------ tracing

    def trace_start(self, name: str) -> int:
        """Trace relay ``name``; returns the cursor of this trace's first record.

        The ring outlives a trace (two clients may trace one relay), so a
        reader that started at 0 would replay older packets as if live.
        """
        rec = self._rec(name)
        self._traced.add(rec.id)
        ring = self._rings.setdefault(rec.id, Ring(MANAGER_RING))
        self.pool.broadcast(m.SetTrace(self._traced_legs()), time.monotonic())
        return ring.next_seq

    def trace_stop(self, name: str) -> None:
        rec = self._rec(name)
        self._traced.discard(rec.id)
        self.pool.broadcast(m.SetTrace(self._traced_legs()), time.monotonic())

    def _traced_legs(self) -> tuple[int, ...]:
        """The table ids the workers record: every leg of each traced rule."""
        return tuple(
            sorted(
                lid
                for rec in self._relays.values()
                if rec.id in self._traced
                for lid, _ in rec.legs
            )
        )

    def trace_stop_all(self) -> None:
        """No client can be reading any trace (the control process restarted)."""
        if self._traced:
            self._traced.clear()
            self.pool.broadcast(m.SetTrace(()), time.monotonic())

    def trace_read(self, name: str, cursor: int) -> tuple[list[dict[str, Any]], int]:
        """Records from ``cursor`` on (start at 0) and the cursor to pass next time."""
        rec = self._rec(name)
        ring = self._rings.get(rec.id)
        if ring is None:
            return [], cursor
        return ring.read(cursor)

    # ------------------------------------------------------------ internals

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def _record(self, relay: Relay) -> RelayRecord:
        """A record with fresh ids: the rule's, and one per leg (a plain relay: the same)."""
        self._since[relay.name] = time.time()  # a new version counts from zero
        rec = RelayRecord(relay, self._new_id())
        if relay.reflect is None:
            rec.legs = [(rec.id, relay)]
        else:
            rec.legs = [(self._new_id(), leg) for leg in relay.legs()]
        for lid, _ in rec.legs:
            self._leg_owner[lid] = rec.id
        return rec

    def _rec(self, name: str) -> RelayRecord:
        rec = self._relays.get(name)
        if rec is None:
            raise NoSuchRule(f"relay {name}")
        return rec

    def _join(self, rec: RelayRecord) -> None:
        for _, leg in rec.legs:
            inp = leg.input
            if not inp.is_multicast:
                continue
            for src in inp.sources or (None,):
                if (inp.iif, inp.group, src) in rec.joins:
                    continue
                self._membership.join(inp.iif, inp.group, src)
                rec.joins.append((inp.iif, inp.group, src))

    def _leave(self, rec: RelayRecord) -> None:
        for iif, group, src in rec.joins:
            self._membership.leave(iif, group, src)
        rec.joins.clear()

    def _remove(self, rec: RelayRecord) -> None:
        self._leave(rec)
        del self._relays[rec.relay.name]
        for lid, _ in rec.legs:
            self.counters.forget(lid)
            self._leg_owner.pop(lid, None)
        self._rings.pop(rec.id, None)
        self._traced.discard(rec.id)


def _src_of(leg: Relay, out: RelayOutput) -> int:
    """How an output's packets get their source: mDNS always through the raw socket, so
    it leaves from port 5353 (RFC 6762 section 11) whatever the source mode."""
    if out.src == "keep":
        return m.SRC_KEEP
    if out.ttl == 0 or is_mdns(out.address, out.port):  # ttl 0: a reflector's "as it came"
        return m.SRC_OWN_RAW
    return m.SRC_OWN


def _refused(what: str, exc: Exception) -> Exception:
    if isinstance(exc, McrelayError):
        return exc
    if isinstance(exc, OSError):
        return KernelRefused(what, exc.errno or 0, str(exc))
    return exc


__all__ = ["RelayManager", "RelayRecord", "input_text"]
