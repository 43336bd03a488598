"""Reference decoders and a lenient ring walk, independent of device/ and wire.py.

Written from the format descriptions (DESIGN.md section 4, docs/VIRTQUEUE.md), not
from the device's code, so the oracle (fuzz/oracle.py) and the decoder target
(fuzz/decoder_target.py) compare the device with a second reading of the same bytes:
  * lenient_chains / chain_bytes / named_mask: every page any interpretation of a
    request could name (no validation: an upper bound), for the discard oracle;
  * ref_bitmap / ref_chunks: the strict formats (refusal reason or the runs), for
    the decoders.
"""
from __future__ import annotations

import struct

import numpy as np

from device.guest.raw_guest import F_INDIRECT, F_NEXT, F_WRITE, RingAddrs
from fuzz.regions import BITMAP_PAGE_SHIFTS, PAGE_SHIFT, PAGE_SIZE, RegionTable
from fuzz.cases import U64_MAX


def ram_offset(regions: RegionTable, gpa: int, n: int) -> int | None:
    """memfd offset of [gpa, gpa+n) if inside one region (the fuzzer's own table,
    fuzz/regions.py, not the device's), else None."""
    return regions.gpa_to_offset(gpa, n)


class GuestReader:
    """Reads guest memory for the model, as if the pages in `zero` (memfd page numbers)
    had been discarded already, and records what it read (pages and byte ranges)."""

    def __init__(self, mem, zero: set[int]) -> None:
        self.mem, self.zero = mem, zero
        self.pages: set[int] = set()
        self.ranges: list[tuple[int, int]] = []

    def read(self, off: int, n: int) -> bytes:
        first, last = off >> PAGE_SHIFT, (off + max(n, 1) - 1) >> PAGE_SHIFT
        self.pages.update(range(first, last + 1))
        self.ranges.append((off, n))
        data = bytes(self.mem[off:off + n])
        if self.zero and not self.zero.isdisjoint(range(first, last + 1)):
            b = bytearray(data)
            for pg in range(first, last + 1):
                if pg in self.zero:
                    lo = max(pg << PAGE_SHIFT, off) - off
                    hi = min((pg + 1) << PAGE_SHIFT, off + n) - off
                    b[lo:hi] = bytes(hi - lo)
            data = bytes(b)
        return data


Chain = list[tuple[int, int, bool]]       # (gpa, len, device-writable) per buffer


def lenient_chains(rd: GuestReader, lay: RegionTable, ring: RingAddrs, last: int, idx: int | None = None
                   ) -> list[Chain]:
    """Every chain the avail ring offers from `last` (up to avail.idx, or `idx` when the
    case publishes it later), following next pointers and one level of indirect tables
    without validating anything else."""
    o_av = ram_offset(lay, ring.avail, 4 + 2 * ring.size)
    o_d = ram_offset(lay, ring.desc, 16 * ring.size)
    if o_av is None or o_d is None:
        return []
    av = rd.read(o_av, 4 + 2 * ring.size)
    dt = rd.read(o_d, 16 * ring.size)
    if idx is None:
        idx = struct.unpack_from("<H", av, 2)[0]
    pending = min((idx - last) & 0xFFFF, ring.size)
    out = []
    for k in range(pending):
        head = struct.unpack_from("<H", av, 4 + 2 * ((last + k) % ring.size))[0]
        bufs: Chain = []
        i, seen = head, set()
        while i < ring.size and i not in seen:
            seen.add(i)
            addr, ln, fl, nx = struct.unpack_from("<QIHH", dt, 16 * i)
            if fl & F_INDIRECT:
                n = min(ln // 16, 1 << 16)   # no chain is longer than 2^16 (le16 next)
                ot = ram_offset(lay, addr, 16 * n)
                if ot is not None and n:
                    tbl = rd.read(ot, 16 * n)
                    j, seen2 = 0, set()
                    while j < n and j not in seen2:
                        seen2.add(j)
                        a2, l2, f2, n2 = struct.unpack_from("<QIHH", tbl, 16 * j)
                        bufs.append((a2, l2, bool(f2 & F_WRITE)))
                        if not f2 & F_NEXT:
                            break
                        j = n2
                break
            bufs.append((addr, ln, bool(fl & F_WRITE)))
            if not fl & F_NEXT:
                break
            i = nx
        out.append(bufs)
    return out


def chain_bytes(rd: GuestReader, lay: RegionTable, bufs: Chain, cap: int = 1 << 22) -> bytes:
    parts, total = [], 0
    for a, ln, _w in bufs:
        o = ram_offset(lay, a, ln)
        if o is None:
            continue
        if total + ln > cap:
            if ln <= 16 << 20:          # the most any device path copies: record, don't read
                rd.pages.update(range(o >> PAGE_SHIFT, ((o + max(ln, 1) - 1) >> PAGE_SHIFT) + 1))
                rd.ranges.append((o, ln))
            continue
        parts.append(rd.read(o, ln))
        total += ln
    return b"".join(parts)


def named_mask(fmt: str, rd: GuestReader, lay: RegionTable, chains: list[Chain], out: np.ndarray) -> np.ndarray:
    """Upper bound of the PFNs a request in wire format `fmt` (regions.wire_format_of)
    names, whatever its validity, marked in `out`, a mask over 0..max_pfn-1 (a PFN at or
    past max_pfn is no RAM page: it cannot lose data)."""
    mx = lay.max_pfn
    for bufs in chains:
        if fmt == "chunks":
            for a, ln, _w in bufs:
                if ln and a >> PAGE_SHIFT < mx:
                    out[a >> PAGE_SHIFT:min((a + ln + PAGE_SIZE - 1) >> PAGE_SHIFT, mx)] = True
            continue
        data = chain_bytes(rd, lay, bufs)
        if fmt == "pfn":
            n = len(data) // 4
            p = np.frombuffer(data[:4 * n], dtype="<u4").astype(np.int64)
            out[p[p < mx]] = True
        elif len(data) >= 32:
            start = struct.unpack_from("<Q", data, 16)[0]
            shift = struct.unpack_from("<H", data, 2)[0]
            unit = 1 << (shift - PAGE_SHIFT) if shift in BITMAP_PAGE_SHIFTS else 1
            if start < mx:
                bits = np.unpackbits(np.frombuffer(data[32:32 + (mx // unit + 8) // 8], dtype=np.uint8),
                                     bitorder="little")
                p = (np.flatnonzero(bits)[:, None] * unit + np.arange(unit)).ravel() + start
                out[p[p < mx]] = True
    return out


def ref_bitmap(data: bytes, max_pfn: int) -> tuple[str | None, tuple[np.ndarray, np.ndarray]]:
    """The bitmap format as DESIGN.md section 4 states it: (refusal or None, maximal runs
    (starts, lengths) of the PFNs whose bits are set), by unpacking every bit."""
    none = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    if len(data) < 32:
        return "truncated-header", none
    _cmd, shift, _fl, _res, _rid, start, blen = struct.unpack_from("<HHHHQQQ", data)
    if shift not in (12, 21):
        return "bad-page-shift", none
    unit = 1 << (shift - 12)              # page_shift 21: one bit per aligned 512-page block
    if start % unit:
        return "unaligned-start", none
    if blen > ((max_pfn + unit - 1) // unit + 7) // 8:
        return "bitmap-too-large", none
    if blen != len(data) - 32:
        return "bitmap-len", none
    bits = np.zeros(8 * blen + 2, dtype=np.int8)
    bits[1:-1] = np.unpackbits(np.frombuffer(data[32:], dtype=np.uint8), bitorder="little")
    edges = np.flatnonzero(np.diff(bits))
    s, e = edges[0::2].astype(np.int64) * unit, edges[1::2].astype(np.int64) * unit
    if not s.size:
        return None, none                     # names nothing, wherever start_pfn points
    if start + int(e[-1]) - 1 >= max_pfn:
        return "beyond-ram", none
    return None, (s + start, e - s)


def ref_chunks(chunks: list[tuple[int, int]], max_pfn: int) -> tuple[str | None, list[tuple[int, int]]]:
    """(refusal or None, the chunks as sorted (start pfn, pages) spans), in the order of
    checks docs/VIRTQUEUE.md lists."""
    if any(n == 0 for g, n in chunks):
        return "zero-length", []
    if any(g % PAGE_SIZE or n % PAGE_SIZE for g, n in chunks):
        return "unaligned", []
    if any(g + n > U64_MAX for g, n in chunks):
        return "overflow", []
    if any((g + n) >> PAGE_SHIFT > max_pfn for g, n in chunks):
        return "beyond-ram", []
    spans = sorted((g >> PAGE_SHIFT, n >> PAGE_SHIFT) for g, n in chunks)
    for (s1, l1), (s2, _) in zip(spans, spans[1:]):
        if s2 < s1 + l1:
            return "overlap", []
    return None, spans


def merge_spans(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for s, n in spans:
        if out and out[-1][0] + out[-1][1] == s:
            out[-1][1] += n
        else:
            out.append([s, n])
    return [(s, n) for s, n in out]

