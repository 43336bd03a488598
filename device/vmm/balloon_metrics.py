"""What the balloon device counts, declared once: one documented metric per counter.

Like Firecracker's balloon metrics.rs: the device (device/vmm/balloon_device.py) and
the page-reporting queue (device/vmm/page_reporting_device.py) fill these records;
their snapshots cross to the lab as dicts that the declarations describe (kind, unit,
one line of doc), so the lab never guesses what a number is.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from device.virtio import wire
from device.virtio.metric_decl import COUNTER, GAUGE, TIMING, Metric, MetricSet, declared_by


# What the device counts per direction (DeviceOpCounters, and its snapshot's "runs").
DEVICE_OP_METRICS = MetricSet("device/vmm/balloon_metrics.py DEVICE_OP_METRICS", [
    Metric("requests", COUNTER, "", "inflate/deflate requests (descriptor chains) the device served"),
    Metric("pages", COUNTER, "", "pages the device accepted into (or out of) the balloon"),
    Metric("discard_calls", COUNTER, "", "madvise/fallocate system calls that discarded guest memory"),
    Metric("translations", COUNTER, "", "guest-physical to memfd translations: per page (pfn), per run (ranges)"),
    Metric("bytes_on_ring", COUNTER, "bytes", "request bytes the device read from the ring (chunks: 16 per descriptor)"),
    Metric("descriptors", COUNTER, "", "descriptors in the chains the device served"),
    Metric("translate_ns", TIMING, "ns", "time in the translate stage: validate pages, look up regions"),
    Metric("discard_ns", TIMING, "ns", "time in the discard stage: the system calls that free memory"),
    Metric("discard_cpu_ns", TIMING, "ns", "CPU time of the VMM's thread in the discard stage (user + system): "
                                           "quieter than discard_ns, time spent waiting for a CPU is not in it"),
    Metric("refused_pages", COUNTER, "", "pages the guest named that the device refused (counted by reason in errors)"),
    Metric("cpu_ns", TIMING, "ns", "CPU time of the VMM's thread serving this queue's kicks: ring, decode, "
                                   "translate, discard"),
    Metric("runs", COUNTER, "", "runs of contiguous pages accepted (what a range protocol discards one call each)"),
])
# The device's own counters beside the per-direction ones (BalloonDevice.counters()).
DEVICE_METRICS = MetricSet("device/vmm/balloon_metrics.py DEVICE_METRICS", [
    Metric("budget_yields", GAUGE, "", "wake-ups that ended with work left (the device re-kicked itself)"),
    Metric("ballooned_pages", COUNTER, "", "pages in the balloon as the device sees it"),
    Metric("memfd_allocated_bytes", COUNTER, "bytes", "guest RAM the memfd holds (st_blocks), the kernel's view"),
])


@declared_by(DEVICE_OP_METRICS)
@dataclass
class DeviceOpCounters:
    """What the device did for one direction (inflate or deflate)."""

    requests: int = 0
    pages: int = 0
    discard_calls: int = 0
    translations: int = 0
    bytes_on_ring: int = 0
    descriptors: int = 0
    translate_ns: int = 0
    discard_ns: int = 0
    discard_cpu_ns: int = 0
    refused_pages: int = 0
    cpu_ns: int = 0
    _run_lengths: list = field(default_factory=list, repr=False)   # range paths: per request
    _pfn_batches: list = field(default_factory=list, repr=False)   # PFN path: pages per request
    _given: list = field(default_factory=list, repr=False)         # pages accepted (deflate)

    def add_runs(self, lengths: np.ndarray) -> None:
        self._run_lengths.append(np.asarray(lengths, dtype=np.int64))

    def add_pfn_batch(self, pfns: np.ndarray) -> None:
        """PFN path: keep the request's pages; their runs are derived when read, so the
        per-page hot path does no numpy work."""
        self._pfn_batches.append(pfns)

    def add_accepted(self, pfns: np.ndarray) -> None:
        self._given.append(pfns)

    def pfns(self) -> np.ndarray:
        """Every page this direction accepted since the counters were reset (deflate)."""
        parts = self._given + self._pfn_batches
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def snapshot(self) -> dict:
        parts = self._run_lengths + [wire.pfns_to_runs(p)[1] for p in self._pfn_batches]
        lengths = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return {
            "requests": self.requests, "pages": self.pages, "discard_calls": self.discard_calls,
            "translations": self.translations, "bytes_on_ring": self.bytes_on_ring,
            "descriptors": self.descriptors, "translate_ns": self.translate_ns,
            "discard_ns": self.discard_ns, "discard_cpu_ns": self.discard_cpu_ns, "cpu_ns": self.cpu_ns,
            "refused_pages": self.refused_pages,
            "runs": int(lengths.size),
            "run_length_hist": {str(k): v for k, v in wire.run_length_hist(lengths).items()},
            "run_length_pages_hist": {str(k): v for k, v in wire.run_length_pages_hist(lengths).items()},
        }
