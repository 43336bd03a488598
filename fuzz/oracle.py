"""The oracle: what an exec of the device or ring target may do, and the check.

The memfd is the witness (SEEK_DATA/SEEK_HOLE, the kernel's view, not the device's
bookkeeping): every page of the guest's fill area holds data before an exec;
afterwards every page that lost its data must be one the guest named on the inflate
queue, where "named" is computed from memory as it was before the exec by the
independent, lenient reading of fuzz/reference_decoders.py (exec_bound). Pages the
device says it ballooned must really be gone from the memfd, and pages the hint
queues mark free must be ones the guest hinted (check_device_exec). A chain the ring
walker hands out must lie inside RAM as this package's own translation says
(check_chain). Every address and offset here is mapped with the fuzzer's own region
table (fuzz/regions.py, written from docs/PROTOCOL.md), never the device's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from device.guest.raw_guest import RingAddrs
from device.vmm.balloon_device import BalloonDevice
from device.vmm.hint_queues import HintQueues
from fuzz.cases import DATA_BYTE, fuzz_layout, kick_steps, ring_gpa
from fuzz.reference_decoders import GuestReader, chain_bytes, lenient_chains, named_mask, ram_offset
from fuzz.regions import PAGE_SHIFT, PAGE_SIZE, RegionTable


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


def _overlap(x: tuple[int, int], y: tuple[int, int]) -> bool:
    return x[0] < y[0] + y[1] and y[0] < x[0] + x[1]


def _published(case: dict, q: int) -> set[int]:
    """Every avail.idx the case shows the device on queue q."""
    return {case["queues"][q]["idx"]} | {i for k, i in kick_steps(case) if k == q and i is not None}


def hint_bound(case: dict, mem, lay: RegionTable) -> np.ndarray:
    """PFNs the hint queues may mark as free: any buffer of a queue-3 chain (its address
    range), any set bit of a bitmap on queue 5, read leniently like the inflate bound."""
    out = np.zeros(lay.max_pfn, dtype=bool)
    for q in (3, 5):
        if q not in case["queues"]:
            continue
        a = RingAddrs.at(ring_gpa(q), case["qsize"])
        last = case["queues"][q]["last"]
        for idx in _published(case, q):
            rd = GuestReader(mem, set())
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


def exec_bound(case: dict, mem, lay: RegionTable, fmt: str) -> Bound:
    """The inflate queue may name its own ring or request buffers: the device then reads
    zeros there for the chains that follow. So the bound is iterated: pages named so far
    are read both as they were and as zeros (rings and buffers alike) until nothing new is
    named. Zeroing only ever shortens chains or adds zero PFNs, and both readings are kept."""
    total = np.zeros(lay.max_pfn, dtype=bool)
    touched: set[int] = set()
    written = []          # memfd ranges the device itself writes: used rings, misc request buffers
    for q in case["queues"]:
        a = RingAddrs.at(ring_gpa(int(q)), case["qsize"])
        o = ram_offset(lay, a.used, a.end - a.used)
        if o is not None:
            written.append((o, a.end - a.used))
        # every queue's rings and buffers: the pages the device will read
        rd = GuestReader(mem, set())
        for idx in _published(case, q):
            for bufs in lenient_chains(rd, lay, a, case["queues"][q]["last"], idx):
                if fmt != "chunks" or int(q) != 0:
                    chain_bytes(rd, lay, bufs, cap=1 << 20)
                if int(q) == 5:           # the seed hint device writes its request into these
                    written += [(wo, 16) for g, _ln, w in bufs if w and (wo := ram_offset(lay, g, 16)) is not None]
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
                rs = GuestReader(mem, zs)
                chains = [c for i in idxs for c in lenient_chains(rs, lay, ring, last, i)]
                read |= rs.pages
                for zc in zeros:                        # request bytes as they were, or zeroed
                    rc = GuestReader(mem, zc)
                    named_mask(fmt, rc, lay, chains, total)
                    read |= rc.pages
                    content += rc.ranges
            touched |= read
            arr = np.fromiter(read, dtype=np.int64, count=len(read))
            pf = lay.offset_to_pfn(arr << PAGE_SHIFT) if arr.size else arr
            ram = (pf >= 0) & (pf < lay.max_pfn)
            hit = set(arr[ram & total[np.clip(pf, 0, lay.max_pfn - 1)]].tolist())
            if hit <= zeros[-1]:
                break
            zeros = [set(), zeros[-1] | hit]
        # request bytes that lie where the device writes (a used ring, a misc request
        # buffer) read what the device wrote there, which the model cannot know
        volatile = any(_overlap(c, u) for c in content for u in written)
        if volatile:
            total[:] = True
    return Bound(total, touched, volatile)


def check_device_exec(case: dict, dev: BalloonDevice, hints: HintQueues | None, pre_mem, lay: RegionTable,
                      bound: Bound, lost: np.ndarray, pre: np.ndarray, fill: np.ndarray) -> tuple[str | None, str]:
    """(failure or None, detail) of one device exec: `lost` PFNs lost their data, `pre`
    were in the balloon before it, `fill` marks the memfd pages that held data."""
    allowed = bound.allowed
    if lost.size:
        bad = lost[~allowed[lost]]
        if bad.size:
            return "oob-discard", f"pages {bad[:8].tolist()} lost their data but were never named on the inflate queue"
    if hints is not None and hints.hinted.any():
        hb = hint_bound(case, pre_mem, lay)
        wrong = np.flatnonzero(hints.hinted & ~hb)
        if not wrong.size:
            wrong = np.flatnonzero(hints.hinted & ~fuzz_layout(case["layout"]).ram_mask)
        if wrong.size:
            return "crash", f"hint device marked pages {wrong[:8].tolist()} free that the guest never hinted (or no RAM)"
    if dev.inflate.requests or dev.deflate.requests:     # the only paths that touch the balloon
        new = np.setdiff1d(ballooned_pfns(dev), pre, assume_unique=True)
        if new.size:
            outside = new[~allowed[new]]
            if outside.size:
                return "crash", f"device ballooned pages {outside[:8].tolist()} the guest never named"
            not_ram = new[lay.pfn_to_offset(new) < 0]
            if not_ram.size:
                return "crash", f"device ballooned pages {not_ram[:8].tolist()} that are not guest RAM"
            # pages the device must have discarded: in the fill area and not touched (rings
            # and request buffers: the device reads or writes them again after a discard,
            # which brings the page back, zeroed)
            offs = lay.pfn_to_offset(new) >> PAGE_SHIFT
            must = new[fill[offs] & ~np.isin(offs, np.fromiter(bound.touched, np.int64))]
            still = must[~np.isin(must, lost)]
            if still.size:
                return "crash", f"device counts pages {still[:8].tolist()} as ballooned but they hold data"
    return None, ""


class MemoryBeforeExec:
    """Guest memory as it was before an exec, sliceable like the mapping: memfd bytes
    below len(low) from a copy, every other page the fill pattern (DATA_BYTE where the
    fill mask says the page holds data, zeros elsewhere), which is what the device target
    keeps there between execs."""

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


def subtract_ranges(a: tuple, b: tuple) -> list[tuple[int, int]]:
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


def ballooned_pfns(dev: BalloonDevice) -> np.ndarray:
    """PFNs in the device's balloon (state 1; 2 marks queue memory). A word-wise scan
    first: the map is mostly zero."""
    b = dev.ballooned_np
    n8 = b.size & ~7
    words = np.flatnonzero(b[:n8].view(np.uint64))
    cand = (words[:, None] * 8 + np.arange(8)).ravel()
    tail = np.arange(n8, b.size)
    cand = np.concatenate((cand, tail))
    return cand[b[cand] == 1]


def check_chain(c, lay: RegionTable, max_chain: int) -> str | None:
    """What a validated chain must satisfy, checked with this package's own translation (ram_offset)."""
    if len(c.elements) > max_chain or not c.elements:
        return f"chain of {len(c.elements)} elements (max_chain {max_chain})"
    seen_w = False
    for (a, ln, w), off in zip(c.elements, c.offsets):
        if ram_offset(lay, a, ln) != off:
            return f"chain element {a:#x}+{ln:#x} translated to {off:#x}, expected {ram_offset(lay, a, ln)}"
        if seen_w and not w:
            return "readable element after a writable one"
        seen_w |= w
    if sum(ln for _, ln, w in c.elements if not w) != c.readable_bytes:
        return "readable_bytes disagrees with the elements"
    return None

