"""Guest side of free-page hinting: queue 3 (upstream FREE_PAGE_HINT) and queue 5 (seed bitmap).

upstream, as Linux's virtio_balloon.c (report_free_page_func) does it: on a config
change whose `free_page_hint_cmd_id` is a new id (>= 2), send that id in a
device-readable le32, then take free order-10 blocks out of the allocator one by
one (BuddyAllocator.take_free_block) and hand each to the device as one
device-writable (gpa, 4 MiB) buffer, then send STOP (0). The blocks stay taken
(the guest cannot use them) until the device writes DONE (1); then they go back
to the allocator. A STOP, DONE or newer id written while reporting ends the report.

seed bitmap: keep one device-writable 16-byte request buffer posted on queue 5.
When the device returns it holding GET_FREE_PAGES, build the free-page mask from
the allocator's free lists (BuddyAllocator.free_page_mask: nothing is allocated,
the pages stay usable), send it as bitmaps in the seed's header format, one
request per window of `pages_per_request` PFNs that holds a free page (the last
flagged LAST), then post the request buffer again.

Writes the driver makes into guest RAM (its buffers) are marked in the dirty log
before and after the write: the mark before covers a stop between the two, the
mark after covers a harvest between them.
"""
from __future__ import annotations

import logging
import os
import select
import time
from dataclasses import dataclass, field

import numpy as np

from device.virtio import wire
from device.guest.balloon_driver import BalloonDriver, DeviceTimeout
from device.virtio.features import (CFG_FREE_PAGE_HINT_CMD_ID, F_FREE_PAGE_HINT, F_PAGE_BITMAP, FREE_PAGE_HINT_CMD_ID_DONE,
                             FREE_PAGE_HINT_CMD_ID_MIN, FREE_PAGE_HINT_CMD_ID_STOP, Q_FREE_PAGE, Q_MISC)
from device.virtio.hint_format import (BITMAP_FLAG_LAST, CMD_GET_FREE_PAGES, CMD_ID, HINT_BLOCK_BYTES, HINT_ORDER,
                                   MISC_REQUEST)
from device.guest.page_contents import GuestPageContents
from device.virtio.layout import PAGE_SHIFT, PAGE_SIZE
from device.virtio.driver_queue import DriverQueue
from device.virtio.split_ring import ring_bytes

log = logging.getLogger("balloon-lab.hint-driver")

BITMAP_PAGES_PER_REQUEST = 262144       # 1 GiB of PFNs, a 32 KiB bitmap per request
CMD_CHECK_EVERY = 128                   # blocks between looks at the cmd_id while reporting


@dataclass
class HintReport:
    """What the guest did for one hint request (agent `info` shows the list)."""

    design: str
    cmd_id: int
    blocks: int = 0
    pages: int = 0
    requests: int = 0
    bytes_on_ring: int = 0
    kicks: int = 0
    total_ns: int = 0
    ended_by: str = "complete"
    errors: list = field(default_factory=list)


class FreePageDriver:
    def __init__(self, balloon: BalloonDriver, memory: GuestPageContents) -> None:
        self.b = balloon
        self.ram = balloon.ram
        self.alloc = balloon.alloc
        self.memory = memory
        self.upstream = balloon.has(F_FREE_PAGE_HINT) and Q_FREE_PAGE in balloon.queues
        self.bitmap = balloon.has(F_PAGE_BITMAP) and Q_MISC in balloon.queues
        self.active_cmd = 0
        self.held: list[int] = []               # start PFNs of the order-10 blocks handed to the device
        self.reports: list[HintReport] = []
        self.cmd_gpa = self._buffer(2 * CMD_ID.size) if self.upstream else 0
        if self.bitmap:
            self.req_gpa = self._buffer(MISC_REQUEST.size)
            self.resp_bytes = wire.BITMAP_HEADER_SIZE + BITMAP_PAGES_PER_REQUEST // 8
            self.resp_gpa = self._buffer(self.resp_bytes)
            self._post_request()

    # --- guest memory the driver owns --------------------------------------------------
    def _buffer(self, nbytes: int) -> int:
        pages = -(-nbytes // PAGE_SIZE)
        order = max(0, (pages - 1).bit_length())
        pfn = self.alloc.alloc_block(order)
        if pfn is None:
            raise MemoryError(f"no free order-{order} block for a {nbytes}-byte hint buffer")
        gpa = int(pfn) << PAGE_SHIFT
        self._write(gpa, bytes(PAGE_SIZE << order))
        return gpa

    def _write(self, gpa: int, data: bytes) -> None:
        pfns = np.arange(gpa >> PAGE_SHIFT, (gpa + len(data) + PAGE_SIZE - 1) >> PAGE_SHIFT)
        self.memory.mark_dirty(pfns)
        self.ram.view(gpa, len(data))[:] = data
        self.memory.mark_dirty(pfns)

    def _mark_ring(self, q: DriverQueue) -> None:
        """The driver just wrote descriptors / avail entries of q."""
        d, a, _u = ring_bytes(q.size)
        for gpa, n in ((q.desc_gpa, d), (q.avail_gpa, a)):
            self.memory.mark_dirty(np.arange(gpa >> PAGE_SHIFT, (gpa + n + PAGE_SIZE - 1) >> PAGE_SHIFT))

    # --- waiting for the device --------------------------------------------------------------
    def _reclaim(self, q: DriverQueue, wait: bool) -> int:
        """Collect used buffers; with wait, block (halt-poll, then the call eventfd)
        until at least one arrives."""
        fd = self.b.call_fds[q.index]
        got = len(q.get_used())
        if got or not wait:
            return got
        deadline = time.monotonic() + self.b.opts.timeout_s
        poll_end = time.perf_counter_ns() + self.b.opts.halt_poll_us * 1000
        while True:
            q.enable_interrupts()
            got = len(q.get_used())
            if got:
                return got
            if time.perf_counter_ns() < poll_end:
                continue
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], min(left, 0.05))[0]:
                if left <= 0:
                    raise DeviceTimeout(f"device did not use hint buffers on queue {q.index} in time")
                continue
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass

    def _add(self, q: DriverQueue, out: list, inn: list, rep: HintReport) -> None:
        while q.num_free < len(out) + len(inn):
            q.kick_if_needed()
            self._reclaim(q, wait=True)
        q.add_buf(out, inn, None)
        self._mark_ring(q)

    def _kick(self, q: DriverQueue, rep: HintReport) -> None:
        if q.kick_if_needed():
            rep.kicks += 1

    # --- upstream ---------------------------------------------------------------------------
    def on_config_change(self) -> None:
        """Called by the guest's loop after the balloon driver's own config handling."""
        if not self.upstream:
            return
        cmd = self.b.read_config_u32(CFG_FREE_PAGE_HINT_CMD_ID)
        if cmd == FREE_PAGE_HINT_CMD_ID_DONE:
            self.return_blocks()
            self.active_cmd = 0
        elif cmd == FREE_PAGE_HINT_CMD_ID_STOP:
            self.active_cmd = 0
        elif cmd >= FREE_PAGE_HINT_CMD_ID_MIN and cmd != self.active_cmd:
            self.report_upstream(cmd)

    def report_upstream(self, cmd_id: int) -> HintReport:
        q = self.b.queues[Q_FREE_PAGE]
        rep = HintReport("upstream", cmd_id)
        t0 = time.perf_counter_ns()
        self.active_cmd = cmd_id
        try:
            self._write(self.cmd_gpa, CMD_ID.pack(cmd_id))
            self._add(q, [(self.cmd_gpa, CMD_ID.size)], [], rep)
            self._kick(q, rep)
            while True:
                if rep.blocks and rep.blocks % CMD_CHECK_EVERY == 0:
                    now = self.b.read_config_u32(CFG_FREE_PAGE_HINT_CMD_ID)
                    if now != cmd_id:
                        rep.ended_by = {FREE_PAGE_HINT_CMD_ID_STOP: "stop", FREE_PAGE_HINT_CMD_ID_DONE: "done"
                                        }.get(now, "new-cmd-id")
                        break
                    self._reclaim(q, wait=False)
                pfn = self.alloc.take_free_block(HINT_ORDER)
                if pfn is None:
                    break
                self.held.append(int(pfn))
                self._add(q, [], [(int(pfn) << PAGE_SHIFT, HINT_BLOCK_BYTES)], rep)
                rep.blocks += 1
                rep.requests += 1
                rep.bytes_on_ring += 16
                if rep.blocks % 32 == 0:
                    self._kick(q, rep)
            self._write(self.cmd_gpa + CMD_ID.size, CMD_ID.pack(FREE_PAGE_HINT_CMD_ID_STOP))
            self._add(q, [(self.cmd_gpa + CMD_ID.size, CMD_ID.size)], [], rep)
            self._kick(q, rep)
            while q.in_flight:
                self._reclaim(q, wait=True)
        except Exception as e:      # reported, never fatal to the guest
            rep.errors.append(f"{type(e).__name__}: {e}")
            log.error("free page reporting failed: %s", e)
        rep.pages = rep.blocks << HINT_ORDER
        rep.total_ns = time.perf_counter_ns() - t0
        self.reports.append(rep)
        return rep

    def return_blocks(self) -> int:
        """DONE: give every held block back to the allocator (one vectorized free)."""
        if not self.held:
            return 0
        starts = np.asarray(self.held, dtype=np.int64)
        self.held = []
        pages = (starts[:, None] + np.arange(1 << HINT_ORDER, dtype=np.int64)).ravel()
        return self.alloc.free_pages(pages)

    # --- seed bitmap ---------------------------------------------------------------------------
    def _post_request(self) -> None:
        q = self.b.queues[Q_MISC]
        q.add_buf([], [(self.req_gpa, MISC_REQUEST.size)], "request")
        self._mark_ring(q)
        q.kick_if_needed()

    def on_misc_interrupt(self) -> None:
        """The device returned something on queue 5: the request buffer means 'send
        your free pages'."""
        q = self.b.queues[Q_MISC]
        try:
            os.eventfd_read(self.b.call_fds[Q_MISC])
        except BlockingIOError:
            pass
        for token, ln in q.get_used():
            if token != "request":
                continue
            raw = bytes(self.ram.view(self.req_gpa, MISC_REQUEST.size))
            cmd, _shift, _r, req_id = MISC_REQUEST.unpack(raw)
            if cmd == CMD_GET_FREE_PAGES and ln >= MISC_REQUEST.size:
                self.report_bitmap(req_id)
            else:
                log.warning("misc queue: unknown request cmd %d (len %d)", cmd, ln)
            self._post_request()
        q.enable_interrupts()

    def report_bitmap(self, req_id: int) -> HintReport:
        q = self.b.queues[Q_MISC]
        rep = HintReport("bitmap", req_id)
        t0 = time.perf_counter_ns()
        try:
            mask = self.alloc.free_page_mask()          # walks the free lists; allocates nothing
            w = BITMAP_PAGES_PER_REQUEST
            starts = [s for s in range(0, len(mask), w) if mask[s:s + w].any()]
            if not starts:
                starts = [0]
            for k, s in enumerate(starts):
                win = mask[s:s + w]
                nz = np.flatnonzero(win)
                nbits = int(nz[-1]) + 1 if len(nz) else 0
                bits = np.packbits(win[:nbits], bitorder="little").tobytes()
                hdr = wire.BITMAP_HEADER.pack(CMD_GET_FREE_PAGES, PAGE_SHIFT,
                                              BITMAP_FLAG_LAST if k == len(starts) - 1 else 0, 0, req_id, s,
                                              len(bits))
                self._write(self.resp_gpa, hdr + bits)
                bufs = [(self.resp_gpa, len(hdr))] + ([(self.resp_gpa + len(hdr), len(bits))] if bits else [])
                self._add(q, bufs, [], rep)
                self._kick(q, rep)
                rep.requests += 1
                rep.bytes_on_ring += len(hdr) + len(bits)
                rep.pages += len(nz)
                # the response buffer is reused: wait until the device has read it (the
                # request buffer came back before this report, so nothing else is in flight)
                while q.in_flight:
                    self._reclaim(q, wait=True)
        except Exception as e:
            rep.errors.append(f"{type(e).__name__}: {e}")
            log.error("free page bitmap failed: %s", e)
        rep.total_ns = time.perf_counter_ns() - t0
        self.reports.append(rep)
        return rep

    def info(self) -> dict:
        return {"upstream": self.upstream, "bitmap": self.bitmap, "held_blocks": len(self.held),
                "reports": [r.__dict__ for r in self.reports[-8:]]}
