"""A throwaway lab of Linux network namespaces joined by veth pairs.

Integration tests, the demo and the benchmarks need a real network: a source
host, a router running mcrelayd, receivers. ``Lab`` builds one out of network
namespaces whose names all start with a random prefix (``mcl1a2b3c-``), so
parallel runs never collide and nothing outside the lab is ever touched:
every command and sysctl goes to a namespace this lab created, and commands
naming any other namespace are refused.

Cleanup is the point: ``cleanup()`` (also run by ``__exit__``, at interpreter
exit and on SIGTERM) kills every process still inside the lab's namespaces
and deletes the namespaces, even if building the lab failed half-way.

The standard topology (``Lab.standard()``, see ``StandardLab``)::

    src:veth0 ---- up0:router:dn1 ---- veth0:rcv1
                         router:dn2 ---- veth0:rcv2
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ipaddress
import json
import os
import secrets
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self, TypeVar

from mcrelay.lab import traffic

T = TypeVar("T")

NETNS_DIR = Path("/run/netns")
PREFIX_LEN = len("mcl") + 6
MARKER = "mcrelay-lab owner="
CLONE_NEWNET = 0x40000000
IFNAMSIZ = 15

# Standard lab addressing (documentation ranges, RFC 5737 / RFC 3849).
SRC_V4, UP0_V4 = "192.0.2.2/24", "192.0.2.1/24"
RCV1_V4, DN1_V4 = "198.51.100.2/24", "198.51.100.1/24"
RCV2_V4, DN2_V4 = "203.0.113.2/24", "203.0.113.1/24"
SRC_V6, UP0_V6 = "2001:db8:1::2/64", "2001:db8:1::1/64"
RCV1_V6, DN1_V6 = "2001:db8:11::2/64", "2001:db8:11::1/64"
RCV2_V6, DN2_V6 = "2001:db8:12::2/64", "2001:db8:12::1/64"
HOST_IF = "veth0"
"""Interface name of every host's single link (never eth0)."""


class LabError(Exception):
    """A lab operation failed; the message includes the command and its stderr."""


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float = 5.0,
    interval: float = 0.02,
    what: str = "condition",
) -> T:
    """Poll ``predicate`` until it returns something truthy; return that value.

    Replaces blind sleeps: returns as soon as the condition holds and raises
    ``TimeoutError`` naming ``what`` if it never does within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    delay = interval
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 1.5, 0.25)


def _cidr_ip(cidr: str | None) -> str | None:
    return None if cidr is None else cidr.split("/", 1)[0]


@dataclass(frozen=True)
class Endpoint:
    """One end of a link: namespace (full name), interface and its addresses.

    ``v4``/``v6`` keep the prefix length ("192.0.2.1/24"); ``ip4``/``ip6``
    are the bare addresses.
    """

    ns: str
    ifname: str
    v4: str | None = None
    v6: str | None = None

    @property
    def ip4(self) -> str | None:
        """IPv4 address without prefix length."""
        return _cidr_ip(self.v4)

    @property
    def ip6(self) -> str | None:
        """IPv6 address without prefix length."""
        return _cidr_ip(self.v6)


@dataclass(frozen=True)
class Link:
    """A veth pair between two endpoints."""

    a: Endpoint
    b: Endpoint


@dataclass(frozen=True)
class LinkSpec:
    """A veth pair to create: names plus optional addresses (CIDR) and MTU.

    Namespaces may be given by role ("router") or full name.
    """

    ns_a: str
    if_a: str
    ns_b: str
    if_b: str
    v4_a: str | None = None
    v4_b: str | None = None
    v6_a: str | None = None
    v6_b: str | None = None
    mtu: int | None = None


def auto_link_spec(ns_a: str, if_a: str, ns_b: str, if_b: str, index: int) -> LinkSpec:
    """A spec addressed from test ranges: link ``index`` (0..511) gets
    198.18.<index>/24 style subnets of 198.18.0.0/15 (RFC 2544) and
    2001:db8:100:<index>::/64; side a is .1/::1, side b .2/::2."""
    if not 0 <= index < 512:
        raise LabError(f"auto-addressed link index {index} outside 0..511")
    net4 = ipaddress.ip_network("198.18.0.0/15").network_address + index * 256
    return LinkSpec(
        ns_a,
        if_a,
        ns_b,
        if_b,
        v4_a=f"{net4 + 1}/24",
        v4_b=f"{net4 + 2}/24",
        v6_a=f"2001:db8:100:{index:x}::1/64",
        v6_b=f"2001:db8:100:{index:x}::2/64",
    )


# --------------------------------------------------------------------------
# entering a namespace from a thread

_libc = ctypes.CDLL(None, use_errno=True)


def _run_in_netns(path: Path, fn: Callable[[], T]) -> T:
    """Run fn in a fresh thread that has joined the network namespace at path.

    setns(CLONE_NEWNET) changes only the calling thread, and that thread dies
    afterwards, so the caller's namespace is never affected. Sockets created
    by fn stay in the lab namespace for their whole life.
    """
    box: list[Any] = []

    def body() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({path}): {os.strerror(err)}")
            finally:
                os.close(fd)
            box.append((True, fn()))
        except BaseException as exc:
            box.append((False, exc))

    t = threading.Thread(target=body, name=f"netns:{path.name}", daemon=True)
    t.start()
    t.join()
    ok, value = box[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


# --------------------------------------------------------------------------
# receivers running as processes


class ReceiverProcess:
    """A ``traffic recv`` process in a lab namespace; ``result()`` collects it.

    Started by ``Lab.receiver``, which waits for the process to report that
    it has joined, so sending may start right away.
    """

    def __init__(self, ns: str, argv: list[str], proc: subprocess.Popen[bytes]) -> None:
        self.ns = ns
        self.argv = argv
        self.proc = proc
        self._early_err = b""
        self._result: traffic.ReceiveResult | None = None

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the receiver has bound and joined (or fail with its stderr)."""
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        deadline = time.monotonic() + timeout
        marker = traffic.READY_LINE.encode()
        while marker not in self._early_err:
            left = deadline - time.monotonic()
            if left <= 0:
                self.proc.kill()
                raise TimeoutError(f"receiver in {self.ns} not ready after {timeout:g}s")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                _out, err = self.proc.communicate()
                raise LabError(
                    f"receiver in {self.ns} exited with {self.proc.returncode} before it "
                    f"was ready: {(self._early_err + err).decode(errors='replace').strip()}"
                )
            self._early_err += chunk

    @property
    def running(self) -> bool:
        """True while the receiver process has not exited."""
        return self.proc.poll() is None

    def result(self, timeout: float | None = 30.0) -> traffic.ReceiveResult:
        """Wait for the receiver to finish (count/duration/idle) and parse its JSON."""
        if self._result is not None:
            return self._result
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise
        text = out.decode(errors="replace").strip()
        if self.proc.returncode != 0 or not text:
            raise LabError(
                f"receiver in {self.ns} failed (exit {self.proc.returncode}): "
                f"{(self._early_err + err).decode(errors='replace').strip()}"
            )
        self._result = traffic.ReceiveResult.from_dict(json.loads(text.splitlines()[-1]))
        return self._result

    def stop(self, timeout: float = 10.0) -> traffic.ReceiveResult:
        """End reception now (SIGTERM) and return what was received so far."""
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
        return self.result(timeout)


# --------------------------------------------------------------------------
# the lab

_LIVE: set[Lab] = set()
_LIVE_LOCK = threading.Lock()
_HOOKS_INSTALLED = False


def _cleanup_all() -> None:
    with _LIVE_LOCK:
        labs = list(_LIVE)
    for lab in labs:
        with contextlib.suppress(Exception):
            lab.cleanup()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    _cleanup_all()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _install_hooks() -> None:
    """atexit always; SIGTERM only if nobody else handles it (main thread)."""
    global _HOOKS_INSTALLED
    if _HOOKS_INSTALLED:
        return
    _HOOKS_INSTALLED = True
    atexit.register(_cleanup_all)
    if threading.current_thread() is threading.main_thread():
        with contextlib.suppress(ValueError):
            if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
                signal.signal(signal.SIGTERM, _on_sigterm)


def python_env() -> dict[str, str]:
    """Environment for child Pythons so ``mcrelay`` imports from this tree."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class Lab:
    """Network namespaces and veth links that exist only for one test or demo.

    Namespaces are addressed by role ("router") or full name
    ("mcl1a2b3c-router"); anything else is refused. Use as a context manager.
    """

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or f"mcl{secrets.token_hex(3)}-"
        self._created: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self.links: list[Link] = []
        self._closed = False
        with _LIVE_LOCK:
            _LIVE.add(self)
        _install_hooks()

    # -- context manager --------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # -- names ------------------------------------------------------------

    @property
    def namespaces(self) -> list[str]:
        """Full names of the namespaces this lab created, in creation order."""
        return list(self._created)

    def name(self, ns: str) -> str:
        """Full namespace name for a role or full name; refuses foreign ones."""
        full = ns if ns.startswith(self.prefix) else self.prefix + ns
        if full not in self._created:
            raise LabError(f"namespace {ns!r} does not belong to this lab ({self.prefix}*)")
        return full

    def role(self, ns: str) -> str:
        """Role part of a namespace name ("router")."""
        return self.name(ns)[len(self.prefix) :]

    # -- commands ---------------------------------------------------------

    @staticmethod
    def _exec(
        argv: Sequence[str],
        *,
        check: bool = True,
        capture: bool = True,
        input: str | None = None,
        timeout: float = 60.0,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            list(argv),
            capture_output=capture,
            text=True,
            input=input,
            timeout=timeout,
            check=False,
            env=env,
        )
        if check and res.returncode != 0:
            detail = (res.stderr or "").strip() if capture else ""
            raise LabError(f"{' '.join(argv)} failed ({res.returncode}): {detail}")
        return res

    def run(
        self,
        ns: str,
        *argv: str,
        check: bool = True,
        capture: bool = True,
        input: str | None = None,
        timeout: float = 60.0,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside namespace ns (``ip netns exec``); text output.

        With check=True a non-zero exit raises LabError carrying stderr.
        """
        return self._exec(
            ["ip", "netns", "exec", self.name(ns), *argv],
            check=check,
            capture=capture,
            input=input,
            timeout=timeout,
            env=env,
        )

    def ip(self, ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``ip -n NS args`` (cheaper than run(ns, "ip", ...))."""
        return self._exec(["ip", "-n", self.name(ns), *args], check=check)

    def ip_json(self, ns: str, *args: str) -> Any:
        """``ip -j -n NS args`` parsed."""
        out = self._exec(["ip", "-j", "-n", self.name(ns), *args]).stdout
        return json.loads(out) if out.strip() else []

    def ip_batch(self, ns: str, lines: Iterable[str]) -> None:
        """Run many ``ip`` commands in ns with one process (``ip -batch -``)."""
        text = "".join(line + "\n" for line in lines)
        if text:
            self._exec(["ip", "-n", self.name(ns), "-batch", "-"], input=text)

    def popen(self, ns: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start argv inside ns in the background; killed at cleanup if still running."""
        proc: subprocess.Popen[Any] = subprocess.Popen(
            ["ip", "netns", "exec", self.name(ns), *argv], **kw
        )
        self._procs.append(proc)
        return proc

    def in_ns(self, ns: str, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Call fn(*args, **kw) in this process, inside namespace ns.

        Sockets fn creates belong to ns (close them before cleanup, or the
        namespace lingers unnamed until they are closed).
        """
        return _run_in_netns(NETNS_DIR / self.name(ns), lambda: fn(*args, **kw))

    # -- building ---------------------------------------------------------

    def add_ns(self, *roles: str) -> list[str]:
        """Create namespaces for roles; lo up, IPv6 DAD off; return full names."""
        names = []
        for role in roles:
            full = self.prefix + role
            if full in self._created:
                raise LabError(f"namespace {full} already exists in this lab")
            self._created.append(full)  # before creating: cleanup covers failures
            self._exec(["ip", "netns", "add", full])
            self.ip_batch(full, ["link set lo up", f'link set lo alias "{MARKER}{os.getpid()}"'])
            for key in (
                "net.ipv6.conf.all.accept_dad",
                "net.ipv6.conf.default.accept_dad",
                "net.ipv6.conf.all.disable_ipv6",
                "net.ipv6.conf.default.disable_ipv6",
            ):
                self.set_sysctl(full, key, 0)
            names.append(full)
        return names

    def add_link(
        self,
        ns_a: str,
        if_a: str,
        ns_b: str,
        if_b: str,
        *,
        v4_a: str | None = None,
        v4_b: str | None = None,
        v6_a: str | None = None,
        v6_b: str | None = None,
        mtu: int | None = None,
    ) -> Link:
        """Create one veth pair ns_a:if_a <-> ns_b:if_b, up, with the given CIDRs."""
        spec = LinkSpec(ns_a, if_a, ns_b, if_b, v4_a, v4_b, v6_a, v6_b, mtu)
        return self.add_links([spec])[0]

    def add_links(self, specs: Sequence[LinkSpec]) -> list[Link]:
        """Create many veth pairs with a handful of ``ip -batch`` calls.

        All pairs are created from their a-side namespace, then every
        namespace configures its ends (up, addresses with ``nodad``) in one
        batch. Suitable for dozens of links (VIF-table tests).
        """
        resolved = []
        for s in specs:
            for ifname in (s.if_a, s.if_b):
                if not 1 <= len(ifname.encode()) <= IFNAMSIZ or "/" in ifname or " " in ifname:
                    raise LabError(f"bad interface name {ifname!r} (1..15 bytes)")
                if ifname == "eth0":
                    raise LabError("the lab never names an interface eth0")
            resolved.append((self.name(s.ns_a), self.name(s.ns_b), s))
        create: dict[str, list[str]] = {}
        config: dict[str, list[str]] = {}
        links = []
        for ns_a, ns_b, s in resolved:
            create.setdefault(ns_a, []).append(
                f"link add {s.if_a} type veth peer name {s.if_b} netns {ns_b}"
            )
            for ns, ifname, v4, v6 in (
                (ns_a, s.if_a, s.v4_a, s.v6_a),
                (ns_b, s.if_b, s.v4_b, s.v6_b),
            ):
                lines = config.setdefault(ns, [])
                if s.mtu:
                    lines.append(f"link set {ifname} mtu {s.mtu}")
                lines.append(f"link set {ifname} up")
                if v4:
                    lines.append(f"addr add {v4} dev {ifname}")
                if v6:
                    lines.append(f"addr add {v6} dev {ifname} nodad")
            links.append(
                Link(Endpoint(ns_a, s.if_a, s.v4_a, s.v6_a), Endpoint(ns_b, s.if_b, s.v4_b, s.v6_b))
            )
        for ns, lines in create.items():
            self.ip_batch(ns, lines)
        for ns, lines in config.items():
            self.ip_batch(ns, lines)
        self.links.extend(links)
        return links

    def add_route(self, ns: str, dest: str, via: str, dev: str | None = None) -> None:
        """``ip route add dest via via [dev dev]`` in ns (family from via)."""
        fam = "-6" if ":" in via else "-4"
        self.ip(ns, fam, "route", "add", dest, "via", via, *(("dev", dev) if dev else ()))

    # -- queries ----------------------------------------------------------

    def endpoint(self, ns: str, ifname: str) -> Endpoint:
        """The endpoint record of a link end created by this lab."""
        full = self.name(ns)
        for link in self.links:
            for end in (link.a, link.b):
                if end.ns == full and end.ifname == ifname:
                    return end
        raise LabError(f"no link end {ifname} in {full}")

    def addr(self, ns: str, ifname: str, family: int = 4) -> str:
        """The (first) global address of ifname in ns, without prefix length."""
        try:
            end = self.endpoint(ns, ifname)
            known = end.ip4 if family == 4 else end.ip6
            if known:
                return known
        except LabError:
            pass
        fam = "inet" if family == 4 else "inet6"
        for info in self.ip_json(ns, "addr", "show", "dev", ifname):
            for a in info.get("addr_info", []):
                if a.get("family") == fam and a.get("scope") == "global":
                    return str(a["local"])
        raise LabError(f"{ifname} in {self.name(ns)} has no global IPv{family} address")

    def ifindex(self, ns: str, ifname: str) -> int:
        """Interface index of ifname inside ns."""
        return self.in_ns(ns, traffic.ifindex, ifname)

    def interfaces(self, ns: str) -> list[str]:
        """Names of all interfaces in ns."""
        return [str(i["ifname"]) for i in self.ip_json(ns, "link", "show")]

    # -- sysctls ----------------------------------------------------------

    @staticmethod
    def _sysctl_path(key: str) -> Path:
        rel = key if "/" in key else key.replace(".", "/")
        if not rel.startswith("net/") or ".." in rel.split("/"):
            raise LabError(f"only net.* sysctls can be set in a lab namespace, not {key!r}")
        return Path("/proc/sys") / rel

    def set_sysctl(self, ns: str, key: str, value: int | str) -> None:
        """Set a net.* sysctl inside ns (never in the root namespace).

        Keys are dotted (net.ipv4.ip_forward) or slashed for interface names
        containing dots (net/ipv4/conf/a.b/rp_filter).
        """
        path = self._sysctl_path(key)
        self.in_ns(ns, path.write_text, f"{value}\n")

    def get_sysctl(self, ns: str, key: str) -> str:
        """Read a net.* sysctl inside ns."""
        return self.in_ns(ns, self._sysctl_path(key).read_text).strip()

    def set_rp_filter(self, ns: str, value: int, ifaces: Iterable[str] | None = None) -> None:
        """Set rp_filter (0 off, 1 strict, 2 loose) on all/default and each iface.

        The kernel uses max(all, iface), so both are set; ifaces defaults to
        every interface in ns.
        """
        names = ["all", "default", *(self.interfaces(ns) if ifaces is None else ifaces)]
        for name in names:
            self.set_sysctl(ns, f"net/ipv4/conf/{name}/rp_filter", value)

    def enable_forwarding(self, ns: str) -> None:
        """Make ns a router: IPv4 and IPv6 forwarding on."""
        self.set_sysctl(ns, "net.ipv4.ip_forward", 1)
        self.set_sysctl(ns, "net.ipv6.conf.all.forwarding", 1)

    # -- traffic ----------------------------------------------------------

    def traffic_argv(self, *args: str) -> list[str]:
        """argv running the traffic tool with this interpreter."""
        return [sys.executable, "-m", "mcrelay.lab.traffic", *args]

    def receiver(
        self,
        ns: str,
        address: str,
        port: int,
        iface: str | None = None,
        *,
        sources: Sequence[str] = (),
        count: int | None = None,
        duration: float = 5.0,
        idle: float | None = None,
        max_records: int = traffic.MAX_RECORDS,
        rcvbuf: int | None = None,
        ready_timeout: float = 10.0,
    ) -> ReceiverProcess:
        """Start ``traffic recv`` in ns in the background, joined before returning.

        Collect with ``.result()`` (waits until count/duration/idle) or
        ``.stop()`` (ends now).
        """
        args = ["recv", address, str(port), "--duration", f"{duration}"]
        if iface:
            args += ["--iface", iface]
        for src in sources:
            args += ["--source", src]
        if count is not None:
            args += ["--count", str(count)]
        if idle is not None:
            args += ["--idle", f"{idle}"]
        if rcvbuf is not None:
            args += ["--rcvbuf", str(rcvbuf)]
        args += ["--max-records", str(max_records)]
        argv = self.traffic_argv(*args)
        proc = self.popen(
            ns, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=python_env()
        )
        rp = ReceiverProcess(self.name(ns), argv, proc)
        rp.wait_ready(ready_timeout)
        return rp

    def send(self, ns: str, dest: str, port: int, **kw: Any) -> traffic.SendResult:
        """``traffic.send(dest, port, **kw)`` run in-process inside ns."""
        return self.in_ns(ns, traffic.send, dest, port, **kw)

    def probe_until_forwarded(
        self,
        send_ns: str,
        dest: str,
        port: int,
        iface: str,
        recv_ns: str,
        recv_iface: str,
        *,
        recv_address: str | None = None,
        recv_port: int | None = None,
        ttl: int = 16,
        timeout: float = 5.0,
        interval: float = 0.05,
    ) -> float:
        """Send probe datagrams until one arrives at recv_ns; return seconds taken.

        Answers "is the path up yet?" without blind sleeps: the kernel
        forwards IPv6 multicast on a fresh link only after about a second, and
        a daemon needs a moment to install routes. Probes use stream
        ``traffic.PROBE_STREAM``, which receivers count apart (``probes``).
        ``recv_address``/``recv_port`` is where to listen (default dest:port),
        for relays that translate the group or port.
        """
        rsock = self.in_ns(
            recv_ns,
            traffic.open_receiver,
            recv_address or dest,
            recv_port or port,
            iface=recv_iface,
        )
        try:
            ssock = self.in_ns(send_ns, traffic.open_sender, dest, iface=iface, ttl=ttl)
            try:
                start = time.monotonic()
                seq = 0
                while True:
                    traffic.send(dest, port, sock=ssock, first_seq=seq, stream=traffic.PROBE_STREAM)
                    seq += 1
                    poll_until = time.monotonic() + interval
                    while (left := poll_until - time.monotonic()) > 0:
                        if not select.select([rsock], [], [], left)[0]:
                            break
                        data = rsock.recv(65535)
                        info = traffic.parse_payload(data)
                        if info is not None and info.stream == traffic.PROBE_STREAM:
                            return time.monotonic() - start
                    if time.monotonic() - start > timeout:
                        raise TimeoutError(
                            f"no probe to {recv_address or dest}:{port} reached "
                            f"{self.name(recv_ns)}:{recv_iface} within {timeout:g}s "
                            f"({seq} sent from {self.name(send_ns)}:{iface})"
                        )
            finally:
                ssock.close()
        finally:
            rsock.close()

    # -- teardown ---------------------------------------------------------

    def _kill_inside(self, name: str) -> None:
        """Stop every process still running inside namespace name."""
        res = self._exec(["ip", "netns", "pids", name], check=False)
        pids = [int(p) for p in res.stdout.split() if p.isdigit()]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = []
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                    alive.append(pid)
            if not alive:
                return
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                res = self._exec(["ip", "netns", "pids", name], check=False)
                pids = [int(p) for p in res.stdout.split() if p.isdigit()]
                if not pids:
                    return
                time.sleep(0.05)

    def cleanup(self) -> None:
        """Kill the lab's processes and delete all its namespaces; idempotent."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=3)
        self._procs.clear()
        errors = []
        for name in reversed(self._created):
            if not (NETNS_DIR / name).exists():
                continue
            self._kill_inside(name)
            res = self._exec(["ip", "netns", "del", name], check=False)
            if res.returncode != 0 and (NETNS_DIR / name).exists():
                errors.append(f"{name}: {res.stderr.strip()}")
        self._created.clear()
        self.links.clear()
        self._closed = True
        with _LIVE_LOCK:
            _LIVE.discard(self)
        if errors:
            raise LabError("could not delete namespaces: " + "; ".join(errors))

    # -- topologies -------------------------------------------------------

    @classmethod
    def standard(cls, *, rp_filter: int | None = 0, prefix: str | None = None) -> StandardLab:
        """Build the standard lab (see ``StandardLab``); cleaned up if building fails."""
        lab = StandardLab(prefix)
        try:
            lab.build(rp_filter=rp_filter)
        except BaseException:
            lab.cleanup()
            raise
        return lab


class StandardLab(Lab):
    """src -- router -- rcv1, rcv2, dual-stack, router forwarding.

    ===========  =======  =================  ======================
    namespace    iface    IPv4               IPv6
    ===========  =======  =================  ======================
    src          veth0    192.0.2.2/24       2001:db8:1::2/64
    router       up0      192.0.2.1/24       2001:db8:1::1/64
    router       dn1      198.51.100.1/24    2001:db8:11::1/64
    rcv1         veth0    198.51.100.2/24    2001:db8:11::2/64
    router       dn2      203.0.113.1/24     2001:db8:12::1/64
    rcv2         veth0    203.0.113.2/24     2001:db8:12::2/64
    ===========  =======  =================  ======================

    Hosts have default routes via the router. The router forwards IPv4 and
    IPv6 unicast; multicast forwarding is what mcrelayd adds.
    """

    ROLES = ("src", "router", "rcv1", "rcv2")

    def build(self, *, rp_filter: int | None = 0) -> None:
        """Create the namespaces, links, addresses, routes and sysctls."""
        self.add_ns(*self.ROLES)
        self.add_links(
            [
                LinkSpec("router", "up0", "src", HOST_IF, UP0_V4, SRC_V4, UP0_V6, SRC_V6),
                LinkSpec("router", "dn1", "rcv1", HOST_IF, DN1_V4, RCV1_V4, DN1_V6, RCV1_V6),
                LinkSpec("router", "dn2", "rcv2", HOST_IF, DN2_V4, RCV2_V4, DN2_V6, RCV2_V6),
            ]
        )
        for host, v4, v6 in (
            ("src", UP0_V4, UP0_V6),
            ("rcv1", DN1_V4, DN1_V6),
            ("rcv2", DN2_V4, DN2_V6),
        ):
            self.ip_batch(
                host,
                [
                    f"route add 0.0.0.0/0 via {_cidr_ip(v4)} dev {HOST_IF}",
                    f"route add ::/0 via {_cidr_ip(v6)} dev {HOST_IF}",
                ],
            )
        self.enable_forwarding("router")
        if rp_filter is not None:
            self.set_rp_filter("router", rp_filter)

    @property
    def src(self) -> str:
        """Full name of the source namespace."""
        return self.name("src")

    @property
    def router(self) -> str:
        """Full name of the router namespace (mcrelayd runs here)."""
        return self.name("router")

    @property
    def rcv1(self) -> str:
        """Full name of receiver 1's namespace (behind router dn1)."""
        return self.name("rcv1")

    @property
    def rcv2(self) -> str:
        """Full name of receiver 2's namespace (behind router dn2)."""
        return self.name("rcv2")


# --------------------------------------------------------------------------
# stale labs


def stale_namespaces() -> list[str]:
    """Lab namespaces whose creating process is gone (left by a crash/kill -9)."""
    stale: list[str] = []
    if not NETNS_DIR.is_dir():
        return stale
    for entry in sorted(NETNS_DIR.iterdir()):
        name = entry.name
        if not (name.startswith("mcl") and len(name) > PREFIX_LEN and name[PREFIX_LEN] == "-"):
            continue
        res = subprocess.run(
            ["ip", "-j", "-n", name, "link", "show", "lo"], capture_output=True, text=True
        )
        try:
            alias = json.loads(res.stdout)[0].get("ifalias", "")
        except (ValueError, IndexError):
            continue
        if not alias.startswith(MARKER):
            continue
        pid = alias[len(MARKER) :]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            stale.append(name)
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mcrelay.lab.netns [--cleanup-stale]``: list or remove stale labs."""
    args = list(sys.argv[1:] if argv is None else argv)
    stale = stale_namespaces()
    for name in stale:
        if "--cleanup-stale" in args:
            lab = Lab(prefix=name[: PREFIX_LEN + 1])
            lab._created.append(name)
            lab.cleanup()
            print(f"removed {name}")
        else:
            print(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
