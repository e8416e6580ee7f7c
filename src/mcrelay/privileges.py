"""Dropping root in the children (control process, relay workers).

A child receives its sockets as file descriptors from the supervisor, then
calls :func:`drop_privileges` before it reads a single untrusted byte. After
it returns the process runs as the configured user (default ``nobody``) with no
supplementary groups, no capabilities in any set, and ``PR_SET_NO_NEW_PRIVS``
so not even a setuid binary can give privileges back. The function checks all
of that afterwards and raises :class:`PrivilegeDropFailed` rather than let a
child run with more than it should: a worker that parses packets as root is
the one failure mode this module exists to prevent.
"""

from __future__ import annotations

import ctypes
import errno
import grp
import os
import pwd
import signal

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class PrivilegeDropFailed(RuntimeError):
    """The process could not shed its privileges; it must exit, not carry on."""


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _prctl(option: int, arg2: int, arg3: int = 0) -> int:
    fn = _lib().prctl
    fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    fn.restype = ctypes.c_int
    rc = int(fn(option, arg2, arg3, 0, 0))
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")
    return rc


def _clear_capabilities() -> None:
    """Empty the effective, permitted and inheritable sets (always allowed)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    fn = _lib().capset
    fn.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]
    fn.restype = ctypes.c_int
    if fn(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def _proc_status() -> dict[str, str]:
    out: dict[str, str] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def resolve_user(name: str) -> tuple[int, int]:
    """(uid, primary gid) of a user name or numeric uid; raises PrivilegeDropFailed."""
    try:
        pw = pwd.getpwuid(int(name)) if name.isascii() and name.isdigit() else pwd.getpwnam(name)
    except (KeyError, ValueError):
        raise PrivilegeDropFailed(
            f"user {name!r} does not exist; set 'user' in mcrelay.toml to an unprivileged "
            "account (default: nobody)"
        ) from None
    return pw.pw_uid, pw.pw_gid


def resolve_group(name: str) -> int | None:
    """gid of a group name or numeric gid; None if there is no such group."""
    if name.isascii() and name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def drop_privileges(user: str) -> None:
    """Become ``user`` for good: no groups, no capabilities, no way back.

    Must be called by root (or a process holding CAP_SETUID and CAP_SETGID).
    Raises :class:`PrivilegeDropFailed` if any step fails or the result is not
    fully unprivileged; the caller should then exit.
    """
    uid, gid = resolve_user(user)
    if uid == 0:
        raise PrivilegeDropFailed(
            f"user {user!r} is root; workers must run unprivileged (set 'user' in mcrelay.toml)"
        )
    try:
        # Ambient capabilities would survive the uid change if we started as a
        # non-root user holding capabilities (systemd AmbientCapabilities=).
        try:
            _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
        except OSError as e:
            if e.errno != errno.EINVAL:  # kernel without ambient capabilities
                raise
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        _clear_capabilities()
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
    except OSError as e:
        raise PrivilegeDropFailed(f"cannot drop privileges to user {user!r}: {e}") from None
    _verify(user, uid, gid)


def become_unprivileged(user: str) -> tuple[int, int]:
    """What every child does once it holds its descriptors: drop to ``user`` for good.

    As root this is :func:`drop_privileges`; a child started unprivileged
    (tests, a non-root daemon) keeps its identity but still loses the way back
    (PR_SET_NO_NEW_PRIVS). Either way the child then dies with its parent:
    the parent-death signal is cleared by a credential change, so it is set
    after. Returns the (uid, gid) the child now runs as.
    """
    if os.geteuid() == 0:
        drop_privileges(user)
    else:
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    return os.getuid(), os.getgid()


def _verify(user: str, uid: int, gid: int) -> None:
    problems: list[str] = []
    if os.getresuid() != (uid, uid, uid):
        problems.append(f"uids are {os.getresuid()}, expected {uid}")
    if os.getresgid() != (gid, gid, gid):
        problems.append(f"gids are {os.getresgid()}, expected {gid}")
    if os.getgroups():
        problems.append(f"supplementary groups remain: {os.getgroups()}")
    status = _proc_status()
    for key in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        if key in status and int(status[key], 16) != 0:
            problems.append(f"{key} is {status[key]}, expected 0")
    if status.get("NoNewPrivs") != "1":
        problems.append("NoNewPrivs is not set")
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        problems.append("setuid(0) succeeded: root could be regained")
    if problems:
        raise PrivilegeDropFailed(
            f"privileges not fully dropped to user {user!r}: {'; '.join(problems)}"
        )
