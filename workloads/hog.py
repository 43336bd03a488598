"""hog: allocate a share of guest RAM and fill it with data (held, verified).

Allocation comes from the buddy allocator in its own order, so on a fresh guest
the hog is one contiguous stretch from the bottom of RAM (across the MMIO hole).
"""
from __future__ import annotations

from dataclasses import dataclass

from device.guest.page_contents import GuestPageContents
from workloads.base import Workload, param


@dataclass(frozen=True)
class HogParams:
    share: float = param(0.5, 0.0, 1.0, help="share of guest RAM to allocate and touch")


class Hog(Workload):
    name = "hog"
    Params = HogParams

    def touched_share(self) -> float:
        return self.params.share

    def prepare(self, mem: GuestPageContents) -> dict:
        want = int(round(self.params.share * mem.alloc.ram_pages))
        pages = mem.alloc.alloc_pages(want)
        mem.hold("hog", pages, self.seed)
        return {"requested_pages": want, "held_pages": len(pages), "shortfall_pages": want - len(pages),
                "free_pages": mem.alloc.free_pages_count}
