"""The guest's virtio-balloon driver: negotiation, rings in guest RAM, inflate, deflate, stats.

Modelled on Linux's drivers/virtio/virtio_balloon.c: the driver allocates pages from
the guest kernel's allocator, tells the device about them one request at a time
(waiting for each to be used before the next, as Linux does), and updates `actual`
in config space after each request. What differs by protocol is only how a batch
of pages is encoded on the ring:

  pfn / pfn-ranges  le32 PFN arrays, at most 256 per request (the device decides
                    whether to merge them into ranges)
  bitmap            the seed's 32-byte header + bitmap, split across descriptors
  chunks            one descriptor per contiguous run (indirect table when long)

Every protocol works in the same passes: a pass takes FILL_PASS pages from the
allocator in calls of ALLOC_BATCH pages (the `alloc` stage), hands them to the wire
format (the `encode` stage holds everything the driver does to turn the pass into
requests, including the per-request page lists it keeps for the balloon), sends the
requests one by one (`transmit`), then writes `actual` once. So allocation calls and
config round trips are the same for every protocol; only encoding and transmission
differ. (A bitmap/chunks request size above FILL_PASS makes that protocol's passes
larger: the one case where passes differ, when the user asks for it.)
"""
from __future__ import annotations

import logging
import os
import resource
import select
import threading
from contextlib import contextmanager, nullcontext
import time
from dataclasses import asdict, dataclass

import numpy as np

from device.virtio import control
from device.guest.alloc_policy import HUGE_ORDER, allocate_for_balloon
from device.guest.buddy import BuddyAllocator
from device.virtio.control import Channel, ControlError, PeerGone, Req
from device.virtio.features import F_FREE_PAGE_HINT, F_REPORTING, Q_FREE_PAGE, Q_MISC, Q_REPORTING
from device.virtio.features import (CFG_ACTUAL, CFG_NUM_PAGES, F_DEFLATE_ON_OOM, F_MUST_TELL_HOST, F_PAGE_BITMAP,
                             F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_STATS_VQ, F_VERSION_1,
                             Q_DEFLATE, Q_INFLATE, Q_STATS, QUEUE_NAMES, S_ACKNOWLEDGE,
                             S_DRIVER, S_DRIVER_OK, S_FEATURES_OK, S_NEEDS_RESET, STAT_ENTRY, STAT_TAGS, bit)
from device.guest.page_contents import GuestPageContents
from device.virtio.ram import GuestRAM
from device.virtio.layout import PAGE_SHIFT, PAGE_SIZE
from device.virtio.protocols import (MAX_CHUNKS_PER_REQUEST, PFN_WIRE, WireFormat, accepted_wire_format,
                                     negotiated_wire_format)
from device.virtio.driver_queue import DriverQueue
from device.virtio.metric_decl import COUNTER, GAUGE, TIMING, Metric, MetricSet, declared_by
from device.virtio.split_ring import ring_area_bytes, ring_layout
from device.virtio.stage import chain, stage

log = logging.getLogger("balloon-lab.driver")
_now = time.perf_counter_ns

QUEUE_SIZE = 256
ALLOC_BATCH = 65536            # pages the allocator hands out per call, for every protocol
FILL_PASS = 262144             # pages per fill/leak pass (one `actual` update each), for every protocol


class DeviceTimeout(RuntimeError):
    """The device did not use a buffer in time (a stalled or dead VMM)."""


# What the driver reports per inflate/deflate (DriverOpReport); the lab sums them per operation.
DRIVER_OP_METRICS = MetricSet("device/guest/balloon_driver.py DRIVER_OP_METRICS", [
    Metric("pages", COUNTER, "", "pages the driver put into (or took out of) the balloon"),
    Metric("requests", COUNTER, "", "requests sent on the ring, each waited for until used"),
    Metric("kicks", GAUGE, "", "kick eventfd writes (EVENT_IDX skips a kick while the device still polls)"),
    Metric("interrupts", GAUGE, "", "call eventfd reads that returned an interrupt"),
    Metric("bytes_on_ring", COUNTER, "bytes", "request bytes put on the ring (chunks: 16 per descriptor)"),
    Metric("descriptors", COUNTER, "", "descriptors in the requests sent"),
    Metric("alloc_ns", TIMING, "ns", "alloc stage: taking pages from the guest allocator (and zeroing them)"),
    Metric("encode_ns", TIMING, "ns", "encode stage: building PFN arrays, bitmaps or chunk chains"),
    Metric("wait_ns", TIMING, "ns", "transmit stage: ring, kick and waiting for used, device work included"),
    Metric("config_ns", TIMING, "ns", "writing `actual` to config space after each pass"),
    Metric("alloc_calls", COUNTER, "", "calls into the allocator (the same for every protocol)"),
    Metric("config_writes", COUNTER, "", "`actual` updates: one per fill/leak pass"),
    Metric("total_ns", TIMING, "ns", "the whole inflate or deflate as the guest saw it"),
    Metric("cpu_ns", TIMING, "ns", "CPU time of the driver's thread in the operation (the total without waiting)"),
    Metric("short_pages", COUNTER, "", "pages the allocator could not give"),
    Metric("target_pages", COUNTER, "", "the balloon size the operation aimed at"),
])


@declared_by(DRIVER_OP_METRICS)
@dataclass
class DriverOpReport:
    """One inflate or deflate as the guest saw it."""

    kind: str
    target_pages: int
    pages: int = 0
    requests: int = 0
    kicks: int = 0
    interrupts: int = 0
    bytes_on_ring: int = 0
    descriptors: int = 0
    alloc_ns: int = 0
    encode_ns: int = 0
    wait_ns: int = 0        # ring + kick + waiting for used: includes the device's own work
    config_ns: int = 0      # writing `actual` after each fill/leak pass
    alloc_calls: int = 0    # calls into the allocator (the same for every protocol)
    config_writes: int = 0  # `actual` updates: one per pass (the same for every protocol)
    total_ns: int = 0
    cpu_ns: int = 0         # the driver thread's CPU time in the operation: waiting is not in it
    short_pages: int = 0    # pages the allocator could not give
    error: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class DriverOptions:
    wire_format: str = "auto"           # which wire format to accept if offered: auto or a WIRE_FORMAT_NAMES name
    batch_pages: int | None = None      # pages per request; None: the wire format's default_batch
    event_idx: bool = True
    indirect: bool = True
    timeout_s: float = 30.0
    # Like KVM's halt polling: poll the used ring this long before sleeping on the call
    # eventfd. Off by default: measured here, a spinning guest doubles the device's
    # discard time (every MADV_REMOVE must then shoot down the TLB of a running vCPU),
    # far more than the ~0.2 ms per request that sleeping costs (docs/BENCHMARKS.md).
    halt_poll_us: int = 0
    # free page hinting for migration: none | upstream (FREE_PAGE_HINT, queue 3) | bitmap
    # (PAGE_BITMAP's misc queue 5); device/guest/hint_driver.py serves those queues
    hint: str = "none"
    # which pages the balloon takes: linux (order-0, lowest orders first) | hugepage-aware
    # (whole aligned order-9 blocks first); device/guest/alloc_policy.py
    alloc_policy: str = "linux"
    # free page reporting (REPORTING, queue 4); device/guest/page_reporting_driver.py serves it
    reporting: bool = False
    # Zero every page allocated for the balloon, as Linux does with init_on_alloc (on in
    # Debian's kernels): the host then discards populated pages (docs/REAL_STACK.md)
    init_on_alloc: bool = False


class BalloonDriver:
    def __init__(self, chan: Channel, ram: GuestRAM, allocator: BuddyAllocator, memory: GuestPageContents,
                 opts: DriverOptions) -> None:
        self.chan = chan
        self.ram = ram
        self.alloc = allocator
        self.memory = memory
        self.opts = opts
        self.features = 0
        self.queues: dict[int, DriverQueue] = {}
        self.kick_fds: dict[int, int] = {}
        self.call_fds: dict[int, int] = {}
        self._pollers: dict[int, select.epoll] = {}  # queue -> what _wait_used sleeps in
        self.config_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.balloon: list[np.ndarray] = []      # pages in the balloon, one array per request
        self.actual = 0
        self.lock = threading.RLock()
        self.failed: str | None = None
        self.reports: list[DriverOpReport] = []
        self.wire: WireFormat = PFN_WIRE          # device/virtio/protocols.py, chosen at bring_up
        self.wire_format = self.wire.name
        self.last_deflated = np.zeros(0, np.int64)   # pages the last deflate gave back

    # --- probe: negotiation and queue set-up -------------------------------------------------
    def bring_up(self) -> None:
        ch = self.chan
        ch.call_result(Req.SET_STATUS, control.U32.pack(S_ACKNOWLEDGE | S_DRIVER))
        offered = control.U64.unpack(ch.call(Req.GET_FEATURES).payload)[0]
        want = bit(F_MUST_TELL_HOST) | bit(F_STATS_VQ) | bit(F_DEFLATE_ON_OOM) | bit(F_VERSION_1)
        if self.opts.event_idx:
            want |= bit(F_RING_EVENT_IDX)
        if self.opts.indirect:
            want |= bit(F_RING_INDIRECT_DESC)
        accepted = accepted_wire_format(self.opts.wire_format, offered)
        if accepted.feature is not None:
            want |= bit(accepted.feature)
        if self.opts.reporting:
            want |= bit(F_REPORTING)
        if self.opts.hint == "upstream":
            want |= bit(F_FREE_PAGE_HINT)
        elif self.opts.hint == "bitmap" and offered & bit(F_PAGE_BITMAP):
            want |= bit(F_PAGE_BITMAP)      # one feature for the seed's bitmaps: the device then
                                            # decodes inflates as bitmaps too (chunks still win)
        self.features = want & offered
        self.wire = negotiated_wire_format(self.features)   # what the device will decode
        self.wire_format = self.wire.name
        ch.call_result(Req.SET_FEATURES, control.U64.pack(self.features))
        ch.call_result(Req.SET_STATUS, control.U32.pack(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK))
        status = control.U32.unpack(ch.call(Req.GET_STATUS).payload)[0]
        if not status & S_FEATURES_OK:
            raise ControlError("device did not accept FEATURES_OK")
        ch.call_result(Req.SET_CONFIG_CALL, b"", [self.config_fd])
        queues = [Q_INFLATE, Q_DEFLATE] + ([Q_STATS] if self.has(F_STATS_VQ) else [])
        queues += [Q_FREE_PAGE] if self.opts.hint == "upstream" and self.has(F_FREE_PAGE_HINT) else []
        queues += [Q_MISC] if self.opts.hint == "bitmap" and self.has(F_PAGE_BITMAP) else []
        queues += [Q_REPORTING] if self.has(F_REPORTING) else []
        for index in queues:
            self._setup_queue(index)
        self._setup_buffers()
        ch.call_result(Req.SET_STATUS, control.U32.pack(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK))
        if Q_STATS in self.queues:
            self._fill_stats()
            self.queues[Q_STATS].add_buf([(self.stats_gpa, STAT_ENTRY.size * len(STAT_TAGS))], [], "stats")
            self.queues[Q_STATS].kick_if_needed()
        if self.read_config_u32(CFG_NUM_PAGES) != self.actual:
            # a target set while we came up (Linux's virtballoon_probe: towards_target, then
            # the config-change work): the guest's loop serves it as any config change
            os.eventfd_write(self.config_fd, 1)
        log.info("driver ready: wire format %s, batch %d pages", self.wire_format, self.batch_pages)

    def has(self, f: int) -> bool:
        return bool(self.features & bit(f))

    def _alloc_contig(self, nbytes: int) -> int:
        """Guest-physical address of a fresh, physically contiguous, zeroed buffer."""
        pages = -(-nbytes // PAGE_SIZE)
        order = max(0, (pages - 1).bit_length())
        pfn = self.alloc.alloc_block(order)
        if pfn is None:
            raise MemoryError(f"no free order-{order} block for a {nbytes}-byte driver buffer")
        gpa = int(pfn) << PAGE_SHIFT
        self.ram.view(gpa, (1 << order) * PAGE_SIZE)[:] = bytes((1 << order) * PAGE_SIZE)
        return gpa

    def _setup_queue(self, index: int) -> None:
        rl = ring_layout(self._alloc_contig(ring_area_bytes(QUEUE_SIZE)), QUEUE_SIZE)
        kick = os.eventfd(0, os.EFD_CLOEXEC)
        call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        indirect_area = None
        if self.has(F_RING_INDIRECT_DESC) and index in (Q_INFLATE, Q_DEFLATE):
            indirect_area = (self._alloc_contig(16 * MAX_CHUNKS_PER_REQUEST), 16 * MAX_CHUNKS_PER_REQUEST)
        q = DriverQueue(self.ram, index, QUEUE_SIZE, rl.desc_gpa, rl.avail_gpa, rl.used_gpa,
                        event_idx=self.has(F_RING_EVENT_IDX), indirect=self.has(F_RING_INDIRECT_DESC),
                        kick=lambda fd=kick: os.eventfd_write(fd, 1), indirect_area=indirect_area)
        self.chan.call_result(Req.SET_VRING, control.VRING.pack(index, QUEUE_SIZE, rl.desc_gpa, rl.avail_gpa, rl.used_gpa))
        self.chan.call_result(Req.SET_VRING_KICK, control.U32.pack(index), [kick])
        self.chan.call_result(Req.SET_VRING_CALL, control.U32.pack(index), [call])
        self.queues[index] = q
        self.kick_fds[index] = kick
        self.call_fds[index] = call

    def _setup_buffers(self) -> None:
        fmt = self.wire
        if self.opts.batch_pages is not None:
            self.batch_pages = int(self.opts.batch_pages)
        else:
            self.batch_pages = fmt.default_batch
        if fmt.max_batch is not None and not 1 <= self.batch_pages <= fmt.max_batch:
            raise ValueError(f"batch_pages must be 1..{fmt.max_batch} for the {fmt.name} protocol, "
                             f"got {self.batch_pages}")
        self.req_bytes = fmt.request_buffer_bytes(self.batch_pages)
        self.req_gpa = self._alloc_contig(self.req_bytes) if self.req_bytes else 0
        self.stats_gpa = self._alloc_contig(STAT_ENTRY.size * len(STAT_TAGS))

    # --- config change: the host asked for a new balloon size --------------------------------
    def read_config_u32(self, off: int) -> int:
        msg = self.chan.call(Req.GET_CONFIG, control.CONFIG_ACCESS.pack(off, 4))
        return control.U32.unpack_from(msg.payload, control.CONFIG_ACCESS.size)[0]

    def write_actual(self) -> None:
        self.chan.call_result(Req.SET_CONFIG, control.CONFIG_ACCESS.pack(CFG_ACTUAL, 4) + control.U32.pack(self.actual))

    def device_status(self) -> int:
        return control.U32.unpack(self.chan.call(Req.GET_STATUS).payload)[0]

    def on_config_change(self) -> DriverOpReport | None:
        try:
            os.eventfd_read(self.config_fd)
        except BlockingIOError:
            pass
        if self.device_status() & S_NEEDS_RESET:
            self.failed = "device set NEEDS_RESET"
            log.error("device needs reset; the driver stops using it")
            return None
        target = self.read_config_u32(CFG_NUM_PAGES)
        with self.lock:
            if target > self.actual:
                rep = self.inflate(target - self.actual, target)
            elif target < self.actual:
                rep = self.deflate(self.actual - target, target)
            else:
                return None
        self.reports.append(rep)
        return rep

    # --- inflate -------------------------------------------------------------------------------
    @contextmanager
    def _operation(self, rep: DriverOpReport):
        """Time one inflate/deflate, mark it for the USDT probe, and turn a failure into
        the report's error (the driver stops; the orchestrator sees why)."""
        cpu0 = time.thread_time_ns()
        with stage(rep.kind, rep, "total_ns"):
            try:
                yield
            except Exception as e:
                rep.error = f"{type(e).__name__}: {e}"
                self.failed = rep.error
                log.error("%s failed: %s", rep.kind, rep.error)
        rep.cpu_ns += time.thread_time_ns() - cpu0

    def inflate(self, n: int, target: int | None = None) -> DriverOpReport:
        rep = DriverOpReport("inflate", target if target is not None else self.actual + n)
        q = self.queues[Q_INFLATE]
        left = n
        with self._operation(rep):
            while left > 0:
                want = min(self._pass_pages(), left)
                parts, got = [], 0
                with stage("alloc", rep):
                    wholes, rests, n_blocks = [], [], 0
                    while got < want:
                        part = allocate_for_balloon(self.alloc, min(ALLOC_BATCH, want - got), self.opts.alloc_policy)
                        rep.alloc_calls += 1
                        if part.pages.size == 0:
                            break
                        w = part.whole_blocks << HUGE_ORDER     # whole 2 MiB blocks lead each part
                        wholes.append(part.pages[:w])
                        rests.append(part.pages[w:])
                        n_blocks += part.whole_blocks
                        got += int(part.pages.size)
                    parts = wholes + rests
                    pages = np.concatenate(parts) if len(parts) > 1 else (parts[0] if parts else np.zeros(0, np.int64))
                    if self.opts.init_on_alloc and pages.size:
                        self.memory.zero_pages(pages)     # part of allocating, as in the kernel
                if pages.size:
                    left -= int(pages.size)
                    self._send_pages(q, pages, rep, whole_blocks=n_blocks)
                    self._update_actual(rep)
                if got < want:
                    rep.short_pages = left
                    log.warning("guest out of memory: %d pages short of the inflate target", left)
                    break
        return rep

    def _pass_pages(self) -> int:
        """Pages per fill/leak pass: FILL_PASS for every protocol (see the module doc); a
        larger request (a format without max_batch, when the user asks) makes it larger."""
        return max(FILL_PASS, self.batch_pages)

    # --- deflate -------------------------------------------------------------------------------
    def deflate(self, n: int, target: int | None = None) -> DriverOpReport:
        rep = DriverOpReport("deflate", target if target is not None else self.actual - n)
        q = self.queues[Q_DEFLATE]
        returned: list[np.ndarray] = []
        left = n
        with self._operation(rep):
            while left > 0 and self.balloon:
                batch = self._take_from_balloon(min(left, self._pass_pages()))
                left -= int(batch.size)
                # Tell the host first (MUST_TELL_HOST), then give the pages back to the allocator.
                self._send_pages(q, np.sort(batch), rep, inflate=False)
                self._update_actual(rep)
                returned.append(batch)
                with stage("alloc", rep):
                    self.alloc.free_pages(batch)
                    rep.alloc_calls += 1
        self.last_deflated = np.concatenate(returned) if returned else np.zeros(0, np.int64)
        return rep

    def _take_from_balloon(self, n: int) -> np.ndarray:
        """The most recently ballooned pages first (the balloon is a stack)."""
        parts, left = [], n
        while left > 0 and self.balloon:
            last = self.balloon[-1]
            take = min(left, int(last.size))
            parts.append(last[last.size - take:])
            if take == last.size:
                self.balloon.pop()
            else:
                self.balloon[-1] = last[: last.size - take]
            left -= take
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def deflate_on_oom(self, shortfall: int) -> int:
        """DEFLATE_ON_OOM: the guest takes pages back from the balloon under pressure."""
        if not self.has(F_DEFLATE_ON_OOM) or not self.balloon:
            return 0
        with self.lock:
            before = self.actual
            rep = self.deflate(min(shortfall, self.actual))
            rep.kind = "deflate-on-oom"
            self.reports.append(rep)
            return before - self.actual

    # --- one batch of pages onto the ring, in the negotiated wire format --------------------
    def _send_pages(self, q: DriverQueue, pages: np.ndarray, rep: DriverOpReport, inflate: bool = True,
                    whole_blocks: int = 0) -> None:
        """Encode a pass with the wire format's `encode` (device/virtio/protocols.py) and
        send its requests one by one. A format that encodes whole passes (bitmap, chunks)
        does so in one encode stage; writing a request into the request buffer (pfn,
        bitmap) is an encode stage of its own. `whole_blocks`: pages[:whole_blocks * 512]
        are whole aligned 2 MiB blocks, which the bitmap format names one bit per block."""
        fmt = self.wire
        for group, page_shift in fmt.unit_groups(pages, whole_blocks << HUGE_ORDER):
            # a whole-pass encode is one encode stage; a per-request one is timed at `place`
            with stage("encode", rep) if fmt.encodes_whole_pass else nullcontext():
                requests = fmt.encode(group, batch_pages=self.batch_pages, inflate=inflate,
                                      req_id_start=rep.requests, page_shift=page_shift)
            for request in requests:
                with chain() as c:           # encode then transmit: one marker between them
                    bufs = request.descriptors
                    if request.payload is not None:
                        c.next("encode", rep)
                        bufs = fmt.place(self.ram, self.req_gpa, request.payload)
                    self._transmit(q, bufs, rep, request.pages, inflate, c)

    def _transmit(self, q: DriverQueue, bufs: list[tuple[int, int]], rep: DriverOpReport, pages: np.ndarray,
                  inflate: bool, c: chain) -> None:
        c.next("transmit", rep, "wait_ns")
        kicks0 = q.kicks
        q.add_buf(bufs, [], rep.requests)
        q.kick_if_needed()
        self._wait_used(q, rep)
        c.end()
        rep.kicks += q.kicks - kicks0
        rep.requests += 1
        rep.descriptors += len(bufs)
        # a request buffer's bytes, or (chunks: the descriptors are the pages) 16 per descriptor
        rep.bytes_on_ring += sum(n for _, n in bufs) if self.wire.place is not None else 16 * len(bufs)
        rep.pages += int(pages.size)
        if inflate:
            self.balloon.append(np.asarray(pages, dtype=np.int64))
            self.actual += int(pages.size)
        else:
            self.actual -= int(pages.size)

    def _update_actual(self, rep: DriverOpReport) -> None:
        """Write `actual` to config space. Linux does it after every fill/leak pass; here
        it is once per allocation batch (a config write is a control round trip here,
        an MMIO exit there)."""
        t0 = _now()
        self.write_actual()
        rep.config_ns += _now() - t0
        rep.config_writes += 1

    def _wait_used(self, q: DriverQueue, rep: DriverOpReport) -> None:
        """Wait until the device returns the request: look at the used ring, ask for a
        call (used_event) and look again, then sleep on the call eventfd (and on the
        control socket, for a hang-up only: a VMM that died will never use the buffer).
        A call that came although the guest did not sleep is consumed and counted too,
        so the next wait does not wake on it. Per request this is the lab's own work on
        the guest's side of a round trip, so it keeps to one poll object per queue and
        the cheap used-idx test (docs/BENCHMARKS.md, the ring's floor)."""
        fd = self.call_fds[q.index]
        if self.opts.halt_poll_us:
            # Interrupts stay enabled while polling: the device still calls, and the
            # call is consumed (and counted) here, as a vCPU would take it.
            q.enable_interrupts()
            has_used, poll_end = q.has_used, _now() + self.opts.halt_poll_us * 1000
            while not has_used() and _now() < poll_end:
                pass
        deadline = None
        woke = False
        while not (q.has_used() or q.enable_interrupts()):
            if deadline is None:
                deadline = time.monotonic() + self.opts.timeout_s
            left = deadline - time.monotonic()
            ready = dict(self._poller(q.index).poll(left)) if left > 0 else {}
            if ready.get(self.chan.sock.fileno(), 0) & (select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR):
                raise PeerGone(f"the VMM closed the control socket while the {QUEUE_NAMES[q.index]} request "
                               f"was in flight (it died)")
            if fd not in ready:
                raise DeviceTimeout(f"device did not use the {QUEUE_NAMES[q.index]} request within "
                                    f"{self.opts.timeout_s:g} s (stalled or dead VMM)")
            woke = self._take_call(fd, rep)
        if not woke:
            self._take_call(fd, rep)
        q.get_used()

    @staticmethod
    def _take_call(fd: int, rep: DriverOpReport) -> bool:
        """Consume a pending call (an interrupt, counted); False when none was pending."""
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return False
        rep.interrupts += 1
        return True

    def _poller(self, index: int) -> select.epoll:
        """The epoll object a wait on queue `index` sleeps in: its call eventfd, and the
        control socket for a hang-up. Made once per queue (not once per request); epoll,
        not poll, so a call's wake-up takes the ready fd off epoll's list instead of
        polling both again (the VMM and the ring's floor wait in epoll too)."""
        p = self._pollers.get(index)
        if p is None:
            p = self._pollers[index] = select.epoll()
            p.register(self.call_fds[index], select.EPOLLIN)
            p.register(self.chan.sock.fileno(), select.EPOLLRDHUP)
        return p

    # --- stats -----------------------------------------------------------------------------------
    def _fill_stats(self) -> None:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        free = self.alloc.free_pages_count * PAGE_SIZE
        total = self.ram.layout.ram_bytes - (self.actual << PAGE_SHIFT)
        values = {"swap-in": 0, "swap-out": 0, "major-faults": ru.ru_majflt, "minor-faults": ru.ru_minflt,
                  "free-memory": free, "total-memory": total, "available-memory": free,
                  "disk-caches": 0, "hugetlb-allocations": 0, "hugetlb-failures": 0, "oom-kills": 0,
                  "alloc-stalls": 0, "async-scans": 0, "direct-scans": 0, "async-reclaims": 0,
                  "direct-reclaims": 0}
        raw = b"".join(STAT_ENTRY.pack(tag, int(values[name])) for tag, name in enumerate(STAT_TAGS))
        self.ram.view(self.stats_gpa, len(raw))[:] = raw

    def on_stats_interrupt(self) -> None:
        q = self.queues.get(Q_STATS)
        fd = self.call_fds.get(Q_STATS)
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            pass
        with self.lock:
            if q.get_used():
                self._fill_stats()
                q.add_buf([(self.stats_gpa, STAT_ENTRY.size * len(STAT_TAGS))], [], "stats")
                q.kick_if_needed()
            q.enable_interrupts()

    # --- what the orchestrator may ask -------------------------------------------------------------
    def balloon_pfns(self) -> np.ndarray:
        return np.sort(np.concatenate(self.balloon)) if self.balloon else np.zeros(0, np.int64)

    def info(self) -> dict:
        return {
            "features": self.features, "wire_format": self.wire_format, "batch_pages": self.batch_pages,
            "kick_fds": {str(i): fd for i, fd in self.kick_fds.items()},
            "call_fds": {str(i): fd for i, fd in self.call_fds.items()},
            "config_fd": self.config_fd, "actual": self.actual,
            "kicks": {str(i): q.kicks for i, q in self.queues.items()},
        }
