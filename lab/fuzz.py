"""Fuzzing the device as a hostile guest would: decoders, ring walking, queue handlers.

A structure-aware mutation loop, in-process for speed. Each execution ("exec") builds
a fresh BalloonDevice over a real memfd GuestRAM, writes a ring, request buffers and
indirect tables that a generator made and a mutator broke (descriptor loops, chains in
the MMIO hole, bitmaps past the end of RAM, PFNs in the hole, wrong page_shift...), and
kicks the real device code. Cheaper execs drive the decoders (wire.py) and the ring
walker (DeviceQueue) alone, checked against reference decoders written here.

The oracle for the device is the memfd itself (SEEK_DATA/SEEK_HOLE, the kernel's view,
not the device's bookkeeping): every page of the guest's "fill" area holds data before
an exec; afterwards, every page that lost its data must be one the guest named on the
inflate queue, where "named" is computed before the exec by an independent, lenient
reading of the ring (this module's own ring walk and decoders, no validation: an upper
bound of what any interpretation of the request could name). Pages the device says it
ballooned must really be gone from the memfd. An exception escaping the device, or
its `device-internal` counter, is a crash; an exec that runs past its time limit
(ITIMER_PROF, with a wall-clock backstop) is a hang.

Guidance is behavioural: a case whose outcome (the set of refusal reasons, NEEDS_RESET,
whether anything was discarded, ...) was never seen joins the pool that mutations start
from. Found failures and the pool can be written out as JSON cases;
tests/fuzz_corpus/ keeps them as regression tests (replay()).
"""
from __future__ import annotations

import copy
import json
import logging
import multiprocessing as mp
import os
import random
import signal
import struct
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from device.virtio import wire
from device.host.balloon_device import BalloonDevice
from device.host.hint_queues import HintQueues
from device.virtio.hint_format import CMD_GET_FREE_PAGES, hint_device_features
from device.virtio.features import (QUEUE_FEATURE, F_PAGE_BITMAP, F_PAGE_CHUNKS, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, S_ACKNOWLEDGE,
                             S_DRIVER, S_DRIVER_OK, S_FEATURES_OK, S_NEEDS_RESET, bit, protocol_device_features)
from device.virtio.ram import GuestRAM, memfd_data_extents
from device.virtio.layout import MiB, PAGE_SHIFT, PAGE_SIZE, GuestLayout, Region
from device.virtio.transport import VringConfig
from device.virtio.device_queue import DeviceQueue, RingError
from lab import fuzz_formats
from lab import fuzz_control, fuzz_migration
from device.guest.raw_guest import F_INDIRECT, F_NEXT, F_WRITE, RingAddrs, RawRing

TARGETS = ("device", "ring", "pfn", "bitmap", "chunks", "report")
WEIGHTS = (0.40, 0.15, 0.10, 0.15, 0.12, 0.08)       # report: lab/fuzz_formats.py
PROTOCOLS = ("pfn", "pfn-ranges", "bitmap", "chunks")
QUEUES = (0, 1, 2, 3, 5)            # inflate, deflate, stats, free-page hint, misc
# Steps that are not guest kicks: what the VMM does on its side between them.
STATS_POLL = -1                     # return the held stats buffer (qom-get guest-stats)
HINT_START, HINT_REQUEST, HINT_STOP, HINT_DONE = -2, -3, -4, -5   # migration asks for / ends free-page hints
VMM_STEPS = (STATS_POLL, HINT_START, HINT_REQUEST, HINT_STOP, HINT_DONE)
HINT_DESIGNS = ("none", "upstream", "bitmap")
BUF_AREA = (0x8000, 0x40000)        # request buffers and indirect tables live here
DATA_BYTE = 0xA5
WIRE_REASONS = {"pfn-array-len", "pfn-range", "truncated-header", "bad-page-shift", "bitmap-len",
                "bitmap-too-large", "beyond-ram", "unaligned", "zero-length", "overflow", "overlap",
                "bad-chunks", "not-ram", "bad-type", "unaligned-start"}
PAGE_SHIFTS = (0, 11, 12, 13, 20, 21, 22, 63, 0xFFFF)   # what mutations put in a bitmap header
U64_MAX = (1 << 64) - 1
_PAGE = bytes([DATA_BYTE]) * PAGE_SIZE


def ring_gpa(q: int) -> int:
    """Each queue's ring gets its own page below BUF_AREA."""
    return 0x1000 * (1 + q)


class Hang(BaseException):
    """The per-exec time limit fired (BaseException: no `except Exception` may swallow it)."""


def _hang_detail(limit_s: float) -> str:
    return f"exec used more than {limit_s} s of CPU (or {limit_s * WALL_FACTOR} s of wall-clock time)"


# ======================================================================================
# Guest layouts the fuzzer uses, and which of their pages hold data before every exec
# ======================================================================================
@dataclass
class FuzzLayout:
    name: str
    layout: GuestLayout
    fill: list[tuple[int, int]]          # guest-physical (gpa, length) ranges that hold data

    @property
    def max_pfn(self) -> int:
        return self.layout.max_pfn

    def interesting_pfns(self) -> list[int]:
        out = {0, 1, 2, 7, 8, 0x3F, 0x40, 0x41}
        for r in self.layout.regions:
            out |= {r.first_pfn, r.first_pfn + 1, r.end_pfn - 1, r.end_pfn - 2, r.end_pfn, r.end_pfn + 1}
        mp_ = self.max_pfn
        out |= {mp_ - 1, mp_, mp_ + 1, mp_ + 7, mp_ + 8, (1 << 20), (1 << 31), (1 << 32) - 1, (1 << 32) - 2}
        return sorted(x for x in out if x >= 0)

    @property
    def ram_mask(self) -> np.ndarray:
        """Boolean per PFN below max_pfn: RAM or not (cached)."""
        if not hasattr(self, "_ram_mask"):
            self._ram_mask = self.layout.ram_pfn_mask(np.arange(self.max_pfn))
        return self._ram_mask

    def data_pfns(self) -> list[tuple[int, int]]:
        """(first pfn, count) of the fill ranges."""
        return [(g >> PAGE_SHIFT, n >> PAGE_SHIFT) for g, n in self.fill]


def make_layout(name: str) -> FuzzLayout:
    if name == "mini":      # 1 MiB RAM, a 1 MiB hole, 1 MiB RAM: every page holds data
        lay = GuestLayout((Region(0, MiB, 0), Region(2 * MiB, MiB, MiB)))
        return FuzzLayout(name, lay, [(0, MiB), (2 * MiB, MiB)])
    if name == "flat":      # one region, nothing past it
        lay = GuestLayout((Region(0, MiB, 0),))
        return FuzzLayout(name, lay, [(0, MiB)])
    if name == "pc":        # the lab's PC layout (3 GiB, hole, 4 MiB above 4 GiB), sparse
        lay = GuestLayout.pc(3072 + 4)
        return FuzzLayout(name, lay, [(0, MiB), ((3 << 30) - (256 << 10), 256 << 10), (4 << 30, 4 * MiB)])
    raise ValueError(f"unknown fuzz layout {name!r}")


LAYOUTS = ("mini", "flat", "pc")
LAYOUT_WEIGHTS = (0.6, 0.2, 0.2)


# ======================================================================================
# Reference decoders and a lenient ring walk (independent of device/ and wire.py)
# ======================================================================================
def _in_ram(lay: GuestLayout, gpa: int, n: int) -> int | None:
    """memfd offset of [gpa, gpa+n) if inside one region (own code, not layout.translate)."""
    for r in lay.regions:
        if r.gpa <= gpa and gpa + n <= r.gpa + r.size and n >= 0:
            return r.offset + gpa - r.gpa
    return None


class _Reader:
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


def lenient_chains(rd: _Reader, lay: GuestLayout, ring: RingAddrs, last: int, idx: int | None = None
                   ) -> list[Chain]:
    """Every chain the avail ring offers from `last` (up to avail.idx, or `idx` when the
    case publishes it later), following next pointers and one level of indirect tables
    without validating anything else."""
    o_av = _in_ram(lay, ring.avail, 4 + 2 * ring.size)
    o_d = _in_ram(lay, ring.desc, 16 * ring.size)
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
                ot = _in_ram(lay, addr, 16 * n)
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


def _chain_bytes(rd: _Reader, lay: GuestLayout, bufs: Chain, cap: int = 1 << 22) -> bytes:
    parts, total = [], 0
    for a, ln, _w in bufs:
        o = _in_ram(lay, a, ln)
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


def named_mask(protocol: str, rd: _Reader, lay: GuestLayout, chains: list[Chain], out: np.ndarray) -> np.ndarray:
    """Upper bound of the PFNs a request names, whatever its validity, marked in `out`, a
    mask over 0..max_pfn-1 (a PFN at or past max_pfn is no RAM page: it cannot lose data)."""
    mx = lay.max_pfn
    for bufs in chains:
        if protocol == "chunks":
            for a, ln, _w in bufs:
                if ln and a >> PAGE_SHIFT < mx:
                    out[a >> PAGE_SHIFT:min((a + ln + PAGE_SIZE - 1) >> PAGE_SHIFT, mx)] = True
            continue
        data = _chain_bytes(rd, lay, bufs)
        if protocol in ("pfn", "pfn-ranges"):
            n = len(data) // 4
            p = np.frombuffer(data[:4 * n], dtype="<u4").astype(np.int64)
            out[p[p < mx]] = True
        elif len(data) >= 32:
            start = struct.unpack_from("<Q", data, 16)[0]
            shift = struct.unpack_from("<H", data, 2)[0]
            unit = 1 << (shift - PAGE_SHIFT) if shift in wire.BITMAP_PAGE_SHIFTS else 1
            if start < mx:
                bits = np.unpackbits(np.frombuffer(data[32:32 + (mx // unit + 8) // 8], dtype=np.uint8),
                                     bitorder="little")
                p = (np.flatnonzero(bits)[:, None] * unit + np.arange(unit)).ravel() + start
                out[p[p < mx]] = True
    return out


@dataclass
class Bound:
    """What the oracle allows one exec: `allowed` PFNs may lose their data; `touched`
    memfd pages are read (or, for rings, written) by the device, so a discard of them may
    come back as a zero page; `volatile` when a request's bytes overlap memory the device
    itself writes mid-exec (a used ring, a held misc request buffer): then any page is
    allowed (rare, counted)."""

    allowed: np.ndarray
    touched: set[int]
    volatile: bool


def kick_steps(case: dict) -> list[tuple[int, int | None]]:
    """(queue or VMM step, avail idx to publish first or None) for each step of a case."""
    return [(k[0], k[1]) if isinstance(k, list) else (k, None) for k in case["kicks"]]


def _overlap(x: tuple[int, int], y: tuple[int, int]) -> bool:
    return x[0] < y[0] + y[1] and y[0] < x[0] + x[1]


def _published(case: dict, q: int) -> set[int]:
    """Every avail.idx the case shows the device on queue q."""
    return {case["queues"][q]["idx"]} | {i for k, i in kick_steps(case) if k == q and i is not None}


def _hint_bound(case: dict, mem, lay: GuestLayout) -> np.ndarray:
    """PFNs the hint queues may mark as free: any buffer of a queue-3 chain (its address
    range), any set bit of a bitmap on queue 5, read leniently like the inflate bound."""
    out = np.zeros(lay.max_pfn, dtype=bool)
    for q in (3, 5):
        if q not in case["queues"]:
            continue
        a = RingAddrs.at(ring_gpa(q), case["qsize"])
        last = case["queues"][q]["last"]
        for idx in _published(case, q):
            rd = _Reader(mem, set())
            chains = lenient_chains(rd, lay, a, last, idx)
            if q == 3:
                named_mask("chunks", rd, lay, chains, out)
                continue
            named_mask("bitmap", rd, lay, chains, out)
            # a response whose bytes lie in a request buffer the device fills in itself
            writable = [(g, n) for bufs in chains for g, n, w in bufs if w]
            readable = [(g, n) for bufs in chains for g, n, w in bufs if not w]
            if any(_overlap(r, w) for r in readable for w in writable):
                out[:] = True
    return out


def wire_format(features: int) -> str:
    """The inflate/deflate format the device uses for these negotiated features."""
    if features & bit(F_PAGE_CHUNKS):
        return "chunks"
    if features & bit(F_PAGE_BITMAP):
        return "bitmap"
    return "pfn"


def exec_bound(case: dict, mem, lay: GuestLayout, fmt: str) -> Bound:
    """The inflate queue may name its own ring or request buffers: the device then reads
    zeros there for the chains that follow. So the bound is iterated: pages named so far
    are read both as they were and as zeros (rings and buffers alike) until nothing new is
    named. Zeroing only ever shortens chains or adds zero PFNs, and both readings are kept."""
    total = np.zeros(lay.max_pfn, dtype=bool)
    touched: set[int] = set()
    written = []          # memfd ranges the device itself writes: used rings, misc request buffers
    for q in case["queues"]:
        a = RingAddrs.at(ring_gpa(int(q)), case["qsize"])
        o = _in_ram(lay, a.used, a.end - a.used)
        if o is not None:
            written.append((o, a.end - a.used))
        # every queue's rings and buffers: the pages the device will read
        rd = _Reader(mem, set())
        for idx in _published(case, q):
            for bufs in lenient_chains(rd, lay, a, case["queues"][q]["last"], idx):
                if fmt != "chunks" or int(q) != 0:
                    _chain_bytes(rd, lay, bufs, cap=1 << 20)
                if int(q) == 5:           # the seed hint device writes its request into these
                    written += [(wo, 16) for g, _ln, w in bufs if w and (wo := _in_ram(lay, g, 16)) is not None]
        touched |= rd.pages
        touched.update(range(a.desc >> PAGE_SHIFT, ((a.end - 1) >> PAGE_SHIFT) + 1))
    volatile = False
    if any(k == 0 for k, _ in kick_steps(case)) and 0 in case["queues"]:
        ring = RingAddrs.at(ring_gpa(0), case["qsize"])
        last = case["queues"][0]["last"]
        idxs = _published(case, 0)
        zeros: list[set[int]] = [set()]
        content: list[tuple[int, int]] = []
        for _ in range(6):
            read: set[int] = set()
            for zs in zeros:                            # ring structure as it was, or zeroed
                rs = _Reader(mem, zs)
                chains = [c for i in idxs for c in lenient_chains(rs, lay, ring, last, i)]
                read |= rs.pages
                for zc in zeros:                        # request bytes as they were, or zeroed
                    rc = _Reader(mem, zc)
                    named_mask(fmt, rc, lay, chains, total)
                    read |= rc.pages
                    content += rc.ranges
            touched |= read
            arr = np.fromiter(read, dtype=np.int64, count=len(read))
            pf = lay.offset_to_pfn(arr << PAGE_SHIFT) if arr.size else arr
            hit = set(arr[(pf < lay.max_pfn) & total[np.minimum(pf, lay.max_pfn - 1)]].tolist())
            if hit <= zeros[-1]:
                break
            zeros = [set(), zeros[-1] | hit]
        # request bytes that lie where the device writes (a used ring, a misc request
        # buffer) read what the device wrote there, which the model cannot know
        volatile = any(_overlap(c, u) for c in content for u in written)
        if volatile:
            total[:] = True
    return Bound(total, touched, volatile)


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


# ======================================================================================
# Case generation
# ======================================================================================
_LAYOUT_CACHE: dict[str, FuzzLayout] = {}


def flayout(name: str) -> FuzzLayout:
    if name not in _LAYOUT_CACHE:
        _LAYOUT_CACHE[name] = make_layout(name)
    return _LAYOUT_CACHE[name]


def interesting_u64(rng: random.Random, fl: FuzzLayout) -> int:
    r = rng.random()
    if r < 0.4:
        return rng.choice(fl.interesting_pfns()) << PAGE_SHIFT
    if r < 0.6:
        return rng.choice([0, 1, 0xFFF, 0x1000, 0x1001, (1 << 31), (1 << 32) - 1, 1 << 32, (1 << 63) - 1,
                           1 << 63, U64_MAX, U64_MAX - 0xFFF, U64_MAX - 0x1FFF, (3 << 30), (4 << 30) - 0x1000])
    if r < 0.8:
        a, n = rng.choice(fl.fill)
        return a + rng.randrange(n)
    return rng.getrandbits(64)


def interesting_len(rng: random.Random) -> int:
    return rng.choice([0, 1, 2, 3, 4, 5, 8, 15, 16, 17, 31, 32, 33, 0x1000, 0x1001, 0xFFF, 0x2000, 0x10000,
                       (1 << 31), (1 << 32) - 1, (1 << 32) - 0x1000, rng.getrandbits(32), rng.randrange(64)])


def pick_pfns(rng: random.Random, fl: FuzzLayout) -> list[int]:
    """A mostly-valid page set with a few hostile ones: runs, scattered pages, edges, hole, beyond."""
    out: list[int] = []
    for _ in range(rng.choice([1, 1, 2, 3, 4])):
        kind = rng.random()
        if kind < 0.45:
            s, n = rng.choice(fl.data_pfns())
            start = s + rng.randrange(n)
            ln = min(rng.choice([1, 2, 3, 8, 17, 64, 200]), s + n - start)
            out.extend(range(start, start + ln))
        elif kind < 0.7:
            s, n = rng.choice(fl.data_pfns())
            out.extend(s + rng.randrange(n) for _ in range(rng.randrange(1, 12)))
        elif kind < 0.9:
            out.append(rng.choice(fl.interesting_pfns()))
        else:
            out.append(rng.randrange(fl.max_pfn + 64))
    rng.shuffle(out)
    if rng.random() < 0.2 and out:
        out.append(rng.choice(out))               # a duplicate
    return out[:300]


class _Builder:
    """Lays chains into a case: buffers in BUF_AREA, descriptors, avail heads."""

    def __init__(self, case: dict, rng: random.Random) -> None:
        self.case, self.rng = case, rng
        self.next_buf = BUF_AREA[0]
        self.next_desc: dict[int, int] = {}

    def buf(self, data: bytes, align: int = 16) -> int:
        g = (self.next_buf + align - 1) & ~(align - 1)
        if g + len(data) > BUF_AREA[1]:
            g = BUF_AREA[0]
        self.case["mem"].append([g, data])
        self.next_buf = g + len(data)
        return g

    def queue(self, q: int) -> dict:
        qs = self.case["queues"]
        if q not in qs:
            n = self.case["qsize"]
            qs[q] = {"desc": [[0, 0, 0, 0] for _ in range(n)], "heads": [], "last": 0, "idx": None,
                     "flags": 0, "event": 0}
            self.next_desc[q] = 0
        return qs[q]

    def chain(self, q: int, bufs: list[tuple[int, int, bool]], indirect: bool) -> None:
        qd = self.queue(q)
        n = self.case["qsize"]
        d = self.next_desc[q]
        if indirect and len(bufs) > 0:
            tbl = b"".join(struct.pack("<QIHH", a, ln, (F_WRITE if w else 0) | (F_NEXT if k + 1 < len(bufs) else 0),
                                       k + 1 if k + 1 < len(bufs) else 0)
                           for k, (a, ln, w) in enumerate(bufs))
            g = self.buf(tbl, 16)
            qd["desc"][d % n] = [g, len(tbl), F_INDIRECT, 0]
            qd["heads"].append(d % n)
            self.next_desc[q] = d + 1
            return
        head = d % n
        for k, (a, ln, w) in enumerate(bufs):
            last = k + 1 == len(bufs)
            qd["desc"][(d + k) % n] = [a, ln, (F_WRITE if w else 0) | (0 if last else F_NEXT), (d + k + 1) % n]
        qd["heads"].append(head)
        self.next_desc[q] = d + max(1, len(bufs))


def encode_request(protocol: str, pfns: list[int], rng: random.Random, b: _Builder, deflate: bool
                   ) -> list[tuple[int, int, bool]]:
    """Buffers of one request in the protocol's wire format (this module's own encoder)."""
    if protocol in ("pfn", "pfn-ranges"):
        raw = struct.pack(f"<{len(pfns)}I", *[p & 0xFFFFFFFF for p in pfns])
        g = b.buf(raw, 4)
        return _split(g, len(raw), rng)
    if protocol == "bitmap":
        if pfns:
            lo = max(0, min(pfns) - rng.choice([0, 0, 0, 1, 7, 8, 64]))
            span = max(pfns) - lo + 1
        else:
            lo, span = 0, 0
        span = min(span, 1 << 16)
        bits = np.zeros(((span + 7) // 8) * 8, dtype=np.uint8)
        for p in pfns:
            if 0 <= p - lo < span:
                bits[p - lo] = 1
        bm = np.packbits(bits, bitorder="little").tobytes()
        if rng.random() < 0.2:
            bm += bytes(rng.randrange(1, 9))           # trailing zero bytes
        shift = 12
        if rng.random() < 0.2:           # whole 2 MiB blocks, one bit each (page_shift 21)
            shift, lo = 21, lo >> 9 << 9
            blocks = sorted({(p - lo) >> 9 for p in pfns if p >= lo})
            bits = np.zeros(((blocks[-1] + 8) // 8 * 8) if blocks else 0, dtype=np.uint8)
            bits[blocks] = 1
            bm = np.packbits(bits, bitorder="little").tobytes()
        hdr = struct.pack("<HHHHQQQ", 1 if deflate else 0, shift, 0, 0, rng.randrange(1 << 16), lo, len(bm))
        g = b.buf(hdr + bm, 8)
        return _split(g, len(hdr) + len(bm), rng, first=32 if rng.random() < 0.6 else None)
    # chunks: one descriptor per run of contiguous pages
    runs: list[list[int]] = []
    for p in sorted(set(pfns)):
        if runs and runs[-1][0] + runs[-1][1] == p:
            runs[-1][1] += 1
        else:
            runs.append([p, 1])
    if rng.random() < 0.3:
        rng.shuffle(runs)
    return [(s << PAGE_SHIFT, n << PAGE_SHIFT, False) for s, n in runs]


def _split(g: int, n: int, rng: random.Random, first: int | None = None) -> list[tuple[int, int, bool]]:
    """One buffer, or the same bytes split across several descriptors."""
    cuts = set()
    if first is not None and first < n:
        cuts.add(first)
    if rng.random() < 0.3 and n > 1:
        cuts.update(rng.randrange(1, n) for _ in range(rng.randrange(1, 4)))
    pts = [0] + sorted(cuts) + [n]
    return [(g + a, c - a, False) for a, c in zip(pts, pts[1:]) if c > a] or [(g, n, False)]


def gen_hints(case: dict, b: _Builder, rng: random.Random, fl: FuzzLayout, q: int) -> None:
    """A free-page-hint exchange as device/host/hint_queues.py describes it, mostly well formed."""
    if q == 3:          # upstream: the VMM asks (cmd_id 2), the guest sends cmd_id, blocks, STOP
        b.chain(3, [(b.buf(struct.pack("<I", rng.choice([2, 2, 2, 1, 3]))), 4, False)], False)
        for _ in range(rng.randrange(1, 4)):
            s, n = rng.choice(fl.data_pfns())
            start = s + rng.randrange(n)
            ln = rng.choice([1, 2, 16, 64])
            b.chain(3, [(start << PAGE_SHIFT, ln << PAGE_SHIFT, True)], False)
        b.chain(3, [(b.buf(struct.pack("<I", 0)), 4, False)], False)
        qd = case["queues"][3]
        case["kicks"] += [HINT_START, [3, len(qd["heads"])]] + ([HINT_DONE] if rng.random() < 0.5 else [])
        return
    # seed bitmap: the guest posts a request buffer, the VMM fills and returns it, the
    # guest answers with bitmaps (cmd 2, req_id 1, LAST on the final one)
    b.chain(5, [(b.buf(bytes(16)), 16, True)], False)
    case["kicks"] += [[5, 1], HINT_REQUEST]
    pfns = pick_pfns(rng, fl)
    bufs = encode_request("bitmap", pfns, rng, b, False)
    hdr = b.case["mem"][-1]         # the response's header + bitmap, as encode_request wrote it
    data = bytearray(hdr[1])
    struct.pack_into("<H", data, 0, CMD_GET_FREE_PAGES)
    struct.pack_into("<H", data, 4, 1 if rng.random() < 0.8 else 0)       # flags: LAST
    struct.pack_into("<Q", data, 8, rng.choice([1, 1, 1, 0, 2]))           # req_id
    hdr[1] = bytes(data)
    b.chain(5, bufs, case["indirect"] and rng.random() < 0.3)
    case["kicks"].append([5, len(case["queues"][5]["heads"])])


def gen_device(rng: random.Random) -> dict:
    lname = rng.choices(LAYOUTS, LAYOUT_WEIGHTS)[0]
    fl = flayout(lname)
    case = {"t": "device", "layout": lname, "proto": rng.choice(PROTOCOLS), "qsize": rng.choice([1, 2, 4, 8, 8, 16]),
            "hint": rng.choices(HINT_DESIGNS, (0.6, 0.2, 0.2))[0],
            "indirect": rng.random() < 0.8, "event_idx": rng.random() < 0.5, "status": "live",
            "pre": [], "queues": {}, "mem": [], "kicks": []}
    b = _Builder(case, rng)
    for _ in range(rng.choice([1, 1, 2, 3])):
        r = rng.random()
        hint_q = {"upstream": 3, "bitmap": 5}.get(case["hint"])
        if r < 0.5:
            q, deflate = 0, False
        elif r < 0.7:
            q, deflate = 1, True
        elif r < 0.8:
            q, deflate = 2, False
        else:
            q, deflate = hint_q if hint_q is not None and rng.random() < 0.8 else rng.choice([3, 5]), False
        if q == 2:
            raw = b"".join(struct.pack("<HQ", rng.randrange(18), rng.getrandbits(64)) for _ in range(rng.randrange(1, 17)))
            b.chain(2, [(b.buf(raw, 2), len(raw), False)], False)
            case["kicks"] += [2] + ([STATS_POLL] if rng.random() < 0.5 else [])
            continue
        if q in (3, 5):
            gen_hints(case, b, rng, fl, q)
            continue
        pfns = pick_pfns(rng, fl)
        if deflate:
            case["pre"].extend(p for p in pfns if rng.random() < 0.8)
        bufs = encode_request(case["proto"], pfns, rng, b, deflate)
        ind = case["indirect"] and (len(bufs) > case["qsize"] or rng.random() < 0.3)
        if len(bufs) > case["qsize"] and not ind:
            bufs = bufs[:case["qsize"]]
        b.chain(q, bufs, ind)
        case["kicks"].append(q)
    for qd in case["queues"].values():
        qd["idx"] = len(qd["heads"])
    return case


# ======================================================================================
# Mutation
# ======================================================================================
def _mutate_bytes(rng: random.Random, data: bytes, fl: FuzzLayout) -> bytes:
    b = bytearray(data)
    op = rng.randrange(8)
    if not b or op == 0:
        b += rng.randbytes(rng.randrange(1, 9))
    elif op == 1:
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    elif op == 2:
        i = rng.randrange(len(b))
        b[i] = rng.choice([0, 1, 0x7F, 0x80, 0xFF])
    elif op == 3:
        del b[rng.randrange(len(b)):]
    elif op == 4 and len(b) >= 8:
        i = rng.randrange(len(b) - 7) & ~7 if rng.random() < 0.7 else rng.randrange(len(b) - 7)
        v = rng.choice([interesting_u64(rng, fl) >> PAGE_SHIFT, interesting_u64(rng, fl), fl.max_pfn,
                        (fl.max_pfn + 7) // 8, (fl.max_pfn + 7) // 8 + 1, len(b) - 32, len(b) - 31])
        struct.pack_into("<Q", b, i, v & U64_MAX)
    elif op == 5 and len(b) >= 4:
        i = rng.randrange(len(b) - 3) & ~3
        struct.pack_into("<I", b, i, rng.choice(fl.interesting_pfns()) & 0xFFFFFFFF)
    elif op == 6 and len(b) >= 2:
        i = rng.randrange(len(b) - 1) & ~1
        struct.pack_into("<H", b, i, rng.choice([0, 1, 11, 12, 13, 16, 0xFFFF]))
    else:
        i = rng.randrange(len(b) + 1)
        b[i:i] = rng.randbytes(rng.randrange(1, 16))
    return bytes(b)


def copy_case(case: dict) -> dict:
    """A copy deep enough for mutation (bytes are immutable and shared); deepcopy is slow."""
    c = dict(case)
    if "queues" in c:
        c["queues"] = {q: dict(qd, desc=[list(d) for d in qd["desc"]], heads=list(qd["heads"]))
                       for q, qd in c["queues"].items()}
    for k in ("mem", "chunks"):
        if k in c:
            c[k] = [list(x) for x in c[k]]
    for k in ("pre", "kicks", "bufs"):
        if k in c:
            c[k] = list(c[k])
    return c


def mutate_device(case: dict, rng: random.Random, pool: list[dict]) -> dict:
    c = copy_case(case)
    fl = flayout(c["layout"])
    for _ in range(rng.choice([1, 1, 2, 3, 4])):
        op = rng.randrange(14)
        qs = c["queues"]
        if not qs:
            qs[0] = {"desc": [[0, 0, 0, 0] for _ in range(c["qsize"])], "heads": [0], "last": 0, "idx": 1,
                     "flags": 0, "event": 0}
            c["kicks"].append(0)
        q = rng.choice(list(qs))
        qd = qs[q]
        n = c["qsize"]
        if op <= 2:                               # one descriptor field
            i = rng.randrange(n)
            f = rng.randrange(4)
            if f == 0:
                qd["desc"][i][0] = interesting_u64(rng, fl) if rng.random() < 0.7 else qd["desc"][i][0] ^ (1 << rng.randrange(64))
            elif f == 1:
                qd["desc"][i][1] = interesting_len(rng)
            elif f == 2:
                qd["desc"][i][2] = rng.choice([0, F_NEXT, F_WRITE, F_INDIRECT, F_NEXT | F_WRITE, F_NEXT | F_INDIRECT,
                                               F_INDIRECT | F_WRITE, rng.getrandbits(16)])
            else:
                qd["desc"][i][3] = rng.choice([0, i, (i + 1) % n, rng.randrange(n), n, n + 1, 0xFFFF, rng.getrandbits(16)])
        elif op == 3:                             # a loop
            i, j = rng.randrange(n), rng.randrange(n)
            qd["desc"][i][2] |= F_NEXT
            qd["desc"][i][3] = j
            qd["desc"][j][2] |= F_NEXT
            qd["desc"][j][3] = i
        elif op == 4:                             # avail heads
            if qd["heads"] and rng.random() < 0.5:
                qd["heads"][rng.randrange(len(qd["heads"]))] = rng.choice([0, n - 1, n, rng.getrandbits(16)])
            else:
                qd["heads"].append(rng.randrange(n))
        elif op == 5:                             # avail idx relative to last
            qd["idx"] = (qd["last"] + rng.choice([0, 1, 2, n, n + 1, 0x8000, 0xFFFF, rng.getrandbits(16)])) & 0xFFFF
        elif op == 6:                             # start near the 16-bit wrap
            pend = ((qd["idx"] if qd["idx"] is not None else len(qd["heads"])) - qd["last"]) & 0xFFFF
            qd["last"] = rng.choice([0xFFFF, 0xFFFE, 0xFFF0, rng.getrandbits(16)])
            qd["idx"] = (qd["last"] + pend) & 0xFFFF
        elif op <= 9 and c["mem"]:                # request bytes
            w = rng.choice(c["mem"])
            w[1] = _mutate_bytes(rng, w[1], fl)
        elif op == 10:
            c["proto"] = rng.choice(PROTOCOLS)
        elif op == 11:
            r = rng.random()
            if r < 0.3:
                k = rng.choice(QUEUES + VMM_STEPS)
                c["kicks"].insert(rng.randrange(len(c["kicks"]) + 1),
                                  [k, rng.randrange(1 << 16)] if k >= 0 and rng.random() < 0.2 else k)
            elif r < 0.5 and c["kicks"]:
                c["kicks"].pop(rng.randrange(len(c["kicks"])))
            elif r < 0.7:
                c["status"] = rng.choice(["live", "no-driver-ok", "needs-reset", "live", "live"])
            elif r < 0.78:
                c["hint"] = rng.choice(HINT_DESIGNS)
            elif r < 0.85:
                c["indirect"] = not c["indirect"]
            else:
                c["event_idx"] = not c["event_idx"]
        elif op == 12:                            # pages in the balloon before the exec
            c["pre"] = [p for p in pick_pfns(rng, fl)] if rng.random() < 0.7 else []
        else:                                     # splice a queue from another case of the pool
            other = rng.choice(pool) if pool else None
            if other is not None and other.get("t") == "device" and other["queues"] and other["qsize"] == n \
                    and other["layout"] == c["layout"]:
                oq = rng.choice(list(other["queues"]))
                o2 = copy_case(other)
                qs[oq] = o2["queues"][oq]
                c["mem"] += o2["mem"]
                c["kicks"] += [k for k in o2["kicks"] if (k[0] if isinstance(k, list) else k) == oq]
        for qd2 in qs.values():
            if qd2["idx"] is None:
                qd2["idx"] = len(qd2["heads"])
    c["mem"] = c["mem"][-24:]
    return c


# --- decoder targets ---------------------------------------------------------------------
def gen_pfn(rng: random.Random) -> dict:
    fl = flayout(rng.choice(LAYOUTS))
    p = pick_pfns(rng, fl)
    data = struct.pack(f"<{len(p)}I", *[x & 0xFFFFFFFF for x in p])
    return {"t": "pfn", "data": data, "max_pfn": rng.choice([None, fl.max_pfn])}


def gen_bitmap(rng: random.Random) -> dict:
    fl = flayout(rng.choice(LAYOUTS))
    b = _Builder({"mem": [], "queues": {}, "qsize": 1}, rng)
    bufs = encode_request("bitmap", pick_pfns(rng, fl), rng, b, False)
    data = b.case["mem"][0][1]
    pieces = [data[a - bufs[0][0]: a - bufs[0][0] + ln] for a, ln, _ in bufs]
    return {"t": "bitmap", "bufs": pieces, "max_pfn": fl.max_pfn}


def gen_chunks(rng: random.Random) -> dict:
    fl = flayout(rng.choice(LAYOUTS))
    b = _Builder({"mem": [], "queues": {}, "qsize": 1}, rng)
    bufs = encode_request("chunks", pick_pfns(rng, fl), rng, b, False)
    return {"t": "chunks", "chunks": [[a, ln] for a, ln, _ in bufs], "max_pfn": fl.max_pfn, "merge": rng.random() < 0.7}


def gen_ring(rng: random.Random) -> dict:
    c = gen_device(rng)
    c["t"] = "ring"
    c["layout"] = "mini" if c["layout"] == "pc" else c["layout"]
    c["max_chain"] = rng.choice([None, None, 1, 2, 3, 8, 64])
    return c


def mutate_decoder(case: dict, rng: random.Random, pool: list[dict]) -> dict:
    c = copy_case(case)
    fl = flayout("mini")
    for _ in range(rng.choice([1, 1, 2, 3])):
        if c["t"] == "pfn":
            c["data"] = _mutate_bytes(rng, c["data"], fl)
            if rng.random() < 0.1:
                c["max_pfn"] = rng.choice([None, 0, 1, 768, 256, 1 << 20])
        elif c["t"] == "bitmap":
            r = rng.random()
            if r < 0.1:                  # page_shift values, at byte 2 of the joined request
                joined = bytearray(b"".join(c["bufs"]))
                if len(joined) >= 4:
                    joined[2:4] = struct.pack("<H", rng.choice(PAGE_SHIFTS))
                c["bufs"] = [bytes(joined)]
            elif r < 0.7 and c["bufs"]:
                k = rng.randrange(len(c["bufs"]))
                c["bufs"][k] = _mutate_bytes(rng, c["bufs"][k], fl)
            elif r < 0.85:
                joined = b"".join(c["bufs"])
                if joined:
                    cut = rng.randrange(len(joined) + 1)
                    c["bufs"] = [joined[:cut], joined[cut:]]
            else:
                c["max_pfn"] = rng.choice([1, 8, 9, 256, 768, 1049600, c["max_pfn"]])
        else:
            ch = c["chunks"]
            r = rng.random()
            if r < 0.5 and ch:
                k = rng.randrange(len(ch))
                if rng.random() < 0.5:
                    ch[k][0] = interesting_u64(rng, fl)
                else:
                    ch[k][1] = rng.choice([0, 0x1000, 0x2000, 0xFFF, 0x1001, (1 << 32) - 0x1000, interesting_u64(rng, fl)])
            elif r < 0.7 and ch:
                ch.append(list(rng.choice(ch)))               # an overlap
            elif r < 0.8:
                ch.append([interesting_u64(rng, fl), interesting_len(rng)])
            elif r < 0.9:
                c["merge"] = not c["merge"]
            else:
                c["max_pfn"] = rng.choice([1, 256, 768, 1049600])
    return c


GENERATORS: dict[str, Callable[[random.Random], dict]] = {
    "device": gen_device, "ring": gen_ring, "pfn": gen_pfn, "bitmap": gen_bitmap, "chunks": gen_chunks,
    "report": fuzz_formats.gen_report}
MUTATORS = {"device": mutate_device, "ring": mutate_device, "pfn": mutate_decoder, "bitmap": mutate_decoder,
            "chunks": mutate_decoder, "report": fuzz_formats.mutate_report}
# The control plane and a hostile guest during migration (lab/fuzz_control.py, lab/fuzz_migration.py)
GENERATORS.update(control=fuzz_control.gen_control, migration=fuzz_migration.gen_migration)
MUTATORS.update(control=fuzz_control.mutate_control, migration=fuzz_migration.mutate_migration)
# `balloon-lab fuzz --target`: which targets a run draws from, with their weights
FAMILIES = {"rings": (TARGETS, WEIGHTS), "control": (("control",), (1.0,)),
            "migration": (("migration",), (1.0,)), "control+migration": (("control", "migration"), (0.5, 0.5))}


# ======================================================================================
# Execution and oracles
# ======================================================================================
@dataclass
class Outcome:
    signature: tuple
    failure: str | None = None        # "crash", "hang", "oob-discard"
    detail: str = ""


class Rig:
    """One worker's guest RAMs (one memfd per layout) and the exec machinery."""

    def __init__(self) -> None:
        self.rams: dict[str, GuestRAM] = {}
        self.expected: dict[str, tuple] = {}
        self.fill_mask: dict[str, np.ndarray] = {}
        self.volatile = 0        # execs whose oracle had to allow every page (see Bound)
        self.timing_retries = 0  # control/migration execs re-run to confirm a slow wake-up

    def ram(self, name: str) -> GuestRAM:
        if name not in self.rams:
            fl = flayout(name)
            ram = GuestRAM.create(fl.layout, name=f"balloon-lab-fuzz-{name}")
            mask = np.zeros(ram.size >> PAGE_SHIFT, dtype=bool)
            for g, n in fl.fill:
                off = fl.layout.translate(g, n)
                ram.mem[off:off + n] = bytes([DATA_BYTE]) * n
                mask[off >> PAGE_SHIFT:(off + n) >> PAGE_SHIFT] = True
            self.rams[name] = ram
            self.fill_mask[name] = mask
            self.expected[name] = tuple(memfd_data_extents(ram.fd, ram.size))
        return self.rams[name]

    def control_rig(self) -> "fuzz_control.ControlRig":
        """The small sealed guest RAM of the control-plane and migration targets."""
        if getattr(self, "_control", None) is None:
            self._control = fuzz_control.ControlRig()
        return self._control

    def close(self) -> None:
        for r in self.rams.values():
            r.close()
        self.rams.clear()
        if getattr(self, "_control", None) is not None:
            self.volatile += self._control.volatile
            self._control.close()
            self._control = None

    # --- memory state between execs ------------------------------------------------------
    def lost_and_restore(self, name: str) -> np.ndarray:
        """memfd pages of the fill area that lost their data (then refilled); pages outside
        it that gained data are punched again, so every exec starts from the same state.
        Interval arithmetic over the few extents SEEK_DATA reports, no per-page scan."""
        ram = self.rams[name]
        want = self.expected[name]
        if self._unchanged(ram, want):
            return np.zeros(0, dtype=np.int64)
        ext = tuple(memfd_data_extents(ram.fd, ram.size))
        lost = _minus(want, ext)
        gained = _minus(ext, want)
        pages = [np.arange(o >> PAGE_SHIFT, (o + n) >> PAGE_SHIFT, dtype=np.int64) for o, n in lost]
        for o, n in lost:
            ram.mem[o:o + n] = bytes([DATA_BYTE]) * n
        for o, n in gained:
            ram.discard(o, n)
        return np.concatenate(pages) if pages else np.zeros(0, dtype=np.int64)

    @staticmethod
    def _unchanged(ram: GuestRAM, want: tuple) -> bool:
        """Fast path: no hole inside the expected extents, no data between them (one
        SEEK_HOLE per extent, one SEEK_DATA per gap: the kernel walks only those ranges)."""
        for k, (off, n) in enumerate(want):
            if os.lseek(ram.fd, off, os.SEEK_HOLE) < off + n:
                return False
            end = off + n
            nxt = want[k + 1][0] if k + 1 < len(want) else ram.size
            if end < nxt:
                try:
                    if os.lseek(ram.fd, end, os.SEEK_DATA) < nxt:
                        return False
                except OSError:          # ENXIO: no data past `end` at all
                    pass
        return True

    def _write_case(self, case: dict, ram: GuestRAM, lay: GuestLayout) -> list[tuple[int, int]]:
        dirty = []
        n = case["qsize"]
        for q, qd in case["queues"].items():
            ring = RawRing(ram.mem, lay.translate, RingAddrs.at(ring_gpa(int(q)), n))
            ring.zero()
            for i, (a, ln, f, nx) in enumerate(qd["desc"][:n]):
                ring.desc(i, a, ln, f, nx)
            for k, h in enumerate(qd["heads"][:n]):
                ring.avail_entry((qd["last"] + k) & 0xFFFF, h)
            ring.set_avail_idx(qd["idx"] if qd["idx"] is not None else qd["last"] + len(qd["heads"]))
            ring.set_avail_flags(qd.get("flags", 0))
            ring.set_used_event(qd.get("event", 0))
        for g, data in case["mem"]:
            g = BUF_AREA[0] + (g - BUF_AREA[0]) % (BUF_AREA[1] - BUF_AREA[0])
            data = data[:BUF_AREA[1] - g]
            off = lay.translate(g, len(data))
            ram.mem[off:off + len(data)] = data
            dirty.append((off, len(data)))
        return dirty

    def _restore_written(self, case: dict, ram: GuestRAM, lay: GuestLayout, dirty) -> None:
        pat = DATA_BYTE
        for off, ln in dirty:
            ram.mem[off:off + ln] = bytes([pat]) * ln
        for q in case["queues"]:
            a = RingAddrs.at(ring_gpa(int(q)), case["qsize"])
            off = lay.translate(a.desc, a.end - a.desc)
            ram.mem[off:off + a.end - a.desc] = bytes([pat]) * (a.end - a.desc)

    # --- the device target ----------------------------------------------------------------
    def run_device(self, case: dict, limit_s: float) -> Outcome:
        fl = flayout(case["layout"])
        lay = fl.layout
        name = case["layout"]
        ram = self.ram(name)
        fill = self.fill_mask[name]
        dirty = self._write_case(case, ram, lay)
        # Guest memory before the exec, for the oracle: the low area (rings, request buffers,
        # tables) copied, every other page is the fill pattern. The bound is computed from it
        # afterwards, and only when the exec discarded, ballooned or hinted something.
        pre_mem = PreExec(bytes(ram.mem[:BUF_AREA[1]]), fill)
        proto = case["proto"]
        offered = protocol_device_features(proto) | hint_device_features(case.get("hint", "none"))
        feats = offered
        if not case["indirect"]:
            feats &= ~bit(F_RING_INDIRECT_DESC)
        if not case["event_idx"]:
            feats &= ~bit(F_RING_EVENT_IDX)
        dev = BalloonDevice(ram, offered, ranges_policy=proto == "pfn-ranges")
        hints = None
        if 3 in case["queues"] or 5 in case["queues"]:      # (queues 3 and 5 only exist then)
            hints = HintQueues(dev)
            hints.register_queues(dev.register_queue)     # as the VMM's migration controller does
        dev.driver_features = feats
        n = case["qsize"]
        for q in case["queues"]:
            need = QUEUE_FEATURE.get(int(q))
            if need is None or feats & bit(need):     # as SET_VRING allows
                a = RingAddrs.at(ring_gpa(int(q)), n)
                dev.vrings[int(q)] = VringConfig(n, a.desc, a.avail, a.used)
        dev.status = S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK
        failure, detail = None, ""
        pre = np.array([p for p in case["pre"] if 0 <= p < lay.max_pfn], dtype=np.int64)
        pre = np.unique(pre[lay.ram_pfn_mask(pre)]) if pre.size else pre
        try:
            if case["status"] != "no-driver-ok":
                dev.activate()
                dev.status |= S_DRIVER_OK
                for q, qd in case["queues"].items():
                    if int(q) in dev.queues:
                        dev.queues[int(q)].restore(qd["last"], qd["last"])
            if case["status"] == "needs-reset":
                dev.status |= S_NEEDS_RESET
            pre = pre[dev.ballooned_np[pre] == 0]        # queue memory keeps its own state
            dev.ballooned_np[pre] = 1
            _arm(limit_s)
            try:
                for k, idx in kick_steps(case):
                    if k >= 0:
                        if idx is not None and k in case["queues"]:
                            a = RingAddrs.at(ring_gpa(k), n)
                            struct.pack_into("<H", ram.mem, lay.translate(a.avail + 2, 2), idx & 0xFFFF)
                        dev.process_queue(k)
                    else:
                        vmm_step(dev, hints, k)
            finally:
                _disarm()
        except Hang:
            failure, detail = "hang", _hang_detail(limit_s)
        except Exception as e:   # anything escaping the device is a crash
            failure, detail = "crash", f"{type(e).__name__}: {e}"
        if failure is None and dev.errors.get("device-internal"):
            failure, detail = "crash", "device-internal error counted (an exception inside the device)"
        lost_pages = self.lost_and_restore(name)
        lost = lay.offset_to_pfn(lost_pages << PAGE_SHIFT) if lost_pages.size else lost_pages
        hinted = hints is not None and bool(hints.hinted.any())
        bound = None
        if lost.size or hinted or dev.inflate.requests or dev.deflate.requests:
            bound = exec_bound(case, pre_mem, lay, wire_format(feats))
            self.volatile += bound.volatile
            if failure is None:
                failure, detail = self._check(case, dev, hints, pre_mem, lay, bound, lost, pre)
        self._restore_written(case, ram, lay, dirty)
        if bound is not None:
            for pg in bound.touched:      # the device may have left zeros there (read after discard)
                if pg < fill.size and fill[pg]:
                    ram.mem[pg << PAGE_SHIFT:(pg + 1) << PAGE_SHIFT] = _PAGE
        if hints is not None and hints.stats["bitmap_requests"] and hints.request_gpa is not None:
            o = _in_ram(lay, hints.request_gpa & ~(PAGE_SIZE - 1), PAGE_SIZE)   # the device wrote a request there
            if o is not None and fill[o >> PAGE_SHIFT]:
                ram.mem[o:o + PAGE_SIZE] = _PAGE
        sig = ("device", name == "pc", proto, case.get("hint", "none"), hinted, tuple(sorted(dev.errors)),
               bool(dev.status & S_NEEDS_RESET), bool(lost.size), min(3, int(lost.size).bit_length() // 3),
               bool(dev.deflate.pages), dev.stats_head is not None)
        return Outcome(sig, failure, detail)

    def _check(self, case: dict, dev: BalloonDevice, hints: HintQueues | None, pre_mem, lay: GuestLayout, bound: Bound,
               lost: np.ndarray, pre: np.ndarray) -> tuple[str | None, str]:
        allowed = bound.allowed
        if lost.size:
            bad = lost[~allowed[lost]]
            if bad.size:
                return "oob-discard", f"pages {bad[:8].tolist()} lost their data but were never named on the inflate queue"
        if hints is not None and hints.hinted.any():
            hb = _hint_bound(case, pre_mem, lay)
            wrong = np.flatnonzero(hints.hinted & ~hb)
            if not wrong.size:
                wrong = np.flatnonzero(hints.hinted & ~flayout(case["layout"]).ram_mask)
            if wrong.size:
                return "crash", f"hint device marked pages {wrong[:8].tolist()} free that the guest never hinted (or no RAM)"
        if dev.inflate.requests or dev.deflate.requests:     # the only paths that touch the balloon
            new = np.setdiff1d(_ballooned(dev), pre, assume_unique=True)
            if new.size:
                outside = new[~allowed[new]]
                if outside.size:
                    return "crash", f"device ballooned pages {outside[:8].tolist()} the guest never named"
                # pages the device must have discarded: in the fill area and not touched (rings
                # and request buffers: the device reads or writes them again after a discard,
                # which brings the page back, zeroed)
                offs = lay.pfn_to_offset(new) >> PAGE_SHIFT
                must = new[self.fill_mask[case["layout"]][offs] & ~np.isin(offs, np.fromiter(bound.touched, np.int64))]
                still = must[~np.isin(must, lost)]
                if still.size:
                    return "crash", f"device counts pages {still[:8].tolist()} as ballooned but they hold data"
        return None, ""

    # --- the ring target ---------------------------------------------------------------------
    def run_ring(self, case: dict, limit_s: float) -> Outcome:
        fl = flayout(case["layout"])
        lay = fl.layout
        ram = self.ram(case["layout"])
        dirty = self._write_case(case, ram, lay)
        n = case["qsize"]
        failure, detail, reasons, chains = None, "", set(), 0
        try:
            _arm(limit_s)
            try:
                for q, qd in case["queues"].items():
                    a = RingAddrs.at(ring_gpa(int(q)), n)
                    dq = DeviceQueue(ram, int(q), n, a.desc, a.avail, a.used, event_idx=case["event_idx"],
                                     indirect=case["indirect"], max_chain=case.get("max_chain"))
                    dq.restore(qd["last"], qd["last"])
                    for _ in range(n + 2):
                        try:
                            c = dq.pop_avail()
                        except RingError as e:
                            reasons.add(e.reason)
                            continue
                        if c is None:
                            break
                        chains += 1
                        msg = check_chain(c, lay, dq.max_chain)
                        if msg:
                            failure, detail = "crash", msg
                            break
                        dq.push_used(c.head, 0)
            finally:
                _disarm()
        except Hang:
            failure, detail = "hang", _hang_detail(limit_s)
        except Exception as e:
            failure, detail = "crash", f"{type(e).__name__}: {e}"
        self._restore_written(case, ram, lay, dirty)
        return Outcome(("ring", tuple(sorted(reasons)), min(chains, 3)), failure, detail)


class PreExec:
    """Guest memory as it was before an exec, sliceable like the mapping: memfd bytes
    below len(low) from a copy, every other page the fill pattern (DATA_BYTE where the
    fill mask says the page holds data, zeros elsewhere), which is what the Rig keeps
    there between execs."""

    def __init__(self, low: bytes, fill: np.ndarray) -> None:
        self.low, self.fill = low, fill

    def __getitem__(self, sl: slice) -> bytes:
        off, end = sl.start, sl.stop
        nlow = len(self.low)
        if end <= nlow:
            return self.low[off:end]
        out = bytearray(end - off)
        if off < nlow:
            out[:nlow - off] = self.low[off:]
        p0, p1 = max(off, nlow) >> PAGE_SHIFT, (end - 1) >> PAGE_SHIFT
        for pg in np.flatnonzero(self.fill[p0:min(p1 + 1, self.fill.size)]) + p0:
            lo = max(int(pg) << PAGE_SHIFT, off, nlow) - off
            hi = min((int(pg) + 1) << PAGE_SHIFT, end) - off
            out[lo:hi] = bytes([DATA_BYTE]) * (hi - lo)
        return bytes(out)


def _minus(a: tuple, b: tuple) -> list[tuple[int, int]]:
    """Page-aligned (offset, length) ranges of `a` not covered by `b` (both sorted, disjoint)."""
    out = []
    for o, n in a:
        pos, end = o, o + n
        for bo, bn in b:
            be = bo + bn
            if be <= pos or bo >= end:
                continue
            if bo > pos:
                out.append((pos, bo - pos))
            pos = max(pos, be)
            if pos >= end:
                break
        if pos < end:
            out.append((pos, end - pos))
    return [(o & ~(PAGE_SIZE - 1), ((o + n + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)) - (o & ~(PAGE_SIZE - 1)))
            for o, n in out]


def _ballooned(dev: BalloonDevice) -> np.ndarray:
    """PFNs in the device's balloon (state 1; 2 marks queue memory). A word-wise scan
    first: the map is mostly zero."""
    b = dev.ballooned_np
    n8 = b.size & ~7
    words = np.flatnonzero(b[:n8].view(np.uint64))
    cand = (words[:, None] * 8 + np.arange(8)).ravel()
    tail = np.arange(n8, b.size)
    cand = np.concatenate((cand, tail))
    return cand[b[cand] == 1]


def vmm_step(dev: BalloonDevice, hints: HintQueues | None, k: int) -> None:
    """What the VMM does between guest kicks, only when its own preconditions hold (the
    real VMM checks them before calling; see device/host/migration/controller.py)."""
    if k == STATS_POLL:
        dev.request_stats()
    elif hints is None:
        return
    elif k == HINT_START and hints.upstream_ready:
        hints.start_upstream()
    elif k == HINT_REQUEST and hints.bitmap_ready:
        hints.request_bitmap()
    elif k == HINT_STOP and hints.upstream_ready:
        hints.stop_upstream()
    elif k == HINT_DONE and hints.upstream_ready:
        hints.done_upstream()


def check_chain(c, lay: GuestLayout, max_chain: int) -> str | None:
    """What a validated chain must satisfy, checked with this module's own translation."""
    if len(c.elements) > max_chain or not c.elements:
        return f"chain of {len(c.elements)} elements (max_chain {max_chain})"
    seen_w = False
    for (a, ln, w), off in zip(c.elements, c.offsets):
        if _in_ram(lay, a, ln) != off:
            return f"chain element {a:#x}+{ln:#x} translated to {off:#x}, expected {_in_ram(lay, a, ln)}"
        if seen_w and not w:
            return "readable element after a writable one"
        seen_w |= w
    if sum(ln for _, ln, w in c.elements if not w) != c.readable_bytes:
        return "readable_bytes disagrees with the elements"
    return None


def run_decoder(case: dict, limit_s: float) -> Outcome:
    t = case["t"]
    failure, detail, reason = None, "", "ok"
    try:
        _arm(limit_s)
        try:
            if t == "pfn":
                reason, failure, detail = _check_pfn(case)
            elif t == "bitmap":
                reason, failure, detail = _check_bitmap(case)
            else:
                reason, failure, detail = _check_chunks(case)
        finally:
            _disarm()
    except Hang:
        failure, detail = "hang", _hang_detail(limit_s)
    except Exception as e:
        failure, detail = "crash", f"{type(e).__name__}: {e}"
    return Outcome((t, reason), failure, detail)


def _check_pfn(case: dict):
    data, mx = case["data"], case["max_pfn"]
    try:
        got = wire.decode_pfns(data, max_pfn=mx)
    except wire.WireError as e:
        ok_reason = e.reason in WIRE_REASONS
        return e.reason, None if ok_reason else "crash", "" if ok_reason else f"unknown reason {e.reason}"
    ref = np.frombuffer(data[: len(data) // 4 * 4], dtype="<u4")
    if len(data) == 0 or len(data) % 4:
        return "ok", "crash", f"accepted a {len(data)}-byte PFN array"
    if not np.array_equal(got, ref):
        return "ok", "crash", "decoded PFNs differ from the bytes"
    if mx is not None and got.size and int(got.max()) >= mx:
        return "ok", "crash", f"accepted PFN {int(got.max())} >= max_pfn {mx}"
    return "ok", None, ""


def _check_bitmap(case: dict):
    bufs, mx = case["bufs"], case["max_pfn"]
    ref_reason, (rs, rl) = ref_bitmap(b"".join(bufs), mx)
    try:
        _hdr, starts, lengths = wire.decode_bitmap(bufs, max_pfn=mx, page_shifts=wire.BITMAP_PAGE_SHIFTS)
    except wire.WireError as e:
        if ref_reason is None:
            return e.reason, "crash", f"refused ({e}) a request the format allows"
        return e.reason, None, ""
    if ref_reason is not None:
        return "ok", "crash", f"accepted a request the format refuses ({ref_reason})"
    if not (np.array_equal(starts, rs) and np.array_equal(lengths, rl)):
        return "ok", "crash", "decoded runs differ from the bitmap's set bits"
    return "ok", None, ""


def _check_chunks(case: dict):
    ch, mx = [tuple(x) for x in case["chunks"]], case["max_pfn"]
    ref_reason, spans = ref_chunks(ch, mx)
    try:
        s, ln = wire.chunks_to_runs(ch, max_pfn=mx, merge=case["merge"])
    except wire.WireError as e:
        if ref_reason is None:
            return e.reason, "crash", f"refused ({e}) a request the format allows"
        return e.reason, None, ""
    if ref_reason is not None:
        return "ok", "crash", f"accepted a request the format refuses ({ref_reason})"
    got = list(zip(s.tolist(), ln.tolist()))
    want = merge_spans(spans) if case["merge"] else [(g >> PAGE_SHIFT, n >> PAGE_SHIFT) for g, n in ch]
    if got != want:
        return "ok", "crash", f"decoded runs {got[:4]} differ from the chunks' {want[:4]}"
    return "ok", None, ""


def _on_alarm(signum, frame):
    raise Hang()


WALL_FACTOR = 10    # the wall-clock backstop: a device blocked in a system call uses no CPU


def _arm(limit_s: float) -> None:
    """An exec may use limit_s of CPU (ITIMER_PROF: a loaded machine does not make it a
    hang), and WALL_FACTOR times that of wall-clock time (a blocked device is a hang too)."""
    signal.setitimer(signal.ITIMER_PROF, limit_s)
    signal.setitimer(signal.ITIMER_REAL, limit_s * WALL_FACTOR)


def _disarm() -> None:
    signal.setitimer(signal.ITIMER_PROF, 0)
    signal.setitimer(signal.ITIMER_REAL, 0)


class hang_timer:
    """Install the Hang handlers for SIGPROF and SIGALRM for the duration of a run."""

    def __enter__(self) -> "hang_timer":
        self.old = {sig: signal.signal(sig, _on_alarm) for sig in (signal.SIGPROF, signal.SIGALRM)}
        return self

    def __exit__(self, *exc) -> None:
        _disarm()
        for sig, h in self.old.items():
            signal.signal(sig, h)


def execute(rig: Rig, case: dict, limit_s: float) -> Outcome:
    t = case["t"]
    if t not in ("control", "migration") and getattr(rig, "_control", None) is not None:
        rig._control.fds = None         # other targets open fds of their own: a new baseline
    if t == "device":
        return rig.run_device(case, limit_s)
    if t == "ring":
        return rig.run_ring(case, limit_s)
    if t == "report":
        return run_report(rig, case, limit_s)
    if t in ("control", "migration"):
        run = fuzz_control.run_control if t == "control" else fuzz_migration.run_migration
        failure, detail, sig = run(rig.control_rig(), case, limit_s)
        # a wake-up over the CPU bound is a hang when it is the case's doing: it must happen
        # again on both of two more runs (a garbage collection of the fuzzer's own heap, or a
        # coarse CPU clock, can make one wake-up look long once)
        for _ in range(2):
            if failure != "hang" or not detail.startswith("one wake-up"):
                break
            rig.timing_retries += 1
            failure, detail, sig = run(rig.control_rig(), case, limit_s)
        return Outcome(sig, failure, detail)
    return run_decoder(case, limit_s)


def run_report(rig: Rig, case: dict, limit_s: float) -> Outcome:
    """The free page reporting queue (lab/fuzz_formats.py), under the same time limit."""
    if not hasattr(rig, "report_rig"):
        rig.report_rig = fuzz_formats.ReportRig()
    try:
        _arm(limit_s)
        try:
            sig, failure, detail = rig.report_rig.run(case)
        finally:
            _disarm()
    except Hang:
        return Outcome(("report", "hang"), "hang", _hang_detail(limit_s))
    return Outcome(sig, failure, detail)


# ======================================================================================
# Case files (JSON): bytes as hex
# ======================================================================================
def case_to_json(case: dict) -> dict:
    c = copy.deepcopy(case)
    if "mem" in c:
        c["mem"] = [[g, d.hex()] for g, d in c["mem"]]
    if "queues" in c:
        c["queues"] = {str(k): v for k, v in c["queues"].items()}
    if c["t"] == "pfn":
        c["data"] = c["data"].hex()
    if c["t"] == "bitmap":
        c["bufs"] = [b.hex() for b in c["bufs"]]
    return c


def case_from_json(d: dict) -> dict:
    c = copy.deepcopy(d)
    if "mem" in c:
        c["mem"] = [[g, bytes.fromhex(h)] for g, h in c["mem"]]
    if "queues" in c:
        c["queues"] = {int(k): v for k, v in c["queues"].items()}
    if c["t"] == "pfn":
        c["data"] = bytes.fromhex(c["data"])
    if c["t"] == "bitmap":
        c["bufs"] = [bytes.fromhex(h) for h in c["bufs"]]
    return c


def load_corpus(path: str | Path) -> list[dict]:
    """Cases from a .json file (one case or a list) or a .jsonl file, or every such file in a directory."""
    p = Path(path)
    files = sorted(p.rglob("*.json*")) if p.is_dir() else [p]
    out = []
    for f in files:
        text = f.read_text()
        if f.suffix == ".jsonl":
            out += [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            obj = json.loads(text)
            out += obj if isinstance(obj, list) else [obj]
    return [case_from_json(c) for c in out]


def replay(cases: list[dict], limit_s: float = 5.0) -> list[tuple[dict, Outcome]]:
    """Run saved cases once each; returns those that fail."""
    rig = Rig()
    _quiet()
    try:
        bad = []
        with hang_timer():
            for c in cases:
                o = execute(rig, c, limit_s)
                if o.failure:
                    bad.append((c, o))
        return bad
    finally:
        rig.close()


def _quiet() -> None:
    # a million refusals would be a million log lines; the counters are the record here
    logging.getLogger("balloon-lab").setLevel(logging.CRITICAL + 1)


# ======================================================================================
# The loop
# ======================================================================================
@dataclass
class FuzzResult:
    execs: int = 0
    crashes: int = 0
    hangs: int = 0
    oob_discards: int = 0
    seconds: float = 0.0
    workers: int = 1
    seed: int = 0
    by_target: dict = field(default_factory=dict)
    signatures: int = 0
    volatile_execs: int = 0      # device execs whose oracle had to allow every page (see Bound)
    timing_retries: int = 0      # control/migration execs re-run because one wake-up looked slow
    max_exec_ms: float = 0.0
    failures: list = field(default_factory=list)       # [{"kind", "detail", "case"}], at most 50
    seen: list = field(default_factory=list, repr=False)   # behaviour signatures, merged over workers
    corpus: list = field(default_factory=list)         # one JSON case per behaviour seen

    def to_json(self, with_corpus: bool = False) -> dict:
        d = asdict(self)
        d.pop("seen")
        if not with_corpus:
            d.pop("corpus")
        d["execs_per_s"] = round(self.execs / self.seconds, 1) if self.seconds else 0.0
        return d


def fuzz_worker(execs: int, seed: int, limit_s: float, counter=None, keep_corpus: bool = False,
                family: str = "rings") -> FuzzResult:
    """One process's share of the run."""
    rng = random.Random(seed)
    rig = Rig()
    targets, weights = FAMILIES[family]
    for name in LAYOUTS if family == "rings" else ():   # create and fill guest RAM before anything is timed
        rig.ram(name)
    _quiet()
    timer = hang_timer().__enter__()
    res = FuzzResult(seed=seed)
    pools: dict[str, list[dict]] = {t: [] for t in targets}
    seen: dict[tuple, dict] = {}
    t0 = time.perf_counter()
    by_t: Counter[str] = Counter()
    try:
        for i in range(execs):
            t = rng.choices(targets, weights)[0]
            pool = pools[t]
            if pool and rng.random() < 0.75:
                case = MUTATORS[t](rng.choice(pool), rng, pool)
            else:
                case = GENERATORS[t](rng)
            e0 = time.perf_counter()
            o = execute(rig, case, limit_s)
            ms = (time.perf_counter() - e0) * 1e3
            if ms > res.max_exec_ms:
                res.max_exec_ms = ms
            by_t[t] += 1
            if o.failure:
                if o.failure == "hang":
                    res.hangs += 1
                elif o.failure == "oob-discard":
                    res.oob_discards += 1
                else:
                    res.crashes += 1
                if len(res.failures) < 50:
                    res.failures.append({"kind": o.failure, "detail": o.detail, "case": case_to_json(case)})
            elif o.signature not in seen:
                seen[o.signature] = case
                pool.append(case)
                if len(pool) > 400:
                    pool.pop(rng.randrange(len(pool)))
            if counter is not None and i % 256 == 255:
                with counter.get_lock():
                    counter.value += 256
        if counter is not None:
            with counter.get_lock():
                counter.value += execs % 256
    finally:
        timer.__exit__()
        rig.close()
    res.execs = execs
    res.volatile_execs = rig.volatile
    res.timing_retries = rig.timing_retries
    res.seconds = time.perf_counter() - t0
    res.by_target = dict(by_t)
    res.signatures = len(seen)
    res.seen = [repr(s) for s in seen]
    if keep_corpus:
        res.corpus = [dict(case_to_json(c), signature=repr(s)) for s, c in seen.items()]
    return res


def select_corpus(cases: list[dict], limit: int) -> list[dict]:
    """At most `limit` cases to keep as regression tests: one per kind of outcome (target
    and the set of refusals, from the signature), the smallest first, then the rest of
    the smallest behaviours until the limit, spread over the targets."""
    def size(c: dict) -> int:
        return len(json.dumps(c))

    def coarse(c: dict) -> tuple:
        sig = c.get("signature", "")
        return (c["t"], sig.split("(", 2)[-1].split(")")[0] if c["t"] == "device" else sig)

    by_group: dict[tuple, dict] = {}
    for c in sorted(cases, key=size):
        by_group.setdefault(coarse(c), c)
    chosen = sorted(by_group.values(), key=size)[:limit]
    picked = {id(c) for c in chosen}
    rest = [c for c in sorted(cases, key=size) if id(c) not in picked]
    chosen += rest[:max(0, limit - len(chosen))]
    return sorted(chosen, key=lambda c: (c["t"], size(c)))


def _worker_entry(args):
    execs, seed, limit_s, keep, family = args
    return fuzz_worker(execs, seed, limit_s, _COUNTER, keep, family)


_COUNTER = None


def _init_worker(counter) -> None:
    global _COUNTER
    _COUNTER = counter


def run_fuzz(execs: int, *, seed: int = 0, workers: int | None = None, exec_timeout_s: float = 2.0,
             keep_corpus: bool = False, progress: Callable[[int, float], None] | None = None,
             family: str = "rings") -> FuzzResult:
    """Run `execs` executions split over `workers` processes (default: one per CPU) of the
    targets of `family` (FAMILIES)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown fuzz target {family!r}; choose from {', '.join(FAMILIES)}")
    workers = max(1, min(workers or os.cpu_count() or 1, execs or 1))
    shares = [execs // workers + (1 if k < execs % workers else 0) for k in range(workers)]
    t0 = time.perf_counter()
    ctx = mp.get_context("fork")
    counter = ctx.Value("q", 0)
    with ctx.Pool(workers, initializer=_init_worker, initargs=(counter,)) as pool:
        pending = pool.map_async(_worker_entry, [(n, seed * 1000 + k, exec_timeout_s, keep_corpus, family)
                                                 for k, n in enumerate(shares)])
        while not pending.ready():
            pending.wait(5.0)
            if progress is not None:
                progress(counter.value, time.perf_counter() - t0)
        parts = pending.get()
    total = FuzzResult(seed=seed, workers=workers)
    by_t: Counter[str] = Counter()
    sigs: set[str] = set()
    kept: set[str] = set()
    for r in parts:
        total.execs += r.execs
        total.crashes += r.crashes
        total.hangs += r.hangs
        total.oob_discards += r.oob_discards
        total.volatile_execs += r.volatile_execs
        total.timing_retries += r.timing_retries
        total.max_exec_ms = max(total.max_exec_ms, r.max_exec_ms)
        total.failures += r.failures
        by_t.update(r.by_target)
        sigs.update(r.seen)
        for c in r.corpus:
            if c["signature"] not in kept:
                kept.add(c["signature"])
                total.corpus.append(c)
    total.failures = total.failures[:50]
    total.by_target = dict(by_t)
    total.signatures = len(sigs)
    total.seconds = time.perf_counter() - t0
    total.max_exec_ms = round(total.max_exec_ms, 2)
    total.seconds = round(total.seconds, 2)
    return total
