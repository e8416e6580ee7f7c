"""The state file: every rule the user configured, re-applied at start.

Format (also what ``mcrelay export`` prints and ``mcrelay apply`` reads)::

    {"version": 1, "routes": [...], "relays": [...], "groups": [...]}

pretty-printed with sorted keys, each list sorted by rule identity, so the
same rule set always gives the same bytes and a diff of two exports shows
only real changes.

Two promises matter to an operator:

* A state file that cannot be trusted (unreadable, not JSON, unknown format
  version, a rule that no longer validates) stops the daemon with
  :class:`StateFileError` naming the file and the problem. It is never
  modified, renamed or replaced: those rules are someone's network, and
  starting empty then saving over them would lose it.
* :meth:`StateStore.save` is atomic: a temporary file in the same directory is
  written, fsynced and renamed over the old one, then the directory is fsynced.
  A crash leaves the old file or the new one, never a mix. If anything up to
  the rename fails (disk full, read-only file system, permissions), the old
  file is untouched, the temporary file is removed and
  :class:`StateWriteFailed` is raised so the daemon can refuse the change.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import functools
import json
import logging
import os
import stat
from collections.abc import Callable
from typing import Any

from .errors import InvalidParams, StateFileError, StateWriteFailed
from .model import RuleSet, parse_ruleset

log = logging.getLogger(__name__)

STATE_VERSION = 1
SUPPORTED_VERSIONS = (1,)
DIR_MODE = 0o750
FILE_MODE = 0o640
# A state file of MAX_RELAYS relays with 32 outputs each is ~60 MiB; refuse
# anything absurdly larger rather than reading it into memory.
MAX_STATE_BYTES = 256 * 1024 * 1024


# ---------------------------------------------------------------- format


def export_dict(rules: RuleSet) -> dict[str, Any]:
    """The state/export form of a rule set, lists sorted by rule identity."""
    body = rules.to_dict()
    return {
        "version": STATE_VERSION,
        "routes": sorted(body["routes"], key=lambda r: (r["iif"], r["group"], r["source"])),
        "relays": sorted(body["relays"], key=lambda r: r["name"]),
        "groups": sorted(body["groups"], key=lambda g: (g["iface"], g["group"], g["source"])),
    }


def dumps(rules: RuleSet) -> str:
    """The exact text written to the state file and printed by ``mcrelay export``.

    The same text as ``json.dumps(export_dict(rules), indent=2, sort_keys=True,
    ensure_ascii=False)`` plus a newline, built from one cached fragment per
    rule: Python's indenting encoder is pure Python, and every accepted change
    writes the whole file, so at 10,000 rules re-encoding them all was most
    of the cost of one ``relay add`` (issue 12).
    """
    parts = []
    for name, items, key in (
        ("groups", rules.groups, _group_key),
        ("relays", rules.relays, _relay_key),
        ("routes", rules.routes, _route_key),
    ):
        elems = sorted((_fragment(x, key) for x in items), key=lambda e: e[0])
        body = "[\n" + ",\n".join(t for _, t in elems) + "\n  ]" if elems else "[]"
        parts.append(f'  "{name}": {body}')
    parts.append(f'  "version": {json.dumps(STATE_VERSION)}')
    return "{\n" + ",\n".join(parts) + "\n}\n"


def _route_key(d: dict[str, Any]) -> Any:
    return (d["iif"], d["group"], d["source"])


def _relay_key(d: dict[str, Any]) -> Any:
    return d["name"]


def _group_key(d: dict[str, Any]) -> Any:
    return (d["iface"], d["group"], d["source"])


@functools.lru_cache(maxsize=65536)
def _fragment(rule: Any, key: Callable[[dict[str, Any]], Any]) -> tuple[Any, str]:
    """(sort key, text at the depth of a list element) of one rule, which is immutable."""
    d = rule.to_dict()
    text = json.dumps(d, indent=2, sort_keys=True, ensure_ascii=False)
    return key(d), "    " + text.replace("\n", "\n    ")


def rules_from_export(obj: Any, *, require_version: bool = False) -> RuleSet:
    """Validate an exported rule set (``mcrelay apply FILE``, the state file).

    ``version`` may be omitted in a hand-written apply file (it means the
    current version) unless ``require_version``; any other version is refused.
    Raises :class:`InvalidParams` naming the field, like every rule check.
    """
    if not isinstance(obj, dict):
        raise InvalidParams("rules", f"must be a JSON object, got {type(obj).__name__}")
    body = dict(obj)
    if "version" not in body:
        if require_version:
            raise InvalidParams("version", "missing; expected 1")
    else:
        version = body.pop("version")
        if isinstance(version, bool) or version not in SUPPORTED_VERSIONS:
            raise InvalidParams(
                "version",
                f"format version {json.dumps(version)} is not supported "
                f"(this mcrelay reads version {', '.join(map(str, SUPPORTED_VERSIONS))}); "
                "was it written by a newer mcrelay?",
            )
    return parse_ruleset(body)


# ---------------------------------------------------------------- the store


def _errno_text(e: OSError) -> str:
    name = errno_mod.errorcode.get(e.errno or 0, str(e.errno))
    return f"{name} ({e.strerror or os.strerror(e.errno or 0)})"


class StateStore:
    """Loads and atomically saves the rule set at ``path``.

    Used by the supervisor alone (one writer); not thread-safe by design.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.directory = os.path.dirname(os.path.abspath(path))

    def __repr__(self) -> str:
        return f"StateStore({self.path!r})"

    def _refuse(self, problem: str) -> StateFileError:
        return StateFileError(
            f"state file {self.path}: {problem}. mcrelayd will not start with it and has "
            "not modified it; fix it, or move it away to start with no rules"
        )

    def load(self) -> RuleSet:
        """The saved rule set; an empty one if the file does not exist.

        Raises :class:`StateFileError` if the file exists but cannot be trusted.
        The file is only ever opened read-only here.
        """
        try:
            st = os.stat(self.path)
            if stat.S_ISDIR(st.st_mode):
                raise self._refuse("is a directory, expected a JSON file")
            if not stat.S_ISREG(st.st_mode):
                # A FIFO or device would block or never end; refuse before opening.
                raise self._refuse("not a regular file")
            with open(self.path, "rb") as f:
                raw = f.read(MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            return RuleSet()
        except OSError as e:
            raise self._refuse(f"cannot read it: {_errno_text(e)}") from None
        if len(raw) > MAX_STATE_BYTES:
            raise self._refuse(f"larger than {MAX_STATE_BYTES} bytes")
        if not raw.strip():
            raise self._refuse("the file is empty (expected a JSON object with a version)")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self._refuse(f"not UTF-8 text (bad byte at offset {e.start})") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise self._refuse(
                f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
            ) from None
        except RecursionError:
            raise self._refuse("not valid JSON: nested too deeply") from None
        try:
            return rules_from_export(obj, require_version=True)
        except InvalidParams as e:
            what = "unsupported format" if e.field == "version" else "invalid rule"
            raise self._refuse(f"{what}: {e.message}") from None

    def save(self, rules: RuleSet) -> None:
        """Write ``rules`` atomically (temp file, fsync, rename, fsync directory).

        Raises :class:`StateWriteFailed` (old file intact, no temp file left)
        if the new content could not be put in place.
        """
        data = dumps(rules).encode("utf-8")
        self._ensure_directory()
        base = os.path.basename(self.path)
        tmp = os.path.join(self.directory, f".{base}.{os.getpid()}.tmp")
        fd = -1
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, self.path)
        except OSError as e:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise self._write_failed(e) from None
        self._sync_directory()
        self._remove_stale_temp_files(base)

    def _remove_stale_temp_files(self, base: str) -> None:
        """Temp files of a save that crashed before its rename (our own names only)."""
        prefix, suffix = f".{base}.", ".tmp"
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        for name in names:
            if (
                name.startswith(prefix)
                and name.endswith(suffix)
                and name[len(prefix) : -4].isdigit()
            ):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.directory, name))
                    log.info("removed %s left by an interrupted save", name)

    def _write_failed(self, e: OSError) -> StateWriteFailed:
        name = errno_mod.errorcode.get(e.errno or 0, str(e.errno))
        return StateWriteFailed(
            f"cannot save rules to {self.path}: {_errno_text(e)}; "
            "the change was not applied and the previous state file is unchanged",
            {"path": self.path, "errno": e.errno, "errno_name": name},
        )

    def _ensure_directory(self) -> None:
        if os.path.isdir(self.directory):
            return
        try:
            os.makedirs(self.directory, mode=DIR_MODE, exist_ok=True)
            # makedirs is subject to the umask; state may be sensitive, say 0750.
            os.chmod(self.directory, DIR_MODE)
        except OSError as e:
            raise self._write_failed(e) from None

    def _sync_directory(self) -> None:
        """Make the rename durable. After the rename the new file is in place,
        so a failure here is logged, not raised: raising would make the daemon
        refuse a change that is already on disk."""
        try:
            dfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            log.warning("cannot open %s to fsync it: %s", self.directory, _errno_text(e))
            return
        try:
            os.fsync(dfd)
        except OSError as e:
            if e.errno not in (errno_mod.EINVAL, errno_mod.EROFS):
                log.warning(
                    "fsync of directory %s failed: %s; %s is written but may not survive "
                    "a power loss",
                    self.directory,
                    _errno_text(e),
                    self.path,
                )
        finally:
            os.close(dfd)
