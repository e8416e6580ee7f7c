"""`mcrelay relay add NAME --reflect ...`: what the CLI sends, and what it refuses locally."""

from __future__ import annotations

from typing import Any

import pytest
from fake_daemon import FakeDaemon
from test_cli import Mcrelay, daemon, mcrelay  # noqa: F401  (fixtures)

from mcrelay.model import parse_relay


def _params(fake: FakeDaemon) -> dict[str, Any]:
    (req,) = [r for r in fake.requests if r["method"] == "relay.add"]
    return req["params"]  # type: ignore[no-any-return]


def _accept(params: dict[str, Any]) -> dict[str, Any]:
    """As the daemon would: validate (protocol.py takes dry_run off first) and echo."""
    rule = {k: v for k, v in params.items() if k != "dry_run"}
    return {"relay": parse_relay(rule).to_dict(), "dry_run": params["dry_run"]}


def test_reflect_options_become_one_relay_add_the_daemon_accepts(
    mcrelay: Mcrelay,  # noqa: F811
    daemon: FakeDaemon,  # noqa: F811
) -> None:
    daemon.replies["relay.add"] = _accept
    run = mcrelay(
        "relay", "add", "disc", "--reflect", "ssdp", "--on", "lan,iot", "--on", "media",
        "--listen-only", "guest", "--source", "own", "--allow", "10.0.0.0/8,192.0.2.0/24",
    )  # fmt: skip
    assert run.code == 0, run.err
    params = _params(daemon)
    assert params["reflect"] == {
        "proto": "ssdp",
        "on": ["lan", "iot", "media"],
        "listen_only": ["guest"],
        "source": "own",
        "allow": ["10.0.0.0/8", "192.0.2.0/24"],
    }
    assert run.out.strip() == (
        "added relay disc: reflect ssdp on lan,iot,media listen-only guest src=own "
        "allow 10.0.0.0/8,192.0.2.0/24"
    )


def test_broadcast_and_group_spellings(mcrelay: Mcrelay, daemon: FakeDaemon) -> None:  # noqa: F811
    daemon.replies["relay.add"] = _accept
    assert mcrelay("relay", "add", "nb", "--reflect", "broadcast:137", "--on", "a,b").code == 0
    assert _params(daemon)["reflect"]["group"] == "255.255.255.255"


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--reflect", "mdns"], "--reflect needs --on"),
        (["--reflect", "mdns", "--on", "a,b", "--in", "224.0.0.251:5353@a"], "replaces --in"),
        (["--on", "a,b", "--in", "239.1.1.1:5000@a", "--out", "239.1.1.2:5000@b"], "--reflect"),
        (["--reflect", "mdns", "--on", "a,b", "--source", "10.0.0.1"], "keep or own"),
        (["--reflect", "bonjour", "--on", "a,b"], "unknown preset"),
    ],
)
def test_refused_before_anything_is_sent(
    mcrelay: Mcrelay,  # noqa: F811
    daemon: FakeDaemon,  # noqa: F811
    argv: list[str],
    words: str,
) -> None:
    run = mcrelay("relay", "add", "disc", *argv)
    assert run.code == 1 and words in run.err, run.err
    assert [r for r in daemon.requests if r["method"] == "relay.add"] == []


def test_show_relays_filters_find_reflectors_by_member_and_group() -> None:
    from mcrelay import cli_format as fmt

    row = {"name": "disc", "reflect": {"proto": "mdns", "on": ["lan", "iot"],
           "listen_only": ["guest"]}}  # fmt: skip
    plain = {"name": "tv", "input": {"iif": "up0", "group": "239.1.1.1", "port": 5000},
             "outputs": [{"address": "239.2.2.2", "port": 5000, "oif": "lan"}]}  # fmt: skip

    def names(*words: str) -> list[str]:
        terms = fmt.parse_filter("relays", list(words))
        return [r["name"] for r in fmt.select("relays", [row, plain], terms)]

    assert names("iif", "guest") == ["disc"]
    assert names("oif", "lan") == ["disc", "tv"]
    assert names("oif", "guest") == []
    assert names("group", "224.0.0.0/24") == ["disc"]
