"""Guest-physical memory layout of a PC-like guest, and address translation.

RAM below 3 GiB, an MMIO hole from 3 GiB to 4 GiB, the rest of RAM from 4 GiB up.
Each RAM region maps to a contiguous range of the guest-RAM memfd. Translation
(guest-physical address -> memfd offset) is a bisect over the sorted region starts
plus a bounds check; the device treats every address it is given as hostile.

GuestLayout is the one owner of the region table (RegionTable): the balloon device's
per-page loop, the device queues' chain translation and the numpy helpers below all
read the table it built once, so there is one answer to "is this RAM, and where".
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
MiB = 1 << 20
GiB = 1 << 30
HOLE_START = 3 * GiB
HOLE_END = 4 * GiB


class BadAddress(ValueError):
    """A guest-physical address (or range) that is not guest RAM."""


@dataclass(frozen=True)
class Region:
    """One contiguous RAM region: guest-physical [gpa, gpa+size) at memfd [offset, offset+size)."""

    gpa: int
    size: int
    offset: int

    @property
    def end(self) -> int:
        return self.gpa + self.size

    @property
    def first_pfn(self) -> int:
        return self.gpa >> PAGE_SHIFT

    @property
    def end_pfn(self) -> int:
        return self.end >> PAGE_SHIFT


@dataclass(frozen=True, eq=False)
class RegionTable:
    """The regions' starts, ends and memfd offsets, built once by GuestLayout in the two
    shapes its readers need: Python lists for the bisect of one buffer's translation
    (an int list indexes faster than numpy there) and uint64 arrays for vectorized
    translation of long chains."""

    starts: list[int]
    ends: list[int]
    offsets: list[int]
    start_array: np.ndarray
    end_array: np.ndarray
    offset_array: np.ndarray

    @classmethod
    def of(cls, regions: tuple[Region, ...]) -> "RegionTable":
        starts, ends, offsets = [r.gpa for r in regions], [r.end for r in regions], [r.offset for r in regions]
        return cls(starts, ends, offsets, np.array(starts, dtype=np.uint64), np.array(ends, dtype=np.uint64),
                   np.array(offsets, dtype=np.uint64))


@dataclass(frozen=True)
class GuestLayout:
    """The RAM regions of one guest, sorted by guest-physical address."""

    regions: tuple[Region, ...]
    table: RegionTable = field(init=False, repr=False, compare=False)   # built here, and only here

    def __post_init__(self) -> None:
        table = RegionTable.of(self.regions)
        object.__setattr__(self, "table", table)
        # cached for the bisect of one buffer's translation (region_index)
        object.__setattr__(self, "_starts", table.starts)
        object.__setattr__(self, "_ends", table.ends)

    @classmethod
    def pc(cls, guest_mib: int) -> "GuestLayout":
        if guest_mib <= 0 or guest_mib % 4:
            raise ValueError(f"guest size must be a positive multiple of 4 MiB, got {guest_mib}")
        size = guest_mib * MiB
        low = min(size, HOLE_START)
        regions = [Region(0, low, 0)]
        if size > low:
            regions.append(Region(HOLE_END, size - low, low))
        return cls(tuple(regions))

    # --- sizes --------------------------------------------------------------------
    @property
    def ram_bytes(self) -> int:
        return sum(r.size for r in self.regions)

    @property
    def ram_pages(self) -> int:
        return self.ram_bytes >> PAGE_SHIFT

    @property
    def max_pfn(self) -> int:
        """One past the highest RAM PFN (what the seed's get_max_pfn() returns)."""
        return self.regions[-1].end_pfn

    @property
    def starts(self) -> list[int]:
        return [r.gpa for r in self.regions]

    # --- translation --------------------------------------------------------------
    def region_index(self, gpa: int) -> int:
        """Index of the region holding gpa, or -1 (hole, beyond RAM, negative)."""
        if gpa < 0:
            return -1
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i < 0 or gpa >= self._ends[i]:
            return -1
        return i

    def translate(self, gpa: int, length: int) -> int:
        """memfd offset of guest-physical [gpa, gpa+length); raises BadAddress unless
        the whole range lies inside one RAM region."""
        i = self.region_index(gpa)
        if i < 0 or length < 0:
            raise BadAddress(f"GPA {gpa:#x} is not guest RAM")
        r = self.regions[i]
        if gpa + length > r.end:
            raise BadAddress(f"GPA range {gpa:#x}+{length:#x} leaves RAM region {r.gpa:#x}-{r.end:#x}")
        return r.offset + (gpa - r.gpa)

    def translate_many(self, gpas: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """translate() for many ranges at once (uint64 arrays, one searchsorted):
        (memfd offsets, ok), where ok[k] is False unless range k lies inside one RAM
        region; the offsets of ranges that are not ok mean nothing."""
        t = self.table
        idx = np.searchsorted(t.start_array, gpas, side="right").astype(np.int64) - 1
        cl = np.clip(idx, 0, len(t.start_array) - 1)
        end = t.end_array[cl]
        ok = (idx >= 0) & (gpas < end) & (lengths <= end - np.minimum(gpas, end))
        return t.offset_array[cl] + (gpas - t.start_array[cl]), ok

    def translate_pfns(self, pfns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Single pages named by PFN (int64 array), each translated on its own, in a few
        numpy calls per region (the PFN protocol's per-page translation): (memfd offsets,
        ok), where ok[k] is False for a PFN in no RAM region; its offset means nothing."""
        ok = np.zeros(pfns.shape, dtype=bool)
        offs = np.zeros(pfns.shape, dtype=np.int64)
        for r in self.regions:
            inside = (pfns >= r.first_pfn) & (pfns < r.end_pfn)
            ok |= inside
            offs = np.where(inside, (pfns << PAGE_SHIFT) + (r.offset - r.gpa), offs)
        return offs, ok

    def translate_pfn_span(self, pfns: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """A request's PFNs (int64) sorted, and translate_pfns' offsets when one RAM region
        holds their whole span (every request of an unfragmented guest): each page still
        translated on its own, in one or two numpy calls after the sort (which the caller
        reuses: it also shows the pages named twice). The offsets are None when the span
        is not inside one region; translate_pfns then says which pages are not RAM."""
        in_order = np.sort(pfns)
        lo, hi = int(in_order[0]), int(in_order[-1])
        i = self.region_index(lo << PAGE_SHIFT)
        if i < 0 or hi >= self.regions[i].end_pfn:
            return in_order, None
        r = self.regions[i]
        shift = r.offset - r.gpa             # 0 for the first region: one numpy call
        return in_order, (pfns << PAGE_SHIFT if not shift else (pfns << PAGE_SHIFT) + shift)

    def split_runs(self, start_pfn: int, npages: int) -> list[tuple[int, int]]:
        """Split a PFN run at region edges into (memfd_offset, length) pieces.
        Raises BadAddress if any page of the run is not RAM."""
        out: list[tuple[int, int]] = []
        pfn, left = start_pfn, npages
        while left > 0:
            gpa = pfn << PAGE_SHIFT
            i = self.region_index(gpa)
            if i < 0:
                raise BadAddress(f"PFN {pfn:#x} is not guest RAM")
            r = self.regions[i]
            n = min(left, r.end_pfn - pfn)
            out.append((r.offset + (gpa - r.gpa), n << PAGE_SHIFT))
            pfn += n
            left -= n
        return out

    # --- vectorized helpers (numpy, for GiB-scale page sets) -----------------------
    def ram_pfn_mask(self, pfns: np.ndarray) -> np.ndarray:
        """Boolean mask: which PFNs are RAM."""
        pfns = np.asarray(pfns, dtype=np.int64)
        ok = np.zeros(pfns.shape, dtype=bool)
        for r in self.regions:
            ok |= (pfns >= r.first_pfn) & (pfns < r.end_pfn)
        return ok

    def pfn_to_offset(self, pfns: np.ndarray) -> np.ndarray:
        """memfd byte offsets of RAM PFNs (caller has checked ram_pfn_mask)."""
        pfns = np.asarray(pfns, dtype=np.int64)
        idx = np.searchsorted(np.asarray(self._starts, dtype=np.int64) >> PAGE_SHIFT, pfns, side="right") - 1
        idx = np.clip(idx, 0, len(self.regions) - 1)
        base_pfn = np.array([r.first_pfn for r in self.regions], dtype=np.int64)[idx]
        base_off = np.array([r.offset for r in self.regions], dtype=np.int64)[idx]
        return base_off + ((pfns - base_pfn) << PAGE_SHIFT)

    def offset_to_pfn(self, offsets: np.ndarray) -> np.ndarray:
        """Guest PFNs of memfd byte offsets (inverse of pfn_to_offset)."""
        offsets = np.asarray(offsets, dtype=np.int64)
        offs = np.array([r.offset for r in self.regions], dtype=np.int64)
        idx = np.searchsorted(offs, offsets, side="right") - 1
        base_pfn = np.array([r.first_pfn for r in self.regions], dtype=np.int64)[idx]
        return base_pfn + ((offsets - offs[idx]) >> PAGE_SHIFT)

    def runs_to_offsets(self, starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """split_runs for many RAM runs at once: memfd (offsets, byte lengths), a run that
        spans two regions split in two. Callers have checked every page is RAM."""
        starts = np.asarray(starts, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        if starts.size == 0:
            return starts, lengths
        ends = starts + lengths
        out_s, out_e = [starts], [ends]
        for r in self.regions[:-1]:             # a cut at each region end (one or two regions)
            cross = (starts < r.end_pfn) & (ends > r.end_pfn)
            if cross.any():
                out_e[0] = np.where(cross, r.end_pfn, out_e[0])
                nxt = self.regions[self.regions.index(r) + 1].first_pfn
                out_s.append(np.full(int(cross.sum()), nxt, dtype=np.int64))
                out_e.append(ends[cross])
        s = np.concatenate(out_s)
        e = np.concatenate(out_e)
        order = np.argsort(s, kind="stable")
        s, e = s[order], e[order]
        return self.pfn_to_offset(s), (e - s) << PAGE_SHIFT

    def ram_pfns(self) -> np.ndarray:
        """All RAM PFNs in ascending order (int64; 32 MiB for a 16 GiB guest)."""
        return np.concatenate([np.arange(r.first_pfn, r.end_pfn, dtype=np.int64) for r in self.regions])

    def to_dict(self) -> dict:
        return {"regions": [{"gpa": r.gpa, "size": r.size, "offset": r.offset} for r in self.regions]}

    @classmethod
    def from_dict(cls, d: dict) -> "GuestLayout":
        return cls(tuple(Region(int(x["gpa"]), int(x["size"]), int(x["offset"])) for x in d["regions"]))
