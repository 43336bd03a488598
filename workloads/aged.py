"""aged: an idle guest that has been up long enough to have touched all its RAM.

Like `idle`, a share of memory is in use (held, verified) in a few clusters; every
other free page holds stale data from earlier use, as in a guest whose page cache
was dropped. This is the lab's default for inflate/deflate: every page the balloon
takes is backed by host memory, so every discard frees something real, and the
memfd shrinks by exactly the ballooned size.

pin_share is the huge-page knob: that share of the free 2 MiB blocks gets one
in-use page at a random place (a slab or page-table page in a real guest), so
no balloon, however it allocates, can give that host page whole.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from device.guest.page_contents import GuestPageContents
from workloads.base import Workload, param
from workloads.idle import IdleParams, shape_idle


@dataclass(frozen=True)
class AgedParams:
    used_share: float = param(0.05, 0.0, 1.0, help="share of guest RAM in use (held, verified)")
    regions: int = param(4, 1, 64, help="clusters the in-use memory is spread over")
    pin_share: float = param(0.0, 0.0, 1.0, help="share of free 2 MiB blocks pinned by one in-use 4 KiB page")


class Aged(Workload):
    name = "aged"
    Params = AgedParams

    def prepare(self, mem: GuestPageContents) -> dict:
        p = self.params
        summary = shape_idle(mem, IdleParams(used_share=p.used_share, stale_share=0.0, regions=p.regions),
                             self.seed, "aged")
        if p.pin_share > 0:
            summary["pinned_blocks"] = pin_blocks(mem, p.pin_share, self.seed)
        # Touch every remaining free page once: allocate all, write, free (buddy merging
        # restores the large blocks, so the free memory's shape is the idle one).
        free = mem.alloc.alloc_pages(mem.alloc.free_pages_count, notify_oom=False)
        if free.size:
            mem.touch_stale(free, self.seed ^ 0xA6ED)
        summary.update(stale_pages=int(free.size), untouched_free_pages=mem.alloc.free_pages_count - int(free.size),
                       free_pages=mem.alloc.free_pages_count)
        return summary

    def retouch(self, mem: GuestPageContents) -> dict:
        """After a deflate: give every free page host memory again, as prepare() left it,
        so the next inflate frees as much. The pages are populated, not written
        (GuestPageContents.populate: the discard that follows costs the same, and it took
        half the time of writing them here: 2-3 s against 5-6 s for 1.75 GiB)."""
        free = mem.alloc.alloc_pages(mem.alloc.free_pages_count, notify_oom=False)
        if free.size:
            mem.populate(free)
            mem.alloc.free_pages(free)
        return {"populated_pages": int(free.size)}


def pin_blocks(mem: GuestPageContents, share: float, seed: int, order: int = 9) -> int:
    """Hold one page at a random offset in `share` of the free aligned 2**order-page
    blocks (loops per pinned block, not per page). Returns the blocks pinned."""
    rng = np.random.default_rng([seed, 0x9195])
    blocks = mem.alloc.free_blocks_at_least(order)
    pick = np.sort(rng.choice(blocks.size, size=int(round(share * blocks.size)), replace=False))
    pins = blocks[pick] + rng.integers(0, 1 << order, size=pick.size)
    for pfn in pins.tolist():
        mem.alloc.alloc_range(pfn, 1)
    if pins.size:
        mem.hold("aged-pins", pins, seed ^ 0x9195)
    return int(pins.size)
