"""The state file on a real daemon: survives kill -9, refuses bad files, refuses unsaved changes.

Topology (tests/netns/conftest.py `lab`):  src --up0 [router] dn1-- rcv1
                                                           dn2-- rcv2
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import socket
import struct
from pathlib import Path

import pytest

from mcrelay.lab import Lab, StandardLab
from mcrelay.lab.daemon import DaemonError, DaemonProcess

SRC4 = "192.0.2.2"
SRC6 = "2001:db8:1::2"
PORT = 5000


def mfc(lab: Lab, family: int = 4) -> set[tuple[str, str]]:
    """(group, origin) pairs of the router's kernel MFC, read from /proc."""
    name = "ip_mr_cache" if family == 4 else "ip6_mr_cache"
    lines = lab.run("router", "cat", f"/proc/net/{name}").stdout.splitlines()[1:]
    out = set()
    for line in lines:
        group, origin = line.split()[:2]
        if family == 4:
            group, origin = (
                socket.inet_ntoa(struct.pack("<I", int(x, 16))) for x in (group, origin)
            )
        else:
            group, origin = (ipaddress.ip_address(x).compressed for x in (group, origin))
        out.add((group, origin))
    return out


def igmp_groups(lab: Lab, iface: str) -> set[str]:
    """IPv4 groups joined on iface in the router (/proc/net/igmp)."""
    groups, current = set(), None
    for line in lab.run("router", "cat", "/proc/net/igmp").stdout.splitlines()[1:]:
        if not line.startswith(("\t", " ")):
            current = line.split()[1].rstrip(":")
        elif current == iface:
            groups.add(socket.inet_ntoa(struct.pack("<I", int(line.split()[0], 16))))
    return groups


def forwarded(lab: StandardLab, group: str, rcv: str = "rcv1", count: int = 30) -> int:
    """Datagrams of `count` sent from src that reached rcv, intact."""
    r = lab.receiver(rcv, group, PORT, "veth0", count=count, duration=4, idle=1.5)
    lab.send("src", group, PORT, iface="veth0", count=count, ttl=8, rate=2000)
    got = r.result()
    assert got.intact == got.count
    return got.count


def digest(path: str) -> tuple[str, float, int]:
    data = Path(path).read_bytes()
    st = os.stat(path)
    return hashlib.sha256(data).hexdigest(), st.st_mtime, st.st_ino


# ---------------------------------------------------------------- kill -9 and restart


def test_after_kill_9_of_everything_a_restart_restores_every_rule_and_traffic_flows(
    lab: StandardLab, daemon: DaemonProcess
) -> None:
    daemon.cli("route", "add", "up0", SRC4, "239.1.1.1", "dn1", check=True)
    daemon.cli("route", "add", "up0", "239.2.2.2", "dn2", check=True)
    daemon.cli("route", "add", "up0", SRC6, "ff3e::10", "dn1", check=True)
    daemon.cli("group", "join", "dn1", "239.5.5.5", check=True)
    before = daemon.cli_json("export")
    lab.probe_until_forwarded("src", "239.1.1.1", PORT, "veth0", "rcv1", "veth0", timeout=10)

    daemon.kill_all()  # SIGKILL the supervisor, the control process and the workers

    # Closing the mroute socket made the kernel drop every entry and VIF: the
    # state file is all that is left.
    assert mfc(lab) == set() and mfc(lab, 6) == set()
    assert "239.5.5.5" not in igmp_groups(lab, "dn1")
    saved = json.loads(Path(daemon.state).read_text())
    assert saved == before

    daemon.start()

    assert daemon.cli_json("export") == before
    assert ("239.1.1.1", SRC4) in mfc(lab)
    assert ("ff3e::10", SRC6) in mfc(lab, 6)
    assert "239.5.5.5" in igmp_groups(lab, "dn1")
    lab.probe_until_forwarded("src", "239.1.1.1", PORT, "veth0", "rcv1", "veth0", timeout=10)
    assert forwarded(lab, "239.1.1.1", "rcv1") == 30
    lab.probe_until_forwarded("src", "239.2.2.2", PORT, "veth0", "rcv2", "veth0", timeout=10)
    assert forwarded(lab, "239.2.2.2", "rcv2") == 30, "(*,G) learns its source again"
    lab.probe_until_forwarded("src", "ff3e::10", PORT, "veth0", "rcv1", "veth0", timeout=10)
    assert forwarded(lab, "ff3e::10", "rcv1") == 30


def test_every_accepted_change_replaces_the_state_file_atomically(
    lab: StandardLab, daemon: DaemonProcess
) -> None:
    daemon.cli("route", "add", "up0", SRC4, "239.1.1.2", "dn1", check=True)
    first = digest(daemon.state)
    saved = json.loads(Path(daemon.state).read_text())
    assert saved["version"] == 1
    assert saved["routes"] == [
        {"iif": "up0", "source": SRC4, "group": "239.1.1.2", "oifs": [{"name": "dn1", "ttl": 1}]}
    ]

    daemon.cli("group", "join", "dn2", "232.1.1.1", SRC4, check=True)
    second = digest(daemon.state)
    assert second[0] != first[0]
    assert second[2] != first[2], "a new file is renamed over the old one, never rewritten"
    assert json.loads(Path(daemon.state).read_text())["groups"] == [
        {"iface": "dn2", "group": "232.1.1.1", "source": SRC4}
    ]

    # Refused and dry-run changes do not touch it.
    refused = daemon.cli("route", "add", "up0", SRC4, "239.1.1.2", "dn1")  # nothing new
    assert refused.returncode == 1 and "already exists" in refused.stderr
    daemon.cli("--dry-run", "route", "del", "up0", SRC4, "239.1.1.2", check=True)
    assert digest(daemon.state) == second
    leftovers = [p.name for p in Path(daemon.state).parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


# ---------------------------------------------------------------- bad state files


BAD_STATE_FILES = {
    "not-json": (b'{"version": 1, "routes": [', "not valid JSON"),
    "empty": (b"", "empty"),
    "future-version": (b'{"version": 99, "routes": [], "relays": [], "groups": []}\n', "99"),
    "no-version": (b'{"routes": [], "relays": [], "groups": []}\n', "version"),
    "bad-rule": (
        b'{"version": 1, "routes": [{"iif": "up0", "group": "10.0.0.1", "oifs": ["dn1"]}]}',
        "invalid rule",
    ),
    "not-utf8": (b'{"version": 1, "routes": [\xff\xfe]}', "UTF-8"),
    "a-list": (b"[1, 2, 3]\n", "JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD_STATE_FILES))
def test_a_bad_state_file_stops_the_daemon_naming_it_and_is_left_byte_for_byte(
    lab: StandardLab, case: str
) -> None:
    content, problem = BAD_STATE_FILES[case]
    with DaemonProcess(lab, "router") as d:
        Path(d.state).write_bytes(content)
        os.utime(d.state, (1_000_000_000, 1_000_000_000))
        before = digest(d.state)

        with pytest.raises(DaemonError, match="exited with 1"):
            d.start(timeout=15)

        log = d.log()
        assert d.state in log, log
        assert problem in log, log
        assert "refusing to start" in log or "will not start" in log
        assert digest(d.state) == before, "the file must be left exactly as it was"
        assert sorted(p.name for p in Path(d.state).parent.iterdir()) == [
            "mcrelayd.log",
            "state.json",
        ], "no socket, no temp file, no backup copy"
        assert mfc(lab) == set()


def test_a_state_path_that_is_a_directory_stops_the_daemon(lab: StandardLab) -> None:
    with DaemonProcess(lab, "router") as d:
        os.mkdir(d.state)
        with pytest.raises(DaemonError, match="exited with 1"):
            d.start(timeout=15)
        assert "is a directory" in d.log() and d.state in d.log()
        assert os.listdir(d.state) == []


# ---------------------------------------------------------------- unwritable state


def read_state(d: DaemonProcess) -> dict[str, object]:
    res = d.in_mount_ns("cat", d.state)
    assert res.returncode == 0, res.stderr
    data: dict[str, object] = json.loads(res.stdout)
    return data


def test_a_change_that_cannot_be_saved_on_a_read_only_disk_is_refused_and_rolled_back(
    lab: StandardLab, tmpfs_daemon: DaemonProcess
) -> None:
    d = tmpfs_daemon
    d.cli("route", "add", "up0", SRC4, "239.1.1.3", "dn1", check=True)
    assert ("239.1.1.3", SRC4) in mfc(lab)
    saved = read_state(d)

    remount = d.in_mount_ns("mount", "-o", "remount,ro", os.path.dirname(d.state))
    assert remount.returncode == 0, remount.stderr

    add = d.cli("route", "add", "up0", SRC4, "239.1.1.4", "dn2")
    assert add.returncode == 1
    assert "cannot save rules" in add.stderr and "EROFS" in add.stderr, add.stderr
    delete = d.cli("route", "del", "up0", SRC4, "239.1.1.3")
    assert delete.returncode == 1 and "EROFS" in delete.stderr
    join = d.cli("group", "join", "dn1", "239.6.6.6")
    assert join.returncode == 1 and "EROFS" in join.stderr

    # The kernel and the state file still agree: only the first route.
    assert ("239.1.1.4", SRC4) not in mfc(lab)
    assert ("239.1.1.3", SRC4) in mfc(lab)
    assert "239.6.6.6" not in igmp_groups(lab, "dn1")
    assert read_state(d) == saved
    assert [r["group"] for r in d.cli_json("show", "routes")["routes"]] == ["239.1.1.3"]

    # Writable again: the same change now goes through.
    assert d.in_mount_ns("mount", "-o", "remount,rw", os.path.dirname(d.state)).returncode == 0
    d.cli("route", "add", "up0", SRC4, "239.1.1.4", "dn2", check=True)
    assert ("239.1.1.4", SRC4) in mfc(lab)


def test_a_change_that_does_not_fit_on_a_full_disk_is_refused_and_rolled_back(
    lab: StandardLab, tmpfs_daemon: DaemonProcess
) -> None:
    d = tmpfs_daemon
    accepted: list[str] = []
    refused = None
    for i in range(1, 250):
        group = f"239.7.{i // 250}.{i % 250}"
        res = d.cli("route", "add", "up0", SRC4, group, "dn1", "dn2")
        if res.returncode != 0:
            refused = (group, res.stderr)
            break
        accepted.append(group)
    assert refused is not None, "16 KiB should not hold 250 routes"
    group, stderr = refused
    assert "ENOSPC" in stderr and "cannot save rules" in stderr, stderr

    in_kernel = {g for g, _ in mfc(lab)}
    assert group not in in_kernel, "the refused route must not stay in the kernel"
    assert set(accepted) <= in_kernel
    saved = read_state(d)
    assert sorted(r["group"] for r in saved["routes"]) == sorted(accepted)  # type: ignore[union-attr, index]
    assert len(d.cli_json("show", "routes")["routes"]) == len(accepted)
