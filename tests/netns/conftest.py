"""Fixtures for tests on real kernels: throwaway network-namespace labs.

Every test here runs as root against real namespaces, veth pairs and
packets (see DESIGN.md "Testing on real kernels"). Tests are skipped, with
the reason, only when that is impossible (not root, ``ip netns`` unusable).
Each fixture removes its namespaces even if the test fails, and checks that
none of them survived.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable, Iterator

import pytest

from mcrelay.lab import Lab, StandardLab
from mcrelay.lab.daemon import DaemonProcess
from mcrelay.lab.netns import NETNS_DIR


@functools.cache
def netns_unusable() -> str | None:
    """Why namespace tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "netns tests need root (network namespaces, veth, mroute sockets)"
    if shutil.which("ip") is None:
        return "iproute2 'ip' command not found"
    try:
        with Lab() as probe:
            probe.add_ns("probe")
    except Exception as exc:
        return f"'ip netns' is unusable here: {exc}"
    return None


def require_netns() -> None:
    """Skip the calling test, with the reason, if namespaces are unusable."""
    reason = netns_unusable()
    if reason:
        pytest.skip(reason)


def _assert_gone(prefix: str) -> None:
    left = sorted(p.name for p in NETNS_DIR.glob(prefix + "*")) if NETNS_DIR.is_dir() else []
    assert not left, f"lab namespaces left behind: {left}"


@pytest.fixture
def lab() -> Iterator[StandardLab]:
    """The standard lab: src -- router(up0 | dn1, dn2) -- rcv1, rcv2."""
    require_netns()
    std = Lab.standard()
    try:
        yield std
    finally:
        std.cleanup()
        _assert_gone(std.prefix)


@pytest.fixture
def make_lab() -> Iterator[Callable[[], Lab]]:
    """Factory for empty labs (custom topologies); all cleaned at teardown."""
    require_netns()
    made: list[Lab] = []

    def factory() -> Lab:
        new = Lab()
        made.append(new)
        return new

    try:
        yield factory
    finally:
        for each in made:
            each.cleanup()
        for each in made:
            _assert_gone(each.prefix)


# ---------------------------------------------------------------------------
# Daemon fixtures (mcrelayd in the router namespace) are added below or in a
# separate module by the daemon's owner.


@pytest.fixture
def daemon(lab: StandardLab) -> Iterator[DaemonProcess]:
    """mcrelayd running in the lab's router namespace (one worker), stopped at teardown."""
    d = DaemonProcess(lab, "router", workers=1)
    try:
        d.start()
        yield d
    finally:
        d.close()


@pytest.fixture
def tmpfs_daemon(lab: StandardLab) -> Iterator[DaemonProcess]:
    """mcrelayd whose state directory is a 16 KiB tmpfs mounted in its own mount namespace.

    The test's own view of that directory stays empty; read the state with
    :func:`read_state` (nsenter into the daemon's mount namespace).
    """
    d = DaemonProcess(lab, "router")
    statedir = d.workdir / "state"
    statedir.mkdir()
    d.state = str(statedir / "state.json")
    d.wrapper = [
        "sh",
        "-c",
        f'mount -t tmpfs -o size=16k,mode=0750 mcrelay-test "{statedir}" && exec "$@"',
        "sh",
    ]
    try:
        d.start()
        yield d
    finally:
        d.close()
