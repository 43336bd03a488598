"""Stage timing with the USDT stage markers, written once: `with stage("encode", rep):`.

Convention (probes/stages.c reads it): sys.audit("balloon-lab:<stage>:b") when a stage
begins and sys.audit("balloon-lab:<stage>:e") when it ends, in the same thread, once
per batch (never per page); where one stage ends exactly where the next begins,
sys.audit("balloon-lab:<next>:n") ends the one and begins the other (`chain`). <stage>
is 1-15 characters of [a-z0-9_-]. Python fires the `python:audit` USDT marker only
while a probe is attached (USDT semaphore), so an unprobed marker costs a function
call; a probed one a uprobe trap, the dearest event the lab probes (the probes measure
it: probes/costs.py), hence one marker per boundary.

`stage(name, into, field)` fires the begin marker, reads the clock, runs the block,
reads the clock, fires the end marker and adds the ns between the two clock reads to
`into.<field>` (default "<name>_ns"): exactly what the hand-written pairs did, markers
outside the timer. The end marker fires and the time is added also when the block
raises, so the probe never sees a stage left open. The cost against the hand-written
pair is measured by benchmarks/stage_marker_cost.py.

`chain()` times consecutive stages with one marker per boundary:

    with chain() as c:
        c.next("encode", rep)               # balloon-lab:encode:b
        ...
        c.next("transmit", rep, "wait_ns")  # balloon-lab:transmit:n (encode ends, transmit begins)
        ...
        c.end()                             # balloon-lab:transmit:e (else on leaving the block)
"""
from __future__ import annotations

import re
import sys
import time
from typing import Any

PREFIX = "balloon-lab:"
NAME_MAX = 15
_NAME_RE = re.compile(r"[a-z0-9_-]{1,%d}" % NAME_MAX)
assert len(PREFIX) == 12, "stages.c compares the prefix as 8 + 4 bytes"

_now = time.perf_counter_ns
_audit = sys.audit
_events: dict[tuple[str, str | None], tuple[str, str, str, str]] = {}   # (name, field) -> (begin, end, field, next)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"stage name {name!r}: must be 1-{NAME_MAX} chars of [a-z0-9_-]")
    return name


def event(name: str, phase: str) -> str:
    """The audit event name for stage `name`, phase 'b' (begin), 'e' (end) or 'n' (next:
    the open stage ends and this one begins)."""
    if phase not in ("b", "e", "n"):
        raise ValueError(f"phase {phase!r}: must be 'b', 'e' or 'n'")
    return f"{PREFIX}{check_name(name)}:{phase}"


def _events_of(name: str, field: str | None) -> tuple[str, str, str, str]:
    ev = _events[name, field] = (event(name, "b"), event(name, "e"), field or f"{name}_ns", event(name, "n"))
    return ev


class stage:
    """Context manager: one stage, its markers and its time (see the module doc).
    A class with slots, not a generator, and the event names computed once per name:
    it is on the per-request path (benchmarks/stage_marker_cost.py measures it)."""

    __slots__ = ("_ev", "_into", "_t0")

    def __init__(self, name: str, into: Any = None, field: str | None = None) -> None:
        self._ev = _events.get((name, field)) or _events_of(name, field)
        self._into = into

    def __enter__(self) -> None:
        _audit(self._ev[0])
        self._t0 = _now()

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        elapsed = _now() - self._t0
        ev = self._ev
        _audit(ev[1])
        if self._into is not None:
            setattr(self._into, ev[2], getattr(self._into, ev[2]) + elapsed)


class chain:
    """Context manager: consecutive stages, one marker per boundary (see the module doc).
    Each stage's time goes to its `into.<field>` as with `stage`; leaving the block ends
    the open stage (also when it raises)."""

    __slots__ = ("_ev", "_into", "_t0")

    def __init__(self) -> None:
        self._ev: tuple[str, str, str, str] | None = None

    def __enter__(self) -> "chain":
        return self

    def next(self, name: str, into: Any = None, field: str | None = None) -> None:
        """Begin stage `name`, ending the open one at the same instant."""
        ev = _events.get((name, field)) or _events_of(name, field)
        if self._ev is None:
            _audit(ev[0])
        else:
            self._add(_now() - self._t0)
            _audit(ev[3])
        self._ev, self._into = ev, into
        self._t0 = _now()

    def end(self) -> None:
        """End the open stage (nothing when none is open)."""
        if self._ev is not None:
            elapsed = _now() - self._t0
            _audit(self._ev[1])
            self._add(elapsed)
            self._ev = None

    def _add(self, elapsed: int) -> None:
        if self._into is not None:
            f = self._ev[2]
            setattr(self._into, f, getattr(self._into, f) + elapsed)

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.end()
