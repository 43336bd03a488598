"""Guest side of free page reporting: Linux's mm/page_reporting.c over the lab's buddy allocator.

What Linux does, and this model does the same way (defaults are the kernel's):
  * a free that leaves a free block of order >= page_reporting_order (pageblock
    order, 9 on x86: 2 MiB) requests a reporting pass, which runs PAGE_REPORTING_DELAY
    (2 s) later, so a burst of frees is reported in one go;
  * a pass first checks the zone watermark (low watermark + capacity << order free
    pages), then walks the free lists from that order up; per order it may send
    budget = ceil(nr_free / (capacity * 16)) + 1 requests ("a sixteenth of the list
    plus one", about 30 s to report an idle guest). Each unreported block is pulled
    off the free list (isolated, so nobody allocates it meanwhile), up to capacity
    (PAGE_REPORTING_CAPACITY, 32) blocks per request, one device-writable descriptor
    per block on queue 4; when the device has used the request the blocks go back
    to the free lists marked "reported". A pass that ran out of budget requests
    another one, again after the delay;
  * a reported block that is allocated needs nothing: the host gives a fresh zero
    page when the guest touches it. Freed again, it is unreported and will be
    reported again.

Here "reported" is one flag per aligned order-9 block on the allocator
(BuddyAllocator.reported), cleared by the allocator when any page of the block is
freed; isolation is BuddyAllocator.alloc_range. Loops are per block, never per page.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from device.virtio import wire
from device.guest.balloon_driver import BalloonDriver, DriverOpReport
from device.guest.buddy import MAX_ORDER, BuddyAllocator
from device.virtio.features import Q_REPORTING
from device.virtio.layout import PAGE_SHIFT

log = logging.getLogger("balloon-lab.reporting")


@dataclass(frozen=True)
class ReportingParams:
    """Linux's defaults (mm/page_reporting.h, mm/page_reporting.c)."""

    order: int = 9            # page_reporting_order: pageblock_order on x86 (2 MiB)
    capacity: int = 32        # PAGE_REPORTING_CAPACITY: blocks per request
    delay_s: float = 2.0      # PAGE_REPORTING_DELAY: 2 * HZ
    budget_divisor: int = 16  # budget = ceil(nr_free / (capacity * 16))

    def __post_init__(self) -> None:
        if not 0 <= self.order <= MAX_ORDER:
            raise ValueError(f"reporting order must be 0..{MAX_ORDER}, got {self.order}")
        if not 1 <= self.capacity <= 256:
            raise ValueError(f"reporting capacity must be 1..256 blocks, got {self.capacity}")
        if not 0 <= self.delay_s <= 60 or not math.isfinite(self.delay_s):
            raise ValueError(f"reporting delay must be 0..60 s, got {self.delay_s}")
        if self.budget_divisor < 1:
            raise ValueError(f"budget divisor must be >= 1, got {self.budget_divisor}")


@dataclass
class ReportingStats:
    notifications: int = 0      # frees that requested a pass
    passes: int = 0
    passes_below_watermark: int = 0
    requests: int = 0
    blocks: int = 0
    bytes: int = 0
    report_ns: int = 0          # time inside passes (isolate + ring + wait + drain)
    first_pass_at: float | None = None
    last_pass_end: float | None = None
    by_order: dict = field(default_factory=dict)


def low_watermark_pages(ram_pages: int) -> int:
    """The zone's low watermark as Linux sizes it: min_free_kbytes = sqrt(16 * lowmem KiB),
    clamped to 128 KiB..256 MiB (mm/page_alloc.c), low = min * 5/4."""
    kb = ram_pages * 4
    min_kb = min(max(int(math.isqrt(kb * 16)), 128), 262144)
    return (min_kb + min_kb // 4) // 4


class ReportingDriver:
    def __init__(self, driver: BalloonDriver, alloc: BuddyAllocator, params: ReportingParams | None = None) -> None:
        self.driver = driver
        self.alloc = alloc
        self.p = params or ReportingParams()
        self.q = driver.queues[Q_REPORTING]
        chunks = -(-alloc.max_pfn // (1 << MAX_ORDER)) << (MAX_ORDER - self.p.order)
        alloc.reported = np.zeros(chunks, dtype=bool)
        alloc.reported_order = self.p.order
        alloc.free_listener = self._on_free
        self.deadline: float | None = None
        self._draining = False
        self.stats = ReportingStats()
        self.watermark = low_watermark_pages(alloc.ram_pages) + (self.p.capacity << self.p.order)

    # --- requests: page_reporting_notify_free ---------------------------------------------------
    def _on_free(self, pfns: np.ndarray) -> None:
        if self._draining or self.deadline is not None:
            return
        if self._frees_made_high_order_block(pfns):
            self.deadline = time.monotonic() + self.p.delay_s
            self.stats.notifications += 1

    def _frees_made_high_order_block(self, pfns: np.ndarray) -> bool:
        chunks = wire.sorted_unique(np.asarray(pfns, dtype=np.int64) >> self.p.order) << self.p.order
        for k in range(self.p.order, MAX_ORDER + 1):
            heads = (chunks >> k) << k
            if np.isin(heads, self.alloc.free_blocks(k)).any():
                return True
        return False

    def timeout(self) -> float | None:
        """Seconds until the pending pass is due (None: nothing pending)."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def tick(self) -> None:
        """Run the pass if it is due (called from the guest's event loop)."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.deadline = None
            self.process()

    # --- a pass: page_reporting_process_zone ----------------------------------------------------
    def process(self) -> None:
        p, st = self.p, self.stats
        t0 = time.perf_counter_ns()
        st.passes += 1
        st.first_pass_at = st.first_pass_at or time.time()
        if self.alloc.free_pages_count < self.watermark:
            st.passes_below_watermark += 1
            return
        sg: list[tuple[int, int]] = []
        again = False
        for k in range(p.order, MAX_ORDER + 1):
            blocks = self.alloc.free_blocks(k)
            if blocks.size == 0:
                continue
            budget = -(-blocks.size // (p.capacity * p.budget_divisor))
            per = 1 << (k - p.order)
            done = self.alloc.reported.reshape(-1, per)[blocks >> k].all(axis=1)
            for b in blocks[~done].tolist():          # per block
                if budget < 0:
                    again = True
                    break
                try:
                    self.alloc.alloc_range(b, 1 << k)   # isolate: nobody allocates it meanwhile
                except ValueError:
                    continue                            # allocated since the list was read
                sg.append((b, k))
                if len(sg) == p.capacity:
                    self._report(sg)
                    sg = []
                    budget -= 1
        if sg:
            self._report(sg)
        st.report_ns += time.perf_counter_ns() - t0
        st.last_pass_end = time.time()
        if again and self.deadline is None:
            self.deadline = time.monotonic() + p.delay_s

    def _report(self, sg: list[tuple[int, int]]) -> None:
        """One request: the blocks as device-writable descriptors, wait until used, then
        give them back to the free lists marked reported (page_reporting_drain)."""
        bufs = [(b << PAGE_SHIFT, (1 << k) << PAGE_SHIFT) for b, k in sg]
        rep = DriverOpReport("report", 0)
        try:
            self.q.add_buf([], bufs, "report")
            self.q.kick_if_needed()
            self.driver._wait_used(self.q, rep)
        finally:
            self._drain(sg)
        st = self.stats
        st.requests += 1
        st.blocks += len(sg)
        for _b, k in sg:
            st.bytes += (1 << k) << PAGE_SHIFT
            st.by_order[str(k)] = st.by_order.get(str(k), 0) + 1

    def _drain(self, sg: list[tuple[int, int]]) -> None:
        pfns = np.concatenate([np.arange(b, b + (1 << k), dtype=np.int64) for b, k in sg])
        self._draining = True
        try:
            self.alloc.free_pages(pfns)
        finally:
            self._draining = False
        o = self.p.order
        for b, k in sg:
            self.alloc.reported[b >> o:(b >> o) + (1 << (k - o))] = True

    # --- what the orchestrator may ask --------------------------------------------------------
    def reported_free_runs(self) -> tuple[np.ndarray, np.ndarray]:
        """PFN runs of the blocks that are reported and still wholly free (what the host
        must hold no data for)."""
        o = self.p.order
        idx = np.flatnonzero(self.alloc.reported)
        if idx.size == 0:
            return idx, idx
        free = self.alloc.free_page_mask()
        padded = np.zeros(self.alloc.reported.size << o, dtype=bool)
        padded[: free.size] = free
        idx = idx[padded.reshape(-1, 1 << o)[idx].all(axis=1)]
        s, ln = wire.pfns_to_runs(idx)
        return s << o, ln << o

    def info(self) -> dict:
        d = asdict(self.stats)
        d.update(params=asdict(self.p), watermark_pages=self.watermark,
                 reported_blocks=int(np.count_nonzero(self.alloc.reported)), pending=self.deadline is not None)
        return d
