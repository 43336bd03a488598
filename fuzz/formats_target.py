"""Fuzz target "report": the free page reporting queue (4) of a real device over a real memfd.

A case is one chain on queue 4 (each descriptor: gpa, length, device-writable or not)
against a device whose balloon holds some pages (`pre`), over a 4 KiB or a THP
backing. The generator names free 2 MiB blocks the way Linux does and then breaks
them: readable descriptors, unaligned or empty ones, ranges past RAM, overlaps,
the ring's own page, ballooned pages, sub-host-page blocks on THP.

Oracle, from the memfd (SEEK_DATA, the kernel's view) before and after:
  * no exception escapes, `device-internal` stays 0;
  * pages that lost data lie inside the ranges the chain names (any descriptor,
    an upper bound) and never on the ring's page;
  * a chain that names a ballooned or ring page loses nothing (refused whole);
  * on THP, lost memory comes in whole, aligned 2 MiB host pages.
Every page outside the ring holds data before each exec (refilled as needed).
"""
from __future__ import annotations

import random
import numpy as np

from device.guest.raw_guest import F_NEXT, F_WRITE
from device.vmm.balloon_device import IN_BALLOON, QUEUE_MEMORY
from device.vmm.page_reporting_device import ReportingDevice
from device.rig import DeviceRig
from device.virtio.features import F_REPORTING, Q_REPORTING, bit
from device.virtio.protocols import protocol_device_features
from device.virtio.ram import GuestRAM
from device.virtio.layout import PAGE_SHIFT, GuestLayout
from fuzz.cases import U64_MAX, Outcome
from fuzz.time_limit import guarded
from fuzz.wakeups import FuzzLoop, NeverIdle, Wakeups

RAM_MIB = 32
RAM_PAGES = (RAM_MIB << 20) >> 12
RING = 0x1000
QSIZE = 16
HUGE = 512                     # 4 KiB pages per 2 MiB host page
BACKINGS = ("4k", "thp")


def gen_report(rng: random.Random) -> dict:
    pages = (RAM_MIB << 20) >> PAGE_SHIFT
    backing = rng.choice(BACKINGS)
    chain = []
    for _ in range(rng.choice([1, 1, 2, 4, 8, 32])):
        blk = rng.randrange(pages // HUGE)
        chain.append([blk * HUGE << PAGE_SHIFT, HUGE << PAGE_SHIFT, True])
    pre = [rng.randrange(pages) for _ in range(rng.choice([0, 0, 1, 4]))]
    return mutate_report({"t": "report", "backing": backing, "pre": pre, "chain": chain}, rng, [], times=rng.choice([0, 1, 2]))


def mutate_report(case: dict, rng: random.Random, pool: list[dict], times: int | None = None) -> dict:
    c = {"t": "report", "backing": case["backing"], "pre": list(case["pre"]), "chain": [list(x) for x in case["chain"]]}
    size = RAM_MIB << 20
    for _ in range(rng.choice([1, 1, 2, 3]) if times is None else times):
        r = rng.random()
        ch = c["chain"]
        k = rng.randrange(len(ch)) if ch else 0
        if r < 0.15 and ch:
            ch[k][2] = not ch[k][2]                                    # readable descriptor
        elif r < 0.3 and ch:
            ch[k][0] = rng.choice([0, RING, size - 4096, size, size + (2 << 20), 1 << 40, (1 << 64) - 4096,
                                   ch[k][0] + rng.choice([1, 8, 4096, 1 << 20])])
        elif r < 0.45 and ch:
            ch[k][1] = rng.choice([0, 1, 4096, 4095, 1 << 20, 2 << 20, 4 << 20, (1 << 32) - 1, 3 << 20])
        elif r < 0.55 and ch:
            ch.append(list(rng.choice(ch)))                            # overlap
        elif r < 0.65:
            c["pre"].append(rng.randrange(size >> PAGE_SHIFT))         # a ballooned page inside a block
        elif r < 0.75:
            c["backing"] = rng.choice(BACKINGS)
        elif r < 0.85 and len(ch) < QSIZE:
            ch.append([rng.randrange(size >> PAGE_SHIFT) << PAGE_SHIFT, rng.choice([4096, 8192, 2 << 20]), True])
        elif ch and len(ch) > 1:
            del ch[k]
    c["chain"] = c["chain"][:QSIZE] or [[0, 4096, True]]
    return c


class ReportTarget:
    """One worker's 32 MiB memfd per backing; each exec a fresh device over it."""

    def __init__(self) -> None:
        self.rams: dict[str, GuestRAM] = {}

    def ram(self, backing: str) -> GuestRAM:
        if backing not in self.rams:
            self.rams[backing] = GuestRAM.create(GuestLayout.pc(RAM_MIB), name=f"balloon-lab-fuzz-report-{backing}",
                                                 backing=backing)
        return self.rams[backing]

    def close(self) -> None:
        for ram in self.rams.values():
            ram.close()
        self.rams.clear()

    def _refill(self, ram: GuestRAM) -> np.ndarray:
        data = ram.data_page_mask()
        holes = np.flatnonzero(~data)
        holes = holes[holes != RING >> PAGE_SHIFT]
        if holes.size:
            brk = np.flatnonzero(np.diff(holes) != 1) + 1
            for run in np.split(holes, brk):
                ram.mem[int(run[0]) << PAGE_SHIFT:(int(run[-1]) + 1) << PAGE_SHIFT] = b"\xa5" * (run.size << PAGE_SHIFT)
            data = ram.data_page_mask()
        return data

    def run(self, case: dict) -> tuple[tuple, str | None, str]:
        """(signature, failure or None, detail)."""
        ram = self.ram(case["backing"])
        before = self._refill(ram)
        feats = protocol_device_features("pfn") | bit(F_REPORTING)
        rig = DeviceRig(ram, features=feats)
        dev = rig.device
        rig.negotiate(feats & ~bit(29))                         # no EVENT_IDX: simplest ring
        ram.mem[RING:RING + 4096] = bytes(4096)
        ring = rig.set_vring(Q_REPORTING, RING, QSIZE, zero=False)
        chain = case["chain"]
        for i, (a, ln, w) in enumerate(chain):
            fl = (F_WRITE if w else 0) | (F_NEXT if i + 1 < len(chain) else 0)
            ring.desc(i, a, ln, fl, i + 1)
        ring.offer([0])                                         # avail ring[0] = head 0, idx = 1
        rig.connect(Q_REPORTING)                                # its kick and call eventfds
        rig.driver_ok()
        rd = ReportingDevice(dev)
        rd.register_queues(dev.register_queue)
        pre = np.asarray([p for p in case["pre"] if 0 <= p < RAM_PAGES], dtype=np.int64)
        dev.ballooned_np[pre] = np.where(dev.ballooned_np[pre] == QUEUE_MEMORY, QUEUE_MEMORY, IN_BALLOON)
        wake = Wakeups()
        loop = FuzzLoop(dev, wake)                              # the VMM's own loop, real budget per wake-up
        try:
            loop.kick(Q_REPORTING, rig.driver_kick_fds[Q_REPORTING], "the report chain's kick")
        except NeverIdle as e:
            return ("report", "never-idle"), "hang", str(e)
        except Exception as e:
            return ("report", "exception"), "crash", f"{type(e).__name__}: {e}"
        finally:
            loop.close()
            rig.close()        # the driver's eventfds, and the device reset (its counters stay)
        if wake.failure() is not None:
            return ("report", "slow"), *wake.failure()
        after = ram.data_page_mask()
        lost = np.flatnonzero(before & ~after)
        errors = tuple(sorted(dev.errors))
        sig = ("report", case["backing"], errors, bool(lost.size))
        if dev.errors.get("device-internal"):
            return sig, "crash", "device-internal error"
        max_page = before.size
        named = np.zeros(max_page, dtype=bool)
        for a, ln, _w in chain:
            a, ln = a & U64_MAX, ln & 0xFFFFFFFF    # what the ring holds: le64 addr, le32 len (the writer masks)
            s = a >> PAGE_SHIFT
            if s < max_page:
                named[s:min(max_page, (a + ln + 4095) >> PAGE_SHIFT)] = True
        if lost.size:
            if not named[lost].all():
                return sig, "oob-discard", f"lost unnamed pages {lost[~named[lost]][:8].tolist()}"
            if (lost == RING >> PAGE_SHIFT).any():
                return sig, "oob-discard", "discarded the ring's page"
            bad = pre[(pre < max_page)]
            if bad.size and named[bad].any():
                return sig, "oob-discard", "discarded a chain that names ballooned pages"
            if case["backing"] == "thp":
                hp = np.unique(lost // HUGE)
                if lost.size != hp.size * HUGE:
                    return sig, "oob-discard", f"lost {lost.size} pages, not whole 2 MiB host pages"
        return sig, None, ""


def run_report(target: ReportTarget, case: dict, limit_s: float) -> Outcome:
    """One exec of the report target under the per-exec time limit."""
    ran, failure, detail = guarded(lambda: target.run(case), limit_s)
    if ran is None:
        return Outcome(("report", failure if failure == "hang" else "exception"), failure, detail)
    return Outcome(*ran)
