"""Device side of free page reporting (VIRTIO_BALLOON_F_REPORTING, feature 5, queue 4).

As QEMU serves it (virtio_balloon_handle_report): the guest's driver puts one chain
of device-WRITABLE descriptors on queue 4, each naming one free block (gpa, bytes;
Linux reports blocks of pageblock order and above, 2 MiB+ on x86, up to 32 per
chain). The device discards each block and returns the chain with 0 bytes written.
The pages stay the guest's: it may allocate a reported page at any time without
telling the device, and the host then faults in a fresh zero page. There is no
deflate and no device-side state: nothing here remembers a reported page.

The guest is untrusted. A descriptor that is device-readable, unaligned, empty,
outside RAM, overlapping another, naming the rings' pages or ballooned pages is
refused (counted by reason) and nothing of it is discarded. On a huge backing
only the whole host pages inside a block are discarded (a block smaller than a host
page frees nothing, and splitting a THP would cost the guest its huge page).
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from device.virtio import wire
from device.vmm.balloon_device import IN_GUEST, BalloonDevice, ChainHandler
from device.vmm.balloon_metrics import DeviceOpCounters
from device.virtio.features import F_REPORTING, Q_REPORTING, bit
from device.vmm.huge_pages import host_page_runs
from device.virtio.layout import PAGE_SHIFT
from device.virtio.device_queue import DescChain

log = logging.getLogger("balloon-lab.reporting")

# A chain longer than this is refused outright (Linux sends at most 32 entries; the
# ring size bounds it anyway, this keeps one request's work small).
MAX_REPORT_ENTRIES = 256


def reporting_device_features(offer: bool) -> int:
    return bit(F_REPORTING) if offer else 0


class ReportingDevice:
    """Queue 4 of one BalloonDevice (register_queues puts it there)."""

    def __init__(self, device: BalloonDevice) -> None:
        self.dev = device
        self.ctr = DeviceOpCounters()
        self.blocks = 0
        self.reported_bytes = 0
        self.host_pages_discarded = 0

    def register_queues(self, register: Callable[[int, ChainHandler], None]) -> None:
        """Serve queue 4 (reporting) through `register` (BalloonDevice.register_queue)."""
        register(Q_REPORTING, self._report_chain)

    def _report_chain(self, chain: DescChain) -> int:
        dev, ctr = self.dev, self.ctr
        ctr.requests += 1
        ctr.descriptors += len(chain.elements)
        if chain.n_readable:
            dev.refuse("report-readable-buffer", "free page reports must be device-writable buffers")
            return 0
        if len(chain.elements) > MAX_REPORT_ENTRIES:
            dev.refuse("report-too-long", f"{len(chain.elements)} blocks in one report (max {MAX_REPORT_ENTRIES})")
            return 0
        try:
            starts, lengths = wire.chunks_to_runs(np.column_stack((chain.gpas(), chain.lens())),
                                                  max_pfn=dev.layout.max_pfn)
            wire.check_runs_in_ram(starts, lengths, dev.layout)
        except wire.WireError as e:
            dev.refuse(f"report-{e.reason}", str(e))
            return 0
        pfns = wire.runs_to_pfns(starts, lengths)
        state = dev.ballooned_np[pfns]
        if (state != IN_GUEST).any():
            bad = int(pfns[np.argmax(state != IN_GUEST)])
            dev.refuse("report-not-free", f"report names PFN {bad:#x}, which is ring memory or in the balloon")
            return 0
        self.blocks += len(chain.elements)
        self.reported_bytes += int(lengths.sum()) << PAGE_SHIFT
        ctr.pages += int(pfns.size)
        offs, lens = dev.layout.runs_to_offsets(starts, lengths)
        shift = dev.ram.host_page_shift
        if shift > PAGE_SHIFT:             # whole host pages only
            first = (offs + (1 << shift) - 1) >> shift
            end = (offs + lens) >> shift
            keep = end > first
            hp = wire.runs_to_pfns(first[keep], (end - first)[keep])
            self.host_pages_discarded += int(hp.size)
            offs, lens = host_page_runs(hp, shift)
        ctr.translations += int(offs.size)
        if offs.size:
            dev._discard(ctr, offs.tolist(), lens.tolist())
        return 0

    def counters(self) -> dict:
        return {"requests": self.ctr.requests, "blocks": self.blocks, "reported_bytes": self.reported_bytes,
                "discard_calls": self.ctr.discard_calls, "discard_ns": self.ctr.discard_ns,
                "host_pages_discarded": self.host_pages_discarded}

    def check_runs_hold_no_data(self, args: dict) -> dict:
        """Verification: PFN runs the guest says it reported and still holds free; how
        many of their pages (whole host pages on a huge backing) still hold data, by the
        kernel's view of the memfd (SEEK_DATA; pread for hugetlb)."""
        try:
            starts = np.asarray(args.get("starts", []), dtype=np.int64)
            lengths = np.asarray(args.get("lengths", []), dtype=np.int64)
            wire.check_runs_in_ram(starts, lengths, self.dev.layout)
        except (TypeError, ValueError, OverflowError) as e:
            raise ValueError(f"starts/lengths must be PFN runs inside guest RAM: {e}") from None
        ram = self.dev.ram
        offs, lens = self.dev.layout.runs_to_offsets(starts, lengths)
        shift = ram.host_page_shift
        first = (offs + (1 << shift) - 1) >> shift
        end = (offs + lens) >> shift
        keep = end > first
        hp = wire.runs_to_pfns(first[keep], (end - first)[keep])
        has = ram.host_pages_with_data(hp)
        return {"host_pages_checked": int(hp.size), "host_pages_with_data": int(has.sum()),
                "host_page_bytes": 1 << shift}
