"""Which host pages the device may discard, when the host page is larger than 4 KiB.

A huge host page (THP or hugetlb, 2 MiB) can only be freed whole: discarding 4 KiB of
it would split a THP (and give back one small page of a page that then stops being
huge) or zero part of a hugetlb page without freeing anything. So the device
discards a host page only once every 4 KiB sub-page of it is in the balloon. Two
ways to know that, selected by `--partial-tracking`:

  full  every host page has a bitmap of its ballooned sub-pages (one flat bool per
        memfd page, plus a count per host page), kept across requests: a host page
        is discarded the moment its last sub-page arrives, whatever request and
        order the sub-pages came in. Deflate clears bits: the host page is then
        partial again and is discarded again when it next becomes whole.
  qemu  QEMU's PartiallyBalloonedPage (hw/virtio/virtio-balloon.c,
        balloon_inflate_page): one bitmap for one host page, living for one
        request; a sub-page of a different host page drops it ("too hard, give up
        on the old partial page"). A host page is discarded only if all its
        sub-pages arrive in one request without a page of another host page in
        between. With Linux's 256-PFN requests and 512 sub-pages per 2 MiB page,
        that never happens.

Everything is in memfd page indices (offset >> 12), so the guest's MMIO hole does
not matter. numpy per request; no Python loop per page.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from device.virtio.layout import PAGE_SHIFT
from device.virtio.metric_decl import COUNTER, Metric, MetricSet, declared_by

PARTIAL_TRACKING = ("full", "qemu")

# HostPageTracker.snapshot(): what the tracker holds and did (huge backings only).
HOST_PAGE_METRICS = MetricSet("device/vmm/huge_pages.py HOST_PAGE_METRICS", [
    Metric("discarded_host_pages", COUNTER, "", "host pages the device chose to discard"),
    Metric("completed_requests", COUNTER, "", "requests that completed at least one host page"),
    Metric("dropped_partials", COUNTER, "", "qemu tracking: partial bitmaps given up on"),
    Metric("host_page_bytes", COUNTER, "bytes", "size of one host page of the backing"),
    Metric("partial_host_pages", COUNTER, "", "host pages partly in the balloon (not discardable yet)"),
    Metric("whole_host_pages", COUNTER, "", "host pages wholly in the balloon"),
    Metric("whole_discarded", COUNTER, "", "host pages the device has discarded"),
    Metric("whole_not_discarded", COUNTER, "", "wholly ballooned host pages still holding memory"),
])


@declared_by(HOST_PAGE_METRICS)
@dataclass
class HostPageCounters:
    """What the tracker did since the counters were reset."""

    discarded_host_pages: int = 0     # host pages the device chose to discard
    completed_requests: int = 0       # requests that completed at least one host page
    dropped_partials: int = 0         # qemu mode: partial bitmaps given up on

    def snapshot(self) -> dict:
        return {"discarded_host_pages": self.discarded_host_pages, "completed_requests": self.completed_requests,
                "dropped_partials": self.dropped_partials}


class HostPageTracker:
    def __init__(self, memfd_pages: int, host_page_shift: int, mode: str = "full") -> None:
        if mode not in PARTIAL_TRACKING:
            raise ValueError(f"unknown partial tracking {mode!r}; choose from {', '.join(PARTIAL_TRACKING)}")
        if host_page_shift < PAGE_SHIFT:
            raise ValueError(f"host page shift {host_page_shift} is below the guest page shift {PAGE_SHIFT}")
        self.mode = mode
        self.shift = host_page_shift - PAGE_SHIFT          # sub-pages per host page = 1 << shift
        self.per = 1 << self.shift
        self.host_pages = -(-memfd_pages // self.per)
        # full mode's per-host-page bitmaps, laid out flat: bit j of host page h is sub[h * per + j]
        self.sub = np.zeros(self.host_pages * self.per, dtype=bool)
        self.count = np.zeros(self.host_pages, dtype=np.int32)
        self.discarded = np.zeros(self.host_pages, dtype=bool)   # discarded and still wholly ballooned
        self.ctr = HostPageCounters()

    # --- inflate / deflate ------------------------------------------------------------------
    def inflate(self, mpages: np.ndarray) -> np.ndarray:
        """Sub-pages (memfd page indices, in the order the request named them, each
        new to the balloon) went in; returns the sorted host page indices to discard now."""
        mp = np.asarray(mpages, dtype=np.int64)
        if mp.size == 0:
            return np.zeros(0, dtype=np.int64)
        hp = mp >> self.shift
        self.sub[mp] = True
        added = np.bincount(hp, minlength=self.host_pages)     # one pass, no per-page Python
        self.count += added.astype(np.int32)
        if self.mode == "full":
            touched = np.flatnonzero(added)
            done = touched[(self.count[touched] == self.per) & ~self.discarded[touched]]
        else:
            done = self._qemu_completed(hp)
        self.discarded[done] = True
        self.ctr.discarded_host_pages += int(done.size)
        self.ctr.completed_requests += int(done.size > 0)
        return done

    def _qemu_completed(self, hp: np.ndarray) -> np.ndarray:
        """Host pages whose sub-pages all came in one unbroken stretch of this request:
        a stretch of equal host page indices is one PartiallyBalloonedPage's life."""
        brk = np.flatnonzero(hp[1:] != hp[:-1]) + 1
        first = np.concatenate(([0], brk))
        lens = np.diff(np.concatenate((first, [hp.size])))
        whole = lens == self.per            # pages are unique (the device refused repeats)
        self.ctr.dropped_partials += int((~whole).sum())
        return np.unique(hp[first[whole]])

    def deflate(self, mpages: np.ndarray) -> None:
        """Sub-pages left the balloon: their host pages are partial again (a host page
        that was discarded stays freed; the guest faults it back in when it uses it)."""
        mp = np.asarray(mpages, dtype=np.int64)
        if mp.size == 0:
            return
        hp = mp >> self.shift
        self.sub[mp] = False
        self.count -= np.bincount(hp, minlength=self.host_pages).astype(np.int32)
        self.discarded[hp] = False

    def reset(self) -> None:
        self.sub[:] = False
        self.count[:] = 0
        self.discarded[:] = False

    # --- what it holds ------------------------------------------------------------------------
    def whole(self) -> np.ndarray:
        """Host pages every sub-page of which is in the balloon."""
        return np.flatnonzero(self.count == self.per)

    def snapshot(self) -> dict:
        partial = int(np.count_nonzero((self.count > 0) & (self.count < self.per)))
        whole = int(np.count_nonzero(self.count == self.per))
        return {"mode": self.mode, "host_page_bytes": self.per << PAGE_SHIFT, "partial_host_pages": partial,
                "whole_host_pages": whole, "whole_discarded": int(np.count_nonzero(self.discarded)),
                "whole_not_discarded": whole - int(np.count_nonzero(self.discarded & (self.count == self.per))),
                **self.ctr.snapshot()}


def host_page_runs(host_pages: np.ndarray, host_page_shift: int) -> tuple[np.ndarray, np.ndarray]:
    """memfd (offsets, lengths) of sorted host page indices, neighbours merged: one
    discard call per run of adjacent host pages."""
    hp = np.asarray(host_pages, dtype=np.int64)
    if hp.size == 0:
        return hp, hp
    brk = np.flatnonzero(np.diff(hp) != 1) + 1
    first = np.concatenate(([0], brk))
    lens = np.diff(np.concatenate((first, [hp.size])))
    return hp[first] << host_page_shift, lens.astype(np.int64) << host_page_shift
