"""The virtio-balloon device model: config space, inflate/deflate/stats queues.

The inflate path, by protocol (device/virtio/protocols.py decodes each wire format):
  pfn         -> _pfns_per_page: one translation and one discard per page,
                 as QEMU does (the translations one numpy pass per request, the
                 discards a Python loop of one system call per page)
  pfn-ranges  -> decode PFNs, merge into runs (numpy, merge_runs), _runs
  bitmap      -> decode the bitmap -> runs (numpy), _runs
  chunks      -> each descriptor is one run, _runs
Every page the guest names is validated (RAM, not already in the balloon) before
anything is discarded; refusals are counted by reason. Stage times (translate,
discard) are measured here and marked for the USDT probe with sys.audit per request.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Callable

import numpy as np

from device.virtio import wire
from device.vmm.budget import WorkBudget, cpu_ns
from device.virtio.features import (CFG_NUM_PAGES, Q_DEFLATE, Q_INFLATE, Q_STATS, S_DRIVER_OK, STAT_ENTRY, STAT_TAGS,
                                     BalloonConfig)
from device.virtio.discard import discard_runs
from device.virtio.protocols import DecodedRequest, Refusal, negotiated_wire_format
from device.virtio.ram import GuestRAM
from device.vmm.huge_pages import HostPageTracker, host_page_runs
from device.virtio.layout import PAGE_SHIFT, PAGE_SIZE
from device.vmm.balloon_metrics import DeviceOpCounters
from device.virtio.stage import chain as stage_chain
from device.virtio.transport import DeviceListener, VirtioTransport, notify
from device.virtio.device_queue import DescChain
from device.virtio.split_ring import RingError

log = logging.getLogger("balloon-lab.device")

# What serves one queue's chains: returns the bytes written into the chain (0 for the
# balloon's device-readable requests), or None to hold the buffer unused (the stats queue).
ChainHandler = Callable[[DescChain], "int | None"]

_now = time.perf_counter_ns

# Upper bound on what one request may make the device copy out of guest RAM.
MAX_REQUEST_BYTES = 16 << 20


def _unserved(chain: DescChain) -> int:
    """A queue no handler was registered for: its chains go back used, 0 bytes written."""
    return 0


# Page states in BalloonDevice.ballooned (one byte per PFN)
IN_GUEST, IN_BALLOON, QUEUE_MEMORY = 0, 1, 2


def _refusal(state: int, inflate: bool) -> str:
    if state == QUEUE_MEMORY:
        return "pfn-is-queue-memory"
    return "already-inflated" if inflate else "deflate-not-inflated"


class BalloonDevice(VirtioTransport):
    """Serves queues 0-2 (inflate, deflate, stats) itself; whoever owns the other queues
    registers a handler for each (register_queue): the hint queues 3 and 5
    (device/vmm/hint_queues.py, registered by the migration controller), free page
    reporting on 4 (device/vmm/page_reporting_device.py, registered by the VMM).
    `listener` hears of kick-fd and `actual` changes (transport.DeviceListener)."""

    def __init__(self, ram: GuestRAM, device_features: int, *, merge_runs: bool = False,
                 discard: str = "madvise", partial_tracking: str = "full",
                 listener: DeviceListener | None = None) -> None:
        super().__init__(ram, device_features, listener)
        self.layout = ram.layout
        self.config = BalloonConfig()
        self.merge_runs = merge_runs      # pfn-ranges: merge PFNs into runs first
        self.discard_method = discard
        # One byte per PFN up to max_pfn: 1 = in the balloon. A bytearray is fast to
        # index from the per-page PFN loop; the numpy view serves the range paths.
        self.ballooned = bytearray(self.layout.max_pfn)
        self.ballooned_np = np.frombuffer(self.ballooned, dtype=np.uint8)
        # Huge host pages: discard a host page only when all of it is ballooned (host_pages.py)
        self.host_pages = (HostPageTracker(ram.size >> PAGE_SHIFT, ram.host_page_shift, partial_tracking)
                           if ram.host_page_shift > PAGE_SHIFT else None)
        self.inflate = DeviceOpCounters()
        self.deflate = DeviceOpCounters()
        self.stats: dict[str, int] = {}
        self.stats_updated: float = 0.0
        self.stats_head: int | None = None       # the stats buffer the device holds
        self.stats_waiters: list = []
        self.budget_yields = 0                   # wake-ups that ended with work left (re-kicked)
        self._budget: WorkBudget | None = None   # of the wake-up being served
        self._carry = None                       # discards of the current request left for later
        self._unsettled: tuple | None = None     # (settle, *args): a served request's counters, left
                                                 # until it is returned used (_settle)
        self._wire = (0, negotiated_wire_format(0))   # (driver features, the wire format they select)
        self._held: dict[int, tuple] = {}        # queue -> (head, written, discards left)
        self._queue_handlers: dict[int, ChainHandler] = {}
        self.register_queue(Q_INFLATE, self._inflate_chain)
        self.register_queue(Q_DEFLATE, self._deflate_chain)
        self.register_queue(Q_STATS, self._stats_chain)

    # --- config space --------------------------------------------------------------------
    def read_config(self) -> bytes:
        return self.config.pack()

    def write_config(self, offset: int, data: bytes) -> None:
        raw = bytearray(self.config.pack())
        # Only `actual` (and poison_val) are driver-writable; num_pages and the hint
        # command id belong to the device and silently keep their values, as in QEMU.
        keep = {CFG_NUM_PAGES: self.config.num_pages, 8: self.config.free_page_hint_cmd_id}
        raw[offset:offset + len(data)] = data
        new = BalloonConfig.unpack(bytes(raw))
        new.num_pages = keep[CFG_NUM_PAGES]
        new.free_page_hint_cmd_id = keep[8]
        if new.actual != self.config.actual:
            log.debug("actual: %d -> %d pages", self.config.actual, new.actual)
        self.config = new
        self.listener.actual_changed(new.actual)

    def set_target_pages(self, num_pages: int) -> None:
        """The new target goes into config space at once; only a driver that is up is
        told (QEMU's virtio_notify_config does nothing before DRIVER_OK): one coming up
        reads num_pages at the end of its probe."""
        self.config.num_pages = num_pages
        if self.status & S_DRIVER_OK:
            self.signal_config()

    def activate(self) -> None:
        # re-activation without a reset: the old queues' requests still owe discards;
        # finish them (unbudgeted, once) so every page counted as ballooned is freed
        for _head, _written, (ctr, offsets, lengths) in self._held.values():
            self._discard(ctr, offsets, lengths)
        self._held.clear()
        super().activate()
        # The pages the queues live in are never discarded, whatever the guest names.
        for v in self.vrings.values():
            self.ballooned_np[v.pages()] = QUEUE_MEMORY

    @property
    def ballooned_pages(self) -> int:
        return int(np.count_nonzero(self.ballooned_np == IN_BALLOON))

    def on_reset(self) -> None:
        # Pages stay discarded; the balloon is empty again from the guest's view
        # (a reset guest driver starts over with all its memory).
        self.ballooned_np[:] = 0
        if self.host_pages is not None:
            self.host_pages.reset()
        self.config.actual = 0
        self.stats_head = None
        self._held.clear()                      # a reset driver forgets its requests; so do we

    # --- queue processing -----------------------------------------------------------------
    def process_queue(self, index: int, budget: WorkBudget | None = None) -> None:
        """A kick arrived on `index`: serve available chains until none is left or the
        wake-up's budget (device/vmm/budget.py: descriptors, bytes, discards) is spent.
        Without a budget (direct callers, tests) the work is unbounded."""
        if not self.live:
            self.refuse("queue-before-driver-ok" if not self.status & 4 else "queue-after-reset",
                        f"kick on queue {index} while the device is not live (status {self.status:#x})")
            return
        q = self.queues.get(index)
        if q is None:
            self.refuse("queue-not-set-up", f"kick on queue {index}, which was not set up")
            return
        handler = self._queue_handlers.get(index, _unserved)
        ctr = {Q_INFLATE: self.inflate, Q_DEFLATE: self.deflate}.get(index)
        if budget is None:
            budget = WorkBudget.unlimited()
        cpu0 = budget.woke_cpu_ns           # the loop's clock when it woke for this queue alone
        alone = cpu0 is not None                  # served alone in its wake-up: the loop's clock is ours
        if alone:
            budget.woke_cpu_ns = None
        else:
            cpu0 = cpu_ns()
        self._budget = budget
        # A guest that keeps adding chains, or adds expensive ones, must not keep the VMM
        # in this loop (its monitor would starve): once the budget is spent, kick ourselves
        # and go back to the event loop, which comes back here after serving everything else.
        try:
            if index in self._held and not self._finish_held(index, q):
                self.budget_yields += 1
                self._rekick(index)
                return
            while True:
                if budget.spent:
                    # Re-kick only with work left (a held request, a chain, or one added
                    # while kicks are re-armed): a re-kick after the last chain is a wake-up
                    # with nothing to serve, which may come after the guest saw its request
                    # done, outside the window the lab measures the operation in.
                    if index in self._held or q.has_avail() or q.enable_notifications():
                        self.budget_yields += 1
                        self._rekick(index)
                    break
                walked, discards = q.walked, self._discard_calls()
                try:
                    chain = q.pop_avail()
                finally:
                    budget.charge(q.walked - walked, 0, 0)
                if chain is None:
                    # Re-arm kicks (EVENT_IDX: avail_event), then look once more so a
                    # buffer added meanwhile is not left waiting for a kick that won't come.
                    if q.enable_notifications():
                        continue
                    break
                written = handler(chain)
                if self._carry is None and written is not None:
                    # Done: returned used and the guest called at once, as QEMU's
                    # virtqueue_push + virtio_notify; the counters are settled while it wakes.
                    q.push_used(chain.head, written)
                    if q.need_call():
                        self.signal_call(index)
                self._settle()
                budget.charge(0, min(chain.readable_bytes + chain.writable_bytes, MAX_REQUEST_BYTES),
                              self._discard_calls() - discards)
                if self._carry is not None:   # its discards did not fit the budget: finish them later
                    self._held[index] = (chain.head, written or 0, self._carry)
                    self._carry = None
        except RingError as e:
            self.needs_reset(f"ring-{e.reason}", e.message)      # e.message names the queue
        except Exception as e:  # a bug in the lab's own code: never let guest input kill the VMM
            log.exception("internal error serving queue %d", index)
            self.needs_reset("device-internal", f"queue {index}: internal error {type(e).__name__}: {e}")
        finally:
            self._settle()
            self._budget = None
            self._carry = None
            if ctr is not None or alone:
                done = cpu_ns()
                if ctr is not None:
                    ctr.cpu_ns += done - cpu0
                if alone:
                    budget.served_cpu_ns = done

    def _settle(self) -> None:
        """The counters of the request just served (left by its handler), once it is used."""
        if self._unsettled is not None:
            settle, *args = self._unsettled
            self._unsettled = None
            settle(*args)

    def _discard_calls(self) -> int:
        return self.inflate.discard_calls + self.deflate.discard_calls

    def _finish_held(self, index: int, q) -> bool:
        """Go on with the discards of a request that did not fit an earlier wake-up;
        return it used once they are all done. False while some are still left."""
        head, written, (ctr, offsets, lengths) = self._held.pop(index)
        before = self._discard_calls()
        self._discard(ctr, offsets, lengths)
        self._budget.charge(0, 0, self._discard_calls() - before)
        if self._carry is not None:
            self._held[index] = (head, written, self._carry)
            self._carry = None
            return False
        q.push_used(head, written)
        if q.need_call():
            self.signal_call(index)
        return True

    def _rekick(self, index: int) -> None:
        notify(self.kick_fds.get(index), "re-kick of queue %d", index)

    def register_queue(self, index: int, handler: ChainHandler) -> None:
        """Serve queue `index`'s chains with `handler` from now on (each queue has one
        owner: a second registration raises ValueError, as does an index the transport
        does not have). A queue nobody registered returns its chains used, 0 bytes written."""
        if not 0 <= index < self.NUM_QUEUES:
            raise ValueError(f"queue {index} does not exist (queues 0..{self.NUM_QUEUES - 1})")
        if index in self._queue_handlers:
            raise ValueError(f"queue {index} already has a handler ({self._queue_handlers[index]!r})")
        self._queue_handlers[index] = handler

    # --- inflate / deflate --------------------------------------------------------------
    def _inflate_chain(self, chain: DescChain) -> int:
        return self._balloon_chain(chain, self.inflate, inflate=True)

    def _deflate_chain(self, chain: DescChain) -> int:
        return self._balloon_chain(chain, self.deflate, inflate=False)

    def _balloon_chain(self, chain: DescChain, ctr: DeviceOpCounters, *, inflate: bool) -> int:
        ctr.requests += 1
        ctr.descriptors += len(chain.elements)
        if chain.n_readable < len(chain.elements):     # a writable buffer (they come last)
            self.refuse("writable-buffer", "inflate/deflate buffers must be device-readable")
            return 0
        if self._wire[0] != self.driver_features:    # looked up once per negotiation, not per request
            self._wire = (self.driver_features, negotiated_wire_format(self.driver_features))
        try:   # the negotiated wire format's decoder (device/virtio/protocols.py)
            request = self._wire[1].decode(chain, max_pfn=self.layout.max_pfn, copy_limit=MAX_REQUEST_BYTES)
        except Refusal as e:
            ctr.bytes_on_ring += e.ring_bytes
            self.refuse(e.reason, e.message)
            return 0
        ctr.bytes_on_ring += request.ring_bytes
        runs = request.runs
        if runs is None:                 # a PFN array: per page, or merged into runs (pfn-ranges)
            if self.merge_runs:
                runs = wire.pfns_to_runs(request.pfns().astype(np.int64))
            else:
                self._pfns_per_page(request, ctr, inflate)
                return 0
        self._runs(runs[0], runs[1], ctr, inflate)
        return 0

    def _pfns_per_page(self, request: DecodedRequest, ctr: DeviceOpCounters, inflate: bool) -> None:
        """The PFN protocol as QEMU serves it: every page translated on its own (never
        merged into runs), then one discard per page. The translation and the checks
        are a few numpy calls over the request (a Python loop of 256 bisects cost
        ~50 us per request here: the lab's cost, not the protocol's); the discard stays
        one system call per page, in request order. The counters are settled after the
        request is returned used (_settle): the guest is waking meanwhile."""
        want, expect = (IN_BALLOON, IN_GUEST) if inflate else (IN_GUEST, IN_BALLOON)
        with stage_chain() as c:             # translate then discard: one marker between them
            c.next("translate", ctr)
            pfns = request.pfns().astype(np.int64)
            n = pfns.size
            # One sort finds the request's span (when one RAM region holds it, one or two
            # numpy calls translate every page) and the pages named twice: few numpy calls,
            # since this runs cache-cold after the last request's discards.
            in_order, offs = self.layout.translate_pfn_span(pfns)
            if offs is None:
                offs, ok = self.layout.translate_pfns(pfns)
                all_ok = bool(ok.all())
                state = self.ballooned_np[pfns if all_ok else np.where(ok, pfns, 0)]
            else:
                ok, all_ok = None, True
                state = self.ballooned_np[pfns]
            # (IN_GUEST is 0: a page in the guest is a zero in `state`)
            if (all_ok and not np.count_nonzero(state if expect == IN_GUEST else state != expect)
                    and not np.count_nonzero(in_order[1:] == in_order[:-1])):
                accepted, hvas, bad, first_bad = pfns, offs, None, None      # every page taken
            else:
                accepted, hvas, bad, first_bad = self._pfns_checked(
                    pfns, offs, ok if ok is not None else np.ones(n, dtype=bool), state, inflate)
            self.ballooned_np[accepted] = want
            if self.host_pages is None and inflate and hvas.size:
                self._discard(ctr, hvas.tolist(), PAGE_SIZE, c)
        if self.host_pages is not None:      # its discards belong to the request: before it is used
            self._host_page_update(ctr, hvas.astype(np.int64) >> PAGE_SHIFT, inflate)
        self._unsettled = (self._pfns_settle, ctr, n, accepted, bad, first_bad)

    def _pfns_settle(self, ctr: DeviceOpCounters, n: int, accepted: np.ndarray, bad: Counter | None,
                     first_bad: int | None) -> None:
        ctr.translations += n
        ctr.pages += int(accepted.size)
        if accepted.size:
            ctr.add_pfn_batch(accepted)
        if bad:
            self._report_bad(bad, first_bad, ctr)

    @staticmethod
    def _pfns_checked(pfns: np.ndarray, offs: np.ndarray, ok: np.ndarray, state: np.ndarray,
                      inflate: bool) -> tuple[np.ndarray, np.ndarray, Counter, int | None]:
        """A PFN request with refusals: what taking its pages one by one, in order, would
        do. A page not RAM is 'pfn-not-ram'; one in the wrong state is refused for that
        state; a page named twice is taken the first time and refused the second (it is
        then in the balloon, or out of it). Returns (accepted PFNs, their offsets, the
        refusals by reason, the first refused PFN), accepted in request order."""
        want, expect = (IN_BALLOON, IN_GUEST) if inflate else (IN_GUEST, IN_BALLOON)
        take = ok & (state == expect)
        taken = np.flatnonzero(take)
        if taken.size > 1:
            order = np.argsort(pfns[taken], kind="stable")          # the first of equal PFNs leads
            later = pfns[taken[order[1:]]] == pfns[taken[order[:-1]]]
            again = taken[order[1:]][later]
            take[again] = False
            state = state.copy()
            state[again] = want                                    # as the page-by-page order sees it
        refused = ~take
        bad: Counter[str] = Counter()
        if not ok.all():
            bad["pfn-not-ram"] += int(np.count_nonzero(~ok))
        seen = state[refused & ok]
        for st in np.unique(seen).tolist():
            bad[_refusal(st, inflate)] += int(np.count_nonzero(seen == st))
        first_bad = int(pfns[np.argmax(refused)]) if refused.any() else None
        return pfns[take], offs[take], bad, first_bad

    def _runs(self, starts: np.ndarray, lengths: np.ndarray, ctr: DeviceOpCounters, inflate: bool) -> None:
        """Range protocols: validate all pages (numpy), translate per run, one discard per run."""
        starts = np.asarray(starts, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        if starts.size == 0:
            return
        with stage_chain() as c:             # translate then discard: one marker between them
            c.next("translate", ctr)
            pfns = wire.runs_to_pfns(starts, lengths)
            ok = self.layout.ram_pfn_mask(pfns)
            bad: Counter[str] = Counter()
            first_bad = None
            if not ok.all():
                bad["pfn-not-ram"] += int((~ok).sum())
                first_bad = int(pfns[~ok][0])
            inram = pfns[ok]
            state = self.ballooned_np[inram]
            want = IN_BALLOON if inflate else IN_GUEST
            dup = state != (IN_GUEST if inflate else IN_BALLOON)
            if dup.any():
                for st in np.unique(state[dup]).tolist():
                    bad[_refusal(st, inflate)] += int((state[dup] == st).sum())
                first_bad = first_bad if first_bad is not None else int(inram[dup][0])
            good = wire.sorted_unique(inram[~dup])
            self.ballooned_np[good] = want
            gstarts, glens = wire.pfns_to_runs(good) if good.size else (good, good)
            # Translation per run, split where a run crosses a region edge.
            # Translation per run (numpy over all runs at once), split where a run crosses
            # a region edge.
            offs, lens = self.layout.runs_to_offsets(gstarts, glens)
            if self.host_pages is None and inflate and offs.size:
                self._discard(ctr, offs.tolist(), lens.tolist(), c)
        ctr.translations += int(offs.size)
        if self.host_pages is not None:
            self._host_page_update(ctr, self.layout.pfn_to_offset(good) >> PAGE_SHIFT, inflate)
        ctr.pages += int(good.size)
        ctr.add_runs(glens)
        if not inflate:
            ctr.add_accepted(good)
        self._report_bad(bad, first_bad, ctr)

    def _host_page_update(self, ctr: DeviceOpCounters, mpages: np.ndarray, inflate: bool) -> None:
        """Huge backings: record the sub-pages (memfd page indices, request order) and
        discard the host pages they complete, one call per run of adjacent host pages.
        The bookkeeping is timed as translation; only the system calls are discard."""
        t0 = _now()
        if inflate:
            done = self.host_pages.inflate(mpages)
        else:
            self.host_pages.deflate(mpages)
            done = mpages[:0]
        ctr.translate_ns += _now() - t0
        if done.size:
            offs, lens = host_page_runs(done, self.ram.host_page_shift)
            self._discard(ctr, offs.tolist(), lens.tolist())

    def _discard(self, ctr: DeviceOpCounters, offsets: list[int], lengths: list[int] | int,
                 stages: stage_chain | None = None) -> None:
        """The discard stage: one system call per piece of memfd, per page on the PFN
        path (`lengths` is then the page size), per run on the range paths. Under a
        wake-up budget, what does not fit is left in self._carry for a later wake-up
        (the request is returned used only when all of it is done). `stages`: the
        caller's chain, whose open stage (translate) ends where discard begins."""
        allowed = self._budget.discards if self._budget is not None else len(offsets)
        if allowed < len(offsets):
            allowed = max(allowed, 0)
            rest = lengths if isinstance(lengths, int) else lengths[allowed:]
            self._carry = (ctr, offsets[allowed:], rest)
            offsets = offsets[:allowed]
            lengths = lengths if isinstance(lengths, int) else lengths[:allowed]
            if not offsets:
                return
        cpu0 = cpu_ns()
        with stages if stages is not None else stage_chain() as c:
            c.next("discard", ctr)
            discard_runs(self.ram, self.discard_method, offsets, lengths)
            ctr.discard_cpu_ns += cpu_ns() - cpu0     # each stage holds one of the two clock reads
        ctr.discard_calls += len(offsets)

    def _report_bad(self, bad: Counter, first_bad: int | None, ctr: DeviceOpCounters) -> None:
        for reason, n in bad.items():
            ctr.refused_pages += n
            self.errors[reason] += n
        if bad:
            # rate-limited like refuse(): a guest must not be able to flood the VMM's log
            self._bad_reports = getattr(self, "_bad_reports", 0) + 1
            if self._bad_reports > 20 and self._bad_reports % 10000:
                return
            log.warning("refused %d page(s) of one request (%s); first bad PFN %#x; nothing discarded for them",
                        sum(bad.values()), dict(bad), first_bad)

    # --- stats queue: the device polls by returning the buffer -----------------------------
    def _stats_chain(self, chain: DescChain) -> int | None:
        limit = STAT_ENTRY.size * 64
        raw = chain.gather(limit, truncate=True)     # an oversized buffer is bad input, not a broken ring
        if chain.readable_bytes > limit or len(raw) % STAT_ENTRY.size:
            self.refuse("stats-len", f"stats buffer of {chain.readable_bytes} bytes is not a multiple of "
                                     f"{STAT_ENTRY.size} up to {limit}")
        if self.stats_head is not None and self.stats_head != chain.head:
            # a second buffer while one is held: return the old one, as QEMU does, so it does not leak
            self.refuse("stats-twice", f"stats buffer {chain.head} while buffer {self.stats_head} is held")
            q = self.queues[Q_STATS]
            q.push_used(self.stats_head, 0)
            if q.need_call():
                self.signal_call(Q_STATS)
        stats: dict[str, int] = {}
        for i in range(len(raw) // STAT_ENTRY.size):
            tag, val = STAT_ENTRY.unpack_from(raw, i * STAT_ENTRY.size)
            if tag < len(STAT_TAGS):
                stats[STAT_TAGS[tag]] = val
            else:
                self.refuse("stats-tag", f"unknown stats tag {tag}")
        self.stats = stats
        self.stats_updated = time.time()
        self.stats_head = chain.head
        for cb in self.stats_waiters:
            cb()
        self.stats_waiters.clear()
        return None   # hold the buffer until the next poll

    def request_stats(self) -> bool:
        """Return the held stats buffer so the guest refills it. False if none held."""
        q = self.queues.get(Q_STATS)
        if q is None or self.stats_head is None or not self.live:
            return False
        head, self.stats_head = self.stats_head, None
        q.push_used(head, 0)
        if q.need_call():
            self.signal_call(Q_STATS)
        return True

    # --- reporting -------------------------------------------------------------------------
    def counters(self) -> dict:
        return {
            "inflate": self.inflate.snapshot(),
            "deflate": self.deflate.snapshot(),
            "errors": dict(self.errors),
            "ballooned_pages": self.ballooned_pages,
            "num_pages": self.config.num_pages,
            "actual": self.config.actual,
            "status": self.status,
            "memfd_allocated_bytes": self.ram.allocated_bytes(),
            "backing": self.ram.backing,
            "host_pages": self.host_pages.snapshot() if self.host_pages is not None else None,
            "queues": {str(i): {"chains": q.chains, "calls": q.calls, "calls_suppressed": q.calls_suppressed,
                                "descriptors_walked": q.walked}
                       for i, q in self.queues.items()},
            "budget_yields": self.budget_yields,
        }

    def reset_counters(self) -> None:
        self.inflate = DeviceOpCounters()
        self.deflate = DeviceOpCounters()
        self.errors.clear()

    def verify_discarded(self) -> dict:
        """Ask the kernel (SEEK_DATA/SEEK_HOLE on the memfd) whether any ballooned page
        still holds data: the check is independent of the device's bookkeeping."""
        pfns = np.flatnonzero(self.ballooned_np == IN_BALLOON)
        if self.host_pages is not None:
            return {**self._verify_host_pages(), "ballooned_pages": int(pfns.size),
                    "ballooned_digest": _digest(pfns)}
        data = self.ram.data_page_mask()                      # per memfd page
        offs = self.layout.pfn_to_offset(pfns) >> PAGE_SHIFT if pfns.size else pfns
        still = pfns[data[offs]] if pfns.size else pfns
        return {"ballooned_pages": int(pfns.size), "ballooned_with_data": int(still.size),
                "first": [int(x) for x in still[:8]],
                "ballooned_digest": _digest(pfns)}

    def _verify_host_pages(self) -> dict:
        """Huge backings, from the kernel's view of the memfd: every host page the device
        discarded and that is still wholly ballooned holds no data (full tracking: that
        is every wholly ballooned host page). Partially ballooned host pages keep their
        data until whole; `whole_with_data` counts wholly ballooned host pages that
        were never freed (what QEMU's tracking leaves behind)."""
        hp = self.host_pages
        whole = hp.whole()
        has = self.ram.host_pages_with_data(whole)
        must_be_empty = hp.discarded[whole] | (hp.mode == "full")
        bad = whole[has & must_be_empty]
        sub = hp.per
        return {"ballooned_with_data": int(bad.size) * sub,
                "first": [int(x) for x in self.layout.offset_to_pfn(bad[:8] << self.ram.host_page_shift)],
                "host_page_bytes": sub << PAGE_SHIFT, "whole_host_pages": int(whole.size),
                "whole_with_data": int(has.sum()), "partial_host_pages": hp.snapshot()["partial_host_pages"]}


def _digest(pfns: np.ndarray) -> str:
    import hashlib
    return hashlib.blake2b(np.ascontiguousarray(pfns, dtype=np.int64).tobytes(), digest_size=16).hexdigest()
