"""fragment: leave free memory in isolated pages and short runs.

It allocates `share` of guest RAM, fills it with data, then frees every other run
of L pages, L = 2**round((1 - degree) * 10), aligned to L: free runs of exactly L
pages alternate with held runs of L pages. degree 1 gives L = 1 (every free page
isolated between held ones: all order-0 blocks), degree 0 gives L = 1024 (free
memory in order-10 blocks, as idle). Degree picks one of these 11 levels. The
freed pages first hold stale data (they were in use), unless stale=false. Memory
outside the shaped share stays free in large blocks (untouched, unless touch_rest:
then it holds stale data too, as in an aged guest, so every discard frees memory).
The balloon's allocations take the lowest orders first, so they draw the fragmented
pages before anything else.
"""
from __future__ import annotations

from dataclasses import dataclass


from device.guest.page_contents import GuestPageContents
from workloads.base import Workload, param


@dataclass(frozen=True)
class FragmentParams:
    share: float = param(0.5, 0.0, 1.0, help="share of guest RAM the workload shapes (half held, half freed)")
    degree: float = param(1.0, 0.0, 1.0, help="0: free runs of 1024 pages (large blocks); 1: isolated free pages")
    stale: bool = param(True, help="write data into the pages before freeing them (free-but-dirty)")
    touch_rest: bool = param(False, help="also write into the free memory outside the shaped share (aged)")


def run_order(degree: float) -> int:
    """log2 of the free/held run length for a degree."""
    return int(round((1.0 - degree) * 10))


class Fragment(Workload):
    name = "fragment"
    Params = FragmentParams

    def touched_share(self) -> float:
        return 1.0 if self.params.touch_rest else self.params.share

    def prepare(self, mem: GuestPageContents) -> dict:
        p = self.params
        want = int(round(p.share * mem.alloc.ram_pages))
        pages = mem.alloc.alloc_pages(want, notify_oom=False)
        lg = run_order(p.degree)
        freed_sel = ((pages >> lg) & 1) == 0
        held, freed = pages[~freed_sel], pages[freed_sel]
        mem.hold("fragment", held, self.seed)
        if p.stale:
            mem.touch_stale(freed, self.seed ^ 0xF4A6)
        else:
            mem.alloc.free_pages(freed)
        if p.touch_rest:
            rest = mem.alloc.alloc_pages(mem.alloc.free_pages_count, notify_oom=False)
            if rest.size:
                mem.touch_stale(rest, self.seed ^ 0xA6ED)
        counts = mem.alloc.order_counts()
        return {"run_pages": 1 << lg, "shaped_pages": len(pages), "held_pages": len(held),
                "freed_pages": len(freed), "free_pages": mem.alloc.free_pages_count,
                "free_blocks_by_order": {str(k): v for k, v in counts.items()}}
