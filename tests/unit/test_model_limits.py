"""Rule-set size limits: as many explicit joins as relays may hold, and a clear error past it."""

from __future__ import annotations

import pytest

from mcrelay.errors import InvalidParams
from mcrelay.model import MAX_GROUPS, MAX_RELAYS, parse_ruleset


def joins(n: int) -> list[dict[str, str]]:
    return [{"iface": "up0", "group": f"239.100.{i // 250}.{i % 250 + 1}"} for i in range(n)]


def test_ten_thousand_joins_are_accepted() -> None:
    rules = parse_ruleset({"routes": [], "relays": [], "groups": joins(10000)})
    assert len(rules.groups) == 10000
    assert MAX_GROUPS == MAX_RELAYS  # each relay joins its group: explicit joins may match


def test_one_join_too_many_names_the_field_and_the_limit() -> None:
    with pytest.raises(InvalidParams, match=rf"groups: at most {MAX_GROUPS} entries"):
        parse_ruleset({"routes": [], "relays": [], "groups": joins(MAX_GROUPS + 1)})
