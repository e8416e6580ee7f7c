"""The Debian package: build it, then look inside like dpkg and systemd would."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import mcrelay

TOP = Path(__file__).resolve().parents[2]
PACKAGING = TOP / "packaging"

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deb")
    proc = subprocess.run(
        ["bash", str(PACKAGING / "build-deb.sh"), str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path == out / f"mcrelay_{mcrelay.__version__}_all.deb"
    assert path.is_file()
    return path


@pytest.fixture(scope="module")
def extracted(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("root")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


def dpkg(*args: str) -> str:
    return subprocess.run(["dpkg-deb", *args], capture_output=True, text=True, check=True).stdout


def test_control_fields(deb: Path) -> None:
    info = dpkg("-I", str(deb))
    fields = dict(
        (m.group(1), m.group(2)) for m in re.finditer(r"^ (\S+): (.*)$", info, re.MULTILINE)
    )
    assert fields["Package"] == "mcrelay"
    assert fields["Version"] == mcrelay.__version__
    assert fields["Architecture"] == "all"
    depends = [d.strip() for d in fields["Depends"].split(",")]
    assert "python3 (>= 3.11)" in depends
    assert "python3-pyroute2" in depends
    assert "adduser" in depends  # postinst runs addgroup
    assert fields["Recommends"] == "socat"
    assert int(fields["Installed-Size"]) > 0
    for script in ("postinst", "prerm", "postrm", "md5sums"):
        assert re.search(rf"\s{script}\s", info), script


def test_contents_and_ownership(deb: Path) -> None:
    listing = dpkg("-c", str(deb))
    entries = {}
    for line in listing.splitlines():
        perms, owner, *_rest = line.split()
        name = line.split()[-1]
        entries[name] = (perms, owner)
    assert all(owner == "root/root" for _, owner in entries.values())
    expected = {
        "./usr/bin/mcrelayd": "-rwxr-xr-x",
        "./usr/bin/mcrelay": "-rwxr-xr-x",
        "./lib/systemd/system/mcrelay.service": "-rw-r--r--",
        "./usr/share/doc/mcrelay/examples/mcrelay.toml": "-rw-r--r--",
        "./usr/share/doc/mcrelay/copyright": "-rw-r--r--",
    }
    for name, perms in expected.items():
        assert entries.get(name, ("missing",))[0] == perms, name
    pkg = "./usr/lib/python3/dist-packages/mcrelay/"
    src_files = {
        p.relative_to(TOP / "src" / "mcrelay").as_posix()
        for p in (TOP / "src" / "mcrelay").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }
    shipped = {n[len(pkg) :] for n in entries if n.startswith(pkg) and not n.endswith("/")}
    assert shipped == src_files, (
        f"only in src: {sorted(src_files - shipped)}; only in .deb: {sorted(shipped - src_files)}"
    )
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in entries)
    assert not any(n.startswith("./etc/") for n in entries)  # no conffile: defaults work


def test_wrappers_match_entry_points(extracted: Path) -> None:
    with open(TOP / "pyproject.toml", "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert set(scripts) >= {"mcrelayd", "mcrelay"}
    for name, target in scripts.items():
        module, _, func = target.partition(":")
        text = (extracted / "usr" / "bin" / name).read_text()
        assert text.startswith("#!/usr/bin/python3 -I\n")
        assert f"from {module} import {func}\n" in text
        rel = module.replace(".", "/")
        pkg = extracted / "usr/lib/python3/dist-packages"
        assert (pkg / f"{rel}.py").is_file() or (pkg / rel / "__init__.py").is_file()


def test_shipped_package_compiles_and_imports(extracted: Path) -> None:
    pkg = extracted / "usr/lib/python3/dist-packages"
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(pkg)], check=True)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "import mcrelay, mcrelay.config, mcrelay.state, mcrelay.sdnotify, mcrelay.privileges; "
        "print(mcrelay.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", code, str(pkg)], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == str(pkg / "mcrelay" / "__init__.py")


def test_maintainer_scripts(extracted: Path, deb: Path, tmp_path: Path) -> None:
    ctrl = tmp_path / "DEBIAN"
    subprocess.run(["dpkg-deb", "-e", str(deb), str(ctrl)], check=True)
    for script in ("postinst", "prerm", "postrm"):
        path = ctrl / script
        assert path.stat().st_mode & 0o111 == 0o111
        subprocess.run(["sh", "-n", str(path)], check=True)  # syntax
    postinst = (ctrl / "postinst").read_text()
    assert "addgroup --system" in postinst and "mcrelay" in postinst
    assert "install -d -m 0750" in postinst and "/var/lib/mcrelay" in postinst
    postrm = (ctrl / "postrm").read_text()
    # /var/lib/mcrelay is removed in the purge branch only.
    purge = postrm.split("purge)", 1)[1].split(";;", 1)[0]
    assert "rm -rf /var/lib/mcrelay" in purge
    before_purge = postrm.split("set -e", 1)[1].split("purge)", 1)[0]
    assert "/var/lib/mcrelay" not in before_purge  # not on plain remove or upgrade


def test_unit_file(extracted: Path, tmp_path: Path) -> None:
    unit = (extracted / "lib/systemd/system/mcrelay.service").read_text()
    settings: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    assert settings["Type"] == ["notify"]
    assert settings["ExecStart"] == ["/usr/bin/mcrelayd"]
    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert settings["Restart"] == ["on-failure"]
    assert settings["WatchdogSec"] == ["30s"]
    for directory in ("RuntimeDirectory", "StateDirectory", "ConfigurationDirectory"):
        assert settings[directory] == ["mcrelay"]
    needed = {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_SETUID", "CAP_SETGID", "CAP_CHOWN"}
    assert needed <= set(settings["CapabilityBoundingSet"][0].split())
    assert needed <= set(settings["AmbientCapabilities"][0].split())
    families = set(settings["RestrictAddressFamilies"][0].split())
    assert {"AF_NETLINK", "AF_PACKET", "AF_INET", "AF_INET6", "AF_UNIX"} <= families
    # Hardening must not take away what a multicast router needs.
    assert "PrivateNetwork" not in settings
    assert "MemoryDenyWriteExecute" not in settings  # ctypes callbacks
    assert "RestrictNamespaces" not in settings or settings["RestrictNamespaces"] == ["yes"]

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return  # the static checks above still ran
    # verify insists ExecStart exists: point it at the wrapper extracted from the .deb.
    local = tmp_path / "mcrelay.service"
    local.write_text(
        unit.replace("ExecStart=/usr/bin/mcrelayd", f"ExecStart={extracted}/usr/bin/mcrelayd")
    )
    proc = subprocess.run(
        [analyze, "verify", str(local)], capture_output=True, text=True, check=False
    )
    # Unknown keys and bad values are only warnings (exit 0): any output is a failure.
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
