"""Declarative rules on a real daemon: `mcrelay apply FILE` and `mcrelay export`."""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path
from typing import Any

from mcrelay.lab import Lab, LinkSpec, StandardLab
from mcrelay.lab.daemon import DaemonProcess

SRC4 = "192.0.2.2"
PORT = 5000

RULES: dict[str, Any] = {
    "version": 1,
    "routes": [
        {"iif": "up0", "source": SRC4, "group": "239.1.1.1", "oifs": ["dn1"]},
        {"iif": "up0", "group": "239.1.1.2", "oifs": ["dn1", "dn2"]},
        {"iif": "up0", "source": "2001:db8:1::2", "group": "ff3e::1", "oifs": ["dn2"]},
    ],
    "groups": [
        {"iface": "dn1", "group": "239.5.5.5"},
        {"iface": "dn2", "group": "232.5.5.5", "source": "203.0.113.9"},
    ],
}


def mfc_v4(lab: Lab) -> set[tuple[str, str]]:
    out = set()
    for line in lab.run("router", "cat", "/proc/net/ip_mr_cache").stdout.splitlines()[1:]:
        g, o = line.split()[:2]
        out.add(tuple(socket.inet_ntoa(struct.pack("<I", int(x, 16))) for x in (g, o)))
    return out  # type: ignore[return-value]


def write(tmp_path: Path, name: str, rules: dict[str, Any]) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(rules, indent=2))
    return str(path)


def test_apply_installs_a_whole_rule_set_and_prints_the_diff(
    lab: StandardLab, daemon: DaemonProcess, tmp_path: Path
) -> None:
    res = daemon.cli("apply", write(tmp_path, "rules.json", RULES))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert sum(line.startswith("+ route") for line in lines) == 3, res.stdout
    assert sum(line.startswith("+ group") for line in lines) == 2, res.stdout
    assert "5 added" in res.stdout
    assert ("239.1.1.1", SRC4) in mfc_v4(lab)
    lab.probe_until_forwarded("src", "239.1.1.2", PORT, "veth0", "rcv2", "veth0", timeout=10)

    # A second file: one route changed, one removed, one group removed.
    new = json.loads(json.dumps(RULES))
    new["routes"][0]["oifs"] = ["dn2"]
    del new["routes"][1]
    del new["groups"][1]
    res = daemon.cli("apply", write(tmp_path, "new.json", new))
    assert res.returncode == 0, res.stderr
    assert "- route" in res.stdout and "~ route" in res.stdout and "- group" in res.stdout
    assert [
        r["oifs"] for r in daemon.cli_json("export")["routes"] if r["group"] == "239.1.1.1"
    ] == [[{"name": "dn2", "ttl": 1}]]
    assert not any(g == "239.1.1.2" for g, _ in mfc_v4(lab))


def test_export_prints_the_apply_format_and_applying_an_export_changes_nothing(
    lab: StandardLab, daemon: DaemonProcess, tmp_path: Path
) -> None:
    daemon.cli("apply", write(tmp_path, "rules.json", RULES), check=True)
    daemon.cli("route", "add", "up0", SRC4, "239.1.1.9", "dn2", check=True)
    exported = daemon.cli("export", check=True).stdout
    assert json.loads(exported)["version"] == 1
    assert exported == Path(daemon.state).read_text(), "export is the state file's format"
    mfc_before = mfc_v4(lab)

    path = tmp_path / "export.json"
    path.write_text(exported)
    res = daemon.cli("apply", str(path), check=True)

    assert "no changes" in res.stdout
    assert not any(line[:2] in ("+ ", "- ", "~ ") for line in res.stdout.splitlines())
    assert daemon.cli("export", check=True).stdout == exported
    assert mfc_v4(lab) == mfc_before
    # From stdin too.
    res = daemon.cli("apply", "-", input=exported, check=True)
    assert "no changes" in res.stdout


def test_dry_run_prints_only_the_diff(
    lab: StandardLab, daemon: DaemonProcess, tmp_path: Path
) -> None:
    daemon.cli("route", "add", "up0", SRC4, "239.1.1.7", "dn1", check=True)
    state_before = Path(daemon.state).read_bytes()
    mfc_before = mfc_v4(lab)

    res = daemon.cli("--dry-run", "apply", write(tmp_path, "rules.json", RULES))

    assert res.returncode == 0, res.stderr
    assert res.stdout.count("+ route") == 3 and res.stdout.count("- route") == 1
    assert "dry run: nothing was changed" in res.stdout
    assert mfc_v4(lab) == mfc_before
    assert Path(daemon.state).read_bytes() == state_before
    assert [r["group"] for r in daemon.cli_json("export")["routes"]] == ["239.1.1.7"]


def test_a_failure_half_way_leaves_the_previous_rule_set_in_place(
    lab: StandardLab, tmp_path: Path
) -> None:
    """The kernel routes are replaced first; then a new membership is refused by
    the kernel (the router namespace allows no more IGMP memberships), so the
    whole apply rolls back: routes, VIFs, memberships and the state file."""
    lab.add_ns("sink")
    lab.add_links([LinkSpec("router", f"x{i}", "sink", f"s{i}") for i in range(2)])
    with DaemonProcess(lab, "router") as d:
        d.start()
        d.cli("apply", write(tmp_path, "rules.json", RULES), check=True)
        export_before = d.cli("export", check=True).stdout
        state_before = Path(d.state).read_bytes()
        mfc_before = mfc_v4(lab)
        igmp_before = lab.run("router", "cat", "/proc/net/igmp").stdout
        lab.run("router", "sysctl", "-qw", "net.ipv4.igmp_max_memberships=0")

        bad = {
            "routes": [
                {"iif": "up0", "source": SRC4, "group": "239.9.9.1", "oifs": ["x0", "x1"]},
                {"iif": "up0", "group": "239.1.1.2", "oifs": ["dn1"]},
            ],
            "groups": [*RULES["groups"], {"iface": "x0", "group": "239.9.9.9"}],
        }
        res = d.cli("apply", write(tmp_path, "bad.json", bad))

        assert res.returncode == 1, res.stdout
        assert "239.9.9.9" in res.stderr and "x0" in res.stderr, res.stderr
        assert d.cli("export", check=True).stdout == export_before
        assert Path(d.state).read_bytes() == state_before
        assert mfc_v4(lab) == mfc_before
        vifs = lab.run("router", "cat", "/proc/net/ip_mr_vif").stdout
        assert "x0" not in vifs and "x1" not in vifs
        assert lab.run("router", "cat", "/proc/net/igmp").stdout == igmp_before
        assert len(d.cli_json("show", "routes")["routes"]) == 3
        # The old (*,G) route still forwards to dn2, which the refused set dropped.
        lab.probe_until_forwarded("src", "239.1.1.2", PORT, "veth0", "rcv2", "veth0", timeout=10)


def test_a_rule_file_with_errors_is_refused_naming_the_field(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    daemon.cli("apply", write(tmp_path, "rules.json", RULES), check=True)
    before = daemon.cli("export", check=True).stdout
    cases = {
        "bad-group.json": {"routes": [{"iif": "up0", "group": "10.1.1.1", "oifs": ["dn1"]}]},
        "version.json": {"version": 7, "routes": []},
        "unknown.json": {"routes": [], "rellays": []},
    }
    for name, rules in cases.items():
        res = daemon.cli("apply", write(tmp_path, name, rules))
        assert res.returncode == 1, (name, res.stdout)
        assert res.stderr.strip(), name
    (tmp_path / "broken.json").write_text('{"routes": [')
    res = daemon.cli("apply", str(tmp_path / "broken.json"))
    assert res.returncode == 1 and "not valid JSON" in res.stderr
    assert daemon.cli("export", check=True).stdout == before
