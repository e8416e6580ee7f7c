"""Rule files operators edit: named by the ``rules`` setting, applied at start and on reload.

``rules = ["/etc/mcrelay/rules.d/*.conf"]`` lists files or globs, read in
order (each glob sorted). A file ending in ``.json`` or ``.toml`` holds our
own format (what ``mcrelay export`` prints, as JSON or as TOML arrays of
tables); any other file is smcroute.conf syntax (:mod:`mcrelay.smcroute_conf`).

Rules from files are a layer of their own: they are not written to the state
file (the files are their home), and ``mcrelay`` refuses to change or delete
one (edit the file, then ``mcrelay reload``). Runtime rules added with
``mcrelay`` live in the state file as before. On reload the file layer is
re-read and the difference applied in one transaction; the runtime layer is
untouched. A rule defined in both layers is an error at load time.
"""

from __future__ import annotations

import glob
import json
import os
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from . import smcroute_conf
from .errors import ConfigError, InvalidParams
from .model import RuleSet, parse_ruleset


@dataclass(frozen=True)
class RuleFiles:
    """Everything the rule files hold."""

    rules: RuleSet = field(default_factory=RuleSet)
    origins: dict[Any, str] = field(default_factory=dict)  # rule identity -> "file[:line]"
    mrdisc: tuple[str, ...] = ()
    files: tuple[str, ...] = ()


def _identity(rule: Any) -> Any:
    return getattr(rule, "key", None) or getattr(rule, "name", None) or rule


def load(patterns: Sequence[str]) -> RuleFiles:
    """Read every file the patterns name; ConfigError names the file (and line) on error."""
    routes: list[Any] = []
    relays: list[Any] = []
    groups: list[Any] = []
    origins: dict[Any, str] = {}
    mrdisc: list[str] = []
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        for path in matches:
            if not os.path.isfile(path):
                raise ConfigError(f"{path}: rule file does not exist (named by 'rules')")
            files.append(path)
            entries, advertise = _read(path)
            mrdisc.extend(advertise)
            for kind, rule, where in entries:
                ident = _identity(rule)
                if ident in origins:
                    raise ConfigError(f"{where}: {_describe(rule)} is also in {origins[ident]}")
                origins[ident] = where
                {"route": routes, "relay": relays, "group": groups}[kind].append(rule)
    return RuleFiles(
        RuleSet(tuple(routes), tuple(relays), tuple(groups)),
        origins,
        tuple(dict.fromkeys(mrdisc)),
        tuple(files),
    )


def _describe(rule: Any) -> str:
    name = getattr(rule, "name", None)
    return f"relay {name}" if name and not hasattr(rule, "key") else str(_identity(rule))


def _read(path: str) -> tuple[list[tuple[str, Any, str]], list[str]]:
    """(kind, rule, where) of every rule in one file, and its mrdisc interfaces."""
    if path.endswith((".json", ".toml")):
        try:
            with open(path, "rb") as f:
                raw = f.read()
            body = json.loads(raw) if path.endswith(".json") else tomllib.loads(raw.decode())
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read: {exc}") from None
        if isinstance(body, dict):
            body = {k: v for k, v in body.items() if k != "version"}
        try:
            rules = parse_ruleset(body)
        except InvalidParams as exc:
            raise ConfigError(f"{path}: {exc.field}: {exc.problem}") from None
        entries: list[tuple[str, Any, str]] = (
            [("route", r, path) for r in rules.routes]
            + [("relay", r, path) for r in rules.relays]
            + [("group", g, path) for g in rules.groups]
        )
        return entries, []
    parsed = smcroute_conf.parse(path)
    conf: list[tuple[str, Any, str]] = [("route", r, parsed.origins[r.key]) for r in parsed.routes]
    return conf + [("group", g, parsed.origins[g]) for g in parsed.groups], parsed.mrdisc


def merge(runtime: RuleSet, files: RuleSet) -> RuleSet:
    """The rules in force: the runtime layer plus the file layer (they never overlap)."""
    return RuleSet(
        (*files.routes, *runtime.routes),
        (*files.relays, *runtime.relays),
        (*files.groups, *runtime.groups),
    )


def overlap(runtime: RuleSet, files: RuleFiles) -> list[tuple[str, str]]:
    """Rules defined in both layers, as (rule, file it is in): refused."""
    out = []
    for rule in (*runtime.routes, *runtime.relays, *runtime.groups):
        where = files.origins.get(_identity(rule))
        if where is not None:
            out.append((_describe(rule), where))
    return out
