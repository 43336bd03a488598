"""Memory-shaping helpers shared by workloads, and run-length measurement.

A long-running guest does not keep its memory at the bottom of RAM: its in-use
pages sit in a few clusters spread over memory, and pages it used earlier and gave
back (still holding their old data) sit elsewhere. place_regions() lays such
clusters out on whole 4 MiB (order-10) slots at seeded random positions, so the
free memory between them stays in large buddy blocks.
"""
from __future__ import annotations

import numpy as np

from device.virtio.wire import pfns_to_runs

from device.guest.buddy import MAX_BLOCK, BuddyAllocator


def run_lengths(pfns: np.ndarray) -> np.ndarray:
    """Lengths of the maximal runs of consecutive PFNs in a PFN set (any order)."""
    return pfns_to_runs(pfns)[1]


def split_even(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def alloc_pfns(alloc: BuddyAllocator, pfns: np.ndarray) -> None:
    """Allocate exactly these (sorted, free) PFNs: one alloc_range per contiguous run
    (a loop per run, and placed regions have few runs)."""
    if not len(pfns):
        return
    brk = np.flatnonzero(np.diff(pfns) != 1)
    starts = np.concatenate(([0], brk + 1))
    ends = np.concatenate((brk + 1, [len(pfns)]))
    for a, b in zip(starts.tolist(), ends.tolist()):
        alloc.alloc_range(int(pfns[a]), b - a)


def place_regions(alloc: BuddyAllocator, sizes: list[int], rng: np.random.Generator) -> list[np.ndarray]:
    """Choose, for each requested size (pages), a cluster of free pages made of
    consecutive free order-10 slots at a random position, without overlaps, in a
    random order of clusters; allocate them and return each cluster's PFNs (sorted).
    When the free order-10 slots cannot hold them all, the last sizes are cut first
    (callers list what matters most first)."""
    slots = alloc.free_blocks(10)
    need = [-(-s // MAX_BLOCK) for s in sizes]
    i = len(need) - 1
    while sum(need) > len(slots):  # clamp from the end: later sizes matter less
        while need[i] == 0:
            i -= 1
        need[i] -= 1
    nseg = len(sizes)
    spare = len(slots) - sum(need)
    order = rng.permutation(nseg)
    cuts = np.sort(rng.integers(0, spare + 1, nseg))
    gaps = np.diff(np.concatenate(([0], cuts)))
    out: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * nseg
    pos = 0
    for j, i in enumerate(order.tolist()):
        pos += int(gaps[j])
        seg = slots[pos : pos + need[i]]
        pos += need[i]
        pages = (seg[:, None] + np.arange(MAX_BLOCK, dtype=np.int64)).ravel()[: sizes[i]]
        # note: a cut size gives fewer pages, reported by the caller as clamped
        alloc_pfns(alloc, pages)
        out[i] = pages
    return out
