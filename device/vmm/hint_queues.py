"""Device side of free-page hinting for live migration: queue 3 (upstream) and queue 5 (seed).

Two designs, side by side (DESIGN.md sections 4 and 5):

upstream FREE_PAGE_HINT (feature 3, queue 3), as QEMU's virtio-balloon serves it:
  the device writes a new cmd_id (>= 2) into config `free_page_hint_cmd_id` and
  signals a config change. The driver answers on queue 3 with a device-readable
  le32 holding that cmd_id, then one device-writable buffer per free order-10
  block (gpa, 4 MiB; the device only reads the address, as QEMU does), then a
  device-readable le32 STOP (0). The driver holds the blocks until the device
  writes DONE (1); STOP (0) written by the device ends reporting early. Hints for
  a cmd_id that is not the current one are ignored (a late report of a previous
  round).

seed bitmap (PAGE_BITMAP, queue 5 "misc"): the driver keeps one device-writable
  16-byte request buffer posted. To ask, the device fills it with
  {le16 cmd = 2 (GET_FREE_PAGES), le16 page_shift, le32 0, le64 req_id}, returns
  it and calls. The driver answers with free-page bitmaps in the seed's 32-byte
  header format (cmd = 2, flags bit 0 = LAST, req_id echoed), built from its free
  lists without allocating anything, then posts the request buffer again.

Either way the result is `hinted`, a bool per PFN that the migration source reads
to drop pages from its first round. The guest is untrusted: every buffer is
validated, refusals are counted (transport.refuse), and a bad hint can only make
the guest lose its own free pages' contents, never touch anything else.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import numpy as np

from device.virtio import wire
from device.vmm.balloon_device import ChainHandler
from device.virtio.features import (F_FREE_PAGE_HINT, F_PAGE_BITMAP, FREE_PAGE_HINT_CMD_ID_DONE,
                                    FREE_PAGE_HINT_CMD_ID_MIN, FREE_PAGE_HINT_CMD_ID_STOP, Q_FREE_PAGE, Q_MISC)
from device.virtio.hint_format import BITMAP_FLAG_LAST, CMD_GET_FREE_PAGES, CMD_ID, MISC_REQUEST
from device.virtio.layout import PAGE_SHIFT, PAGE_SIZE, BadAddress
from device.virtio.device_queue import DescChain

log = logging.getLogger("balloon-lab.hint")

def mark_runs(mask: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> None:
    """mask[s:s+l] = True for every run (vectorized when there are many runs)."""
    if len(starts) <= 64:
        for s, ln in zip(starts.tolist(), lengths.tolist()):
            mask[s:s + ln] = True
        return
    lo, hi = int(starts.min()), int((starts + lengths).max())
    delta = np.zeros(hi - lo + 1, dtype=np.int32)
    np.add.at(delta, starts - lo, 1)
    np.add.at(delta, starts + lengths - lo, -1)
    mask[lo:hi] |= np.cumsum(delta[:-1]) > 0


class HintQueues:
    """The hint queues of one BalloonDevice. Runs in the VMM's main loop thread;
    the migration thread reads `hinted` and waits on the events."""

    def __init__(self, device, mark_dirty: Callable[[np.ndarray], None] | None = None) -> None:
        self.dev = device
        self.layout = device.layout
        self.max_pfn = self.layout.max_pfn
        self.mark_dirty = mark_dirty
        self.hinted = np.zeros(self.max_pfn, dtype=bool)
        self.report_done = threading.Event()
        # upstream
        self.cmd_id = FREE_PAGE_HINT_CMD_ID_MIN - 1
        self.reporting = False
        # bitmap
        self.request_head: int | None = None
        self.request_view: memoryview | None = None
        self.request_gpa: int | None = None
        self.req_id = 0
        self.awaiting: int | None = None
        self.stats = self._zero_stats()

    @staticmethod
    def _zero_stats() -> dict:
        return {"cmd_id": 0, "blocks": 0, "hinted_pages": 0, "stale_hints": 0, "bitmap_requests": 0,
                "bitmap_responses": 0, "bitmap_bytes": 0, "requested_ns": 0, "first_hint_ns": 0,
                "report_end_ns": 0}

    def reset(self) -> None:
        """Forget every hint (a new migration starts from scratch)."""
        self.hinted[:] = False
        self.report_done.clear()
        self.stats = self._zero_stats()

    # --- the queues served here --------------------------------------------------------
    def register_queues(self, register: Callable[[int, ChainHandler], None]) -> None:
        """Serve queue 3 (free page hint) and queue 5 (misc) through `register`
        (BalloonDevice.register_queue), as their owner (the migration controller) decides."""
        register(Q_FREE_PAGE, self._free_page_chain)
        register(Q_MISC, self._misc_chain)

    # --- upstream: queue 3 -------------------------------------------------------------
    @property
    def upstream_ready(self) -> bool:
        return self.dev.live and self.dev.has(F_FREE_PAGE_HINT) and Q_FREE_PAGE in self.dev.queues

    def start_upstream(self) -> int:
        """Ask for hints under a new cmd_id (config write + config interrupt)."""
        if not self.upstream_ready:
            raise RuntimeError("FREE_PAGE_HINT was not negotiated (or the device is not live)")
        self.cmd_id = max(self.cmd_id + 1, FREE_PAGE_HINT_CMD_ID_MIN)
        if self.cmd_id > 0xFFFFFFFF:
            self.cmd_id = FREE_PAGE_HINT_CMD_ID_MIN
        self.reporting = False
        self.report_done.clear()
        self.stats["cmd_id"] = self.cmd_id
        self.stats["requested_ns"] = time.perf_counter_ns()
        self._set_cmd(self.cmd_id)
        return self.cmd_id

    def stop_upstream(self) -> None:
        self.reporting = False
        self._set_cmd(FREE_PAGE_HINT_CMD_ID_STOP)

    def done_upstream(self) -> None:
        """DONE: the guest may use its hinted blocks again."""
        self.reporting = False
        self._set_cmd(FREE_PAGE_HINT_CMD_ID_DONE)

    def _set_cmd(self, value: int) -> None:
        self.dev.config.free_page_hint_cmd_id = value
        self.dev.signal_config()

    def _free_page_chain(self, chain: DescChain) -> int:
        if chain.n_readable:
            if chain.n_readable != 1 or chain.readable_bytes != CMD_ID.size or chain.writable_bytes:
                self.dev.refuse("hint-cmd-len", f"free-page chain {chain.head}: a cmd_id buffer must be one "
                                                f"device-readable le32 ({chain.readable_bytes} readable bytes)")
                return 0
            (cid,) = CMD_ID.unpack(bytes(chain.readable()[0]))
            if cid == FREE_PAGE_HINT_CMD_ID_STOP:
                if self.reporting:
                    self.reporting = False
                    self.stats["report_end_ns"] = time.perf_counter_ns()
                    self.report_done.set()
            elif cid == self.cmd_id:
                self.reporting = True
            else:
                self.stats["stale_hints"] += 1
            return 0
        if not self.reporting:
            self.stats["stale_hints"] += 1          # after STOP/DONE or for an old cmd_id: ignored
            return 0
        for gpa, ln, _w in chain.elements:
            if gpa % PAGE_SIZE or ln % PAGE_SIZE or ln == 0:
                self.dev.refuse("hint-unaligned", f"free page hint {gpa:#x}+{ln:#x} is not page-aligned")
                continue
            try:
                self.layout.translate(gpa, ln)
            except BadAddress as e:
                self.dev.refuse("hint-not-ram", f"free page hint {gpa:#x}+{ln:#x}: {e}")
                continue
            s = gpa >> PAGE_SHIFT
            self.hinted[s:s + (ln >> PAGE_SHIFT)] = True
            self.stats["blocks"] += 1
            self.stats["hinted_pages"] += ln >> PAGE_SHIFT
            if not self.stats["first_hint_ns"]:
                self.stats["first_hint_ns"] = time.perf_counter_ns()
        return 0

    # --- seed bitmap: queue 5 ------------------------------------------------------------
    @property
    def bitmap_ready(self) -> bool:
        return self.dev.live and self.dev.has(F_PAGE_BITMAP) and self.request_head is not None

    def request_bitmap(self) -> int:
        """Return the held request buffer filled with a GET_FREE_PAGES request."""
        q = self.dev.queues.get(Q_MISC)
        if q is None or not self.bitmap_ready:
            raise RuntimeError("PAGE_BITMAP misc queue not set up, or the driver posted no request buffer")
        self.req_id += 1
        self.awaiting = self.req_id
        self.report_done.clear()
        self.stats["bitmap_requests"] += 1
        self.stats["requested_ns"] = time.perf_counter_ns()
        head, view = self.request_head, self.request_view
        self.request_head = self.request_view = None
        view[:MISC_REQUEST.size] = MISC_REQUEST.pack(CMD_GET_FREE_PAGES, PAGE_SHIFT, 0, self.req_id)
        if self.mark_dirty is not None and self.request_gpa is not None:
            self.mark_dirty(np.array([self.request_gpa >> PAGE_SHIFT]))
        q.push_used(head, MISC_REQUEST.size)
        if q.need_call():
            self.dev.signal_call(Q_MISC)
        return self.req_id

    def _misc_chain(self, chain: DescChain) -> int | None:
        if chain.n_readable == 0:
            # the driver's request buffer: hold it until the device has a request
            if chain.writable_bytes < MISC_REQUEST.size or chain.elements[0][1] < MISC_REQUEST.size:
                self.dev.refuse("misc-request-len", f"misc request buffer of {chain.writable_bytes} bytes "
                                                    f"(needs {MISC_REQUEST.size} in its first descriptor)")
                return 0
            if self.request_head is not None:
                self.dev.refuse("misc-request-twice", "a second misc request buffer while one is held")
                return 0
            self.request_head = chain.head
            self.request_view = chain.writable()[0]
            self.request_gpa = chain.elements[0][0]
            return None
        limit = wire.BITMAP_HEADER_SIZE + (self.max_pfn + 7) // 8
        if chain.readable_bytes > limit:
            self.dev.refuse("bitmap-too-large", f"free page bitmap of {chain.readable_bytes} bytes (max {limit})")
            return 0
        try:
            hdr, starts, lengths = wire.decode_bitmap(chain.readable(), max_pfn=self.max_pfn)
            wire.check_runs_in_ram(starts, lengths, self.layout)   # no hints for the MMIO hole
        except wire.WireError as e:
            self.dev.refuse(f"free-bitmap-{e.reason}", str(e))
            return 0
        if hdr.cmd != CMD_GET_FREE_PAGES or hdr.req_id != self.awaiting:
            self.stats["stale_hints"] += 1
            self.dev.refuse("free-bitmap-stale", f"free page bitmap cmd {hdr.cmd} req_id {hdr.req_id}, "
                                                 f"awaiting req_id {self.awaiting}")
            return 0
        self.stats["bitmap_responses"] += 1
        self.stats["bitmap_bytes"] += chain.readable_bytes
        if len(starts):
            mark_runs(self.hinted, starts, lengths)
            self.stats["hinted_pages"] += int(lengths.sum())
            if not self.stats["first_hint_ns"]:
                self.stats["first_hint_ns"] = time.perf_counter_ns()
        if hdr.flags & BITMAP_FLAG_LAST:
            self.awaiting = None
            self.stats["report_end_ns"] = time.perf_counter_ns()
            self.report_done.set()
        return 0

    def snapshot(self) -> dict:
        s = dict(self.stats)
        t0 = s.pop("requested_ns")
        first, end = s.pop("first_hint_ns"), s.pop("report_end_ns")
        s["first_hint_ms"] = (first - t0) / 1e6 if first and t0 else None
        s["report_ms"] = (end - t0) / 1e6 if end and t0 else None
        s["hinted_pages_now"] = int(np.count_nonzero(self.hinted))
        return s
