"""State file: round trip, atomic replacement, refusal to touch a bad file."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from mcrelay.errors import InvalidParams, StateFileError, StateWriteFailed
from mcrelay.model import RuleSet, parse_ruleset
from mcrelay.state import StateStore, dumps, export_dict, rules_from_export

RULES_JSON: dict[str, Any] = {
    "routes": [
        {"iif": "eth1", "source": "*", "group": "239.1.1.1", "oifs": ["eth2", "eth3"]},
        {"iif": "eth0", "source": "192.0.2.1", "group": "232.1.1.1", "oifs": ["eth2"]},
        {"iif": "eth0", "group": "ff3e::1", "source": "2001:db8::1", "oifs": ["eth4"]},
    ],
    "relays": [
        {
            "name": "zeta",
            "input": {"iif": "eth0", "group": "239.9.9.9", "port": 5000},
            "outputs": [{"address": "192.0.2.10", "port": 7000}],
        },
        {
            "name": "alpha",
            "input": {"iif": "eth0", "group": "239.1.2.3", "port": 5000, "sources": ["10.0.0.1"]},
            "outputs": [
                {"address": "239.2.2.2", "port": 6000, "oif": "eth1", "ttl": 4, "dscp": "EF"}
            ],
            "mode": "socket",
        },
    ],
    "groups": [
        {"iface": "eth1", "group": "239.5.5.5"},
        {"iface": "eth0", "group": "232.5.5.5", "source": "192.0.2.7"},
    ],
}


@pytest.fixture
def rules() -> RuleSet:
    return parse_ruleset(RULES_JSON)


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    return StateStore(str(tmp_path / "lib" / "state.json"))


def same_rules(a: RuleSet, b: RuleSet) -> bool:
    return (set(a.routes), set(a.relays), set(a.groups)) == (
        set(b.routes),
        set(b.relays),
        set(b.groups),
    )


def leftovers(directory: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n != "state.json")


# ---------------------------------------------------------------- round trip and format


def test_missing_file_is_an_empty_rule_set(store: StateStore) -> None:
    assert store.load() == RuleSet()
    assert not os.path.exists(store.directory)  # load never creates anything


def test_round_trip(store: StateStore, rules: RuleSet) -> None:
    store.save(rules)
    loaded = store.load()
    assert same_rules(loaded, rules)
    assert len(loaded.routes) == 3 and len(loaded.relays) == 2 and len(loaded.groups) == 2


def test_format_is_versioned_pretty_sorted_and_stable(store: StateStore, rules: RuleSet) -> None:
    store.save(rules)
    text = Path(store.path).read_text()
    obj = json.loads(text)
    assert obj["version"] == 1
    assert list(obj) == ["groups", "relays", "routes", "version"]  # sorted keys
    assert [r["name"] for r in obj["relays"]] == ["alpha", "zeta"]
    assert [r["iif"] for r in obj["routes"]] == ["eth0", "eth0", "eth1"]
    assert text.endswith("\n") and "\n  " in text  # indented, one value per line
    # Same rules in another order: same bytes.
    shuffled = RuleSet(rules.routes[::-1], rules.relays[::-1], rules.groups[::-1])
    assert dumps(shuffled) == text
    assert export_dict(shuffled) == obj


def test_empty_rule_set_saves_as_empty_lists(store: StateStore) -> None:
    store.save(RuleSet())
    assert json.loads(Path(store.path).read_text()) == {
        "version": 1,
        "routes": [],
        "relays": [],
        "groups": [],
    }
    assert store.load() == RuleSet()


def test_creates_directory_0750_and_file_not_world_readable(store: StateStore) -> None:
    store.save(RuleSet())
    assert stat.S_IMODE(os.stat(store.directory).st_mode) == 0o750
    assert stat.S_IMODE(os.stat(store.path).st_mode) & 0o007 == 0
    assert leftovers(store.directory) == []


def test_save_replaces_previous_content(store: StateStore, rules: RuleSet) -> None:
    store.save(rules)
    store.save(RuleSet())
    assert store.load() == RuleSet()
    assert leftovers(store.directory) == []


def test_rules_from_export_version_handling(rules: RuleSet) -> None:
    obj = export_dict(rules)
    assert same_rules(rules_from_export(obj), rules)
    no_version = {k: v for k, v in obj.items() if k != "version"}
    assert same_rules(rules_from_export(no_version), rules)  # hand-written apply file
    with pytest.raises(InvalidParams, match="version: missing"):
        rules_from_export(no_version, require_version=True)
    with pytest.raises(InvalidParams, match="format version 2 is not supported"):
        rules_from_export({**obj, "version": 2})
    with pytest.raises(InvalidParams, match="format version true"):
        rules_from_export({**obj, "version": True})
    with pytest.raises(InvalidParams, match="rules: must be a JSON object"):
        rules_from_export([])


# ---------------------------------------------------------------- bad files are refused, untouched


BAD_FILES: list[tuple[bytes, str]] = [
    (b"", "the file is empty"),
    (b'{"version": 1, "routes": [', "not valid JSON: Expecting value at line 1"),
    (b"\xff\xfe garbage", "not UTF-8 text"),
    (b"[]", "rules: must be a JSON object"),
    (b'{"routes": []}', "version: missing"),
    (b'{"version": 7, "routes": []}', "unsupported format: version: format version 7"),
    (
        b'{"version": 1, "routes": [{"iif": "eth0", "group": "10.0.0.1", "oifs": ["eth1"]}]}',
        "invalid rule: routes[0].group: 10.0.0.1 is not multicast",
    ),
    (b'{"version": 1, "bogus": []}', "invalid rule: bogus: unknown field"),
]


@pytest.mark.parametrize(("content", "problem"), BAD_FILES)
def test_bad_file_raises_and_is_left_byte_for_byte(
    store: StateStore, content: bytes, problem: str
) -> None:
    os.makedirs(store.directory)
    Path(store.path).write_bytes(content)
    before = os.stat(store.path)
    with pytest.raises(StateFileError) as info:
        store.load()
    message = str(info.value)
    assert store.path in message
    assert problem in message
    assert "not modified it" in message
    assert Path(store.path).read_bytes() == content
    after = os.stat(store.path)
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_size,
    )
    assert os.listdir(store.directory) == ["state.json"]


def test_directory_instead_of_file(store: StateStore) -> None:
    os.makedirs(store.path)
    with pytest.raises(StateFileError, match="is a directory"):
        store.load()


def test_fifo_is_refused_without_blocking(store: StateStore) -> None:
    os.makedirs(store.directory)
    os.mkfifo(store.path)
    with pytest.raises(StateFileError, match="not a regular file"):
        store.load()


def test_unreadable_file(store: StateStore, monkeypatch: pytest.MonkeyPatch) -> None:
    os.makedirs(store.directory)
    Path(store.path).write_text("{}")

    def deny(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("builtins.open", deny)
    with pytest.raises(StateFileError, match="cannot read it: EACCES"):
        store.load()


# ---------------------------------------------------------------- write failures keep the old file


@pytest.mark.parametrize(
    ("func", "err"),
    [
        ("write", errno.ENOSPC),
        ("fsync", errno.EIO),
        ("replace", errno.EROFS),
        ("open", errno.EACCES),
    ],
)
def test_write_failure_keeps_old_file_and_no_temp(
    store: StateStore, rules: RuleSet, monkeypatch: pytest.MonkeyPatch, func: str, err: int
) -> None:
    store.save(rules)
    old = Path(store.path).read_bytes()
    real = getattr(os, func)

    def fail(*args: Any, **kwargs: Any) -> Any:
        # Let os.open on the directory (fsync of dir) through; only fail the file steps.
        if func == "open" and os.path.isdir(args[0]):
            return real(*args, **kwargs)
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, func, fail)
    with pytest.raises(StateWriteFailed) as info:
        store.save(RuleSet())
    monkeypatch.undo()
    message = str(info.value)
    assert store.path in message
    assert errno.errorcode[err] in message
    assert "previous state file is unchanged" in message
    assert info.value.data["errno"] == err
    assert Path(store.path).read_bytes() == old
    assert leftovers(store.directory) == []
    assert same_rules(store.load(), rules)


def test_short_writes_are_completed(
    store: StateStore, rules: RuleSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write

    def dribble(fd: int, data: Any) -> int:
        return real_write(fd, bytes(data[:7]))

    monkeypatch.setattr(os, "write", dribble)
    store.save(rules)
    monkeypatch.undo()
    assert Path(store.path).read_text() == dumps(rules)


def test_directory_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    store = StateStore(str(blocker / "sub" / "state.json"))
    with pytest.raises(StateWriteFailed, match="ENOTDIR"):
        store.save(RuleSet())


def test_crash_between_temp_write_and_rename_leaves_old_file(
    store: StateStore, rules: RuleSet, tmp_path: Path
) -> None:
    """A child process is killed after fsync of the temp file, before rename."""
    store.save(rules)
    old = Path(store.path).read_bytes()
    pid = os.fork()
    if pid == 0:  # child: stop dead at the rename, as a power cut or SIGKILL would
        try:

            def die(*args: Any) -> None:
                os._exit(17)

            os.replace = die  # type: ignore[assignment]
            store.save(RuleSet())
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 17
    # The old file is intact and still loads; the temp file is the crash residue
    # and is complete (it was fsynced) but never became the state file.
    assert Path(store.path).read_bytes() == old
    assert same_rules(store.load(), rules)
    residue = leftovers(store.directory)
    assert len(residue) == 1 and residue[0].endswith(".tmp")
    # The next save succeeds and cleans the residue up.
    store.save(RuleSet())
    assert store.load() == RuleSet()
    assert leftovers(store.directory) == []


def test_rename_is_what_makes_the_change_visible(
    store: StateStore, rules: RuleSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Up to the rename the state file holds the old bytes; after it the new."""
    store.save(rules)
    old = Path(store.path).read_bytes()
    seen: list[bytes] = []
    real_replace = os.replace

    def spy(src: str, dst: str) -> None:
        seen.append(Path(dst).read_bytes())
        assert Path(src).read_text() == dumps(RuleSet())
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    store.save(RuleSet())
    assert seen == [old]
    assert Path(store.path).read_text() == dumps(RuleSet())


def test_directory_fsync_failure_is_not_a_write_failure(
    store: StateStore, rules: RuleSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.save(RuleSet())
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    store.save(rules)  # the new file is in place: reporting failure would be a lie
    monkeypatch.undo()
    assert same_rules(store.load(), rules)
