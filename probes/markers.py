"""Stage markers the lab's processes emit for the stage probe (stages.c).

Convention: sys.audit("balloon-lab:<stage>:b") when a stage begins and
sys.audit("balloon-lab:<stage>:e") when it ends, in the same thread, once per batch
(never per page). <stage> is 1-15 characters of [a-z0-9_-]. Python fires the
`python:audit` USDT marker only while a probe is attached (USDT semaphore), so an
unprobed marker costs a function call; a probed one a uprobe trap (~1-3 us).
"""
from __future__ import annotations

import re
import sys
from contextlib import contextmanager
from typing import Iterator

PREFIX = "balloon-lab:"
NAME_MAX = 15
STAGES = ("alloc", "encode", "transmit", "translate", "discard", "inflate", "deflate")
_NAME_RE = re.compile(r"[a-z0-9_-]{1,%d}" % NAME_MAX)
assert len(PREFIX) == 12, "stages.c compares the prefix as 8 + 4 bytes"


def check_name(stage: str) -> str:
    if not isinstance(stage, str) or not _NAME_RE.fullmatch(stage):
        raise ValueError(f"stage name {stage!r}: must be 1-{NAME_MAX} chars of [a-z0-9_-]")
    return stage


def event(stage: str, phase: str) -> str:
    """The audit event name for `stage`, phase 'b' (begin) or 'e' (end)."""
    if phase not in ("b", "e"):
        raise ValueError(f"phase {phase!r}: must be 'b' or 'e'")
    return f"{PREFIX}{check_name(stage)}:{phase}"


def begin(stage: str) -> None:
    sys.audit(event(stage, "b"))


def end(stage: str) -> None:
    sys.audit(event(stage, "e"))


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Mark the enclosed block as stage `name` (the end marker fires even on error)."""
    b, e = event(name, "b"), event(name, "e")
    sys.audit(b)
    try:
        yield
    finally:
        sys.audit(e)


def prefix_words() -> tuple[int, int]:
    """PREFIX as (bytes 0-7, bytes 8-11) little-endian integers, for stages.c's -D flags."""
    raw = PREFIX.encode()
    return int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:12], "little")
