"""Build the benchmark's C traffic tools (bench/c/mcgen.c, bench/c/mcsink.c) with gcc.

The generator and the sink are C so that the relay, not the traffic tools, is
what the benchmark measures. They are compiled at bench time into a build
directory (default: a fresh temporary directory) and never installed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

C_DIR = Path(__file__).resolve().parent / "c"
TOOLS = ("mcgen", "mcsink")
CFLAGS = ("-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11")


class BuildError(Exception):
    """gcc is missing or a tool did not compile; the message carries gcc's output."""


def build(outdir: str | Path) -> dict[str, Path]:
    """Compile every tool into ``outdir``; return {name: executable path}."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise BuildError("gcc not found (Debian: apt-get install gcc libc6-dev)")
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    built: dict[str, Path] = {}
    for name in TOOLS:
        exe = out / name
        res = subprocess.run(
            [cc, *CFLAGS, "-o", str(exe), str(C_DIR / f"{name}.c")],
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            raise BuildError(f"{name}.c did not compile:\n{res.stderr}")
        built[name] = exe
    return built
