"""Stage markers the lab's processes emit for the stage probe (stages.c).

Convention: sys.audit("balloon-lab:<stage>:b") when a stage begins and
sys.audit("balloon-lab:<stage>:e") when it ends, in the same thread, once per batch
(never per page). <stage> is 1-15 characters of [a-z0-9_-]. Python fires the
`python:audit` USDT marker only while a probe is attached (USDT semaphore), so an
unprobed marker costs a function call; a probed one a uprobe trap (measured per session,
probes/costs.py).
The format and the `stage` context manager are written once, in device/virtio/stage.py
(the device and the driver time their stages with it); this module names them for the probes.
"""
from __future__ import annotations

import sys

from device.virtio.stage import NAME_MAX, PREFIX, chain, check_name, event, stage

STAGES = ("alloc", "encode", "transmit", "translate", "discard", "inflate", "deflate")
__all__ = ["NAME_MAX", "PREFIX", "STAGES", "begin", "chain", "check_name", "end", "event", "prefix_words", "stage"]


def begin(stage: str) -> None:
    sys.audit(event(stage, "b"))


def end(stage: str) -> None:
    sys.audit(event(stage, "e"))


def prefix_words() -> tuple[int, int]:
    """PREFIX as (bytes 0-7, bytes 8-11) little-endian integers, for stages.c's -D flags."""
    raw = PREFIX.encode()
    return int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:12], "little")
