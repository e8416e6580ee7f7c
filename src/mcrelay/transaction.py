"""Undo logs: apply steps in order, and on failure undo the applied ones in reverse."""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import TracebackType

log = logging.getLogger("mcrelay.transaction")


class Transaction:
    """Collects undo actions while a change is applied.

    Used as a context manager: leaving the block with an exception runs every
    registered undo, newest first, and lets the exception propagate. An undo
    that fails itself is logged, not raised, so the others still run and the
    caller sees the original error.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._undo: list[tuple[str, Callable[[], object]]] = []

    def on_failure(self, description: str, undo: Callable[[], object]) -> None:
        self._undo.append((description, undo))

    def rollback(self) -> None:
        while self._undo:
            description, undo = self._undo.pop()
            try:
                undo()
            except Exception:
                log.exception("%s: rollback step failed: %s", self.what, description)

    def __enter__(self) -> Transaction:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            log.info("%s failed (%s); rolling back %d step(s)", self.what, exc, len(self._undo))
            self.rollback()
