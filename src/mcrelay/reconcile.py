"""Level-triggered convergence: every engine on the rules and the interfaces as they are now.

Nothing in the supervisor reacts to an interface *event*. Each engine
(kernel routes, memberships, relays) has a ``reconcile()`` that compares what
its rules want on today's interfaces with what it has installed and closes
the difference. The :class:`Reconciler` calls each one whenever the interface
table moved (its generation changed) and keeps calling a part that failed,
with a back-off, until it succeeds. So a lost, late or duplicated event can
never leave a rule broken, and a kernel step that fails because an interface
vanished mid-change is simply tried again on the next state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from .errors import McrelayError

RETRY_START = 0.1
RETRY_CAP = 2.0

log = logging.getLogger("mcrelay.reconcile")


@dataclass
class Part:
    """One engine's convergence and its retry state."""

    name: str
    converge: Callable[[], None]
    generation: int = -1  # interface generation it last converged at
    failing: str | None = None
    delay: float = 0.0
    retry_at: float = 0.0
    failures: int = 0


class Reconciler:
    """Runs each part's ``converge`` when interfaces moved or while it fails."""

    def __init__(self, parts: list[tuple[str, Callable[[], None]]]) -> None:
        self.parts = [Part(name, fn) for name, fn in parts]

    def run(self, now: float, generation: int) -> None:
        """Converge every part that is behind ``generation`` or due for a retry."""
        for part in self.parts:
            if part.failing is None and part.generation == generation:
                continue
            if part.failing is not None and now < part.retry_at and part.generation == generation:
                continue
            self._run(part, now, generation)

    def _run(self, part: Part, now: float, generation: int) -> None:
        try:
            part.converge()
        except (McrelayError, OSError) as exc:
            self._failed(part, now, generation, str(exc))
            return
        except Exception as exc:  # a bug: say where once, keep retrying
            if part.failing is None:
                log.exception("%s: reconciling failed", part.name)
            self._failed(part, now, generation, f"internal error: {exc}", quiet=True)
            return
        if part.failing is not None:
            log.info("%s: converged again after %d failed attempt(s)", part.name, part.failures)
        part.failing, part.delay, part.failures = None, 0.0, 0
        part.generation = generation

    @staticmethod
    def _failed(part: Part, now: float, generation: int, why: str, quiet: bool = False) -> None:
        if why != part.failing and not quiet:
            log.warning("%s: %s; retrying", part.name, why)
        part.failing = why
        part.failures += 1
        part.delay = min(RETRY_CAP, max(RETRY_START, part.delay * 2))
        part.retry_at = now + part.delay
        part.generation = generation

    def warnings(self) -> list[str]:
        """Parts that are not converged, for ``mcrelay status``."""
        return [
            f"{p.name}: not converged ({p.failures} attempt(s)): {p.failing}"
            for p in self.parts
            if p.failing is not None
        ]
