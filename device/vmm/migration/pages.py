"""Reading guest pages for migration: pread into one reused buffer, zero detection
and fingerprints with numpy per chunk, never through the mapping.

Reading a never-touched memfd page with pread returns zeros without allocating it
(ENVIRONMENT.md), so even a scan that examines every guest page, as QEMU's bulk
stage does, leaves the host's memory as it was. The unit of work is a chunk of up
to `chunk_pages` pages of one RAM region: the pages a round selects in it are read
in spans (runs of selected pages merged over small gaps, one pread per span),
then classified zero/data in one numpy reduction per span.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from device.virtio.page_pattern import WORDS, pread_full
from device.virtio.layout import PAGE_SHIFT, PAGE_SIZE, GuestLayout
from device.vmm.migration.stream import FLAG_DATA, FLAG_ZERO

CHUNK_PAGES = 2048      # 8 MiB per read buffer
GAP_PAGES = 32          # read across gaps of up to 128 KiB rather than issue another pread
MAX_DATA_RUNS_AS_IOV = 64


def runs(idx: np.ndarray, gap: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the runs in sorted indices, merging runs at most `gap` apart."""
    if not len(idx):
        return idx, idx
    brk = np.flatnonzero(np.diff(idx) > gap + 1) + 1
    starts = idx[np.concatenate(([0], brk))]
    ends = idx[np.concatenate((brk - 1, [len(idx) - 1]))] + 1
    return starts, ends


@dataclass
class ChunkResult:
    """One chunk's pages as they go on the wire."""

    start_pfn: int            # PFN of flags[0]
    flags: np.ndarray         # uint8 per page from start_pfn: skip / zero / data
    data: list                # buffers holding the data pages, in PFN order
    ndata: int
    nzero: int
    examined: int             # selected pages checked for zero
    bytes_read: int
    data_pfns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


class PageScanner:
    """Per-chunk page reading and zero detection for the source."""

    def __init__(self, fd: int, layout: GuestLayout, chunk_pages: int = CHUNK_PAGES) -> None:
        self.fd = fd
        self.layout = layout
        self.chunk_pages = chunk_pages
        self.buf = bytearray(chunk_pages * PAGE_SIZE)
        self.mv = memoryview(self.buf)
        self.words = np.frombuffer(self.buf, dtype=np.uint64).reshape(-1, WORDS)
        self.gbuf = bytearray(chunk_pages * PAGE_SIZE)
        self.gwords = np.frombuffer(self.gbuf, dtype=np.uint64).reshape(-1, WORDS)
        self.nz = np.zeros(chunk_pages, dtype=bool)

    def chunks(self) -> Iterator[tuple[int, int, int]]:
        """(first pfn, end pfn, memfd offset of first pfn) of every chunk, region by region."""
        for r in self.layout.regions:
            for p in range(r.first_pfn, r.end_pfn, self.chunk_pages):
                yield p, min(p + self.chunk_pages, r.end_pfn), r.offset + ((p - r.first_pfn) << PAGE_SHIFT)

    def chunks_of(self, pfns: np.ndarray) -> Iterator[tuple[int, int, int, np.ndarray]]:
        """Like chunks(), but only the chunks holding some of the sorted RAM `pfns`, each
        with its bool selection (for rounds that send a few scattered pages)."""
        for r in self.layout.regions:
            lo, hi = np.searchsorted(pfns, [r.first_pfn, r.end_pfn])
            sub = pfns[lo:hi] - r.first_pfn
            if not len(sub):
                continue
            cid = sub // self.chunk_pages
            brk = np.flatnonzero(np.diff(cid)) + 1
            for part in np.split(sub, brk):
                p = r.first_pfn + int(part[0]) // self.chunk_pages * self.chunk_pages
                end = min(p + self.chunk_pages, r.end_pfn)
                sel = np.zeros(end - p, dtype=bool)
                sel[part + r.first_pfn - p] = True
                yield p, end, r.offset + ((p - r.first_pfn) << PAGE_SHIFT), sel

    def read_chunk(self, c0: int, off0: int, sel: np.ndarray) -> ChunkResult | None:
        """Read the selected pages (bool per page of the chunk starting at PFN c0,
        memfd offset off0) and classify them. None when nothing is selected. The
        returned data buffers stay valid until the next call."""
        idx = np.flatnonzero(sel)
        if not len(idx):
            return None
        nz = self.nz
        bytes_read = 0
        for a, b in zip(*(x.tolist() for x in runs(idx, GAP_PAGES))):
            pread_full(self.fd, self.mv[a * PAGE_SIZE:b * PAGE_SIZE], off0 + a * PAGE_SIZE)
            nz[a:b] = self.words[a:b].max(axis=1) != 0
            bytes_read += (b - a) * PAGE_SIZE
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        is_data = nz[idx]
        flags = np.zeros(hi - lo, dtype=np.uint8)
        flags[idx - lo] = np.where(is_data, FLAG_DATA, FLAG_ZERO)
        didx = idx[is_data]
        data = self._data_buffers(didx)
        return ChunkResult(c0 + lo, flags, data, len(didx), len(idx) - len(didx), len(idx), bytes_read,
                           didx + c0)

    def _data_buffers(self, didx: np.ndarray) -> list:
        if not len(didx):
            return []
        s, e = runs(didx)
        if len(s) <= MAX_DATA_RUNS_AS_IOV:
            return [self.mv[a * PAGE_SIZE:b * PAGE_SIZE] for a, b in zip(s.tolist(), e.tolist())]
        # many short runs: gather them into one buffer (one numpy copy) instead of a long iovec
        np.take(self.words, didx, axis=0, out=self.gwords[:len(didx)])
        return [memoryview(self.gbuf)[:len(didx) * PAGE_SIZE]]
