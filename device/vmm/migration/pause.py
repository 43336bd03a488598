"""Stopping the guest for stop-and-copy: SIGSTOP, wait until every thread is stopped,
and make sure no write is half-logged.

GuestPageContents counts write chunks in progress in the dirty log's `inflight` word:
a chunk's data is written before its dirty mark, so a guest stopped between the
two has changed pages the log does not show. Then the guest is resumed briefly
and stopped again, until it stops with inflight == 0 (guest_memory.py).
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

import numpy as np


class PauseError(RuntimeError):
    """The guest could not be stopped cleanly (it exited, or kept writing)."""


@dataclass
class PauseResult:
    attempts: int
    wait_ns: int


def _all_stopped(pid: int) -> bool:
    """True when every thread of pid is in state T/t (group stop complete)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        raise PauseError(f"guest process {pid} is gone") from None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                stat = f.read()
        except FileNotFoundError:
            continue            # a thread that just exited
        state = stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3]
        if state == b"Z" and tid == str(pid):
            raise PauseError(f"guest process {pid} exited")
        if state not in (b"T", b"t", b"X", b"Z"):
            return False
    return True


def wait_stopped(pid: int, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not _all_stopped(pid):
        if time.monotonic() > deadline:
            raise PauseError(f"guest process {pid} did not stop within {timeout_s} s")
        time.sleep(20e-6)


def pause_guest(pid: int, inflight: np.ndarray | None, max_attempts: int = 200) -> PauseResult:
    """Stop the guest with no write chunk in progress. inflight: the dirty log's
    counter (None: no dirty log, just stop)."""
    t0 = time.perf_counter_ns()
    for attempt in range(1, max_attempts + 1):
        os.kill(pid, signal.SIGSTOP)
        wait_stopped(pid)
        if inflight is None or int(inflight[0]) == 0:
            return PauseResult(attempt, time.perf_counter_ns() - t0)
        os.kill(pid, signal.SIGCONT)
        time.sleep(200e-6)      # let the chunk in flight finish and log itself
    raise PauseError(f"guest {pid} was mid-write each of {max_attempts} times it was stopped")


def resume_guest(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass
