"""Were two stored runs made in one job? Only then may the gate compare their timings.

Measured here: the kernel's own cost drifts by ~15 % over tens of minutes (the madvise
time of one bitmap inflate moved 178 -> 153 ms between identical runs 45 minutes
apart), so timings of runs made at different times are not comparable on these
machines; `balloon-lab ab` compares two revisions interleaved instead.

Two runs are one job when both carry the same job id (lab/machine/environment.py job_id:
BALLOON_LAB_JOB, or the CI system's), or, when
either has none, when they ran on the same boot of the same host and the later one
started at most MAX_GAP_S after the earlier one ended. Runs recorded before jobs were
(no job, no boot id) are judged on the gap alone.
"""
from __future__ import annotations

import datetime as _dt
from typing import Any, Mapping

MAX_GAP_S = 10 * 60


def _when(text: Any) -> _dt.datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        t = _dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)


def one_job(a_env: Mapping[str, Any], a_span: tuple[str | None, str | None], b_env: Mapping[str, Any],
            b_span: tuple[str | None, str | None]) -> tuple[bool, str]:
    """(whether the two runs are one job, why), from their environments and their
    (started, finished) ISO times."""
    ja, jb = a_env.get("job"), b_env.get("job")
    if ja and jb:
        return (ja == jb, f"job {ja}" if ja == jb else f"jobs {ja} and {jb}")
    ba, bb = a_env.get("boot_id"), b_env.get("boot_id")
    if ba and bb and ba != bb:
        return False, "different boots of the machine"
    if a_env.get("hostname") and b_env.get("hostname") and a_env["hostname"] != b_env["hostname"]:
        return False, f"hosts {a_env['hostname']} and {b_env['hostname']}"
    a0, a1 = _when(a_span[0]), _when(a_span[1] or a_span[0])
    b0, b1 = _when(b_span[0]), _when(b_span[1] or b_span[0])
    if None in (a0, a1, b0, b1):
        return False, "a run without start and end times"
    gap = max((b0 - a1).total_seconds(), (a0 - b1).total_seconds(), 0.0)
    if gap > MAX_GAP_S:
        return False, f"made {_minutes(gap)} apart"
    return True, f"made {_minutes(gap)} apart"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"
