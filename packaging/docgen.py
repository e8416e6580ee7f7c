#!/usr/bin/python3
"""Generate the man pages and the settings reference from the code itself.

    python3 packaging/docgen.py man mcrelay        > mcrelay.8
    python3 packaging/docgen.py man mcrelayd       > mcrelayd.8
    python3 packaging/docgen.py man mcrelay.toml   > mcrelay.toml.5
    python3 packaging/docgen.py settings-md        > docs/settings.md
    python3 packaging/docgen.py completion bash    > mcrelay   (zsh: _mcrelay)

(with ``src`` on PYTHONPATH). The command pages walk the argparse parsers
(``mcrelay.cli.build_parser``, ``mcrelay.daemon.build_parser``), every level of
subcommand included, so a new option or command is documented by the next
build without anyone remembering to. Debian's argparse-manpage (1.2 in
bookworm) cannot set a section other than 1, writes no whatis line (lintian:
bad-whatis-entry) and repeats the global options under every subcommand, so
this small generator does it instead.

The settings page takes each key, its default and whether a reload applies it
from ``mcrelay.config`` (``SETTING_KEYS``, ``Settings``, ``RELOADABLE``) and
its prose from the comment above the key in ``packaging/mcrelay.toml``, the
commented example admins already read; a key missing from either side is an
error, so the three can never disagree silently.

The date in the pages is ``SOURCE_DATE_EPOCH`` (dpkg-buildpackage sets it from
debian/changelog), so two builds of one commit give identical pages.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
EXAMPLE = TOP / "packaging" / "mcrelay.toml"
GLOBAL_GROUP = "global options"


# ---------------------------------------------------------------- roff


def roff(text: str) -> str:
    """Plain text made safe for roff: backslashes, hyphens, line-leading dots."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return re.sub(r"^([.'])", r"\\&\1", text, flags=re.M)


def prose(text: str) -> str:
    """Like :func:`roff`, with Markdown-style `code` spans set in bold."""
    return re.sub(r"`([^`]+)`", r"\\fB\1\\fR", roff(text))


def bold(text: str) -> str:
    return f"\\fB{roff(text)}\\fR"


def _date() -> str:
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0") or 0)
    return time.strftime("%Y-%m-%d", time.gmtime(epoch))


def _header(name: str, section: int, version: str, whatis: str) -> list[str]:
    return [
        f'.TH "{name.upper()}" "{section}" "{_date()}" "mcrelay {version}" "mcrelay manual"',
        ".SH NAME",
        f"{roff(name)} \\- {roff(whatis)}",
    ]


# ---------------------------------------------------------------- argparse walk


@dataclass(frozen=True)
class Command:
    """One leaf (or the top) of the command tree: its full name and parser."""

    name: str
    parser: argparse.ArgumentParser
    help: str


def _subparsers(
    parser: argparse.ArgumentParser,
) -> argparse._SubParsersAction[argparse.ArgumentParser] | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def commands(parser: argparse.ArgumentParser, name: str, help_: str = "") -> list[Command]:
    """Every runnable command under ``parser``, depth first, in definition order."""
    subs = _subparsers(parser)
    if subs is None:
        return [Command(name, parser, help_)]
    helps = {a.dest: a.help or "" for a in subs._choices_actions}
    out: list[Command] = []
    for sub_name, sub in subs.choices.items():
        out.extend(commands(sub, f"{name} {sub_name}", helps.get(sub_name, "")))
    return out


def _global_dests(parser: argparse.ArgumentParser) -> set[str]:
    return {
        a.dest for g in parser._action_groups if g.title == GLOBAL_GROUP for a in g._group_actions
    }


def _own_actions(parser: argparse.ArgumentParser, skip: set[str]) -> list[argparse.Action]:
    return [
        a
        for a in parser._actions
        if a.dest not in skip
        and not isinstance(a, argparse._HelpAction | argparse._SubParsersAction)
        and a.help != argparse.SUPPRESS
    ]


def usage(parser: argparse.ArgumentParser, skip: set[str]) -> str:
    """The usage line without "usage: " and without the options listed elsewhere."""
    if parser.usage:
        text = parser.usage
    else:
        fmt = argparse.HelpFormatter(parser.prog, width=10_000)
        fmt.add_usage(None, _own_actions(parser, skip), [], prefix="")
        text = fmt.format_help()
    return " ".join(text.split())


def _invocation(action: argparse.Action) -> str:
    if not action.option_strings:
        return bold(str(action.metavar or action.dest))
    names = ", ".join(bold(o) for o in action.option_strings)
    if action.nargs == 0:
        return names
    if action.metavar is not None:
        meta = str(action.metavar)
    elif action.choices is not None:
        meta = "{" + ",".join(str(c) for c in action.choices) + "}"
    else:
        meta = action.dest.upper()
    return f"{names} \\fI{roff(meta)}\\fR"


def _describe(action: argparse.Action) -> str:
    text = action.help or ""
    meta = str(action.metavar or "")
    if action.choices is not None and action.metavar is not None and "|" not in meta:
        text += f" (one of: {', '.join(str(c) for c in action.choices)})"
    return text


def options(actions: list[argparse.Action]) -> list[str]:
    lines: list[str] = []
    for action in actions:
        if not action.option_strings and not action.help:
            continue  # a bare positional: the usage line says it all
        lines += [".TP", _invocation(action), roff(_describe(action))]
    return lines


# ---------------------------------------------------------------- command pages


_MCRELAY_TAIL = r"""
.SH EXIT STATUS
.TP
.B 0
done
.TP
.B 1
refused: by the daemon, or bad input caught by mcrelay; the message names the field
.TP
.B 2
the daemon is not reachable; the message names the socket
.SH ENVIRONMENT
.TP
.B MCRELAY_SOCKET
control socket to use when \fB\-\-socket\fR is not given
.SH FILES
.TP
.I /run/mcrelay/mcrelay.sock
the daemon's control socket (JSON\-RPC 2.0, one object per line); members of
group \fBmcrelay\fR may read, root (or the configured \fBadmin_group\fR) may
change rules
.SH SEE ALSO
.BR mcrelayd (8),
.BR mcrelay.toml (5),
.BR ip\-mroute (8),
.BR smcroute (8).
The CLI and JSON\-RPC references are in /usr/share/doc/mcrelay/.
"""

_MCRELAYD_TAIL = r"""
.SH SIGNALS
.TP
.B SIGHUP
re\-read the settings file; the settings that can change at run time apply at
once, the daemon logs which others need a restart
.TP
.BR SIGTERM ", " SIGINT
remove the kernel routes the daemon installed, stop the children, exit 0
.SH ENVIRONMENT
.TP
.B NOTIFY_SOCKET
set by systemd (\fBType=notify\fR): READY=1 once the saved rules are applied
and the control socket answers; STATUS= with the rule counts
.TP
.B WATCHDOG_USEC
set by systemd (\fBWatchdogSec=\fR): the daemon pings at half this interval
.TP
.B JOURNAL_STREAM
set by systemd when stderr is the journal: every log line then starts with its
syslog priority (<3> error, <4> warning, <6> info, <7> debug), so
\fBjournalctl \-p warning\fR shows warnings and errors
.SH FILES
.TP
.I /etc/mcrelay/mcrelay.toml
settings, see \fBmcrelay.toml\fR(5)
.TP
.I /var/lib/mcrelay/state.json
the rules, rewritten atomically on every accepted change and re\-applied at
start; a corrupt file stops the daemon and is left untouched
.TP
.I /run/mcrelay/mcrelay.sock
control socket used by \fBmcrelay\fR(8)
.SH SEE ALSO
.BR mcrelay (8),
.BR mcrelay.toml (5),
.BR systemctl (1),
.BR journalctl (1)
"""


def command_page(
    parser: argparse.ArgumentParser, whatis: str, version: str, body: str, tail: str
) -> str:
    """A section 8 page for a parser and all its subcommands."""
    name = parser.prog
    globals_ = _global_dests(parser)
    cmds = commands(parser, name)
    leaves = [c for c in cmds if c.parser is not parser]
    lines = _header(name, 8, version, whatis)
    lines.append(".SH SYNOPSIS")
    if leaves:
        lines.append(f"{bold(name)} [\\fIGLOBAL OPTIONS\\fR] \\fICOMMAND\\fR ...")
        for c in leaves:
            lines += [".br", roff(usage(c.parser, globals_))]
    else:
        lines.append(roff(usage(parser, set())))
    lines += [".SH DESCRIPTION", roff(parser.description or "")]
    if body:
        lines += [".PP", body.strip()]
    if parser.epilog:
        lines += [".PP", roff(parser.epilog)]
    top = _own_actions(parser, set())
    if globals_:
        lines += [".SH GLOBAL OPTIONS", "Accepted before and after the command.", ".PP"]
        lines += options([a for a in top if a.dest in globals_])
        others = [a for a in top if a.dest not in globals_]
        if others:
            lines += [".SH OPTIONS", *options(others)]
    else:
        lines += [".SH OPTIONS", *options(top)]
    if leaves:
        lines.append(".SH COMMANDS")
        for c in leaves:
            lines += [f'.SS "{roff(c.name)}"', roff(c.help or c.parser.description or "")]
            lines += [".PP", "Usage: " + roff(usage(c.parser, globals_))]
            own = _own_actions(c.parser, globals_)
            if own:
                lines += [".RS", *options(own), ".RE"]
            if c.parser.epilog:
                lines += [".PP", roff(c.parser.epilog)]
    return "\n".join(lines) + "\n" + tail.lstrip("\n")


_MCRELAY_BODY = r"""
Two engines: \fBroute\fR commands program static (S,G) and (*,G) routes into
the kernel's multicast forwarding cache, which forwards at line rate;
\fBrelay\fR commands configure the daemon's userspace data plane, which can
change group and port, send to unicast receivers, receive from sources that
reverse\-path filtering would drop, and mark DSCP. Every mutating command takes
\fB\-\-dry\-run\fR; \fB\-o json\fR gives stable JSON for scripts.
"""

_MCRELAYD_BODY = r"""
Runs in the foreground and logs to stderr, as systemd expects. Privileged
work (mroute sockets, AF_PACKET, memberships) stays in the supervisor; the
control process and the relay workers drop to the configured \fBuser\fR.
Command\-line options override the settings file, see \fBmcrelay.toml\fR(5).
"""


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class Setting:
    key: str
    default: str  # as written in TOML
    reloadable: bool
    text: str  # prose from the example file


def settings() -> list[Setting]:
    """Every setting in config.py order, with its prose from the example file."""
    from mcrelay import config

    prose: dict[str, tuple[str, str]] = {}
    block: list[str] = []
    for line in EXAMPLE.read_text().splitlines():
        m = re.match(r"^# (\w+) = (.*)$", line)
        if m and m.group(1) in config.SETTING_KEYS:
            prose[m.group(1)] = (m.group(2), " ".join(block))
            block = []
        elif line.startswith("#"):
            block.append(line[1:].strip())
        else:
            block = []
    keys = list(config.SETTING_KEYS)
    missing = [k for k in keys if k not in prose or not prose[k][1]]
    if missing:
        raise SystemExit(f"docgen: {EXAMPLE}: no commented default with prose for {missing}")
    return [Setting(k, prose[k][0], k in config.RELOADABLE, prose[k][1]) for k in keys]


_TOML_PREAMBLE = r"""
.SH SYNOPSIS
.I /etc/mcrelay/mcrelay.toml
.SH DESCRIPTION
Settings of \fBmcrelayd\fR(8): flat top\-level TOML keys, no tables. Every key
is optional and the defaults below work without a file. An unknown key or a bad
value stops the daemon with a message naming the file, the key and what is
allowed. Rules (routes, relays, group joins) are not settings: they live in the
state file and are changed with \fBmcrelay\fR(8).
.PP
\fB\-\-config\fR \fIFILE\fR names another file (then a missing file is an
error); \fB\-\-socket\fR, \fB\-\-state\fR, \fB\-\-workers\fR, \fB\-\-user\fR and
\fB\-\-log\-level\fR override the file.
.PP
\fBsystemctl reload mcrelay\fR (which runs \fBmcrelay reload\fR; SIGHUP does
the same) re\-reads the file. Settings marked
\(lqapplied on reload\(rq take effect at once; the others need
\fBsystemctl restart mcrelay\fR, and the daemon logs which changed.
.SH SETTINGS
"""

_TOML_TAIL = r"""
.SH FILES
.TP
.I /etc/mcrelay/mcrelay.toml
the Debian package ships this file (a conffile) with every key commented out
except \fBuser = "mcrelay"\fR, the system user the package creates
.SH SEE ALSO
.BR mcrelayd (8),
.BR mcrelay (8)
"""


def toml_page(version: str) -> str:
    lines = _header("mcrelay.toml", 5, version, "settings of the mcrelay daemon")
    lines.append(_TOML_PREAMBLE.strip())
    for s in settings():
        when = "applied on reload" if s.reloadable else "needs a restart"
        lines += [".TP", f"{bold(s.key)} = {roff(s.default)}", f"{prose(s.text)} ({when})"]
    return "\n".join(lines) + "\n" + _TOML_TAIL.lstrip("\n")


def settings_markdown() -> str:
    """docs/settings.md: the same facts as mcrelay.toml(5), for the docs site."""
    out = [
        "# Settings",
        "",
        "<!-- Generated by packaging/docgen.py settings-md from src/mcrelay/config.py",
        "     and packaging/mcrelay.toml; edit those, then regenerate. -->",
        "",
        "`mcrelayd` reads `/etc/mcrelay/mcrelay.toml` (`--config FILE` names another):",
        "flat top-level TOML keys, no tables. Every key is optional; an unknown key or",
        "a bad value stops the daemon with a message naming the key. `--socket`,",
        "`--state`, `--workers`, `--user` and `--log-level` override the file.",
        "",
        "`systemctl reload mcrelay` (which runs `mcrelay reload`; SIGHUP does the same)",
        "re-reads the file: keys marked *reload* apply at once, the others need",
        "`systemctl restart mcrelay`; `mcrelay reload` answers with what changed.",
        "",
        "The Debian package ships the file with every key commented out except",
        '`user = "mcrelay"`, the system user it creates.',
        "",
        "| Key | Default | Applies | Meaning |",
        "|---|---|---|---|",
    ]
    for s in settings():
        text = s.text.replace("|", "\\|")
        out.append(
            f"| `{s.key}` | `{s.default}` | {'reload' if s.reloadable else 'restart'} | {text} |"
        )
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- completion

# shtab 1.5 (bookworm) reads a positional's choices with ${!name}, which gives
# only an array's first element: `mcrelay route <TAB>` offered "add" but not
# "del". Later shtab reads name[@]; do the same, one choice a line, because the
# script splits the list on newlines.
_SHTAB_CHOICES_BUG = (
    'local current_action_choices_var="${current_action}_choices"\n'
    '  current_action_choices="${!current_action_choices_var}"'
)
_SHTAB_CHOICES_FIX = (
    'local current_action_choices_var="${current_action}_choices[@]"\n'
    "  printf -v current_action_choices '%s\\n' \"${!current_action_choices_var}\""
)


def completion(shell: str) -> str:
    """The shell completion script for ``mcrelay``, from its parser (shtab)."""
    import shtab

    from mcrelay import cli

    text: str = shtab.complete(cli.build_parser(), shell=shell)
    if shell == "bash" and _SHTAB_CHOICES_BUG in text:
        text = text.replace(_SHTAB_CHOICES_BUG, _SHTAB_CHOICES_FIX)
    return text


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="docgen", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    man = sub.add_parser("man", help="a man page on stdout")
    man.add_argument("page", choices=("mcrelay", "mcrelayd", "mcrelay.toml"))
    sub.add_parser("settings-md", help="docs/settings.md on stdout")
    comp = sub.add_parser("completion", help="shell completion for mcrelay on stdout")
    comp.add_argument("shell", choices=("bash", "zsh"))
    args = ap.parse_args(argv)

    from mcrelay import __version__, cli, daemon

    if args.what == "settings-md":
        sys.stdout.write(settings_markdown())
    elif args.what == "completion":
        sys.stdout.write(completion(args.shell))
    elif args.page == "mcrelay":
        text = command_page(
            cli.build_parser(),
            "control the mcrelay multicast router and relay",
            __version__,
            _MCRELAY_BODY,
            _MCRELAY_TAIL,
        )
        sys.stdout.write(text)
    elif args.page == "mcrelayd":
        text = command_page(
            daemon.build_parser(),
            "multicast router and relay daemon",
            __version__,
            _MCRELAYD_BODY,
            _MCRELAYD_TAIL,
        )
        sys.stdout.write(text)
    else:
        sys.stdout.write(toml_page(__version__))
    return 0


if __name__ == "__main__":
    sys.exit(main())
