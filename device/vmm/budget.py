"""The work one event-loop wake-up may do for the guest's queues, so the monitor keeps answering.

The VMM has one event loop: while it serves a queue, nothing else (the monitor, the
control socket, the other queues) is served. Counting chains does not bound that time,
because one chain may be one descriptor or an indirect table of 4096 of them (max_chain), and one
request may name one page or carry a 16 MiB bitmap. So a wake-up is budgeted in what
costs time: descriptors walked (every descriptor of every chain, refused or not, the
whole indirect table), bytes of requests read from guest RAM, and discard system
calls. Once any is spent the device returns to the loop, re-kicking the queue itself if
work is left (a budget that ends with the last chain re-arms kicks instead: a wake-up
with nothing to serve would only come after the guest saw its request done); the loop
serves everything else before it comes back. A single chain is never split, so
one wake-up does at most the budget plus one chain: the bound docs/BAD_INPUT.md states
and benchmarks/chain_attack.py measures.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

# Per wake-up, for all queues together. About 2 ms each on the project's machine when
# quiet (walk ~0.5 us/descriptor, copy ~1 GB/s, MADV_REMOVE ~3.5 us/page).
DESCRIPTORS_PER_WAKEUP = 4096
BYTES_PER_WAKEUP = 256 << 10
DISCARDS_PER_WAKEUP = 1024


@dataclass
class WorkBudget:
    descriptors: int = DESCRIPTORS_PER_WAKEUP
    bytes: int = BYTES_PER_WAKEUP
    discards: int = DISCARDS_PER_WAKEUP
    # cpu_ns() when the loop woke for one fd alone: the queue it serves starts its own
    # CPU time there (one clock read fewer on a request's round trip), and takes it; and
    # cpu_ns() when that queue was done, which ends the wake-up's CPU time (one more).
    woke_cpu_ns: int | None = None
    served_cpu_ns: int | None = None

    @classmethod
    def unlimited(cls) -> "WorkBudget":
        """For callers outside the event loop (tests, the in-process fuzzers' old targets)."""
        big = 1 << 62
        return cls(big, big, big)

    @property
    def spent(self) -> bool:
        return self.descriptors <= 0 or self.bytes <= 0 or self.discards <= 0

    def charge(self, descriptors: int, nbytes: int, discards: int) -> None:
        self.descriptors -= descriptors
        self.bytes -= nbytes
        self.discards -= discards


# This thread's CPU time in ns (CLOCK_THREAD_CPUTIME_ID; ~0.9 us here, 1.7 us cold after a
# request's discards: getrusage is no cheaper): the VMM's one CPU clock, for a wake-up, a
# queue and the discard stage. The function itself, not a wrapper: it is read on every request.
cpu_ns = time.thread_time_ns


def cpu_time() -> float:
    """This thread's CPU time in seconds (cpu_ns): what a wake-up costs whatever the
    machine's load."""
    return cpu_ns() / 1e9
