"""Loader for pagefree.c: pages freed in the probed pids' context (kmem:mm_page_free,
mm_page_free_batched). Opt-in: it runs once per freed page in every arm (pagefree.c
says why no cheaper hook gives this count).

Standalone: `python -m probes.pagefree -p PID [-d SECONDS] [--json]`.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from probes.bpf import array_words, array_zero
from probes.pagealloc import PageAllocReading, PidPageEvents, TracepointConcern


class PageFreeProbe(TracepointConcern):
    name = "pagefree"
    c_file = "pagefree.c"
    order = 50
    TRACEPOINTS = (("kmem", "mm_page_free"), ("kmem", "mm_page_free_batched"))
    ORDER_FIELD, ORDER_FLAG = ("kmem", "mm_page_free"), "PA_FREE_HAS_ORDER"

    def read(self, bpf: Any, targets: list[int]) -> PageAllocReading:
        """Frees, freed pages and batched frees per pid (the other fields stay 0)."""
        r = PageAllocReading(missing=list(self.missing))
        ev = array_words(bpf[b"pf_events"])                 # frees, free_pages, frees_batched
        for slot in np.flatnonzero(ev.any(axis=1)).tolist():
            pid = targets[slot] if slot < len(targets) else 0
            if pid:
                r.per_pid[pid] = PidPageEvents(frees=int(ev[slot, 0]), free_pages=int(ev[slot, 1]),
                                               frees_batched=int(ev[slot, 2]))
        return r

    def clear(self, bpf: Any) -> None:
        array_zero(bpf[b"pf_events"])
