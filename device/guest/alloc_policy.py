"""How the guest's balloon driver picks the pages it gives: an arm parameter.

  linux           what Linux's balloon does: order-0 pages one at a time from the
                  buddy allocator (balloon_page_alloc), which hands out the lowest
                  orders first; on a fragmented guest they are scattered 4 KiB pages
                  that rarely fill a 2 MiB host page
  hugepage-aware  whole, naturally aligned order-9 blocks (2 MiB, one x86 huge page)
                  from the free lists first, splitting larger blocks but never
                  gathering smaller ones, then order-0 pages for the rest: on a huge
                  backing each whole block frees one host page

Both return int64 PFNs sorted ascending within each kind; `whole_blocks` says how
many leading 512-page blocks are whole (the bitmap protocol sends those with
page_shift 21).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from device.guest.buddy import BuddyAllocator

ALLOC_POLICIES = ("linux", "hugepage-aware")
HUGE_ORDER = 9
HUGE_PAGES = 1 << HUGE_ORDER


@dataclass
class BalloonAllocation:
    pages: np.ndarray          # every PFN given (whole blocks first)
    whole_blocks: int = 0      # pages[: whole_blocks * 512] are whole aligned order-9 blocks


def allocate_for_balloon(alloc: BuddyAllocator, n: int, policy: str) -> BalloonAllocation:
    """n pages for the balloon under `policy` (fewer when the guest runs out)."""
    if policy == "linux":
        return BalloonAllocation(alloc.alloc_pages(n, notify_oom=False))
    if policy != "hugepage-aware":
        raise ValueError(f"unknown allocation policy {policy!r}; choose from {', '.join(ALLOC_POLICIES)}")
    starts = alloc.alloc_blocks(HUGE_ORDER, n >> HUGE_ORDER)
    whole = (starts[:, None] + np.arange(HUGE_PAGES, dtype=np.int64)).ravel()
    rest = alloc.alloc_pages(n - whole.size, notify_oom=False) if n > whole.size else whole[:0]
    return BalloonAllocation(np.concatenate((whole, rest)), int(starts.size))
