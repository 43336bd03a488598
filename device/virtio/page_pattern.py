"""The pattern every kept guest page carries, and its fingerprint: shared by both sides.

The guest writes the pattern (device/guest/page_contents.py) and verifies it; the
migration source and destination (device/vmm/migration/) fingerprint what the memfd
holds to prove a copy exact. Word i of a page is h(pfn, seed) * MULT[i] (mod 2**64);
the fingerprint is sum_i word[i] * FPV[i] (mod 2**64). Pages are read with pread into
a reused buffer, never through a mapping (ENVIRONMENT.md).
"""
from __future__ import annotations

import os

import numpy as np

from device.virtio.layout import PAGE_SHIFT, PAGE_SIZE, GuestLayout
from device.virtio.ram import memfd_data_extents

WORDS = PAGE_SIZE // 8
CHUNK_PAGES = 2048      # 8 MiB per read buffer

_M64 = 0xFFFFFFFFFFFFFFFF


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # wrapping mod 2**64 is the point
        z = np.asarray(x).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _seed_key(seeds: np.ndarray) -> np.ndarray:
    return _splitmix64(np.asarray(seeds, dtype=np.uint64) ^ np.uint64(0x5EED5EED5EED5EED))


def page_hash(pfns: np.ndarray, seeds) -> np.ndarray:
    """Odd 64-bit value per page from (pfn, seed); seeds a scalar or one per page."""
    pf = np.asarray(pfns, dtype=np.int64).astype(np.uint64)
    return _splitmix64(pf ^ _seed_key(seeds)) | np.uint64(1)


_rng = np.random.default_rng(0xBA11007)
MULT = _rng.integers(0, 1 << 63, WORDS, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
FPV = _rng.integers(0, 1 << 63, WORDS, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
FP_CONST = np.uint64(int((MULT * FPV).sum(dtype=np.uint64)))
assert FP_CONST != 0


def seed_ok(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= _M64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return int(seed)


def pread_full(fd: int, mv: memoryview, offset: int) -> None:
    got = 0
    while got < len(mv):
        n = os.preadv(fd, [mv[got:]], offset + got)
        if n <= 0:
            raise OSError(f"short pread of guest RAM at offset {offset + got:#x}")
        got += n


# --- fingerprints (verification) -----------------------------------------------------------
def fingerprint_memfd(fd: int, layout: GuestLayout, skip: np.ndarray | None = None,
                      chunk_pages: int = CHUNK_PAGES) -> np.ndarray:
    """uint64 fingerprint per PFN over [0, max_pfn): GuestPageContents's page fingerprint
    (sum of word[i] * FPV[i]) for every page the memfd holds data for, 0 for holes
    (a zero page's fingerprint is 0 too). Pages where `skip` is True are not read
    (left 0). Reads only the memfd's data extents, with pread."""
    out = np.zeros(layout.max_pfn, dtype=np.uint64)
    buf = bytearray(chunk_pages * PAGE_SIZE)
    mv = memoryview(buf)
    words = np.frombuffer(buf, dtype=np.uint64).reshape(-1, WORDS)
    size = layout.ram_bytes
    for off, ln in memfd_data_extents(fd, size):
        pos, end = off, off + ln
        while pos < end:
            n = min(chunk_pages * PAGE_SIZE, end - pos)
            npg = n >> PAGE_SHIFT
            pfns = layout.offset_to_pfn(np.arange(pos, pos + n, PAGE_SIZE, dtype=np.int64))
            if skip is not None and skip[pfns].all():
                pos += n
                continue
            pread_full(fd, mv[:n], pos)
            out[pfns] = words[:npg] @ FPV
            pos += n
    if skip is not None:
        out[skip] = 0
    return out


def fingerprint_pfns(fd: int, layout: GuestLayout, pfns: np.ndarray) -> np.ndarray:
    """Fingerprints of the given sorted RAM PFNs, read with pread in spans."""
    pfns = np.asarray(pfns, dtype=np.int64)
    out = np.empty(len(pfns), dtype=np.uint64)
    if not len(pfns):
        return out
    buf = bytearray(CHUNK_PAGES * PAGE_SIZE)
    mv = memoryview(buf)
    words = np.frombuffer(buf, dtype=np.uint64).reshape(-1, WORDS)
    offs = layout.pfn_to_offset(pfns) >> PAGE_SHIFT   # memfd page numbers (sorted like pfns)
    i = 0
    while i < len(offs):
        # one span: pages within CHUNK_PAGES of the first one
        j = int(np.searchsorted(offs, offs[i] + CHUNK_PAGES, side="left"))
        base = int(offs[i])
        span = int(offs[j - 1]) - base + 1
        pread_full(fd, mv[:span * PAGE_SIZE], base * PAGE_SIZE)
        rows = offs[i:j] - base
        out[i:j] = words[rows] @ FPV
        i = j
    return out
