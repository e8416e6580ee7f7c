"""smcroute.conf syntax and rule files: what an smcroute user's file becomes, and back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mcrelay import daemon, rulefiles, smcroute_conf
from mcrelay.errors import ConfigError
from mcrelay.model import GroupJoin, Oif, Route

SAMPLE = """\
# an smcroute.conf as users have it
phyint eth0 enable
phyint eth2 ttl-threshold 4 mrdisc
mgroup from eth0 group 225.1.2.3
ssmgroup from eth0 group 232.1.1.1 source 192.0.2.9
mgroup from eth1 source 192.0.2.0/30 group 225.3.0.0/31   # a range: 8 joins
mroute from eth0 group 225.1.2.3 to eth1 eth2
mroute from eth0 source 192.0.2.10 group 225.1.2.3 to eth2
mroute from eth0 source 10.0.0.0/8 group 225.4.0.0/16 to vlan+
mroute from eth0 source 192.0.2.66 group 225.1.2.3
include conf.d/*.conf
"""


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "extra.conf").write_text("mroute from eth9 group 239.9.9.9 to eth1\n")
    path = tmp_path / "smcroute.conf"
    path.write_text(SAMPLE)
    return path


def test_an_smcroute_conf_becomes_routes_joins_and_mrdisc(conf: Path) -> None:
    parsed = smcroute_conf.parse(str(conf))
    assert Route("eth0", None, "225.1.2.3", (Oif("eth1"), Oif("eth2", 4))) in parsed.routes
    assert Route("eth0", "192.0.2.10", "225.1.2.3", (Oif("eth2", 4),)) in parsed.routes
    assert Route("eth0", "10.0.0.0/8", "225.4.0.0/16", (Oif("vlan+"),)) in parsed.routes
    assert Route("eth0", "192.0.2.66", "225.1.2.3", ()) in parsed.routes, "no 'to': a stop filter"
    assert Route("eth9", None, "239.9.9.9", (Oif("eth1"),)) in parsed.routes, "from the include"
    assert GroupJoin("eth0", "232.1.1.1", "192.0.2.9") in parsed.groups
    assert len(GroupJoin("eth1", "225.3.0.0/31", "192.0.2.0/30").expand()) == 8
    assert parsed.mrdisc == ["eth2"]
    assert parsed.origins[Route("eth0", None, "225.1.2.3", ()).key] == f"{conf}:7"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            "mroute from eth0 group 10.1.1.1 to eth1",
            ":2: mroute: route.group: 10.1.1.1 is not multicast",
        ),
        ("mroute eth0 group 225.1.1.1", ":2: mroute: unexpected 'eth0'"),
        ("mroute from eth0 to eth1", ":2: mroute: needs 'from IFNAME' and 'group GROUP'"),
        (
            "mgroup from eth0 group 225.0.0.0/8",
            ":2: mgroup: group.group: 225.0.0.0/8 is 16777216 joins",
        ),
        ("phyint eth0 ttl-threshold 0", ":2: phyint: ttl-threshold must be 1-255"),
        ("route add eth0 225.1.1.1 eth1", ":2: unknown statement 'route'"),
        ("mroute from eth0 group 225.1.2.3 to eth1", ":2: mroute: duplicate"),
    ],
)
def test_errors_name_the_file_the_line_and_the_field(
    tmp_path: Path, line: str, expected: str
) -> None:
    path = tmp_path / "bad.conf"
    path.write_text(f"mroute from eth0 group 225.1.2.3 to eth2\n{line}\n")
    with pytest.raises(ConfigError) as err:
        smcroute_conf.parse(str(path))
    assert f"{path}{expected}" in str(err.value)


def test_export_as_smcroute_reads_back_as_the_same_rules(conf: Path, tmp_path: Path) -> None:
    parsed = smcroute_conf.parse(str(conf))
    export = {
        "routes": [r.to_dict() for r in parsed.routes],
        "groups": [g.to_dict() for g in parsed.groups],
        "relays": [{"name": "tv"}],
    }
    text = smcroute_conf.format_rules(export)
    assert "# relay tv: relays have no smcroute.conf form" in text
    again = tmp_path / "again.conf"
    again.write_text(text)
    back = smcroute_conf.parse(str(again))
    assert sorted(map(str, back.routes)) == sorted(map(str, parsed.routes))
    assert set(back.groups) == set(parsed.groups)


def test_rule_files_mix_our_json_with_smcroute_syntax_and_refuse_a_rule_twice(
    tmp_path: Path,
) -> None:
    (tmp_path / "a.conf").write_text("mroute from eth0 group 225.1.2.3 to eth1\n")
    (tmp_path / "b.json").write_text(
        json.dumps({"routes": [{"iif": "eth0", "group": "225.7.7.7", "oifs": ["eth1"]}]})
    )
    files = rulefiles.load([str(tmp_path / "*")])
    assert [r.group for r in files.rules.routes] == ["225.1.2.3", "225.7.7.7"]
    assert files.files == (str(tmp_path / "a.conf"), str(tmp_path / "b.json"))
    (tmp_path / "c.conf").write_text("\n\nmroute from eth0 group 225.1.2.3 to eth2\n")
    with pytest.raises(ConfigError, match=r"c\.conf:3: .* is also in .*a\.conf:1"):
        rulefiles.load([str(tmp_path / "*")])


def test_mcrelayd_check_validates_offline_and_names_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = tmp_path / "rules.conf"
    rules.write_text("mroute from eth0 group 225.1.2.3 to eth1\n")
    cfg = tmp_path / "mcrelay.toml"
    cfg.write_text(f'rules = ["{rules}"]\n')
    assert daemon.main(["--config", str(cfg), "--check"]) == 0
    assert "1 route(s)" in capsys.readouterr().out
    rules.write_text("mroute from eth0 group 225.1.2.3 to eth1\nmroute from eth0 group 1.2.3.4\n")
    assert daemon.main(["--config", str(cfg), "--check"]) == 1
    assert f"{rules}:2: mroute: route.group: 1.2.3.4 is not multicast" in capsys.readouterr().err
