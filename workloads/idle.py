"""idle: a long-running guest at rest.

Some memory in use (held, with data), more that was used earlier and freed but
still holds stale data (what migration must copy unless the guest hints it),
and the rest never touched. In-use and stale memory sit in a few clusters at
seeded random places, so the free memory stays in large buddy blocks, as in a
real idle guest after boot and some work.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from device.guest.page_contents import GuestPageContents
from workloads.base import Workload, param
from workloads.shapes import place_regions, split_even


@dataclass(frozen=True)
class IdleParams:
    used_share: float = param(0.05, 0.0, 1.0, help="share of guest RAM in use (held, verified)")
    stale_share: float = param(0.20, 0.0, 1.0, help="share of guest RAM free but holding stale data")
    regions: int = param(4, 1, 64, help="clusters the in-use memory is spread over")
    stale_regions: int = param(3, 1, 64, help="clusters the stale memory is spread over")


def shape_idle(mem: GuestPageContents, p: IdleParams, seed: int, holding: str) -> dict:
    """Lay out an idle guest's memory; the in-use pages become holding `holding`."""
    alloc = mem.alloc
    ram = alloc.ram_pages
    used = int(round(p.used_share * ram))
    stale = int(round(p.stale_share * ram))
    rng = np.random.default_rng([seed, 0x1D1E])
    sizes = split_even(used, p.regions) + split_even(stale, p.stale_regions)
    clusters = place_regions(alloc, sizes, rng)
    used_c, stale_c = clusters[: p.regions], clusters[p.regions :]
    used_pfns = np.concatenate(used_c)
    stale_pfns = np.concatenate(stale_c)
    mem.hold(holding, used_pfns, seed)
    if len(stale_pfns):
        mem.touch_stale(stale_pfns, seed ^ 0x57A1E)
    free = alloc.free_pages_count
    return {
        "used_pages": len(used_pfns),
        "stale_pages": len(stale_pfns),
        "untouched_free_pages": free - len(stale_pfns),
        "free_pages": free,
        "ram_pages": ram,
        "clamped": len(used_pfns) < used or len(stale_pfns) < stale,
        "used_clusters": [[int(c[0]), len(c)] for c in used_c if len(c)],
        "stale_clusters": [[int(c[0]), len(c)] for c in stale_c if len(c)],
        "free_in_order10_share": alloc.order_counts()[10] * 1024 / max(free, 1),
    }


class Idle(Workload):
    name = "idle"
    Params = IdleParams

    def validate(self) -> None:
        p = self.params
        if p.used_share + p.stale_share > 1.0:
            raise ValueError(f"workload 'idle': used_share + stale_share must be <= 1.0, "
                             f"got {p.used_share} + {p.stale_share}")

    def touched_share(self) -> float:
        return self.params.used_share + self.params.stale_share

    def prepare(self, mem: GuestPageContents) -> dict:
        return shape_idle(mem, self.params, self.seed, "idle")
