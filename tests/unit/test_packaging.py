"""The Debian package: build it from debian/, then look inside like dpkg and systemd would.

The build (packaging/deb.sh, dpkg-buildpackage in a copy of the tracked files)
needs Debian's build tools; `make deb` installs them. Without them the tests
that need the .deb are skipped, the static ones still run.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import mcrelay
from mcrelay import cli
from mcrelay.config import Settings, load_settings

TOP = Path(__file__).resolve().parents[2]
SRC = TOP / "src" / "mcrelay"
SITE = "usr/lib/python3/dist-packages"
NOT_SHIPPED = ("lab/", "demo.py")  # test tools: only for tests, bench and make demo

have_build_tools = (
    all(shutil.which(t) for t in ("dpkg-buildpackage", "dh", "dpkg-deb", "git"))
    and Path("/usr/share/dh-python/dhpython/build/plugin_pyproject.py").exists()
)
needs_deb = pytest.mark.skipif(not have_build_tools, reason="needs debhelper, dh-python (make deb)")


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deb")
    proc = subprocess.run(
        ["bash", str(TOP / "packaging" / "deb.sh"), "build", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path == out / f"mcrelay_{mcrelay.__version__}_all.deb"
    assert path.is_file()
    return path


@pytest.fixture(scope="module")
def extracted(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("root")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


@pytest.fixture(scope="module")
def control_dir(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    ctrl = tmp_path_factory.mktemp("DEBIAN")
    subprocess.run(["dpkg-deb", "-e", str(deb), str(ctrl)], check=True)
    return ctrl


def dpkg(*args: str) -> str:
    return subprocess.run(["dpkg-deb", *args], capture_output=True, text=True, check=True).stdout


def split_list(value: str) -> list[str]:
    return [d.strip() for d in value.split(",")]


# ---------------------------------------------------------------- static (no build)


def test_changelog_version_is_the_package_version() -> None:
    first = (TOP / "debian" / "changelog").read_text().splitlines()[0]
    assert first.startswith(f"mcrelay ({mcrelay.__version__}) ")


def test_no_runtime_module_imports_the_lab_or_the_demo() -> None:
    """The .deb leaves them out, so an import of them would crash the daemon there."""
    offenders = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith(NOT_SHIPPED):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = "." * node.level + (node.module or "")
                names = [base] + [f"{base}.{a.name}".replace("..", ".") for a in node.names]
            for name in names:
                if re.search(r"(^|\.)(lab|demo)(\.|$)", name):
                    offenders.append(f"{rel}: {name}")
    assert offenders == []


# ---------------------------------------------------------------- the .deb


@needs_deb
def test_control_fields(deb: Path) -> None:
    info = dpkg("-I", str(deb))
    fields = dict(
        (m.group(1), m.group(2)) for m in re.finditer(r"^ (\S+): (.*)$", info, re.MULTILINE)
    )
    assert fields["Package"] == "mcrelay"
    assert fields["Version"] == mcrelay.__version__
    assert fields["Architecture"] == "all"
    assert fields["Section"] == "net"
    depends = split_list(fields["Depends"])
    assert "python3-pyroute2" in depends
    assert "python3:any (>= 3.11~)" in depends  # tomllib
    assert "systemd | systemd-standalone-sysusers" in depends  # postinst runs systemd-sysusers
    recommends = split_list(fields["Recommends"])
    # Metrics are served with the standard library: nothing to Recommend for them.
    assert "python3-prometheus-client" not in recommends and "socat" in recommends
    # Each of these owns the kernel's one mroute socket, as mcrelayd does.
    assert set(split_list(fields["Conflicts"])) >= {"smcroute", "pimd", "mrouted"}
    assert int(fields["Installed-Size"]) > 0


@needs_deb
def test_contents_and_ownership(deb: Path) -> None:
    entries = {}
    for line in dpkg("-c", str(deb)).splitlines():
        perms, owner, *_rest = line.split()
        entries[line.split()[5]] = (perms, owner)
    assert all(owner == "root/root" for _, owner in entries.values())
    expected = {
        "./usr/sbin/mcrelayd": "-rwxr-xr-x",
        "./usr/bin/mcrelay": "-rwxr-xr-x",
        "./lib/systemd/system/mcrelay.service": "-rw-r--r--",
        "./lib/systemd/system/mcrelay@.service": "-rw-r--r--",
        "./usr/lib/sysusers.d/mcrelay.conf": "-rw-r--r--",
        "./etc/mcrelay/mcrelay.toml": "-rw-r--r--",
        "./usr/share/man/man8/mcrelay.8.gz": "-rw-r--r--",
        "./usr/share/man/man8/mcrelayd.8.gz": "-rw-r--r--",
        "./usr/share/man/man5/mcrelay.toml.5.gz": "-rw-r--r--",
        "./usr/share/bash-completion/completions/mcrelay": "-rw-r--r--",
        "./usr/share/zsh/vendor-completions/_mcrelay": "-rw-r--r--",
        "./usr/share/doc/mcrelay/copyright": "-rw-r--r--",
        "./usr/share/doc/mcrelay/changelog.gz": "-rw-r--r--",
    }
    for name, perms in expected.items():
        assert entries.get(name, ("missing",))[0] == perms, name
    assert "./usr/bin/mcrelayd" not in entries  # the daemon is in sbin only
    docs = {n.rsplit("/", 1)[1] for n in entries if n.startswith("./usr/share/doc/mcrelay/")}
    for doc in ("README.md", "protocol.md", "cli.md", "settings.md", "troubleshooting.md"):
        assert doc in docs or f"{doc}.gz" in docs, doc

    pkg = f"./{SITE}/mcrelay/"
    src_modules = {
        p.relative_to(SRC).as_posix()
        for p in SRC.rglob("*.py")
        if "__pycache__" not in p.parts
        and not p.relative_to(SRC).as_posix().startswith(NOT_SHIPPED)
    }
    shipped = {n[len(pkg) :] for n in entries if n.startswith(pkg) and n.endswith(".py")}
    assert shipped == src_modules, (
        f"only in src: {sorted(src_modules - shipped)}; "
        f"only in .deb: {sorted(shipped - src_modules)}"
    )
    assert not any(n.startswith(pkg + "lab") or n == pkg + "demo.py" for n in entries)
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in entries)


@needs_deb
def test_conffile_makes_the_children_drop_to_the_mcrelay_user(
    extracted: Path, control_dir: Path
) -> None:
    assert (control_dir / "conffiles").read_text().split() == ["/etc/mcrelay/mcrelay.toml"]
    conf = extracted / "etc/mcrelay/mcrelay.toml"
    settings = load_settings(str(conf), {})
    assert settings.user == "mcrelay"
    # Everything else is the built-in default.
    expected = Settings(user="mcrelay").to_dict()
    assert settings.to_dict() == expected
    sysusers = (extracted / "usr/lib/sysusers.d/mcrelay.conf").read_text()
    lines = [ln.split() for ln in sysusers.splitlines() if ln and not ln.startswith("#")]
    assert lines and lines[0][:3] == ["u", "mcrelay", "-"]
    assert lines[0][-1] == "/usr/sbin/nologin"


@needs_deb
def test_wrappers_match_entry_points(extracted: Path) -> None:
    with open(TOP / "pyproject.toml", "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    places = {"mcrelayd": "usr/sbin", "mcrelay": "usr/bin"}
    assert set(scripts) == set(places)
    for name, target in scripts.items():
        module, _, func = target.partition(":")
        text = (extracted / places[name] / name).read_text()
        # -I: a root daemon must not pick up PYTHONPATH or a user site directory.
        assert text.startswith("#!/usr/bin/python3 -I\n")
        assert f"from {module} import {func}" in text


@needs_deb
def test_every_shipped_module_imports_without_the_lab(extracted: Path) -> None:
    pkg = extracted / SITE
    modules = sorted(
        "mcrelay." + p.relative_to(pkg / "mcrelay").with_suffix("").as_posix().replace("/", ".")
        for p in (pkg / "mcrelay").rglob("*.py")
    )
    code = (
        "import importlib, sys; sys.path.insert(0, sys.argv[1]); "
        "[importlib.import_module(m.removesuffix('.__init__')) for m in sys.argv[2:]]; "
        "import mcrelay; print(mcrelay.__file__)"
    )
    proc = subprocess.run(
        [sys.executable, "-I", "-c", code, str(pkg), *modules],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(pkg / "mcrelay" / "__init__.py")


@needs_deb
def test_maintainer_scripts(control_dir: Path) -> None:
    for script in ("postinst", "prerm", "postrm"):
        path = control_dir / script
        assert path.stat().st_mode & 0o111 == 0o111
        subprocess.run(["sh", "-n", str(path)], check=True)  # syntax
    postinst = (control_dir / "postinst").read_text()
    assert "systemd-sysusers" in postinst and "mcrelay.conf" in postinst
    assert "deb-systemd-helper enable 'mcrelay.service'" in postinst
    postrm = (control_dir / "postrm").read_text()
    # /var/lib/mcrelay is removed on purge only.
    purge = postrm.split('if [ "$1" = "purge" ]; then', 1)[1].split("fi", 1)[0]
    assert "rm -rf /var/lib/mcrelay" in purge
    code = "\n".join(ln for ln in postrm.splitlines() if not ln.lstrip().startswith("#"))
    assert code.count("/var/lib/mcrelay") == 1  # not on plain remove or upgrade


@needs_deb
def test_man_pages_cover_every_command(extracted: Path, tmp_path: Path) -> None:
    man = extracted / "usr/share/man"
    pages = {
        "mcrelay": man / "man8/mcrelay.8.gz",
        "mcrelayd": man / "man8/mcrelayd.8.gz",
        "mcrelay.toml": man / "man5/mcrelay.toml.5.gz",
    }
    import gzip

    texts = {name: gzip.decompress(p.read_bytes()).decode() for name, p in pages.items()}
    assert re.search(r"^\.SH NAME\nmcrelay \\- \S", texts["mcrelay"], re.M)
    # Every leaf command of the parser has its own subsection.
    parser = cli.build_parser()
    leaves = _leaf_commands(parser, "mcrelay")
    assert leaves
    for name in leaves:
        assert f'.SS "{name}"' in texts["mcrelay"], name
    for key in Settings().to_dict():
        assert f"\\fB{key}\\fR = " in texts["mcrelay.toml"], key
    if shutil.which("man") is None:
        return
    for name, page in pages.items():
        proc = subprocess.run(
            ["man", "--warnings", "-l", str(page)],
            capture_output=True,
            text=True,
            check=False,
            env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"},
        )
        assert proc.returncode == 0 and proc.stderr == "", (name, proc.stderr)
        assert "SEE ALSO" in proc.stdout


def _leaf_commands(parser: object, name: str) -> list[str]:
    import argparse

    assert isinstance(parser, argparse.ArgumentParser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            out: list[str] = []
            for sub_name, sub in action.choices.items():
                out += _leaf_commands(sub, f"{name} {sub_name}")
            return out
    return [name]


def bash_complete(script: Path, line: str) -> list[str]:
    """What bash offers for ``line`` (words so far, a trailing space: a new word)."""
    driver = (
        'source "$1"; read -ra COMP_WORDS <<< "$2"; [[ "$2" == *" " ]] && COMP_WORDS+=("");'
        " COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); COMP_LINE=$2; COMP_POINT=${#2};"
        ' _shtab_mcrelay mcrelay "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}";'
        ' printf "%s\\n" "${COMPREPLY[@]}"'
    )
    out = subprocess.run(
        ["bash", "-c", driver, "complete", str(script), line],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [w for w in out.splitlines() if w]


@needs_deb
def test_completions(extracted: Path) -> None:
    script = extracted / "usr/share/bash-completion/completions/mcrelay"
    bash = script.read_text()
    subprocess.run(["bash", "-n", "-c", bash], check=True)
    assert re.search(r"^complete .*\bmcrelay$", bash, re.M)
    subs = _subcommands(cli.build_parser())
    assert bash_complete(script, "mcrelay ") == list(subs)
    # Every choice, not only the first (shtab 1.5 offered only "add" here).
    assert bash_complete(script, "mcrelay route ") == list(_subcommands(subs["route"]))
    assert bash_complete(script, "mcrelay -o ") == ["table", "json"]
    assert "--dry-run" in bash_complete(script, "mcrelay route add --")
    zsh = (extracted / "usr/share/zsh/vendor-completions/_mcrelay").read_text()
    assert zsh.startswith("#compdef mcrelay")
    assert "route" in zsh and "--dry-run" in zsh


def _subcommands(parser: object) -> dict[str, object]:
    import argparse

    assert isinstance(parser, argparse.ArgumentParser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


@needs_deb
def test_the_template_unit_runs_named_instances_on_their_own_socket_and_state(
    extracted: Path,
) -> None:
    unit = (extracted / "lib/systemd/system/mcrelay@.service").read_text()
    assert unit == (TOP / "packaging" / "mcrelay@.service").read_text()
    (start,) = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    assert start == (
        "ExecStart=/usr/sbin/mcrelayd --config /etc/mcrelay/%i.toml "
        "--socket /run/mcrelay/%i.sock --state /var/lib/mcrelay/%i.json"
    )
    assert "Environment=MCRELAY_SOCKET=/run/mcrelay/%i.sock" in unit
    assert "RuntimeDirectoryPreserve=yes" in unit


@needs_deb
def test_unit_file(extracted: Path, tmp_path: Path) -> None:
    unit = (extracted / "lib/systemd/system/mcrelay.service").read_text()
    assert unit == (TOP / "packaging" / "mcrelay.service").read_text()
    settings: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    assert settings["Type"] == ["notify"]
    assert settings["ExecStart"] == ["/usr/sbin/mcrelayd"]
    assert (extracted / "usr/sbin/mcrelayd").is_file()
    # A reload that answers when done (not an asynchronous SIGHUP), by the packaged CLI.
    assert settings["ExecReload"] == ["/usr/bin/mcrelay reload"]
    assert (extracted / "usr/bin/mcrelay").is_file()
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
    for ref in settings["Documentation"][0].split():
        page = re.fullmatch(r"man:([\w.]+)\((\d)\)", ref)
        assert page, ref
        assert (extracted / f"usr/share/man/man{page[2]}/{page[1]}.{page[2]}.gz").is_file(), ref

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return  # the static checks above still ran
    # verify insists ExecStart and ExecReload exist: point them at the .deb's extracted ones.
    local = tmp_path / "mcrelay.service"
    local.write_text(
        unit.replace(
            "ExecStart=/usr/sbin/mcrelayd", f"ExecStart={extracted}/usr/sbin/mcrelayd"
        ).replace("ExecReload=/usr/bin/mcrelay", f"ExecReload={extracted}/usr/bin/mcrelay")
    )
    proc = subprocess.run(
        # The man pages are in the extracted tree (checked above), not installed here.
        [analyze, "verify", "--man=no", str(local)],
        capture_output=True,
        text=True,
        check=False,
    )
    # Unknown keys and bad values are only warnings (exit 0): any output is a failure.
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
