"""Balloon inflate/deflate wire formats (DESIGN.md section 4), all little-endian.

Pure functions over numpy arrays and bytes. They run over GiB of pages, so nothing
here loops in Python per page: the loops that remain are per request (bitmap
windows, chunk requests), which is what the protocols themselves cost.

Decoders are the device's first line against a hostile guest: every refusal raises
WireError with a stable short reason code the device counts by. Decoders copy
guest memory once (joining the chain's buffers) before validating, so the guest
cannot change what was checked.

Formats:
- pfn: le32 PFN array (at most 256 per request on the ring; that limit is the
  driver's, not the codec's).
- bitmap (the seed's): 32-byte header {le16 cmd, le16 page_shift, le16 flags,
  le16 reserved, le64 req_id, le64 start_pfn, le64 bmap_len} then bmap_len bytes;
  bit i (byte i//8, bit i%8, LSB first) stands for PFN start_pfn + i. With
  page_shift s > 12 a bit stands for the 2**(s-12) pages from start_pfn + i*2**(s-12)
  (start_pfn, still a 4 KiB PFN, aligned to that): page_shift 21 names whole 2 MiB
  blocks, one bit per huge host page.
- chunks: one (GPA, nbytes) descriptor per run of contiguous pages.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PFN_LIMIT = 1 << 32  # le32 PFNs: 16 TiB of 4 KiB pages
BITMAP_HEADER = struct.Struct("<HHHHQQQ")
BITMAP_HEADER_SIZE = BITMAP_HEADER.size  # 32
MAX_DESC_LEN = (1 << 32) - 1
# Largest page-aligned length one descriptor (le32 len) can carry: 4 GiB - 4 KiB.
MAX_CHUNK_BYTES = MAX_DESC_LEN & ~(PAGE_SIZE - 1)
# virtio: a chain may not cover more than 2^32 bytes in total.
MAX_REQUEST_BYTES = 1 << 32

Buffers = bytes | bytearray | memoryview | Sequence[bytes | bytearray | memoryview]


class WireError(ValueError):
    """A request the device refuses; `reason` is a stable short code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


# ======================================================================================
# Runs
# ======================================================================================
def _as_int64(a, what: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise WireError("bad-type", f"{what} must be integers, got dtype {arr.dtype}")
    if arr.dtype == np.uint64 and (arr > np.iinfo(np.int64).max).any():
        raise WireError("pfn-range", f"{what} has values >= 2^63")
    return arr.astype(np.int64, copy=False).ravel()


def sorted_unique(a: np.ndarray) -> np.ndarray:
    """np.unique for int arrays by sort + neighbour compare: np.unique is tens of times
    slower on numpy 2.4 for millions of PFNs. Skips the sort when already sorted."""
    a = np.asarray(a)
    if a.size < 2:
        return a.copy()
    if not (a[1:] >= a[:-1]).all():
        a = np.sort(a)
    return a[np.concatenate(([True], a[1:] != a[:-1]))]


def pfns_to_runs(pfns) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique start PFNs and lengths (int64) of the maximal runs of
    contiguous PFNs in `pfns` (any order, duplicates allowed)."""
    u = sorted_unique(_as_int64(pfns, "pfns"))
    if u.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    brk = np.flatnonzero(np.diff(u) != 1) + 1
    first = np.concatenate(([0], brk))
    ends = np.concatenate((brk, [u.size]))
    return u[first], (ends - first).astype(np.int64)


def runs_to_pfns(starts, lengths) -> np.ndarray:
    """Every PFN of the runs, in run order (int64)."""
    s = _as_int64(starts, "starts")
    ln = _as_int64(lengths, "lengths")
    if s.shape != ln.shape:
        raise WireError("bad-runs", f"{s.size} starts but {ln.size} lengths")
    if (ln < 0).any():
        raise WireError("bad-runs", "negative run length")
    total = int(ln.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    first = np.cumsum(ln) - ln  # position of each run's first PFN in the output
    return np.arange(total, dtype=np.int64) + np.repeat(s - first, ln)


def _log2_buckets(lengths: np.ndarray) -> np.ndarray:
    # frexp gives x = m * 2**e with m in [0.5, 1): floor(log2 x) = e - 1, exact below 2**53
    _, e = np.frexp(lengths.astype(np.float64))
    return (e - 1).astype(np.int64)


def run_length_hist(lengths) -> dict[int, int]:
    """Runs per log2 bucket: {bucket lower bound in pages: number of runs}; a run of
    L pages lands in bucket 2**floor(log2 L) (1, 2, 4, ...)."""
    ln = _as_int64(lengths, "lengths")
    if ln.size == 0:
        return {}
    if (ln < 1).any():
        raise WireError("bad-runs", "run lengths must be >= 1")
    counts = np.bincount(_log2_buckets(ln))
    return {1 << int(b): int(counts[b]) for b in np.flatnonzero(counts)}


def run_length_pages_hist(lengths) -> dict[int, int]:
    """Pages per log2 bucket of run length (same buckets as run_length_hist)."""
    ln = _as_int64(lengths, "lengths")
    if ln.size == 0:
        return {}
    if (ln < 1).any():
        raise WireError("bad-runs", "run lengths must be >= 1")
    b = _log2_buckets(ln)
    pages = np.zeros(int(b.max()) + 1, dtype=np.int64)
    np.add.at(pages, b, ln)
    counts = np.bincount(b)
    return {1 << int(k): int(pages[k]) for k in np.flatnonzero(counts)}


def _join(buf: Buffers) -> bytes:
    """One private copy of the request (the guest cannot change it afterwards)."""
    if isinstance(buf, (bytes, bytearray, memoryview)):
        return bytes(buf)
    return b"".join(bytes(b) for b in buf)


def check_runs_in_ram(starts, lengths, layout) -> None:
    """Refuse ('not-ram') any run that is not entirely inside one RAM region of the
    GuestLayout (hole PFNs, beyond RAM, or straddling a region edge). Vectorized."""
    s = _as_int64(starts, "starts")
    ln = _as_int64(lengths, "lengths")
    if s.size == 0:
        return
    first = np.array([r.first_pfn for r in layout.regions], dtype=np.int64)
    end = np.array([r.end_pfn for r in layout.regions], dtype=np.int64)
    idx = np.searchsorted(first, s, side="right") - 1
    cl = np.clip(idx, 0, len(first) - 1)
    ok = (idx >= 0) & (s >= 0) & (ln >= 1) & (s + ln <= end[cl])
    if not ok.all():
        k = int(np.argmin(ok))
        raise WireError("not-ram", f"run of {int(ln[k])} pages at PFN {int(s[k]):#x} is not inside one RAM region")


# ======================================================================================
# pfn format
# ======================================================================================
def _check_pfns(pfns) -> np.ndarray:
    p = np.asarray(pfns)
    if p.size and p.dtype.kind not in "iu":
        raise WireError("bad-type", f"PFNs must be integers, got dtype {p.dtype}")
    p = p.ravel()
    if p.size and (p.min() < 0 or p.max() >= PFN_LIMIT):
        bad = p[(p < 0) | (p >= PFN_LIMIT)][0]
        raise WireError("pfn-range", f"PFN {int(bad)} does not fit le32 (0..2^32-1)")
    return p


def encode_pfns(pfns) -> bytes:
    """le32 PFN array. Refuses PFNs outside 0..2^32-1 ('pfn-range')."""
    return _check_pfns(pfns).astype("<u4").tobytes()


def encode_pfns_into(dst, pfns) -> int:
    """Write the le32 PFN array straight into `dst` (e.g. a guest-RAM memoryview),
    saving the intermediate bytes object; returns the bytes written."""
    p = _check_pfns(pfns)
    out = np.frombuffer(dst, dtype=np.uint8)
    n = p.size * 4
    if n > out.size:
        raise WireError("buffer-small", f"{p.size} PFNs need {n} bytes, buffer has {out.size}")
    out[:n].view("<u4")[:] = p
    return n


def decode_pfns(buf: Buffers, *, max_pfn: int | None = None) -> np.ndarray:
    """PFNs (uint32, private copy) of a pfn request. Refuses an empty buffer or one
    whose length is not a multiple of 4 ('pfn-array-len') and, given max_pfn, any
    PFN >= max_pfn ('beyond-ram'). Hole PFNs are the caller's check (layout)."""
    data = _join(buf)
    if len(data) == 0:
        raise WireError("pfn-array-len", "empty PFN array")
    if len(data) % 4:
        raise WireError("pfn-array-len", f"PFN array of {len(data)} bytes is not a multiple of 4")
    pfns = np.frombuffer(data, dtype="<u4").astype(np.uint32)
    if max_pfn is not None:
        hi = int(pfns.max())
        if hi >= max_pfn:
            raise WireError("beyond-ram", f"PFN {hi:#x} is beyond guest RAM (max_pfn {max_pfn:#x})")
    return pfns


# ======================================================================================
# bitmap format (the seed's)
# ======================================================================================
@dataclass(frozen=True)
class BitmapHeader:
    cmd: int
    page_shift: int
    flags: int
    reserved: int
    req_id: int
    start_pfn: int
    bmap_len: int

    def pack(self) -> bytes:
        return BITMAP_HEADER.pack(self.cmd, self.page_shift, self.flags, self.reserved,
                                  self.req_id, self.start_pfn, self.bmap_len)

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> "BitmapHeader":
        if len(buf) < BITMAP_HEADER_SIZE:
            raise WireError("truncated-header", f"bitmap header needs {BITMAP_HEADER_SIZE} bytes, got {len(buf)}")
        return cls(*BITMAP_HEADER.unpack_from(buf, 0))


def _bitmap_windows(u: np.ndarray, pages_per_request: int):
    """For sorted unique PFNs: per non-empty aligned window of pages_per_request PFNs,
    (first index, end index, start PFN = lowest set PFN, bitmap bytes up to the
    highest set PFN)."""
    win = u // pages_per_request
    brk = np.flatnonzero(np.diff(win)) + 1
    first = np.concatenate(([0], brk))
    end = np.concatenate((brk, [u.size]))
    start = u[first]
    nbytes = (u[end - 1] - start) // 8 + 1  # trailing zero bytes trimmed
    return first, end, start, nbytes


def encode_bitmap_requests(pfns, *, pages_per_request: int, page_shift: int = PAGE_SHIFT, cmd: int,
                           req_id_start: int = 0) -> list[bytes]:
    """One request (header + bitmap) per aligned window of pages_per_request PFNs
    that holds any of `pfns`; the bitmap starts at the window's lowest set PFN and
    ends at the byte of its highest, so sparse windows produce small bitmaps.
    Empty windows produce nothing. req_id counts up from req_id_start. With
    page_shift > 12, `pfns` are block numbers (PFN >> (page_shift - 12)) and the
    header's start_pfn is the first block's 4 KiB PFN."""
    if pages_per_request < 1:
        raise ValueError(f"pages_per_request must be >= 1, got {pages_per_request}")
    u = sorted_unique(_as_int64(pfns, "pfns"))
    if u.size == 0:
        return []
    if u[0] < 0:
        raise WireError("pfn-range", f"negative PFN {int(u[0])}")
    first, end, start, nbytes = _bitmap_windows(u, pages_per_request)
    # all bitmaps in one buffer: one packbits for the whole set, then slices
    base = np.cumsum(nbytes) - nbytes
    bits = np.zeros(int(nbytes.sum()) * 8, dtype=np.uint8)
    w = np.repeat(np.arange(first.size), end - first)
    bits[base[w] * 8 + (u - start[w])] = 1
    packed = np.packbits(bits, bitorder="little").tobytes()
    out = []
    for k, (s, b, n) in enumerate(zip(start.tolist(), base.tolist(), nbytes.tolist())):
        hdr = BITMAP_HEADER.pack(cmd, page_shift, 0, 0, req_id_start + k, s << (page_shift - PAGE_SHIFT), n)
        out.append(hdr + packed[b : b + n])
    return out


BITMAP_PAGE_SHIFTS = (PAGE_SHIFT, 21)   # what the device accepts: 4 KiB pages, 2 MiB blocks


def decode_bitmap(buf: Buffers, *, max_pfn: int, expected_page_shift: int = PAGE_SHIFT,
                  page_shifts: tuple[int, ...] | None = None) -> tuple[BitmapHeader, np.ndarray, np.ndarray]:
    """(header, run starts, run lengths) of one bitmap request, given as one buffer
    or the chain's list of buffers (header and bitmap may be split anywhere).
    Refuses: 'truncated-header', 'bad-page-shift', 'bitmap-too-large' (bmap_len
    more than max_pfn bits need), 'bitmap-len' (bmap_len differs from the bytes
    received), 'beyond-ram' (a set bit at or beyond max_pfn), 'unaligned-start'
    (start_pfn not a multiple of the page_shift's block). `page_shifts` lists the
    accepted page_shift values (default: just expected_page_shift). Runs come back
    in 4 KiB PFNs whatever the page_shift."""
    data = _join(buf)
    hdr = BitmapHeader.unpack(data)
    accepted = page_shifts if page_shifts is not None else (expected_page_shift,)
    if hdr.page_shift not in accepted:
        raise WireError("bad-page-shift", f"page_shift {hdr.page_shift}, expected "
                                          f"{' or '.join(str(x) for x in accepted)}")
    unit_shift = hdr.page_shift - PAGE_SHIFT
    if hdr.start_pfn & ((1 << unit_shift) - 1):
        raise WireError("unaligned-start", f"start_pfn {hdr.start_pfn:#x} is not aligned to the "
                                           f"{1 << unit_shift} pages of page_shift {hdr.page_shift}")
    need = (-(-max_pfn >> unit_shift) + 7) // 8
    if hdr.bmap_len > need:
        raise WireError("bitmap-too-large", f"bmap_len {hdr.bmap_len} is more than the {need} bytes "
                                            f"a guest of {max_pfn} pages can need")
    got = len(data) - BITMAP_HEADER_SIZE
    if hdr.bmap_len != got:
        raise WireError("bitmap-len", f"header says bmap_len {hdr.bmap_len}, request carries {got} bytes")
    starts, lengths = bitmap_to_runs(np.frombuffer(data, dtype=np.uint8, offset=BITMAP_HEADER_SIZE))
    starts, lengths = starts << unit_shift, lengths << unit_shift
    if starts.size:
        last = hdr.start_pfn + int(starts[-1] + lengths[-1]) - 1
        if last >= max_pfn:
            raise WireError("beyond-ram", f"bitmap sets PFN {last:#x}, beyond guest RAM (max_pfn {max_pfn:#x})")
        starts = starts + np.int64(hdr.start_pfn)
    return hdr, starts, lengths


def _runs_of_bits(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of set bits by unpacking every bit: best for small or busy bitmaps."""
    p = np.zeros(b.size * 8 + 2, dtype=np.uint8)
    p[1:-1] = np.unpackbits(b, bitorder="little")
    edges = np.flatnonzero(p[1:] != p[:-1])  # bit stream starts and ends with 0: rise, fall, ...
    starts = edges[0::2]
    return starts, edges[1::2] - starts


def bitmap_to_runs(bitmap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of set bits (LSB-first bit order) as (bit offsets, lengths), int64.

    For large bitmaps only the bytes where a run can start or end are unpacked
    (bytes other than 0x00/0xFF, or whose bit 0 differs from the previous byte's
    bit 7): a dense or sparse bitmap then costs one pass over its bytes, not its
    bits. Busy (highly fragmented) or small bitmaps are unpacked whole."""
    b = np.asarray(bitmap, dtype=np.uint8).ravel()
    if b.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if b.size <= 64:
        s, ln = _runs_of_bits(b)
        return s.astype(np.int64), ln.astype(np.int64)
    bp = np.zeros(b.size + 2, dtype=np.uint8)  # a zero byte before and after
    bp[1:-1] = b
    cur = bp[1:]  # bytes 0..n (n = the trailing zero byte)
    prev_hi = bp[:-1] >> 7  # bit 7 of the byte before each
    cand = np.flatnonzero(((cur != 0) & (cur != 0xFF)) | (prev_hi != (cur & 1)))
    if cand.size * 4 > b.size:
        s, ln = _runs_of_bits(b)
        return s.astype(np.int64), ln.astype(np.int64)
    seq = np.empty((cand.size, 9), dtype=np.uint8)
    seq[:, 0] = prev_hi[cand]
    seq[:, 1:] = np.unpackbits(cur[cand][:, None], axis=1, bitorder="little")
    ed = seq[:, 1:] != seq[:, :-1]
    pos = (cand.astype(np.int64)[:, None] * 8 + np.arange(8, dtype=np.int64))[ed]
    starts = pos[0::2]
    return starts, pos[1::2] - starts


# ======================================================================================
# chunks format
# ======================================================================================
def runs_to_chunks(starts, lengths, *, max_chunk_bytes: int = MAX_CHUNK_BYTES,
                   page_shift: int = PAGE_SHIFT) -> list[tuple[int, int]]:
    """(gpa, nbytes) per run, splitting runs longer than max_chunk_bytes (a
    descriptor's le32 len caps one chunk just under 4 GiB)."""
    s = _as_int64(starts, "starts")
    ln = _as_int64(lengths, "lengths")
    g, n = runs_to_chunk_arrays(s, ln, max_chunk_bytes=max_chunk_bytes, page_shift=page_shift)
    return list(zip(g.tolist(), n.tolist()))


def runs_to_chunk_arrays(starts, lengths, *, max_chunk_bytes: int = MAX_CHUNK_BYTES,
                         page_shift: int = PAGE_SHIFT) -> tuple[np.ndarray, np.ndarray]:
    """runs_to_chunks as two int64 arrays (gpas, nbytes), ready for a vectorized
    indirect table (DriverQueue.add_buf accepts np.column_stack of them)."""
    s = _as_int64(starts, "starts")
    ln = _as_int64(lengths, "lengths")
    if (ln < 1).any() or (s < 0).any():
        raise WireError("bad-runs", "runs need non-negative starts and lengths >= 1")
    max_pages = max_chunk_bytes >> page_shift
    if max_pages < 1:
        raise ValueError(f"max_chunk_bytes {max_chunk_bytes} is less than one page")
    pieces = (ln + max_pages - 1) // max_pages
    if (pieces == 1).all():
        return s << page_shift, ln << page_shift
    run = np.repeat(np.arange(s.size), pieces)
    k = np.arange(run.size) - np.repeat(np.cumsum(pieces) - pieces, pieces)  # piece number in its run
    cs = s[run] + k * max_pages
    cl = np.minimum(max_pages, ln[run] - k * max_pages)
    return cs << page_shift, cl << page_shift


def chunks_to_runs(chunks: Iterable[tuple[int, int]] | np.ndarray, *, max_pfn: int, merge: bool = True,
                   page_shift: int = PAGE_SHIFT) -> tuple[np.ndarray, np.ndarray]:
    """PFN runs of a chunks request. Refuses 'zero-length', 'unaligned' (gpa or len
    not page-aligned), 'overflow' (gpa + len past 2^64), 'beyond-ram' (ends past
    max_pfn), 'overlap' (two chunks share a page). With merge=True the runs come
    back sorted with chunks the guest sent adjacent merged into one run; with
    merge=False in the order sent. Accepts (gpa, nbytes) pairs or an (n, 2) array
    (e.g. np.column_stack((chain.gpas(), chain.lens())))."""
    if isinstance(chunks, np.ndarray):
        a = chunks
        if a.size and a.dtype.kind not in "iu":
            raise WireError("bad-chunks", f"chunks must be integers, got dtype {a.dtype}")
        if a.dtype.kind == "i" and (a < 0).any():
            raise WireError("bad-chunks", "negative chunk gpa or length")
    else:
        try:
            a = np.array(list(chunks), dtype=np.uint64)
        except (OverflowError, TypeError, ValueError) as e:
            raise WireError("bad-chunks", f"chunks must be (gpa, nbytes) integer pairs in 0..2^64-1: {e}") from None
    if a.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if a.ndim != 2 or a.shape[1] != 2:
        raise WireError("bad-chunks", f"chunks must be (gpa, nbytes) pairs, got shape {a.shape}")
    a = a.astype(np.uint64, copy=False)
    gpa, nb = a[:, 0], a[:, 1]
    mask = np.uint64((1 << page_shift) - 1)
    if (nb == 0).any():
        k = int(np.argmax(nb == 0))
        raise WireError("zero-length", f"chunk {k} at {int(gpa[k]):#x} has length 0")
    bad = ((gpa & mask) != 0) | ((nb & mask) != 0)
    if bad.any():
        k = int(np.argmax(bad))
        raise WireError("unaligned", f"chunk {k} ({int(gpa[k]):#x}, {int(nb[k])}) is not page-aligned")
    over = gpa > np.uint64((1 << 64) - 1) - nb
    if over.any():
        k = int(np.argmax(over))
        raise WireError("overflow", f"chunk {k} ({int(gpa[k]):#x}, {int(nb[k])}) wraps past 2^64")
    spfn = gpa >> np.uint64(page_shift)
    epfn = spfn + (nb >> np.uint64(page_shift))
    past = epfn > np.uint64(max_pfn)
    if past.any():
        k = int(np.argmax(past))
        raise WireError("beyond-ram", f"chunk {k} ends at PFN {int(epfn[k]):#x}, beyond guest RAM (max_pfn {max_pfn:#x})")
    s = spfn.astype(np.int64)
    ln = (epfn - spfn).astype(np.int64)
    order = np.argsort(s, kind="stable")
    ss, sl = s[order], ln[order]
    if ss.size > 1:
        ov = ss[1:] < ss[:-1] + sl[:-1]
        if ov.any():
            k = int(np.argmax(ov))
            raise WireError("overlap", f"chunks at PFN {int(ss[k]):#x}+{int(sl[k])} and {int(ss[k + 1]):#x} overlap")
    if not merge:
        return s, ln
    e = ss + sl
    brk = np.flatnonzero(ss[1:] != e[:-1]) + 1
    first = np.concatenate(([0], brk))
    last = np.concatenate((brk, [ss.size])) - 1
    return ss[first], e[last] - ss[first]


def chunk_requests(gpas: np.ndarray, nbytes: np.ndarray, *, max_chunks: int,
                   max_bytes: int = MAX_REQUEST_BYTES) -> list[tuple[int, int]]:
    """Split a chunk list into requests as [(first, end)] index ranges, each at most
    max_chunks chunks and max_bytes in total (virtio caps a chain at 2^32 bytes).
    Loops per request, not per chunk."""
    nb = np.asarray(nbytes, dtype=np.int64)
    if max_chunks < 1:
        raise ValueError("max_chunks must be >= 1")
    if nb.size and int(nb.max()) > max_bytes:
        raise WireError("too-long", f"a chunk of {int(nb.max())} bytes exceeds max_bytes {max_bytes}")
    cum = np.concatenate(([0], np.cumsum(nb)))
    out = []
    i, n = 0, nb.size
    while i < n:
        j = int(np.searchsorted(cum, cum[i] + max_bytes, side="right")) - 1
        j = min(j, i + max_chunks, n)
        out.append((i, j))
        i = j
    return out
