"""Ctrl-C and SIGTERM end every command the same way: unwound, cleaned up, one line.

By default SIGTERM (from `timeout`, systemd, `kill`) ends Python at once: no finally
block, no atexit hook runs, so a trial's VMM scratch directory, a raised hugetlb pool
and BCC's programs stay behind. install() makes both signals raise Interrupted (a
KeyboardInterrupt, so no `except Exception` in a trial swallows it); every command
then unwinds through its own clean-up (LabProcesses.close, the probe session's
detach, the knobs' restore), and the command line prints one line and exits with
128 + the signal's number (130 for SIGINT, 143 for SIGTERM).
"""
from __future__ import annotations

import signal
from typing import Any

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; `signum` says which."""

    def __init__(self, signum: int, message: str = "") -> None:
        super().__init__(message or f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def _raise(signum: int, _frame: Any) -> None:
    raise Interrupted(signum)


def install() -> dict[int, Any]:
    """Both signals raise Interrupted from now on (main thread only); the handlers
    they had, for restore()."""
    return {s: signal.signal(s, _raise) for s in HANDLED}


def restore(old: dict[int, Any]) -> None:
    for s, h in old.items():
        if h is not None:
            signal.signal(s, h)


def signum_of(e: KeyboardInterrupt) -> int:
    """The signal behind an interrupt (a bare KeyboardInterrupt is a SIGINT)."""
    return getattr(e, "signum", signal.SIGINT)


def exit_status(e: KeyboardInterrupt) -> int:
    return 128 + signum_of(e)
