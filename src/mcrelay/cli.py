"""``mcrelay``: the command-line client of mcrelayd.

The command lines are a contract (DESIGN.md, "Command lines"); docs/cli.md is
their reference. Every command is one or a few JSON-RPC calls through
:class:`mcrelay.client.Client`; this module only turns argv into parameters
and results into text.

Exit codes: 0 done; 1 refused (by the daemon, or bad input the CLI caught
itself; the message names the field); 2 the daemon is not reachable (the
message names the socket and how to start the daemon). argparse's own usage
errors also exit 1, so that 2 always means "no daemon".

iproute2 habits: command words may be shortened to any unambiguous prefix
(``mcrelay sh ro``), ``route show|list`` is ``show routes``, ``del`` may be
spelt ``delete``, and views take filters (``show routes iif up0``). Words are
resolved before argparse sees them (:func:`resolve_argv`), which also lets
``main`` build the parser of the one command asked for.

A CLI call is short-lived, so start-up is most of its cost: modules that only
some commands need (the rule model, ipaddress, logging, shlex) are imported
where they are used, not here.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, NoReturn, TextIO, cast

from . import __version__
from . import cli_format as fmt
from .client import Client, DaemonUnreachable, RemoteError
from .errors import InvalidParams, McrelayError

if TYPE_CHECKING:  # argparse is imported only when a command line needs it (see _fast_parse)
    import argparse

    Handler = Callable[["Ctx", argparse.Namespace], int]
    Sub = Callable[..., argparse.ArgumentParser]

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_UNREACHABLE = 2
EXIT_INTERRUPTED = 130

TRACE_POLL = 0.2  # seconds between trace.read calls
REPLY_STEP = 10.0  # seconds between "still waiting" notes while the daemon works
RULE_FILE_VERSION = 1
SHOW_VIEWS = ("routes", "relays", "interfaces", "groups", "stats", "workers")

# Command words and their spellings; each maps to the canonical word.
COMMAND_WORDS = {
    w: w for w in ("route", "relay", "group", "show", "stats", "trace", "status", "apply", "export")
}
ACTION_WORDS: dict[str, dict[str, str]] = {
    "route": {"add": "add", "del": "del", "delete": "del", "show": "show", "list": "show"},
    "relay": {"add": "add", "del": "del", "delete": "del", "show": "show", "list": "show"},
    "group": {"join": "join", "leave": "leave", "show": "show", "list": "show"},
}
VIEW_WORDS = {
    **{v: v for v in SHOW_VIEWS},
    "route": "routes",
    "relay": "relays",
    "interface": "interfaces",
    "group": "groups",
    "worker": "workers",
}
SHOW_OF = {"route": "routes", "relay": "relays", "group": "groups"}  # `route show` = show routes
# Commands taken only when spelt out: `rel` stays `relay`, as before `reload` existed.
EXACT_COMMANDS = ("reload",)
# Global options that take a value, so that value is not taken for a command word.
_VALUE_OPTIONS = ("-o", "--output", "--socket", "-b", "--batch")
_SHORT_VALUE = "ob"


class UsageError(Exception):
    """The command line does not parse; carries the usage of the (sub)command.

    ``usage`` may be empty when the error is found before a parser is built
    (an unknown or ambiguous command word); ``command`` then says whose usage
    to show.
    """

    def __init__(self, usage: str, message: str, command: str | None = None) -> None:
        super().__init__(message)
        self.usage = usage
        self.message = message
        self.command = command


class CliError(McrelayError):
    """Input the CLI refuses before asking the daemon (unreadable rule file...)."""


_PARSER_CLASS: list[type[argparse.ArgumentParser]] = []


def _parser(**kw: Any) -> argparse.ArgumentParser:
    """argparse, but a usage error raises (exit 1) instead of exiting with 2.

    The subclass is made on first use so that importing this module does not
    import argparse.
    """
    if not _PARSER_CLASS:
        import argparse

        class _Parser(argparse.ArgumentParser):
            def error(self, message: str) -> NoReturn:
                raise UsageError(self.format_usage().rstrip(), message)

        _PARSER_CLASS.append(_Parser)
    return _PARSER_CLASS[0](**kw)


class Ctx:
    """What every command needs: the client and how to print.

    In a batch (``line`` set) every command prints one line: JSON results are
    compact and tagged with their line number, and the dry-run notice is
    printed once at the end instead of after each command. A plain class, not
    a dataclass, because :mod:`dataclasses` is slow to import.
    """

    __slots__ = ("client", "dry_run", "err", "json", "line", "out", "verbose")

    def __init__(
        self,
        client: Client,
        json: bool,
        verbose: bool,
        dry_run: bool,
        out: TextIO,
        err: TextIO,
        line: int | None = None,
    ) -> None:
        self.client = client
        self.json = json
        self.verbose = verbose
        self.dry_run = dry_run
        self.out = out
        self.err = err
        self.line = line

    def print(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def note(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    def print_json(self, result: Any) -> None:
        """A command's JSON result: indented, or one tagged line per command in a batch."""
        if self.line is None:
            self.print(fmt.json_text(result))
        else:
            self.print(fmt.json_line({"line": self.line, "result": result}))


# ---------------------------------------------------------------- argv parsing


def _add_globals(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """Global options, accepted before and after the subcommand.

    Below the top level their default is SUPPRESS, so that an option given
    before the subcommand is not reset by the subcommand's default.
    """

    import argparse

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


def _help_width() -> int:
    """The help text width argparse would pick, without importing shutil for it."""
    try:
        columns = int(os.environ.get("COLUMNS", "0")) or os.get_terminal_size(2).columns
    except (ValueError, OSError):
        columns = 80
    return max(columns - 2, 20)


def _formatter(prog: str) -> argparse.HelpFormatter:
    """argparse's formatter with a fixed width: it builds one per argument otherwise
    asking the terminal each time (and importing shutil to do so)."""
    import argparse

    return argparse.HelpFormatter(prog, width=_help_width())


def _sub_maker(cmds: Any) -> Sub:
    """``sub(parent, name, handler, help)``: a subcommand parser with the global options."""

    def sub(
        parent: Any, name: str, handler: Handler | None, help_: str, **kw: Any
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(
            name, help=help_, description=help_, formatter_class=_formatter, **kw
        )
        _add_globals(p, top=False)
        if handler is not None:
            p.set_defaults(handler=handler)
        return p

    return sub


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``mcrelay`` command line; with ``only``, just that command's subparser.

    Building every subcommand costs a call more than parsing does, and
    :func:`resolve_argv` already knows which one is asked for.
    """
    parser = _parser(
        prog="mcrelay",
        description="Control mcrelayd: static kernel multicast routes and userspace relays.",
        epilog="Exit codes: 0 done, 1 refused (the message says why), 2 daemon not reachable. "
        "Command words may be shortened (mcrelay sh ro = mcrelay show routes).",
        formatter_class=_formatter,
    )
    parser.add_argument("--version", action="version", version=f"mcrelay {__version__}")
    _add_globals(parser, top=True)
    _add_batch_options(parser)
    cmds = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub = _sub_maker(cmds)
    for name, builder in _BUILDERS.items():
        if only is None or name == only:
            builder(cmds, sub)
    return parser


def build_batch_parser() -> argparse.ArgumentParser:
    """``mcrelay [GLOBALS] -b FILE [--force]``: the commands come from FILE."""
    parser = _parser(prog="mcrelay", formatter_class=_formatter)
    _add_globals(parser, top=True)
    _add_batch_options(parser)
    return parser


def _add_batch_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("batch")
    g.add_argument(
        "-b",
        "--batch",
        metavar="FILE",
        help="run one command per line of FILE (- for stdin) over one connection",
    )
    g.add_argument(
        "--force",
        action="store_true",
        help="with --batch: go on after a refused command (exit 1 at the end)",
    )


def _build_route(cmds: Any, sub: Sub) -> None:
    route = sub(cmds, "route", None, "kernel multicast routes (S,G) and (*,G)")
    route_cmds = route.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub(
        route_cmds,
        "add",
        cmd_route_add,
        "add a static kernel route; without SOURCE it is (*,G): any source of GROUP",
        usage="mcrelay route add IIF [SOURCE[/LEN]] GROUP[/LEN] [OIF...] [--ttl-threshold OIF=N]",
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
        "delete a kernel route (also: route delete)",
        usage="mcrelay route del IIF [SOURCE[/LEN]] GROUP[/LEN]",
    )
    p.add_argument("iif", metavar="IIF", help="input interface")
    p.add_argument("rest", nargs="+", metavar="[SOURCE] GROUP", help="the route's addresses")


def _build_relay(cmds: Any, sub: Sub) -> None:
    relay = sub(cmds, "relay", None, "userspace relays (re-address, unicast, DSCP, fan-out)")
    relay_cmds = relay.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub(
        relay_cmds,
        "add",
        cmd_relay_add,
        "add a relay (--in/--out) or a discovery reflector (--reflect/--on)",
        usage="mcrelay relay add NAME --in GROUP:PORT@IIF --out SPEC [--out SPEC...] "
        "[--mode packet|socket] [--source ADDR...]\n"
        "       mcrelay relay add NAME --reflect PROTO|GROUP:PORT --on IF,IF[,IF...] "
        "[--listen-only IF,...] [--source keep|own] [--allow PREFIX,...]",
    )
    p.add_argument("name", metavar="NAME", help="relay name (letters, digits, . _ - : @ [ ])")
    p.add_argument(
        "--in",
        dest="input",
        metavar="GROUP:PORT@IIF",
        help="what to receive: a group (or a unicast address of this host, or "
        "255.255.255.255 for broadcast), port, interface",
    )
    p.add_argument(
        "--out",
        dest="outputs",
        action="append",
        default=[],
        metavar="SPEC",
        help="ADDR:PORT[@OIF][,ttl=N][,dscp=CLASS][,src=keep|own]; repeat for more outputs "
        "(at most 32); src=keep sends with the original sender's address and port",
    )
    p.add_argument(
        "--reflect",
        metavar="PROTO|GROUP:PORT",
        help="a reflector over the --on interfaces: mdns, ssdp, llmnr, wsd, wol, "
        "GROUP:PORT or broadcast:PORT",
    )
    p.add_argument(
        "--on",
        action="append",
        default=[],
        metavar="IF,IF[,IF...]",
        help="reflector members: a packet heard on one is sent on every other",
    )
    p.add_argument(
        "--listen-only",
        action="append",
        default=[],
        metavar="IF,...",
        help="reflector members that are heard but never sent to",
    )
    p.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="PREFIX,...",
        help="reflect only packets whose source is in these prefixes",
    )
    p.add_argument("--mode", choices=("packet", "socket"), help="ingress mode (default packet)")
    p.add_argument(
        "--source",
        dest="sources",
        action="extend",
        nargs="+",
        default=[],
        metavar="ADDR",
        help="with --in: relay only packets from these sources (also joins source-specific); "
        "with --reflect: keep (default: the sender's address and port) or own (this router's)",
    )
    p = sub(relay_cmds, "del", cmd_relay_del, "delete a relay (also: relay delete)")
    p.add_argument("name", metavar="NAME")


def _build_group(cmds: Any, sub: Sub) -> None:
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


def _build_show(cmds: Any, sub: Sub) -> None:
    p = sub(
        cmds,
        "show",
        cmd_show,
        "show rules, interfaces, memberships, counters, workers",
        usage="mcrelay show [VIEW [FILTER...]]",
        epilog="Filters: routes [iif IFACE] [oif IFACE] [group PREFIX] [source PREFIX]; "
        "relays [NAME] [iif IFACE] [oif IFACE] [group PREFIX]; "
        "groups [iface IFACE] [group PREFIX] [source PREFIX]; interfaces [NAME]. "
        "NAME may hold * ? [ ] wildcards; a prefix is 239.1.0.0/16 or an address.",
    )
    p.add_argument("what", nargs="?", metavar="|".join(SHOW_VIEWS), help="default: both")
    p.add_argument("filters", nargs="*", metavar="FILTER", help="only what matches (see below)")


def _build_stats(cmds: Any, sub: Sub) -> None:
    p = sub(cmds, "stats", cmd_stats, "counters of routes, relays and workers")
    p.add_argument(
        "--watch",
        nargs="?",
        const=1.0,
        type=float,
        metavar="SECONDS",
        help="refresh every SECONDS (default 1) until Ctrl-C",
    )


def _build_trace(cmds: Any, sub: Sub) -> None:
    p = sub(cmds, "trace", cmd_trace, "show a relay's packets as they pass (like tcpdump)")
    p.add_argument("name", metavar="NAME", help="relay name")
    p.add_argument("--count", "-c", type=int, metavar="N", help="stop after N packets")
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")


def _build_status(cmds: Any, sub: Sub) -> None:
    sub(cmds, "status", cmd_status, "daemon health and summary")


def _build_reload(cmds: Any, sub: Sub) -> None:
    sub(
        cmds,
        "reload",
        cmd_reload,
        "re-read the daemon's settings file and say what changed (systemctl reload runs this)",
    )


def _build_apply(cmds: Any, sub: Sub) -> None:
    p = sub(cmds, "apply", cmd_apply, "replace the whole rule set from FILE in one transaction")
    p.add_argument("file", metavar="FILE", help="rule file as printed by export; - for stdin")


def _build_export(cmds: Any, sub: Sub) -> None:
    p = sub(cmds, "export", cmd_export, "print the whole rule set (the format apply reads)")
    p.add_argument(
        "--format",
        choices=("json", "smcroute"),
        default="json",
        help="json (what apply reads, default) or smcroute (smcroute.conf lines)",
    )


# ---------------------------------------------------------------- command words


class Resolved:
    """``argv`` with its command words spelt out, and what it asks for."""

    __slots__ = ("argv", "batch", "command")

    def __init__(self, argv: list[str], command: str | None, batch: bool) -> None:
        self.argv = argv
        self.command = command  # canonical first word, None without one
        self.batch = batch  # -b/--batch was given


def _word_positions(argv: Sequence[str]) -> tuple[list[int], bool]:
    """Indexes of the words that are not options or option values; was --batch given?

    Only the global options can come before the command words, so only their
    values need skipping; the scan is about the first few words.
    """
    positions: list[int] = []
    batch = False
    i = 0
    while i < len(argv):
        word = argv[i]
        takes_value = False
        if word == "--":
            positions.extend(range(i + 1, len(argv)))
            break
        if word.startswith("--"):
            name = word.partition("=")[0]
            batch = batch or name == "--batch"
            takes_value = name in _VALUE_OPTIONS and "=" not in word
        elif word.startswith("-") and len(word) > 1:
            letters = word[1:]
            for j, letter in enumerate(letters):
                batch = batch or letter == "b"
                if letter in _SHORT_VALUE:
                    takes_value = j == len(letters) - 1  # else the value is glued on
                    break
        else:
            positions.append(i)
        i += 2 if takes_value else 1
    return positions, batch


def resolve_word(word: str, table: dict[str, str], what: str, command: str | None) -> str:
    """``word`` or an unambiguous prefix of it -> the canonical word of ``table``.

    Spellings of one word (``del``/``delete``, ``route``/``routes``) do not
    make a prefix ambiguous; different words do, and the error lists them.
    """
    if word in table:
        return table[word]
    found = {canonical for spelling, canonical in table.items() if spelling.startswith(word)}
    if len(found) == 1 and word:
        return found.pop()
    known = sorted(set(table.values()))
    if len(found) > 1 and word:
        raise UsageError(
            "", f"ambiguous {what} {word!r}: could be {', '.join(sorted(found))}", command
        )
    raise UsageError("", f"unknown {what} {word!r}; expected one of {', '.join(known)}", command)


def resolve_argv(argv: Sequence[str]) -> Resolved:
    """Spell out the command words of ``argv`` (prefixes, aliases, ``route show``).

    ``mcrelay sh ro iif up0`` becomes ``mcrelay show routes iif up0``,
    ``route list`` and ``route show`` become ``show routes``, ``route delete``
    becomes ``route del``. Words after the command's own (names, addresses,
    filters) are left alone.
    """
    out = list(argv)
    positions, batch = _word_positions(out)
    if not positions:
        return Resolved(out, None, batch)
    first = positions[0]
    if out[first] in EXACT_COMMANDS:
        return Resolved(out, out[first], batch)
    command = resolve_word(out[first], COMMAND_WORDS, "command", None)
    out[first] = command
    second = positions[1] if len(positions) > 1 else None
    if second is not None and command in ACTION_WORDS:
        action = resolve_word(out[second], ACTION_WORDS[command], f"{command} action", command)
        if action == "show":
            out[first], out[second], command = "show", SHOW_OF[command], "show"
        else:
            out[second] = action
    elif second is not None and command == "show":
        out[second] = resolve_word(out[second], VIEW_WORDS, "view", command)
    return Resolved(out, command, batch)


# ---------------------------------------------------------------- helpers


def _address_kind(text: str) -> str | None:
    """'multicast', 'unicast', or None if ``text`` is not an IP address or prefix (ADDR/LEN)."""
    import ipaddress

    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None
    return "multicast" if net.network_address.is_multicast else "unicast"


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
        if ctx.line is None:  # a batch says it once, at the end
            ctx.print("dry run: nothing was changed")
    else:
        ctx.print(f"{done} {description}")


def _show_mutation(
    ctx: Ctx, result: dict[str, Any], key: str, sent: dict[str, Any], verb: str, done: str
) -> int:
    if ctx.json:
        ctx.print_json(result)
        return EXIT_OK
    rule = result.get(key)
    _mutation_text(ctx, verb, done, fmt.describe(key, rule if isinstance(rule, dict) else sent))
    return EXIT_OK


# ---------------------------------------------------------------- commands


def cmd_route_add(ctx: Ctx, args: argparse.Namespace) -> int:
    form = "IIF [SOURCE[/LEN]] GROUP[/LEN] [OIF...]"
    source, group, names = _split_source_group(args.rest, form)
    if not names and source is None:
        raise InvalidParams(
            "oifs",
            f"at least one output interface is required: {form} "
            "(only an (S,G) may have none: a stop filter that blocks that source)",
        )
    thresholds: dict[str, int] = {}
    for item in args.ttl_threshold:
        name, sep, value = item.partition("=")
        if not sep or name not in names:
            raise InvalidParams(
                "ttl-threshold",
                f"{item!r}: expected OIF=N with OIF one of the outputs ({', '.join(names)})",
            )
        from .model import check_ttl

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
    from .model import check_port, parse_input_spec

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
    from .model import check_dscp, check_port, check_ttl, parse_output_spec

    where = f"outputs[{index}]"
    spec = parse_output_spec(text, where)
    out: dict[str, Any] = {
        "address": spec["address"],
        "port": check_port(spec["port"], f"{where}.port"),
    }
    if spec.get("oif") is not None:
        out["oif"] = spec["oif"]
    if "src" in spec:
        out["src"] = spec["src"]
    if "ttl" in spec:
        out["ttl"] = check_ttl(spec["ttl"], f"{where}.ttl")
    if "dscp" in spec:
        out["dscp"] = check_dscp(spec["dscp"], f"{where}.dscp")
    return out


def _csv(items: Sequence[str]) -> list[str]:
    return [s.strip() for item in items for s in item.split(",") if s.strip()]


def _reflect_params(args: argparse.Namespace) -> dict[str, Any]:
    from .model import parse_reflect_spec

    spec = parse_reflect_spec(args.reflect)
    spec["on"] = _csv(args.on)
    if args.listen_only:
        spec["listen_only"] = _csv(args.listen_only)
    if args.sources:
        if len(args.sources) != 1 or args.sources[0] not in ("keep", "own"):
            raise InvalidParams(
                "reflect.source",
                f"with --reflect, --source is keep or own, got {' '.join(args.sources)!r}",
            )
        spec["source"] = args.sources[0]
    if args.allow:
        spec["allow"] = _csv(args.allow)
    return spec


def cmd_relay_add(ctx: Ctx, args: argparse.Namespace) -> int:
    if args.reflect is not None:
        spec = _reflect_params(args)
        result = ctx.client.reflector_add(args.name, spec, dry_run=ctx.dry_run)
        sent = {"name": args.name, "reflect": spec}
        return _show_mutation(ctx, result, "relay", sent, "add", "added")
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


SHOW_METHODS = {
    "routes": "route.list",
    "relays": "relay.list",
    "interfaces": "interface.list",
    "groups": "group.list",
    "workers": "worker.list",
}


def cmd_show(ctx: Ctx, args: argparse.Namespace) -> int:
    c = ctx.client
    what = args.what
    if what is None:
        routes, relays = c.routes(), c.relays()
        if ctx.json:
            ctx.print_json({"routes": routes, "relays": relays})
        else:
            ctx.print(fmt.section("Routes", routes, fmt.routes_table(routes, ctx.verbose), "none"))
            ctx.print()
            ctx.print(fmt.section("Relays", relays, fmt.relays_table(relays, ctx.verbose), "none"))
        return EXIT_OK
    terms = fmt.parse_filter(what, args.filters)  # refused before asking the daemon
    if what == "stats":
        stats = c.stats()
        if ctx.json:
            ctx.print_json(stats)
        else:
            ctx.print(_stats_text(stats, ctx.verbose))
        return EXIT_OK
    result = c.call(SHOW_METHODS[what])
    items = result.get(what) if isinstance(result, dict) else None
    items = items if isinstance(items, list) else []
    if terms:
        items = fmt.select(what, items, terms)
        if isinstance(result, dict):
            result = {**result, what: items}  # the daemon's shape, fewer entries
    if ctx.json:
        ctx.print_json(result)
    elif not items:
        ctx.print(f"no {what} match {fmt.filter_text(terms)}" if terms else f"no {what}")
    else:
        ctx.print(_VIEW_TABLES[what](items, ctx.verbose))
    return EXIT_OK


_VIEW_TABLES: dict[str, Callable[[list[Any], bool], str]] = {
    "routes": fmt.routes_table,
    "relays": fmt.relays_table,
    "interfaces": lambda items, verbose: fmt.interfaces_table(items),
    "groups": lambda items, verbose: fmt.groups_table(items),
    "workers": lambda items, verbose: fmt.workers_table(items),
}


def cmd_stats(ctx: Ctx, args: argparse.Namespace) -> int:
    interval: float | None = args.watch
    if interval is None:
        stats = ctx.client.stats()
        if ctx.json:
            ctx.print_json(stats)
        else:
            ctx.print(_stats_text(stats, ctx.verbose))
        return EXIT_OK
    if not interval > 0:
        raise InvalidParams("watch", f"the refresh interval must be > 0 seconds, got {interval:g}")
    tty = ctx.out.isatty()
    clear = not ctx.json and tty
    prev: fmt.Sample | None = None
    prev_at = 0.0
    pid: Any = None
    lost_at: float | None = None
    try:
        while True:
            try:
                stats = ctx.client.stats()
            except DaemonUnreachable as exc:
                # A restart (or an upgrade) is not the end of a watch: retry until Ctrl-C.
                if lost_at is None:
                    lost_at = time.monotonic()
                    ctx.note(f"mcrelay: {exc.message}; retrying every {interval:g}s")
                time.sleep(interval)
                continue
            now = time.monotonic()
            daemon = stats.get("daemon")
            new_pid = daemon.get("pid") if isinstance(daemon, dict) else None
            if lost_at is not None:
                again = "restarted" if new_pid != pid else "reachable again"
                ctx.note(f"mcrelay: daemon {again} after {now - lost_at:.1f}s (pid {new_pid})")
                lost_at = None
            if new_pid != pid:
                prev = None  # a new daemon's counters start again: no rate across it
            pid = new_pid
            current = fmt.sample(stats)
            per_key = fmt.rates(prev, current, now - prev_at) if prev is not None else None
            if ctx.json:
                line = dict(stats)
                if per_key is not None:
                    line["rates"] = fmt.rates_json(per_key, now - prev_at)
                ctx.print(fmt.json_line(line))  # one object per line: a stream for scripts
            else:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                head = f"Every {interval:g}s: mcrelay stats    {stamp}"
                ctx.out.write("\033[H\033[2J" if clear else "")
                ctx.print(f"{head}\n\n{_watch_text(stats, per_key, now - prev_at, tty)}\n")
            prev, prev_at = current, now
            time.sleep(interval)
    except KeyboardInterrupt:
        return EXIT_OK


def _watch_text(stats: dict[str, Any], per_key: Any, seconds: float, color: bool) -> str:
    """One ``stats --watch`` screen: rates per rule and output, then workers and the daemon."""
    workers = stats.get("workers") or []
    rules = (stats.get("routes") or []) + (stats.get("relays") or [])
    over = f"over the last {seconds:.1f}s" if per_key is not None else "from the next refresh on"
    blocks = [
        fmt.section(f"Rules, rates {over}", rules, fmt.rates_table(stats, per_key, color), "none"),
        fmt.section("Workers", workers, fmt.workers_table(workers), "none"),
    ]
    daemon = stats.get("daemon")
    if isinstance(daemon, dict) and daemon:
        blocks.append("Daemon: " + fmt.status_text(daemon).splitlines()[0])
    return "\n\n".join(blocks)


def cmd_trace(ctx: Ctx, args: argparse.Namespace) -> int:
    if args.count is not None and args.count < 1:
        raise InvalidParams("count", f"must be at least 1, got {args.count}")
    if args.duration is not None and not args.duration > 0:
        raise InvalidParams("duration", f"must be > 0 seconds, got {args.duration:g}")
    c = ctx.client
    since = time.time()
    begun = c.trace_start(args.name)
    seen = 0
    if not ctx.json:
        ctx.note(f"tracing relay {args.name}, Ctrl-C to stop")
    try:
        # Read from this trace's first record (an older daemon gives none: 0), and
        # skip packets received before we started (a worker may still hand over
        # the end of an earlier trace).
        first = begun.get("cursor")
        cursor = first if isinstance(first, int) and not isinstance(first, bool) else 0
        started = time.monotonic()
        while True:
            result = c.trace_read(args.name, cursor)
            records = result.get("records")
            for record in records if isinstance(records, list) else []:
                if not isinstance(record, dict) or _before(record, since):
                    continue
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


def _before(record: dict[str, Any], since: float) -> bool:
    """True for a packet received before the trace started (its ``time`` says so)."""
    t = record.get("time")
    return isinstance(t, int | float) and not isinstance(t, bool) and t < since


def cmd_status(ctx: Ctx, args: argparse.Namespace) -> int:
    status = ctx.client.status()
    if ctx.json:
        ctx.print_json(status)
    else:
        ctx.print(fmt.status_text(status))
    return EXIT_OK


def cmd_reload(ctx: Ctx, args: argparse.Namespace) -> int:
    result = ctx.client.reload(dry_run=ctx.dry_run)
    if ctx.json:
        ctx.print_json(result)
    else:
        for line in reload_lines(result, ctx.dry_run):
            ctx.print(line)
    return EXIT_OK


def reload_lines(result: dict[str, Any], dry_run: bool) -> list[str]:
    """What ``mcrelay reload`` prints: the file read, what now applies, what needs a restart."""
    source = result.get("config") or "built-in defaults (no settings file)"
    changed = [str(k) for k in result.get("changed") or []]
    restart = [str(k) for k in result.get("restart_required") or []]
    if dry_run:
        lines = [f"dry run: {source} read, nothing was changed"]
        if changed:
            lines.append(f"would apply: {', '.join(changed)}")
    else:
        lines = [f"settings re-read from {source}"]
        lines.append(f"applied: {', '.join(changed)}" if changed else "applied: no change")
    if restart:
        lines.append(
            f"changed but need a restart (systemctl restart mcrelay): {', '.join(restart)}"
        )
    return lines


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
        ctx.print_json(result)
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
    rules = ctx.client.export()
    if getattr(args, "format", "json") == "smcroute":
        from .smcroute_conf import format_rules

        ctx.out.write(format_rules(rules))
        return EXIT_OK
    ctx.print_json(rules)
    return EXIT_OK


_BUILDERS: dict[str, Callable[[Any, Sub], None]] = {
    "route": _build_route,
    "relay": _build_relay,
    "group": _build_group,
    "show": _build_show,
    "stats": _build_stats,
    "trace": _build_trace,
    "status": _build_status,
    "reload": _build_reload,
    "apply": _build_apply,
    "export": _build_export,
}


# ---------------------------------------------------------------- running commands


def run_command(ctx: Ctx, args: argparse.Namespace, where: str = "") -> int:
    """Run one parsed command; errors become the message and the exit code.

    ``where`` prefixes messages (``line 3: ``) in a batch.
    """
    handler: Handler = args.handler
    try:
        return handler(ctx, args)
    except DaemonUnreachable as exc:
        ctx.note(f"mcrelay: {where}{exc.message}")
        return EXIT_UNREACHABLE
    except RemoteError as exc:
        detail = f" (error {exc.code}{', ' + json.dumps(exc.data) if exc.data else ''})"
        ctx.note(f"mcrelay: {where}{exc.message}{detail if ctx.verbose else ''}")
        _json_error(ctx, exc.code, exc.message)
        return EXIT_REFUSED
    except McrelayError as exc:
        ctx.note(f"mcrelay: {where}{exc.message}")
        _json_error(ctx, exc.code, exc.message)
        return EXIT_REFUSED


def _json_error(ctx: Ctx, code: int, message: str) -> None:
    """In a JSON batch a refused command still has its line on stdout, so lines pair up."""
    if ctx.json and ctx.line is not None:
        error = {"code": code, "message": message}
        ctx.print(fmt.json_line({"line": ctx.line, "error": error}))


def _waiting_note(err: TextIO) -> Callable[[float], None] | None:
    """Tell a person at a terminal that the daemon is busy, not gone (scripts get silence)."""
    if not err.isatty():
        return None

    def note(waited: float) -> None:
        print(f"mcrelay: still waiting for mcrelayd ({waited:.0f} s)\u2026", file=err, flush=True)

    return note


def make_client(socket_path: str | None, err: TextIO) -> Client:
    """The CLI's client: it waits for a slow reply as long as the connection is open.

    Exit 2 means the daemon is gone (connect failed, connection dropped), never
    that it is busy: a large ``apply`` may take longer than any fixed timeout.
    """
    return Client(
        socket_path, timeout=REPLY_STEP, wait_while_connected=True, on_wait=_waiting_note(err)
    )


# ---------------------------------------------------------------- batch mode


def _open_batch(path: str) -> Iterable[str]:
    if path == "-":
        return sys.stdin
    try:
        return open(path, encoding="utf-8")  # closed by run_batch
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from None


def _batch_args(
    tokens: list[str], top: argparse.Namespace, parsers: dict[str, argparse.ArgumentParser]
) -> argparse.Namespace:
    """One batch line parsed as a command line; the batch's global options are its defaults."""
    resolved = resolve_argv(tokens)
    if resolved.batch:
        raise CliError("a batch line cannot start another batch (-b)")
    if resolved.command is None:
        raise CliError("no command on this line")
    parser = parsers.get(resolved.command)
    if parser is None:
        parser = parsers[resolved.command] = build_parser(resolved.command)
    import argparse

    defaults = {k: getattr(top, k) for k in ("dry_run", "verbose", "output", "socket")}
    args = parser.parse_args(resolved.argv, namespace=argparse.Namespace(**defaults))
    if args.socket != top.socket:
        raise CliError("--socket applies to the whole batch: give it before -b")
    if args.command == "trace" or (args.command == "stats" and args.watch is not None):
        raise CliError(f"{args.command} runs until stopped; it cannot be part of a batch")
    if args.command == "apply" and args.file == "-" and top.batch == "-":
        raise CliError("apply -: standard input is the batch itself; name a file")
    return args


def run_batch(top: argparse.Namespace, client: Client, out: TextIO, err: TextIO) -> int:
    """``mcrelay -b FILE``: one command per line, all over ``client``'s one connection.

    Lines are split like a shell would (quotes, ``#`` comments); blank lines
    are skipped. The first refused command stops the batch unless
    ``--force``; an unreachable daemon always stops it. Exit 1 if any command
    was refused, 2 if the daemon went away.
    """
    import shlex

    parsers: dict[str, argparse.ArgumentParser] = {}
    lines = _open_batch(top.batch)
    ran = refused = 0
    dry_run = top.dry_run
    try:
        for number, text in enumerate(lines, 1):
            ctx = Ctx(client, top.output == "json", top.verbose, top.dry_run, out, err, number)
            where = f"line {number}: "
            try:
                tokens = shlex.split(text, comments=True)
                if not tokens:
                    continue
                args = _batch_args(tokens, top, parsers)
            except (ValueError, UsageError, McrelayError) as exc:
                message = exc.message if isinstance(exc, UsageError | McrelayError) else str(exc)
                code = exc.code if isinstance(exc, McrelayError) else InvalidParams.code
                ctx.note(f"mcrelay: {where}{message}")
                _json_error(ctx, code, message)
                result = EXIT_REFUSED
            except SystemExit:  # --help on a line: printed, nothing to run
                continue
            else:
                ctx = Ctx(client, args.output == "json", args.verbose, args.dry_run, out, err)
                ctx.line = number
                dry_run = dry_run or args.dry_run
                result = run_command(ctx, args, where)
            ran += 1
            if result == EXIT_UNREACHABLE:
                return EXIT_UNREACHABLE
            if result != EXIT_OK:
                refused += 1
                if not top.force:
                    print(
                        f"mcrelay: stopped at line {number} ({ran - refused} done before it); "
                        "--force goes on after a refused command",
                        file=err,
                    )
                    return EXIT_REFUSED
    finally:
        if lines is not sys.stdin and hasattr(lines, "close"):
            lines.close()
    if dry_run and top.output != "json":
        print("dry run: nothing was changed", file=out)
    if refused:
        print(f"mcrelay: {refused} of {ran} commands refused", file=err)
    return EXIT_REFUSED if refused else EXIT_OK


# ---------------------------------------------------------------- entry point


_FAST_GLOBALS = {"--dry-run": "dry_run", "-v": "verbose", "--verbose": "verbose"}
_FAST_VALUES = {"-o": "output", "--output": "output", "--socket": "socket"}


def _fast_parse(argv: Sequence[str]) -> argparse.Namespace | None:
    """``status``, ``route add`` and ``route del`` parsed without argparse, or None.

    These are the calls scripts make by the thousand, and importing and
    building argparse is a good part of such a call. Only plain forms are
    taken (words and the global options spelt out in full); anything else
    (help, abbreviated options, --ttl-threshold, a missing word) returns None
    and goes to argparse, which then also produces the usage errors. A unit
    test holds this to giving exactly what argparse gives.
    """
    values: dict[str, Any] = {"dry_run": False, "verbose": False, "output": "table"}
    values.update(socket=None, batch=None, force=False)
    words: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        name, eq, glued = word.partition("=")
        if word in _FAST_GLOBALS:
            values[_FAST_GLOBALS[word]] = True
        elif name in _FAST_VALUES and name.startswith("--") and eq:
            values[_FAST_VALUES[name]] = glued
        elif word in _FAST_VALUES and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            values[_FAST_VALUES[word]] = argv[i + 1]
            i += 1
        elif word.startswith("-"):
            return None
        else:
            words.append(word)
        i += 1
    if values["output"] not in ("table", "json") or values["socket"] == "":
        return None
    if words == ["status"]:
        values.update(command="status", handler=cmd_status)
    elif len(words) >= 4 and words[0] == "route" and words[1] in ("add", "del"):
        values.update(command="route", action=words[1], iif=words[2], rest=words[3:])
        if words[1] == "add":
            values.update(handler=cmd_route_add, ttl_threshold=[])
        else:
            values.update(handler=cmd_route_del)
    else:
        return None
    return cast("argparse.Namespace", SimpleNamespace(**values))


def parse_argv(argv: Sequence[str]) -> argparse.Namespace:
    """argv -> the parsed command line, building only the parser it needs."""
    resolved = resolve_argv(argv)
    fast = None if resolved.batch else _fast_parse(resolved.argv)
    if fast is not None:
        return fast
    if resolved.batch:
        parser = build_batch_parser()
        if resolved.command is not None:
            raise UsageError(
                parser.format_usage().rstrip(),
                "with -b FILE the commands come from FILE, not from the command line",
            )
        return parser.parse_args(resolved.argv)
    args = build_parser(resolved.command).parse_args(resolved.argv)
    if getattr(args, "force", False):
        raise UsageError("", "--force goes with --batch FILE", resolved.command)
    if getattr(args, "handler", None) is cmd_relay_add:
        _relay_add_usage(args)
    return args


def _relay_add_usage(args: argparse.Namespace) -> None:
    """``relay add`` is either --in/--out or --reflect/--on: argparse cannot say that."""
    if args.reflect is not None:
        if args.input is not None or args.outputs:
            raise UsageError(
                "", "--reflect replaces --in and --out; give one or the other", "relay"
            )
        if not args.on:
            raise UsageError("", "--reflect needs --on IF,IF[,IF...]", "relay")
    elif args.on or args.listen_only or args.allow:
        raise UsageError("", "--on, --listen-only and --allow belong to --reflect", "relay")
    elif args.input is None or not args.outputs:
        raise UsageError("", "a relay needs --in and --out (or --reflect and --on)", "relay")


def _usage_error(exc: UsageError, err: TextIO) -> int:
    usage = exc.usage or _usage_of(exc.command)
    print(usage, file=err)
    print(f"mcrelay: {exc.message} (see mcrelay --help)", file=err)
    return EXIT_REFUSED


def _usage_of(command: str | None) -> str:
    parser = build_parser(command)
    if command is not None:
        for action in parser._subparsers._group_actions if parser._subparsers else []:
            choices = getattr(action, "choices", None) or {}
            if command in choices:
                return str(choices[command].format_usage().rstrip())
    return parser.format_usage().rstrip()


def _verbose_logging(err: TextIO) -> Callable[[], None]:
    """Show the client's JSON-RPC exchange on ``err``; returns how to stop."""
    import logging

    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(message)s"))
    client_log = logging.getLogger("mcrelay.client")
    client_log.addHandler(handler)
    client_log.setLevel(logging.DEBUG)
    return lambda: client_log.removeHandler(handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mcrelay`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    out, err = sys.stdout, sys.stderr
    try:
        args = parse_argv(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        return _usage_error(exc, err)
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK

    stop_logging = _verbose_logging(err) if args.verbose else None
    client = make_client(args.socket, err)
    try:
        if getattr(args, "batch", None) is not None:
            return run_batch(args, client, out, err)
        ctx = Ctx(client, args.output == "json", args.verbose, args.dry_run, out, err)
        return run_command(ctx, args)
    except McrelayError as exc:  # an unreadable batch file
        print(f"mcrelay: {exc.message}", file=err)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `mcrelay show | head`: the reader has gone, which is what the user wanted.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, out.fileno())  # no second error when Python flushes at exit
        except (OSError, ValueError):
            pass
        return EXIT_OK
    finally:
        client.close()
        if stop_logging is not None:
            stop_logging()


if __name__ == "__main__":
    sys.exit(main())
