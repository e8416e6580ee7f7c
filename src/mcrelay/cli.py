"""``mcrelay``: the command-line client of mcrelayd.

The command lines are a contract (DESIGN.md, "Command lines"); docs/cli.md is
their reference. Every command is one or a few JSON-RPC calls through
:class:`mcrelay.client.Client`; this module only turns argv into parameters
and results into text.

Exit codes: 0 done; 1 refused (by the daemon, or bad input the CLI caught
itself; the message names the field); 2 the daemon is not reachable (the
message names the socket and how to start the daemon). argparse's own usage
errors also exit 1, so that 2 always means "no daemon".
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TextIO

from . import __version__
from . import cli_format as fmt
from .client import Client, DaemonUnreachable, RemoteError
from .errors import InvalidParams, McrelayError
from .model import check_dscp, check_port, check_ttl, parse_input_spec, parse_output_spec

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_UNREACHABLE = 2
EXIT_INTERRUPTED = 130

TRACE_POLL = 0.2  # seconds between trace.read calls
RULE_FILE_VERSION = 1
SHOW_VIEWS = ("routes", "relays", "interfaces", "groups", "stats", "workers")


class UsageError(Exception):
    """The command line does not parse; carries the usage of the (sub)command."""

    def __init__(self, usage: str, message: str) -> None:
        super().__init__(message)
        self.usage = usage
        self.message = message


class CliError(McrelayError):
    """Input the CLI refuses before asking the daemon (unreadable rule file...)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error raises (exit 1) instead of exiting with 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self.format_usage().rstrip(), message)


@dataclass(frozen=True)
class Ctx:
    """What every command needs: the client and how to print."""

    client: Client
    json: bool
    verbose: bool
    dry_run: bool
    out: TextIO
    err: TextIO

    def print(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def note(self, text: str) -> None:
        print(text, file=self.err, flush=True)


Handler = Callable[[Ctx, argparse.Namespace], int]


# ---------------------------------------------------------------- argv parsing


def _add_globals(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """Global options, accepted before and after the subcommand.

    Below the top level their default is SUPPRESS, so that an option given
    before the subcommand is not reset by the subcommand's default.
    """

    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    g = parser.add_argument_group("global options")
    g.add_argument(
        "--dry-run",
        action="store_true",
        default=default(False),
        help="check and show what a change would do; change nothing",
    )
    g.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default(False),
        help="exact counters, more detail, and the JSON-RPC exchange on stderr",
    )
    g.add_argument(
        "-o",
        "--output",
        choices=("table", "json"),
        default=default("table"),
        help="table for people (default), json for scripts",
    )
    g.add_argument(
        "--socket",
        metavar="PATH",
        default=default(None),
        help="daemon control socket (default: $MCRELAY_SOCKET or /run/mcrelay/mcrelay.sock)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The whole ``mcrelay`` command line."""
    parser = _Parser(
        prog="mcrelay",
        description="Control mcrelayd: static kernel multicast routes and userspace relays.",
        epilog="Exit codes: 0 done, 1 refused (the message says why), 2 daemon not reachable.",
    )
    parser.add_argument("--version", action="version", version=f"mcrelay {__version__}")
    _add_globals(parser, top=True)
    cmds = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def sub(
        parent: Any, name: str, handler: Handler | None, help_: str, **kw: Any
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_, description=help_, **kw)
        _add_globals(p, top=False)
        if handler is not None:
            p.set_defaults(handler=handler)
        return p

    # route
    route = sub(cmds, "route", None, "kernel multicast routes (S,G) and (*,G)")
    route_cmds = route.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub(
        route_cmds,
        "add",
        cmd_route_add,
        "add a static kernel route; without SOURCE it is (*,G): any source of GROUP",
        usage="mcrelay route add IIF [SOURCE] GROUP OIF [OIF...] [--ttl-threshold OIF=N]",
    )
    p.add_argument("iif", metavar="IIF", help="input interface")
    p.add_argument("rest", nargs="+", metavar="[SOURCE] GROUP OIF", help="addresses and outputs")
    p.add_argument(
        "--ttl-threshold",
        action="append",
        default=[],
        metavar="OIF=N",
        help="forward on OIF only packets whose TTL exceeds N (default 1); repeatable",
    )
    p = sub(
        route_cmds,
        "del",
        cmd_route_del,
        "delete a kernel route",
        usage="mcrelay route del IIF [SOURCE] GROUP",
    )
    p.add_argument("iif", metavar="IIF", help="input interface")
    p.add_argument("rest", nargs="+", metavar="[SOURCE] GROUP", help="the route's addresses")

    # relay
    relay = sub(cmds, "relay", None, "userspace relays (re-address, unicast, DSCP, fan-out)")
    relay_cmds = relay.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub(relay_cmds, "add", cmd_relay_add, "add a relay")
    p.add_argument("name", metavar="NAME", help="relay name (letters, digits, . _ - : @ [ ])")
    p.add_argument(
        "--in",
        dest="input",
        required=True,
        metavar="GROUP:PORT@IIF",
        help="what to receive: a group (or a unicast address of this host), port, interface",
    )
    p.add_argument(
        "--out",
        dest="outputs",
        action="append",
        required=True,
        metavar="SPEC",
        help="ADDR:PORT[@OIF][,ttl=N][,dscp=CLASS]; repeat for more outputs (at most 32)",
    )
    p.add_argument("--mode", choices=("packet", "socket"), help="ingress mode (default packet)")
    p.add_argument(
        "--source",
        dest="sources",
        action="extend",
        nargs="+",
        default=[],
        metavar="ADDR",
        help="relay only packets from these sources (also joins source-specific)",
    )
    p = sub(relay_cmds, "del", cmd_relay_del, "delete a relay")
    p.add_argument("name", metavar="NAME")

    # group
    group = sub(cmds, "group", None, "standing IGMP/MLD memberships")
    group_cmds = group.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, help_ in (
        ("join", "join GROUP on IFACE (from SOURCE only: SSM) so the stream is delivered"),
        ("leave", "drop a membership made with group join"),
    ):
        p = sub(group_cmds, action, cmd_group, help_)
        p.add_argument("iface", metavar="IFACE")
        p.add_argument("group", metavar="GROUP")
        p.add_argument("source", metavar="SOURCE", nargs="?")

    # views
    p = sub(cmds, "show", cmd_show, "show rules, interfaces, memberships, counters, workers")
    p.add_argument(
        "what", nargs="?", choices=SHOW_VIEWS, metavar="|".join(SHOW_VIEWS), help="default: both"
    )
    p = sub(cmds, "stats", cmd_stats, "counters of routes, relays and workers")
    p.add_argument(
        "--watch",
        nargs="?",
        const=1.0,
        type=float,
        metavar="SECONDS",
        help="refresh every SECONDS (default 1) until Ctrl-C",
    )
    p = sub(cmds, "trace", cmd_trace, "show a relay's packets as they pass (like tcpdump)")
    p.add_argument("name", metavar="NAME", help="relay name")
    p.add_argument("--count", "-c", type=int, metavar="N", help="stop after N packets")
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    sub(cmds, "status", cmd_status, "daemon health and summary")
    p = sub(cmds, "apply", cmd_apply, "replace the whole rule set from FILE in one transaction")
    p.add_argument("file", metavar="FILE", help="rule file as printed by export; - for stdin")
    sub(cmds, "export", cmd_export, "print the whole rule set (the format apply reads)")
    return parser


# ---------------------------------------------------------------- helpers


def _address_kind(text: str) -> str | None:
    """'multicast', 'unicast', or None if ``text`` is not an IP address."""
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    return "multicast" if addr.is_multicast else "unicast"


def _split_source_group(rest: Sequence[str], form: str) -> tuple[str | None, str, list[str]]:
    """``[SOURCE] GROUP ...`` -> (source, group, remainder).

    The second word after IIF is the group if it is a multicast address,
    otherwise it is the source and the group follows.
    """
    first = rest[0]
    kind = _address_kind(first)
    if kind is None:
        raise InvalidParams(
            "group", f"{first!r} is not an IP address; expected {form} (group is multicast)"
        )
    if kind == "multicast":
        source, group, names = None, first, list(rest[1:])
    elif len(rest) < 2:
        raise InvalidParams("group", f"missing after source {first}; expected {form}")
    else:
        source, group, names = first, rest[1], list(rest[2:])
    # Linux would accept "239.1.1.1" as an interface name, but here it is
    # always a mistyped SOURCE/GROUP pair (e.g. a multicast address as SOURCE).
    for i, name in enumerate(names):
        if _address_kind(name) is not None:
            raise InvalidParams(
                f"oifs[{i}]",
                f"{name} is an address, not an interface name; expected {form} "
                "(SOURCE is a unicast address, GROUP a multicast one)",
            )
    return source, group, names


def _mutation_text(ctx: Ctx, verb: str, done: str, description: str) -> None:
    if ctx.dry_run:
        ctx.print(f"would {verb} {description}")
        ctx.print("dry run: nothing was changed")
    else:
        ctx.print(f"{done} {description}")


def _show_mutation(
    ctx: Ctx, result: dict[str, Any], key: str, sent: dict[str, Any], verb: str, done: str
) -> int:
    if ctx.json:
        ctx.print(fmt.json_text(result))
        return EXIT_OK
    rule = result.get(key)
    _mutation_text(ctx, verb, done, fmt.describe(key, rule if isinstance(rule, dict) else sent))
    return EXIT_OK


# ---------------------------------------------------------------- commands


def cmd_route_add(ctx: Ctx, args: argparse.Namespace) -> int:
    form = "IIF [SOURCE] GROUP OIF [OIF...]"
    source, group, names = _split_source_group(args.rest, form)
    if not names:
        raise InvalidParams("oifs", f"at least one output interface is required: {form}")
    thresholds: dict[str, int] = {}
    for item in args.ttl_threshold:
        name, sep, value = item.partition("=")
        if not sep or name not in names:
            raise InvalidParams(
                "ttl-threshold",
                f"{item!r}: expected OIF=N with OIF one of the outputs ({', '.join(names)})",
            )
        thresholds[name] = check_ttl(value, f"oifs[{names.index(name)}].ttl")
    oifs: list[str | dict[str, Any]] = [
        {"name": n, "ttl": thresholds[n]} if n in thresholds else n for n in names
    ]
    result = ctx.client.route_add(args.iif, group, oifs, source=source, dry_run=ctx.dry_run)
    sent = {"iif": args.iif, "source": source, "group": group, "oifs": oifs}
    return _show_mutation(ctx, result, "route", sent, "add", "added")


def cmd_route_del(ctx: Ctx, args: argparse.Namespace) -> int:
    form = "IIF [SOURCE] GROUP"
    source, group, extra = _split_source_group(args.rest, form)
    if extra:
        raise InvalidParams("group", f"unexpected {' '.join(extra)!r}; expected {form}")
    result = ctx.client.route_del(args.iif, group, source=source, dry_run=ctx.dry_run)
    sent = {"iif": args.iif, "source": source, "group": group}
    return _show_mutation(ctx, result, "route", sent, "delete", "deleted")


def _relay_input(args: argparse.Namespace) -> dict[str, Any]:
    spec = parse_input_spec(args.input, "input")
    inp: dict[str, Any] = {
        "iif": spec["iif"],
        "group": spec["group"],
        "port": check_port(spec["port"], "input.port"),
    }
    sources = [s.strip() for item in args.sources for s in item.split(",") if s.strip()]
    if sources:
        inp["sources"] = sources
    return inp


def _relay_output(text: str, index: int) -> dict[str, Any]:
    where = f"outputs[{index}]"
    spec = parse_output_spec(text, where)
    out: dict[str, Any] = {
        "address": spec["address"],
        "port": check_port(spec["port"], f"{where}.port"),
    }
    if spec.get("oif") is not None:
        out["oif"] = spec["oif"]
    if "ttl" in spec:
        out["ttl"] = check_ttl(spec["ttl"], f"{where}.ttl")
    if "dscp" in spec:
        out["dscp"] = check_dscp(spec["dscp"], f"{where}.dscp")
    return out


def cmd_relay_add(ctx: Ctx, args: argparse.Namespace) -> int:
    inp = _relay_input(args)
    outputs = [_relay_output(text, i) for i, text in enumerate(args.outputs)]
    result = ctx.client.relay_add(args.name, inp, outputs, mode=args.mode, dry_run=ctx.dry_run)
    sent = {"name": args.name, "input": inp, "outputs": outputs, "mode": args.mode}
    return _show_mutation(ctx, result, "relay", sent, "add", "added")


def cmd_relay_del(ctx: Ctx, args: argparse.Namespace) -> int:
    result = ctx.client.relay_del(args.name, dry_run=ctx.dry_run)
    return _show_mutation(ctx, result, "relay", {"name": args.name}, "delete", "deleted")


def cmd_group(ctx: Ctx, args: argparse.Namespace) -> int:
    if args.action == "join":
        result = ctx.client.group_join(args.iface, args.group, args.source, dry_run=ctx.dry_run)
        verb, done = "join", "joined"
    else:
        result = ctx.client.group_leave(args.iface, args.group, args.source, dry_run=ctx.dry_run)
        verb, done = "leave", "left"
    sent = {"iface": args.iface, "group": args.group, "source": args.source}
    return _show_mutation(ctx, result, "group", sent, verb, done)


def _stats_text(stats: dict[str, Any], verbose: bool) -> str:
    routes = stats.get("routes") or []
    relays = stats.get("relays") or []
    workers = stats.get("workers") or []
    blocks = [
        fmt.section("Routes", routes, fmt.routes_table(routes, verbose), "none"),
        fmt.section("Relays", relays, fmt.relays_table(relays, verbose), "none"),
        fmt.section("Workers", workers, fmt.workers_table(workers), "none"),
    ]
    daemon = stats.get("daemon")
    if isinstance(daemon, dict) and daemon:
        blocks.append("Daemon: " + fmt.status_text(daemon).splitlines()[0])
    return "\n\n".join(blocks)


def cmd_show(ctx: Ctx, args: argparse.Namespace) -> int:
    c = ctx.client
    what = args.what
    if what is None:
        routes, relays = c.routes(), c.relays()
        if ctx.json:
            ctx.print(fmt.json_text({"routes": routes, "relays": relays}))
        else:
            ctx.print(fmt.section("Routes", routes, fmt.routes_table(routes, ctx.verbose), "none"))
            ctx.print()
            ctx.print(fmt.section("Relays", relays, fmt.relays_table(relays, ctx.verbose), "none"))
        return EXIT_OK
    if what == "stats":
        stats = c.stats()
        ctx.print(fmt.json_text(stats) if ctx.json else _stats_text(stats, ctx.verbose))
        return EXIT_OK
    method = {
        "routes": "route.list",
        "relays": "relay.list",
        "interfaces": "interface.list",
        "groups": "group.list",
        "workers": "worker.list",
    }[what]
    result = c.call(method)
    if ctx.json:
        ctx.print(fmt.json_text(result))
        return EXIT_OK
    items = result.get(what) if isinstance(result, dict) else None
    items = items if isinstance(items, list) else []
    if not items:
        ctx.print(f"no {what}")
        return EXIT_OK
    render: dict[str, Callable[[list[Any]], str]] = {
        "routes": lambda x: fmt.routes_table(x, ctx.verbose),
        "relays": lambda x: fmt.relays_table(x, ctx.verbose),
        "interfaces": fmt.interfaces_table,
        "groups": fmt.groups_table,
        "workers": fmt.workers_table,
    }
    ctx.print(render[what](items))
    return EXIT_OK


def cmd_stats(ctx: Ctx, args: argparse.Namespace) -> int:
    interval: float | None = args.watch
    if interval is None:
        stats = ctx.client.stats()
        ctx.print(fmt.json_text(stats) if ctx.json else _stats_text(stats, ctx.verbose))
        return EXIT_OK
    if not interval > 0:
        raise InvalidParams("watch", f"the refresh interval must be > 0 seconds, got {interval:g}")
    clear = not ctx.json and ctx.out.isatty()
    try:
        while True:
            stats = ctx.client.stats()
            if ctx.json:
                ctx.print(fmt.json_line(stats))  # one object per line: a stream for scripts
            else:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                head = f"Every {interval:g}s: mcrelay stats    {stamp}"
                ctx.out.write("\033[H\033[2J" if clear else "")
                ctx.print(f"{head}\n\n{_stats_text(stats, ctx.verbose)}\n")
            time.sleep(interval)
    except KeyboardInterrupt:
        return EXIT_OK


def cmd_trace(ctx: Ctx, args: argparse.Namespace) -> int:
    if args.count is not None and args.count < 1:
        raise InvalidParams("count", f"must be at least 1, got {args.count}")
    if args.duration is not None and not args.duration > 0:
        raise InvalidParams("duration", f"must be > 0 seconds, got {args.duration:g}")
    c = ctx.client
    c.trace_start(args.name)
    seen = 0
    if not ctx.json:
        ctx.note(f"tracing relay {args.name}, Ctrl-C to stop")
    try:
        cursor = 0
        started = time.monotonic()
        while True:
            result = c.trace_read(args.name, cursor)
            records = result.get("records")
            for record in records if isinstance(records, list) else []:
                if isinstance(record, dict):
                    ctx.print(fmt.json_line(record) if ctx.json else fmt.trace_line(record))
                seen += 1
                if args.count is not None and seen >= args.count:
                    return EXIT_OK
            next_cursor = result.get("cursor")
            if isinstance(next_cursor, int) and not isinstance(next_cursor, bool):
                cursor = next_cursor
            if args.duration is not None and time.monotonic() - started >= args.duration:
                return EXIT_OK
            time.sleep(TRACE_POLL)
    except KeyboardInterrupt:
        c.close()  # a read may be half done: stop tracing on a fresh connection
        return EXIT_OK
    finally:
        try:
            c.trace_stop(args.name)
        except McrelayError as exc:
            ctx.note(f"mcrelay: warning: could not stop tracing {args.name}: {exc.message}")
        except KeyboardInterrupt:
            pass
        if not ctx.json:
            ctx.note(f"{seen} packet{'s' if seen != 1 else ''} traced")


def cmd_status(ctx: Ctx, args: argparse.Namespace) -> int:
    status = ctx.client.status()
    ctx.print(fmt.json_text(status) if ctx.json else fmt.status_text(status))
    return EXIT_OK


def read_rule_file(path: str, stdin: TextIO | None = None) -> dict[str, Any]:
    """The rules of an ``export``-format file ({"version": 1, routes, relays, groups}).

    ``version`` is checked and dropped; everything else is sent as-is so the
    daemon names any unknown key. ``-`` reads standard input.
    """
    try:
        if path == "-":
            text = (stdin or sys.stdin).read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise CliError(f"cannot read {path}: not UTF-8 text ({exc.reason})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(
            f"{path}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    if not isinstance(data, dict):
        raise CliError(
            f'{path}: expected a JSON object {{"version": 1, "routes": [...], "relays": [...], '
            f'"groups": [...]}}, got {type(data).__name__}'
        )
    version = data.pop("version", RULE_FILE_VERSION)
    if version != RULE_FILE_VERSION:
        raise InvalidParams(
            "version",
            f"{path}: rule file version {version!r} is not supported "
            f"(this mcrelay reads version {RULE_FILE_VERSION})",
        )
    return data


def cmd_apply(ctx: Ctx, args: argparse.Namespace) -> int:
    rules = read_rule_file(args.file)
    result = ctx.client.apply(rules, dry_run=ctx.dry_run)
    if ctx.json:
        ctx.print(fmt.json_text(result))
        return EXIT_OK
    lines, counts = fmt.diff_lines(result.get("diff"))
    for line in lines:
        ctx.print(line)
    if lines:
        summary = ", ".join(f"{counts[k]} {k}" for k in ("added", "removed", "changed"))
    else:
        summary = "no changes: the running rules already match"
    if ctx.dry_run:
        ctx.print(f"{summary}; dry run: nothing was changed")
    else:
        ctx.print(summary)
    return EXIT_OK


def cmd_export(ctx: Ctx, args: argparse.Namespace) -> int:
    ctx.print(fmt.json_text(ctx.client.export()))
    return EXIT_OK


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    """Run ``mcrelay`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    out, err = sys.stdout, sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(exc.usage, file=err)
        print(f"mcrelay: {exc.message} (see mcrelay --help)", file=err)
        return EXIT_REFUSED
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK

    handler: Handler = args.handler
    log_handler: logging.Handler | None = None
    client_log = logging.getLogger("mcrelay.client")
    if args.verbose:
        log_handler = logging.StreamHandler(err)
        log_handler.setFormatter(logging.Formatter("%(message)s"))
        client_log.addHandler(log_handler)
        client_log.setLevel(logging.DEBUG)
    client = Client(args.socket)
    ctx = Ctx(client, args.output == "json", args.verbose, args.dry_run, out, err)
    try:
        return handler(ctx, args)
    except DaemonUnreachable as exc:
        print(f"mcrelay: {exc.message}", file=err)
        return EXIT_UNREACHABLE
    except RemoteError as exc:
        detail = f" (error {exc.code}{', ' + json.dumps(exc.data) if exc.data else ''})"
        print(f"mcrelay: {exc.message}{detail if args.verbose else ''}", file=err)
        return EXIT_REFUSED
    except McrelayError as exc:
        print(f"mcrelay: {exc.message}", file=err)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `mcrelay show | head`: the reader has gone, which is what the user wanted.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, out.fileno())  # no second error when Python flushes at exit
        return EXIT_OK
    finally:
        client.close()
        if log_handler is not None:
            client_log.removeHandler(log_handler)


if __name__ == "__main__":
    sys.exit(main())
