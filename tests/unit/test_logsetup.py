"""journald priorities on log lines: `<N>` only when stderr is the journal stream."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import TextIO

import pytest

from mcrelay import logsetup


@pytest.fixture
def stream() -> Iterator[TextIO]:
    """A real file, so it has a device and inode JOURNAL_STREAM can name."""
    with tempfile.TemporaryFile("w+") as f:
        yield f


def journal_env(f: TextIO) -> dict[str, str]:
    st = os.fstat(f.fileno())
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def emit(handler: logging.Handler, level: int, msg: str, exc: bool = False) -> None:
    logger = logging.Logger("t")  # not the root logger: tests stay independent
    logger.addHandler(handler)
    if exc:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.log(level, msg, exc_info=True)
    else:
        logger.log(level, msg)


def written(f: TextIO) -> list[str]:
    f.flush()
    f.seek(0)
    return f.read().splitlines()


@pytest.mark.parametrize(
    ("level", "prio"),
    [
        (logging.CRITICAL, 2),
        (logging.ERROR, 3),
        (logging.WARNING, 4),
        (logging.INFO, 6),
        (logging.DEBUG, 7),
        (logging.INFO + 5, 6),  # between two levels: the less severe priority
        (logging.ERROR + 1, 3),
        (1, 7),
        (logging.CRITICAL + 10, 2),
    ],
)
def test_priority_for_each_level(level: int, prio: int) -> None:
    assert logsetup.priority(level) == prio


@pytest.mark.parametrize(
    ("level", "line"),
    [
        (logging.CRITICAL, "<2>mcrelayd: CRITICAL m"),
        (logging.ERROR, "<3>mcrelayd: ERROR m"),
        (logging.WARNING, "<4>mcrelayd: WARNING m"),
        (logging.INFO, "<6>mcrelayd: INFO m"),
        (logging.DEBUG, "<7>mcrelayd: DEBUG m"),
    ],
)
def test_journal_lines_start_with_the_priority_and_have_no_timestamp(
    stream: TextIO, level: int, line: str
) -> None:
    handler = logsetup.make_handler("mcrelayd", stream, journal_env(stream))
    handler.setLevel(logging.DEBUG)
    emit(handler, level, "m")
    assert written(stream) == [line]


def test_every_traceback_line_keeps_the_error_priority(stream: TextIO) -> None:
    emit(logsetup.make_handler("mcrelayd", stream, journal_env(stream)), logging.ERROR, "x", True)
    lines = written(stream)
    assert len(lines) > 3
    assert lines[0] == "<3>mcrelayd: ERROR x"
    assert all(line.startswith("<3>") for line in lines)
    assert lines[-1] == "<3>RuntimeError: boom"


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"JOURNAL_STREAM": ""},
        {"JOURNAL_STREAM": "garbage"},
        {"JOURNAL_STREAM": "1:2"},  # another file: stderr was redirected
    ],
    ids=["unset", "empty", "garbage", "other-inode"],
)
def test_no_prefix_unless_the_stream_is_the_journal(stream: TextIO, env: dict[str, str]) -> None:
    emit(logsetup.make_handler("mcrelay-control", stream, env), logging.ERROR, "m")
    [line] = written(stream)
    assert not line.startswith("<")
    assert line.endswith(" mcrelay-control: ERROR m")
    assert line[:4].isdigit()  # a timestamp first, as on a terminal


def test_a_stream_without_a_file_descriptor_is_not_the_journal() -> None:
    import io

    buf = io.StringIO()
    assert not logsetup.stream_is_journal(buf, {"JOURNAL_STREAM": "1:2"})


def test_prefix_for_direct_writes(stream: TextIO, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert logsetup.prefix(logging.ERROR, stream) == ""
    monkeypatch.setenv("JOURNAL_STREAM", journal_env(stream)["JOURNAL_STREAM"])
    assert logsetup.prefix(logging.ERROR, stream) == "<3>"
    assert logsetup.prefix(logging.WARNING, stream) == "<4>"


def test_daemon_config_error_is_stored_as_an_error() -> None:
    """End to end: mcrelayd with a bad --config, stderr a file named by JOURNAL_STREAM."""
    with tempfile.TemporaryFile("w+") as err, tempfile.NamedTemporaryFile("w") as conf:
        conf.write("workers = 0\n")
        conf.flush()
        env = {**os.environ, **journal_env(err)}
        proc = subprocess.run(
            [sys.executable, "-m", "mcrelay.daemon", "--config", conf.name],
            stderr=err,
            env=env,
            check=False,
        )
        assert proc.returncode == 1
        [line] = written(err)
        assert line.startswith("<3>mcrelayd: ") and "workers" in line


def test_configure_replaces_handlers(stream: TextIO) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        logsetup.configure("a", "warning", stream, journal_env(stream))
        logsetup.configure("b", "info", stream, journal_env(stream))
        logging.getLogger("mcrelay.x").info("once")
        assert written(stream) == ["<6>b: INFO once"]
        assert root.level == logging.INFO
    finally:
        for h in root.handlers[:]:
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)
