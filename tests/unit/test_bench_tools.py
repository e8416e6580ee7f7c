"""The benchmark's C traffic tools compile and parse their arguments (no timing)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root holds bench/
from bench import tools
from bench.relay_throughput import (
    Result,
    cpu_mask,
    fmt_table,
    mixed_listens,
    mixed_rules,
    relay_rules,
    summarise_profile,
)

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")


@pytest.fixture(scope="module")
def exe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tools.build(tmp_path_factory.mktemp("bench-tools"))


def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=10)


def test_both_tools_build(exe: dict[str, Path]) -> None:
    assert set(exe) == {"mcgen", "mcsink"}
    assert all(p.is_file() for p in exe.values())


GEN_LO = ("--group", "239.1.1.1", "--port", "5000", "--iface", "lo", "--count", "1")


@pytest.mark.parametrize(
    "args",
    [
        (),  # nothing at all
        ("--group", "239.1.1.1", "--port", "5000"),  # no interface
        ("--group", "nonsense", "--port", "5000", "--iface", "lo", "--count", "1"),
        ("--group", "239.1.1.1", "--port", "0", "--iface", "lo", "--count", "1"),
        ("--group", "239.1.1.1", "--port", "5000", "--iface", "lo", "--size", "8", "--count", "1"),
        ("--group", "239.1.1.1", "--port", "5000", "--iface", "lo"),  # neither count nor time
        ("--group", "239.1.1.1", "--port", "5000", "--iface", "no-such-if0", "--count", "1"),
        (*GEN_LO, "--groups", "0"),
        (*GEN_LO, "--groups", "65537"),
        (*GEN_LO, "--burst", "0"),
        (*GEN_LO, "--group", "255.255.255.255", "--groups", "2"),  # runs past the last address
        ("--bogus",),
    ],
)
def test_mcgen_refuses_bad_arguments(exe: dict[str, Path], args: tuple[str, ...]) -> None:
    res = run(exe["mcgen"], *args)
    assert res.returncode == 2
    assert res.stdout == ""


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("--listen", "239.1.1.1:5000"),  # no interface
        ("--listen", "239.1.1.1:0@lo"),
        ("--listen", "239.1.1.1:5000@lo", "--idle", "0"),
        ("--listen", "239.1.1.1:5000@no-such-if0"),
    ],
)
def test_mcsink_refuses_bad_arguments(exe: dict[str, Path], args: tuple[str, ...]) -> None:
    res = run(exe["mcsink"], *args)
    assert res.returncode == 2
    assert res.stdout == ""


def test_help_texts(exe: dict[str, Path]) -> None:
    assert "usage: mcgen" in run(exe["mcgen"], "--help").stderr
    assert "--groups N" in run(exe["mcgen"], "--help").stderr
    assert "usage: mcsink" in run(exe["mcsink"], "--help").stderr


def test_mcsink_reports_json_when_idle(exe: dict[str, Path]) -> None:
    # Joining needs no privilege; a listen on loopback that sees nothing still reports.
    res = run(exe["mcsink"], "--listen", "239.255.77.1:45678@lo", "--duration", "0.2")
    assert res.returncode == 0, res.stderr
    assert res.stderr.startswith("ready")
    doc = json.loads(res.stdout)
    assert doc["packets"] == 0 and doc["latency_us"] is None
    assert doc["listens"][0]["listen"] == "239.255.77.1:45678@lo"


def test_helpers() -> None:
    assert cpu_mask("0") == "1" and cpu_mask("1") == "2" and cpu_mask("0-2,5") == "27"
    rules = relay_rules("socket", 4, 3)["relays"]
    assert len(rules) == 3 and len({r["input"]["group"] for r in rules}) == 3
    assert len(rules[0]["outputs"]) == 4 and all(r["mode"] == "socket" for r in rules)


def test_mixed_helpers() -> None:
    rules = mixed_rules("packet", 8)["relays"]
    assert [r["input"]["group"] for r in rules] == [f"239.1.1.{k}" for k in range(1, 9)]
    assert all(len(r["outputs"]) == 1 and r["outputs"][0]["oif"] == "dn1" for r in rules)
    outs = [r["outputs"][0]["address"] for r in rules]
    assert outs == [f"239.2.2.{k}" for k in range(2, 10)]
    assert mixed_listens(8) == [f"{g}:6000@veth1" for g in outs]
    assert all(r["mode"] == "packet" and r["input"]["port"] == 5000 for r in rules)


def test_table_shows_flows_only_for_mixed_rows() -> None:
    one = Result("packet", 64, 1, 1, 0.0)
    mixed = Result("packet", 64, 1, 8, 1000.0, flows=8, burst=16)
    assert "flows" not in fmt_table([one], "t") and "flows" not in one.label
    table = fmt_table([mixed], "t").splitlines()
    assert "flows" in table[1] and "burst" in table[1]
    assert table[3].split()[4:6] == ["8", "16"]
    assert "8flows burst 16" in mixed.label


def test_profile_summary(tmp_path: Path) -> None:
    raw = tmp_path / "raw.txt"
    raw.write_text("main (a.py:1);f (a.py:2) 3\nmain (a.py:1);f (a.py:9) 1\nmain (a.py:1) 4\n")
    top = summarise_profile(raw)
    assert top[0] == {"function": "f (a.py)", "self_pct": 50.0, "incl_pct": 50.0}
    assert top[1]["function"] == "main (a.py)" and top[1]["incl_pct"] == 100.0
