"""`mcrelayd`: the daemon's command line. Foreground, logs to stderr, systemd style."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from . import __version__
from .errors import ConfigError
from .logsetup import configure as configure_logging
from .logsetup import prefix as journal_prefix


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mcrelayd",
        description="mcrelay daemon: kernel multicast routes and userspace relays.",
    )
    p.add_argument(
        "--config", metavar="FILE", help="settings file (default /etc/mcrelay/mcrelay.toml)"
    )
    p.add_argument("--socket", metavar="PATH", help="control socket path")
    p.add_argument("--state", metavar="FILE", help="state file holding the rules")
    p.add_argument("--workers", metavar="N", type=int, help="relay worker processes")
    p.add_argument("--user", metavar="USER", help="user the children run as")
    p.add_argument(
        "--log-level",
        metavar="LEVEL",
        choices=["debug", "info", "warning", "error"],
        help="debug, info, warning or error (default info)",
    )
    p.add_argument(
        "--table",
        metavar="N",
        type=int,
        help="multicast routing table (MRT_TABLE) of this instance; 0 = the default table",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="validate the settings and the rule files, print what they hold, exit 0 or 1",
    )
    p.add_argument("--version", action="version", version=f"mcrelayd {__version__}")
    return p


def check(settings: Any) -> int:
    """``mcrelayd --check``: the settings already loaded; read the rule files offline."""
    from .rulefiles import load

    try:
        files = load(settings.rules)
    except ConfigError as exc:
        print(f"mcrelayd: {exc}", file=sys.stderr)
        return 1
    where = settings.config_path or "built-in defaults"
    print(f"settings: {where}: ok")
    rules = files.rules
    for path in files.files:
        print(f"rule file {path}: ok")
    print(
        f"{len(rules.routes)} route(s), {len(rules.relays)} relay(s), {len(rules.groups)} "
        f"group join(s) from {len(files.files)} rule file(s)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides: dict[str, Any] = {
        key: value
        for key, value in (
            ("socket", args.socket),
            ("state", args.state),
            ("workers", args.workers),
            ("user", args.user),
            ("log_level", args.log_level),
            ("table", args.table),
        )
        if value is not None
    }
    # Imported late so `mcrelayd --help` works without pyroute2 installed.
    from .config import check_startup, load_settings

    try:
        settings = load_settings(args.config, overrides)
        # Before anything starts: a setting only a child would trip on (the
        # user it drops to) must stop mcrelayd here, not crash-loop the children.
        if args.check:
            return check(settings)
        check_startup(settings, overrides)
    except ConfigError as exc:
        # Fatal, and logging is not set up yet: still stored as an error.
        print(f"{journal_prefix(logging.ERROR)}mcrelayd: {exc}", file=sys.stderr)
        return 1
    # Under systemd each line carries its journald priority (logsetup.py).
    configure_logging("mcrelayd", settings.log_level)
    if os.geteuid() != 0:
        logging.getLogger("mcrelay").warning(
            "not running as root: kernel routes and AF_PACKET need CAP_NET_ADMIN and CAP_NET_RAW"
        )
    from .supervisor import Supervisor

    return Supervisor(settings, args.config, overrides).run()


if __name__ == "__main__":
    sys.exit(main())
