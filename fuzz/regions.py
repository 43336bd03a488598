"""The oracle's own guest-physical region table, written from docs/PROTOCOL.md.

The out-of-range oracle maps every memfd page that lost its data back to a PFN and
asks whether the guest named it. If it did so with the device's own table
(GuestLayout.offset_to_pfn, pfn_to_offset, translate), a bug in that shared table
would move the device's discard and the oracle's answer together, and stay invisible.
So the fuzzer keeps its own, from the protocol's words (docs/PROTOCOL.md, "guest
memory"): guest RAM is a list of regions `(gpa, size, memfd_offset)`; a guest-physical
address `a` inside region r lives at memfd offset `r.memfd_offset + (a - r.gpa)`; on
the PC layout RAM is below 3 GiB and from 4 GiB up, 3-4 GiB is an MMIO hole, and the
regions follow each other in the memfd. Bitmaps name pages of 4 KiB (page_shift 12)
or aligned 2 MiB blocks (page_shift 21). Nothing here is imported from device/.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
MiB = 1 << 20
GiB = 1 << 30
HOLE_START, HOLE_END = 3 * GiB, 4 * GiB        # the PC layout's MMIO hole
BITMAP_PAGE_SHIFTS = (12, 21)                  # docs/PROTOCOL.md, the bitmap header's page_shift
F_PAGE_BITMAP, F_PAGE_CHUNKS = 50, 51          # the lab's feature bits (docs/PROTOCOL.md)


@dataclass(frozen=True)
class RamRegion:
    gpa: int
    size: int
    memfd_offset: int


@dataclass(frozen=True)
class RegionTable:
    """Guest RAM as the protocol describes it; every lookup is this module's own arithmetic."""

    regions: tuple[RamRegion, ...]

    @property
    def max_pfn(self) -> int:
        """One past the last RAM page's PFN."""
        return max(r.gpa + r.size for r in self.regions) >> PAGE_SHIFT

    @property
    def memfd_bytes(self) -> int:
        return max(r.memfd_offset + r.size for r in self.regions)

    def gpa_to_offset(self, gpa: int, n: int) -> int | None:
        """memfd offset of [gpa, gpa+n) if it lies inside one region, else None."""
        for r in self.regions:
            if n >= 0 and r.gpa <= gpa and gpa + n <= r.gpa + r.size:
                return r.memfd_offset + gpa - r.gpa
        return None

    def translate(self, gpa: int, n: int) -> int:
        """gpa_to_offset, raising ValueError outside RAM (the raw guest's ring writer wants one)."""
        off = self.gpa_to_offset(gpa, n)
        if off is None:
            raise ValueError(f"{gpa:#x}+{n:#x} is not inside one RAM region")
        return off

    def offset_to_pfn(self, offsets: np.ndarray) -> np.ndarray:
        """PFN of each memfd byte offset (-1 where no region maps it)."""
        off = np.asarray(offsets, dtype=np.int64)
        out = np.full(off.shape, -1, dtype=np.int64)
        for r in self.regions:
            inside = (off >= r.memfd_offset) & (off < r.memfd_offset + r.size)
            out[inside] = (off[inside] - r.memfd_offset + r.gpa) >> PAGE_SHIFT
        return out

    def pfn_to_offset(self, pfns: np.ndarray) -> np.ndarray:
        """memfd byte offset of each PFN's page (-1 where the PFN is not RAM)."""
        gpa = np.asarray(pfns, dtype=np.int64) << PAGE_SHIFT
        out = np.full(gpa.shape, -1, dtype=np.int64)
        for r in self.regions:
            inside = (gpa >= r.gpa) & (gpa < r.gpa + r.size)
            out[inside] = gpa[inside] - r.gpa + r.memfd_offset
        return out

    def ram_mask(self) -> np.ndarray:
        """Boolean per PFN below max_pfn: RAM or not."""
        mask = np.zeros(self.max_pfn, dtype=bool)
        for r in self.regions:
            mask[r.gpa >> PAGE_SHIFT:(r.gpa + r.size) >> PAGE_SHIFT] = True
        return mask


def pc_regions(guest_mib: int) -> RegionTable:
    """The PC layout of a guest of `guest_mib` MiB: RAM below the 3 GiB hole, the rest
    from 4 GiB, the regions one after the other in the memfd. Written again on purpose,
    from the protocol's words, beside GuestLayout.pc: the oracle must not share the
    device's table (a test checks that the two agree)."""
    ram = guest_mib * MiB
    low = min(ram, HOLE_START)
    regions = [RamRegion(0, low, 0)]
    if ram > low:
        regions.append(RamRegion(HOLE_END, ram - low, low))
    return RegionTable(tuple(regions))


def wire_format_of(features: int) -> str:
    """The inflate/deflate wire format negotiated features select (chunks over bitmap over pfn)."""
    if features >> F_PAGE_CHUNKS & 1:
        return "chunks"
    if features >> F_PAGE_BITMAP & 1:
        return "bitmap"
    return "pfn"
