"""docs/protocol.md against the code: every method, its access, every result field.

The reference drifted once (``group.list`` said ``users`` while the daemon
returned ``refs``; six counters were missing). Methods come from
``protocol.METHODS``. Result fields are read statically from the functions
that build the replies (the string keys of their dict literals, subscript
assignments and ``update(key=...)`` calls), listed in RESULT_SOURCES: a field
added there and not documented fails here, and so does a function that moved
(update the list).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from mcrelay.protocol import METHODS

TOP = Path(__file__).resolve().parents[2]
SRC = TOP / "src" / "mcrelay"
DOC = (TOP / "docs" / "protocol.md").read_text()

#: (module path under src/mcrelay, qualified function name) of each function
#: whose dict becomes (part of) a JSON-RPC result. A name ending in "?" may be
#: absent (code being moved between modules); the others must exist.
RESULT_SOURCES: tuple[tuple[str, str], ...] = (
    ("model.py", "Oif.to_dict"),
    ("model.py", "RouteKey.to_dict"),
    ("model.py", "Route.to_dict"),
    ("model.py", "RelayInput.to_dict"),
    ("model.py", "RelayOutput.to_dict"),
    ("model.py", "Relay.to_dict"),
    ("model.py", "GroupJoin.to_dict"),
    ("kernel/engine.py", "_route_dict"),
    ("kernel/engine.py", "LearnedSource.to_dict"),
    ("kernel/engine.py", "RouteStatus.to_dict"),
    ("kernel/engine.py", "RouteDiff.to_dict"),
    ("netlink.py", "Interface.to_dict"),
    ("membership.py", "Membership.list"),
    ("relay/manager.py", "RelayManager.relays"),
    ("relay/manager.py", "RelayManager.workers"),
    ("relay/pool.py", "WorkerPool.describe?"),
    ("relay/counters.py", "Counters.worker?"),
    ("relay/trace.py", "record"),
    ("supervisor.py", "Supervisor._status_extra"),
    ("supervisor.py", "Supervisor.reload"),
    ("supervisor.py", "Supervisor._reload_settings"),
    ("service.py", "*"),  # every method of the service: the replies themselves
)


def _functions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    out: dict[str, ast.FunctionDef] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            out[node.name] = node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    out[f"{node.name}.{item.name}"] = item
    return out


def _keys(func: ast.FunctionDef) -> set[str]:
    keys: set[str] = set()
    for node in ast.walk(func):
        if isinstance(node, ast.Dict):
            keys |= {k.value for k in node.keys if isinstance(k, ast.Constant)}
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                for t in target.elts if isinstance(target, ast.Tuple) else [target]:
                    if isinstance(t, ast.Subscript) and isinstance(t.slice, ast.Constant):
                        keys.add(t.slice.value)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "update"
        ):
            keys |= {kw.arg for kw in node.keywords if kw.arg}
    return {k for k in keys if isinstance(k, str) and re.fullmatch(r"[a-z][a-z0-9_]*", k)}


def result_fields() -> dict[str, set[str]]:
    """Field name -> where it is built."""
    found: dict[str, set[str]] = {}
    for rel, name in RESULT_SOURCES:
        path = SRC / rel
        optional = name.endswith("?")
        name = name.rstrip("?")
        if optional and not path.is_file():
            continue
        assert path.is_file(), f"{rel} is gone: update RESULT_SOURCES"
        funcs = _functions(ast.parse(path.read_text(), str(path)))
        if optional and name not in funcs:
            continue
        if name == "*":
            chosen = [f for q, f in funcs.items() if "." in q]
        else:
            assert name in funcs, f"{name} is not in {rel} any more: update RESULT_SOURCES"
            chosen = [funcs[name]]
        for func in chosen:
            for key in _keys(func):
                found.setdefault(key, set()).add(f"{rel}:{func.name}")
    return found


def documented(word: str) -> bool:
    """Named as code (`word`, or `a.word` in a path) or as a JSON key ("word")."""
    return bool(re.search(rf'`{word}`|"{word}"|`[\w.\[\]]*\.{word}`', DOC))


def headings() -> dict[str, str]:
    """Method name -> its heading line in the Methods section."""
    out = {}
    for line in re.findall(r"^### (.+)$", DOC, re.M):
        for name in re.findall(r"`([a-z]+\.[a-z]+)`", line):
            out[name] = line
    return out


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_has_a_section_with_its_access(method: str) -> None:
    heads = headings()
    assert method in heads, f"docs/protocol.md has no '### `{method}`' section"
    admin = "(admin)" in heads[method]
    assert admin == (METHODS[method].access == "admin"), heads[method]


def test_no_section_for_a_method_that_does_not_exist() -> None:
    assert set(headings()) <= set(METHODS)


def test_every_result_field_is_documented() -> None:
    fields = result_fields()
    assert len(fields) > 40  # the scan works
    missing = {k: sorted(v) for k, v in fields.items() if not documented(k)}
    assert missing == {}, f"result fields missing from docs/protocol.md: {missing}"


def test_drift_that_was_reported_is_fixed() -> None:
    assert "`users`" not in DOC and '"users"' not in DOC
    for word in ("refs", "input_drops", "traced", "received", "unmatched", "malformed"):
        assert documented(word), word
    assert documented("control_restarts")
