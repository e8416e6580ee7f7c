"""The docs site and the generated pages stay in step with the code."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]


def test_settings_page_is_what_the_generator_writes() -> None:
    """docs/settings.md comes from config.py and packaging/mcrelay.toml (make docs)."""
    proc = subprocess.run(
        [sys.executable, str(TOP / "packaging" / "docgen.py"), "settings-md"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(TOP / "src")},
    )
    assert proc.stdout == (TOP / "docs" / "settings.md").read_text(), "run make docs"


def test_every_page_is_in_the_site_and_every_link_resolves() -> None:
    mkdocs = (TOP / "mkdocs.yml").read_text()
    nav = set(re.findall(r"^  - [^:]+: (\S+\.md)$", mkdocs, re.M))
    pages = {p.name for p in (TOP / "docs").glob("*.md")}
    assert nav == pages
    for page in pages:
        text = (TOP / "docs" / page).read_text()
        for target in re.findall(r"\]\(([\w-]+\.md)(?:#[\w-]+)?\)", text):
            assert target in pages, f"{page} links to {target}"


def test_troubleshooting_covers_the_usual_causes() -> None:
    text = (TOP / "docs" / "troubleshooting.md").read_text().lower()
    for topic in ("rp_filter", "ttl", "vif table", "querier", "mroute socket"):
        assert topic in text, topic
