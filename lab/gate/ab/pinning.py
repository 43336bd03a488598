"""One CPU for both sides' paced trials (`ab --pin-cpu`).

Each side's `run` starts a VMM and a guest process. Left to the scheduler, the two
sides' processes land on different CPUs, and where they landed stays with them for the
whole trial: a side can be a few per cent faster for all its cycles, a per-round
difference that no number of cycles averages out. At CI's size with a 10 % slower
discard, 8 cycles a trial, the per-round spread of discard_cpu_ns (log ratio) was
0.047-0.074 unpinned and 0.018-0.027 with both sides on one CPU (docs/BENCHMARKS.md).
Only one side is measured at a time (paced), so they never compete for it.

A side is pinned from its start (its interpreter sets its own affinity before anything
else runs, and the VMM and guest it starts inherit it), so its guest is also prepared
on that CPU.
"""
from __future__ import annotations

import os


def default_cpu() -> int | None:
    """The last CPU this process may run on (the first is where most else runs); None
    when there is only one (nothing to choose)."""
    cpus = os.sched_getaffinity(0)
    return max(cpus) if len(cpus) > 1 else None


def pinned_program(program: str, cpu: int | None) -> str:
    """`python -c` source that runs `program` on `cpu` only (unchanged for None)."""
    return program if cpu is None else f"import os; os.sched_setaffinity(0, {{{int(cpu)}}}); {program}"
