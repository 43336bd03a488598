"""Targets "device" and "ring": hostile ring contents against the real device code.

device: each exec builds a fresh BalloonDevice (through device/rig.py's DeviceRig)
over the worker's memfd for the case's layout, writes the case's rings, request
buffers and indirect tables with the raw guest's RawRing, applies the start-up
sequence the case asks for (features, queues, DRIVER_OK or not, NEEDS_RESET), and
runs its steps: guest kicks (process_queue, as the VMM's loop does on a kick) and
the VMM's own steps (stats poll, free-page hint commands). The oracle
(fuzz/oracle.py) then compares what the memfd lost with what the guest named.

ring: the ring walker (DeviceQueue) alone, every chain it hands out checked against
this package's own translation.

Between execs every page goes back to its state before (fill pattern or hole), so
each exec starts from the same memory and the oracle's "before" is known without a
copy of guest RAM.
"""
from __future__ import annotations

import os
import struct

import numpy as np

from device.guest.raw_guest import RawRing, RingAddrs
from device.vmm.balloon_device import BalloonDevice
from device.vmm.hint_queues import HintQueues
from device.rig import DeviceRig
from device.virtio.features import QUEUE_FEATURE, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, S_NEEDS_RESET, bit
from device.virtio.hint_format import hint_device_features
from device.virtio.protocols import protocol_device_features
from device.vmm.budget import WorkBudget
from device.virtio.layout import PAGE_SHIFT, PAGE_SIZE
from device.virtio.ram import GuestRAM, memfd_data_extents
from device.virtio.device_queue import DeviceQueue, RingError
from fuzz.cases import (BUF_AREA, DATA_BYTE, DATA_PAGE, HINT_DONE, HINT_REQUEST, HINT_START, HINT_STOP, STATS_POLL,
                        Outcome, fuzz_layout, kick_steps, ring_gpa)
from fuzz.oracle import MemoryBeforeExec, check_chain, check_device_exec, exec_bound, subtract_ranges
from fuzz.reference_decoders import ram_offset
from fuzz.regions import RegionTable, wire_format_of
from fuzz.time_limit import guarded
from fuzz.wakeups import FuzzLoop, NeverIdle, Wakeups


class DeviceTarget:
    """One worker's guest RAMs for these targets (one sealed memfd per layout, filled
    once) and their execs."""

    def __init__(self) -> None:
        self.rams: dict[str, GuestRAM] = {}
        self.expected: dict[str, tuple] = {}
        self.fill_mask: dict[str, np.ndarray] = {}
        self.volatile = 0        # execs whose oracle had to allow every page (see oracle.Bound)

    def ram(self, name: str) -> GuestRAM:
        if name not in self.rams:
            fl = fuzz_layout(name)
            ram = GuestRAM.create(fl.layout, name=f"balloon-lab-fuzz-{name}")
            mask = np.zeros(ram.size >> PAGE_SHIFT, dtype=bool)
            for g, n in fl.fill:
                off = fl.regions.gpa_to_offset(g, n)
                ram.mem[off:off + n] = bytes([DATA_BYTE]) * n
                mask[off >> PAGE_SHIFT:(off + n) >> PAGE_SHIFT] = True
            self.rams[name] = ram
            self.fill_mask[name] = mask
            self.expected[name] = tuple(memfd_data_extents(ram.fd, ram.size))
        return self.rams[name]

    def close(self) -> None:
        for r in self.rams.values():
            r.close()
        self.rams.clear()

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
        lost = subtract_ranges(want, ext)
        gained = subtract_ranges(ext, want)
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

    def _write_case(self, case: dict, ram: GuestRAM, lay: RegionTable) -> list[tuple[int, int]]:
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
            off = lay.gpa_to_offset(g, len(data))
            ram.mem[off:off + len(data)] = data
            dirty.append((off, len(data)))
        return dirty

    def _restore_written(self, case: dict, ram: GuestRAM, lay: RegionTable, dirty) -> None:
        pat = DATA_BYTE
        for off, ln in dirty:
            ram.mem[off:off + ln] = bytes([pat]) * ln
        for q in case["queues"]:
            a = RingAddrs.at(ring_gpa(int(q)), case["qsize"])
            off = lay.gpa_to_offset(a.desc, a.end - a.desc)
            ram.mem[off:off + a.end - a.desc] = bytes([pat]) * (a.end - a.desc)

    # --- the device target ----------------------------------------------------------------
    def run_device(self, case: dict, limit_s: float) -> Outcome:
        fl = fuzz_layout(case["layout"])
        lay = fl.regions          # the oracle's own table (fuzz/regions.py); the device has fl.layout
        name = case["layout"]
        ram = self.ram(name)
        fill = self.fill_mask[name]
        dirty = self._write_case(case, ram, lay)
        # Guest memory before the exec, for the oracle: the low area (rings, request buffers,
        # tables) copied, every other page is the fill pattern. The bound is computed from it
        # afterwards, and only when the exec discarded, ballooned or hinted something.
        pre_mem = MemoryBeforeExec(bytes(ram.mem[:BUF_AREA[1]]), fill)
        proto = case["proto"]
        offered = protocol_device_features(proto) | hint_device_features(case.get("hint", "none"))
        feats = offered
        if not case["indirect"]:
            feats &= ~bit(F_RING_INDIRECT_DESC)
        if not case["event_idx"]:
            feats &= ~bit(F_RING_EVENT_IDX)
        rig = DeviceRig(ram, protocol=proto, features=offered)
        dev = rig.device
        hints = None
        if 3 in case["queues"] or 5 in case["queues"]:      # (queues 3 and 5 only exist then)
            hints = HintQueues(dev)
            hints.register_queues(dev.register_queue)     # as the VMM's migration controller does
        rig.negotiate(feats)
        n = case["qsize"]
        for q in case["queues"]:
            need = QUEUE_FEATURE.get(int(q))
            if need is None or feats & bit(need):     # as SET_VRING allows
                rig.set_vring(int(q), ring_gpa(int(q)), n, zero=False)   # the case wrote the ring
                rig.connect(int(q))                                       # its kick and call eventfds
        wake = Wakeups()
        loop = FuzzLoop(dev, wake)                    # the VMM's own loop code, real budget per wake-up
        pre = np.array([p for p in case["pre"] if 0 <= p < lay.max_pfn], dtype=np.int64)
        pre = np.unique(pre[fl.ram_mask[pre]]) if pre.size else pre

        def exec_() -> np.ndarray:     # anything escaping the device is a crash
            if case["status"] != "no-driver-ok":
                rig.driver_ok()
                for q, qd in case["queues"].items():
                    if int(q) in dev.queues:
                        dev.queues[int(q)].restore(qd["last"], qd["last"])
            if case["status"] == "needs-reset":
                dev.status |= S_NEEDS_RESET
            kept = pre[dev.ballooned_np[pre] == 0]        # queue memory keeps its own state
            dev.ballooned_np[kept] = 1
            for step, (k, idx) in enumerate(kick_steps(case)):
                if k >= 0:
                    if idx is not None and k in case["queues"]:
                        a = RingAddrs.at(ring_gpa(k), n)
                        struct.pack_into("<H", ram.mem, lay.gpa_to_offset(a.avail + 2, 2), idx & 0xFFFF)
                    fd = rig.driver_kick_fds.get(k)
                    if fd is not None:
                        loop.kick(k, fd, f"step {step}: kick on queue {k}")
                    else:             # no eventfd: a queue never set up; the device refuses the kick
                        with wake.timed(f"step {step}: kick on queue {k}, not set up"):
                            dev.process_queue(k, WorkBudget())
                else:
                    with wake.timed(f"step {step}: the VMM's step {k}"):
                        vmm_step(dev, hints, k)
                    loop.until_idle(f"step {step}: after the VMM's step {k}")
            return kept

        ballooned_before, failure, detail = guarded(exec_, limit_s, hangs=(NeverIdle,))
        if ballooned_before is not None:
            pre = ballooned_before
        if failure is None and dev.errors.get("device-internal"):
            failure, detail = "crash", "device-internal error counted (an exception inside the device)"
        if failure is None and wake.failure() is not None:
            failure, detail = wake.failure()
        lost_pages = self.lost_and_restore(name)
        lost = lay.offset_to_pfn(lost_pages << PAGE_SHIFT) if lost_pages.size else lost_pages
        hinted = hints is not None and bool(hints.hinted.any())
        bound = None
        if lost.size or hinted or dev.inflate.requests or dev.deflate.requests:
            bound = exec_bound(case, pre_mem, lay, wire_format_of(feats))
            self.volatile += bound.volatile
            if failure is None:
                failure, detail = check_device_exec(case, dev, hints, pre_mem, lay, bound, lost, pre, fill)
        self._restore_written(case, ram, lay, dirty)
        if bound is not None:
            for pg in bound.touched:      # the device may have left zeros there (read after discard)
                if pg < fill.size and fill[pg]:
                    ram.mem[pg << PAGE_SHIFT:(pg + 1) << PAGE_SHIFT] = DATA_PAGE
        if hints is not None and hints.stats["bitmap_requests"] and hints.request_gpa is not None:
            o = ram_offset(lay, hints.request_gpa & ~(PAGE_SIZE - 1), PAGE_SIZE)   # the device wrote a request there
            if o is not None and fill[o >> PAGE_SHIFT]:
                ram.mem[o:o + PAGE_SIZE] = DATA_PAGE
        sig = ("device", name == "pc", proto, case.get("hint", "none"), hinted, tuple(sorted(dev.errors)),
               bool(dev.status & S_NEEDS_RESET), bool(lost.size), min(3, int(lost.size).bit_length() // 3),
               bool(dev.deflate.pages), dev.stats_head is not None)
        loop.close()
        rig.close()
        return Outcome(sig, failure, detail)

    # --- the ring target ---------------------------------------------------------------------
    def run_ring(self, case: dict, limit_s: float) -> Outcome:
        fl = fuzz_layout(case["layout"])
        lay = fl.regions
        ram = self.ram(case["layout"])
        dirty = self._write_case(case, ram, lay)
        n = case["qsize"]
        reasons: set = set()
        wake = Wakeups()

        def exec_() -> tuple[str | None, str, int]:
            chains = 0
            for q, qd in case["queues"].items():
                a = RingAddrs.at(ring_gpa(int(q)), n)
                dq = DeviceQueue(ram, int(q), n, a.desc, a.avail, a.used, event_idx=case["event_idx"],
                                 indirect=case["indirect"], max_chain=case.get("max_chain"))
                dq.restore(qd["last"], qd["last"])
                for k in range(n + 2):
                    try:
                        with wake.timed(f"walking chain {k} of queue {q}"):   # one chain: within one wake-up
                            c = dq.pop_avail()
                    except RingError as e:
                        reasons.add(e.reason)
                        continue
                    if c is None:
                        break
                    chains += 1
                    msg = check_chain(c, lay, dq.max_chain)
                    if msg:
                        return "crash", msg, chains
                    dq.push_used(c.head, 0)
            return None, "", chains

        walked, failure, detail = guarded(exec_, limit_s)
        chains = 0
        if walked is not None:
            failure, detail, chains = walked
        if failure is None and wake.failure() is not None:
            failure, detail = wake.failure()
        self._restore_written(case, ram, lay, dirty)
        return Outcome(("ring", tuple(sorted(reasons)), min(chains, 3)), failure, detail)


def vmm_step(dev: BalloonDevice, hints: HintQueues | None, k: int) -> None:
    """What the VMM does between guest kicks, only when its own preconditions hold (the
    real VMM checks them before calling; see device/vmm/migration/controller.py)."""
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


