"""The per-exec time limit: an exec past it is a hang.

Every target runs its exec through guarded() (arm(), the exec, disarm(); a hang or
anything escaping the exec becomes its failure) inside one hang_timer(): the
timer raises Hang (a BaseException, so no `except Exception` in the device or the
fuzzer can swallow it) when the exec used its CPU time (ITIMER_PROF: a loaded
machine does not make an exec a hang) or WALL_FACTOR times that of wall-clock time
(a device blocked in a system call uses no CPU).
"""
from __future__ import annotations

import signal
from typing import Callable, TypeVar

T = TypeVar("T")

WALL_FACTOR = 10    # the wall-clock backstop: a device blocked in a system call uses no CPU


class Hang(BaseException):
    """The per-exec time limit fired (BaseException: no `except Exception` may swallow it)."""


def hang_detail(limit_s: float) -> str:
    """The failure detail of a hang."""
    return f"exec used more than {limit_s} s of CPU (or {limit_s * WALL_FACTOR} s of wall-clock time)"


def _on_alarm(signum, frame):
    raise Hang()


def arm(limit_s: float) -> None:
    """An exec may use limit_s of CPU (ITIMER_PROF: a loaded machine does not make it a
    hang), and WALL_FACTOR times that of wall-clock time (a blocked device is a hang too)."""
    signal.setitimer(signal.ITIMER_PROF, limit_s)
    signal.setitimer(signal.ITIMER_REAL, limit_s * WALL_FACTOR)


def disarm() -> None:
    """Stop both timers (the exec finished in time)."""
    signal.setitimer(signal.ITIMER_PROF, 0)
    signal.setitimer(signal.ITIMER_REAL, 0)


def guarded(exec_: Callable[[], T], limit_s: float, hangs: tuple[type[Exception], ...] = ()) -> tuple[T | None, str | None, str]:
    """Run one exec under the per-exec time limit: (its value, None, "") when it returns,
    (None, "hang", detail) past the limit, (None, "crash", "Type: message") when anything
    escapes it (the device and the targets' own code must never raise); an exception of
    `hangs` is a hang that the target noticed itself, its message the detail."""
    try:
        arm(limit_s)
        try:
            return exec_(), None, ""
        finally:
            disarm()
    except Hang:
        return None, "hang", hang_detail(limit_s)
    except hangs as e:
        return None, "hang", str(e)
    except Exception as e:
        return None, "crash", f"{type(e).__name__}: {e}"


class hang_timer:
    """Install the Hang handlers for SIGPROF and SIGALRM for the duration of a run."""

    def __enter__(self) -> "hang_timer":
        self.old = {sig: signal.signal(sig, _on_alarm) for sig in (signal.SIGPROF, signal.SIGALRM)}
        return self

    def __exit__(self, *exc) -> None:
        disarm()
        for sig, h in self.old.items():
            signal.signal(sig, h)

