"""Privilege drop, checked in a forked child (the test process stays root)."""

from __future__ import annotations

import json
import os
import pwd
from collections.abc import Callable
from typing import Any

import pytest

from mcrelay.privileges import PrivilegeDropFailed, drop_privileges, resolve_group, resolve_user

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")


def in_child(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run fn in a forked child and return what it reported (or its exception)."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        try:
            result = fn()
        except BaseException as e:
            result = {"error": type(e).__name__, "message": str(e)}
        os.write(wfd, json.dumps(result).encode())
        os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as r:
        data = r.read()
    os.waitpid(pid, 0)
    result: dict[str, Any] = json.loads(data)
    return result


def proc_status() -> dict[str, str]:
    with open("/proc/self/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


def drop_and_inspect() -> dict[str, Any]:
    os.setgroups([0, 4])  # supplementary groups that must go
    drop_privileges("nobody")
    status = proc_status()
    try:
        os.setuid(0)
        regained = True
    except PermissionError:
        regained = False
    return {
        "resuid": list(os.getresuid()),
        "resgid": list(os.getresgid()),
        "groups": os.getgroups(),
        "no_new_privs": status["NoNewPrivs"],
        "caps": {k: int(status[k], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapAmb")},
        "regained": regained,
        "can_read_shadow": os.access("/etc/shadow", os.R_OK),
    }


def test_drop_to_nobody() -> None:
    nobody = pwd.getpwnam("nobody")
    r = in_child(drop_and_inspect)
    assert "error" not in r, r
    assert r["resuid"] == [nobody.pw_uid] * 3
    assert r["resgid"] == [nobody.pw_gid] * 3
    assert r["groups"] == []
    assert r["no_new_privs"] == "1"
    assert r["caps"] == {"CapInh": 0, "CapPrm": 0, "CapEff": 0, "CapAmb": 0}
    assert r["regained"] is False
    assert r["can_read_shadow"] is False


def test_parent_is_untouched() -> None:
    in_child(drop_and_inspect)
    assert os.geteuid() == 0


def test_unknown_user_is_refused_before_anything_changes() -> None:
    def attempt() -> dict[str, Any]:
        drop_privileges("no-such-user-mcrelay")
        return {"uid": os.getuid()}

    r = in_child(attempt)
    assert r["error"] == "PrivilegeDropFailed"
    assert "'no-such-user-mcrelay' does not exist" in r["message"]


def test_root_is_refused() -> None:
    def attempt() -> dict[str, Any]:
        drop_privileges("root")
        return {"uid": os.getuid()}

    r = in_child(attempt)
    assert r["error"] == "PrivilegeDropFailed"
    assert "is root" in r["message"]


def test_numeric_uid_and_resolve_helpers() -> None:
    nobody = pwd.getpwnam("nobody")
    assert resolve_user(str(nobody.pw_uid)) == (nobody.pw_uid, nobody.pw_gid)
    assert resolve_user("nobody") == (nobody.pw_uid, nobody.pw_gid)
    with pytest.raises(PrivilegeDropFailed):
        resolve_user("no-such-user-mcrelay")
    assert resolve_group("root") == 0
    assert resolve_group("1234") == 1234
    assert resolve_group("no-such-group-mcrelay") is None


def test_incomplete_drop_is_detected_not_trusted() -> None:
    """If a step silently did nothing, the verification still refuses to go on."""

    def attempt() -> dict[str, Any]:
        os.setresuid = lambda *ids: None  # a uid change that "succeeds" but does nothing
        drop_privileges("nobody")
        return {"uid": os.getuid()}

    r = in_child(attempt)
    assert r["error"] == "PrivilegeDropFailed"
    assert "uids are (0, 0, 0)" in r["message"]
    assert "setuid(0) succeeded: root could be regained" in r["message"]
