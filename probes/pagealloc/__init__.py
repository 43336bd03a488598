"""Loader for pagealloc.c (page allocations by order, user page faults) and pagefree.c
(page frees, opt-in: probes/pagefree/), per pid.

Standalone: `python -m probes.pagealloc -p PID [-d SECONDS] [--json]`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from probes.bpf import Concern, ConcernUnavailable, array_words, array_zero
from probes.tracefs import tracepoint_exists, tracepoint_fields

PA_ORDERS = 33                       # pagealloc.c: orders 0..31 and 32 = unknown
ORDER_UNKNOWN = PA_ORDERS - 1


@dataclass
class PidPageEvents:
    allocs: int = 0
    alloc_pages: int = 0
    faults: int = 0
    frees: int = 0
    free_pages: int = 0
    frees_batched: int = 0


@dataclass
class PageAllocReading:
    per_pid: dict[int, PidPageEvents] = field(default_factory=dict)
    alloc_orders: dict[int, int] = field(default_factory=dict)   # order -> allocations (all pids)
    missing: list[str] = field(default_factory=list)             # tracepoints this kernel lacks

    def total(self, attr: str) -> int:
        return sum(getattr(p, attr) for p in self.per_pid.values())


class TracepointConcern(Concern):
    """A probe on raw tracepoints that a kernel may lack: HAVE_TP_<event> for each one
    present (the others go to `missing`, ConcernUnavailable when none is), and ORDER_FLAG
    when ORDER_FIELD's tracepoint carries an `order` argument."""

    TRACEPOINTS: tuple[tuple[str, str], ...] = ()
    ORDER_FIELD: tuple[str, str] = ("", "")      # the tracepoint whose order is read
    ORDER_FLAG = ""

    def __init__(self) -> None:
        self.missing: list[str] = []

    def cflags(self) -> list[str]:
        self.missing = []
        flags = []
        for cat, ev in self.TRACEPOINTS:
            if tracepoint_exists(cat, ev):
                flags.append(f"-DHAVE_TP_{ev}")
            else:
                self.missing.append(f"{cat}:{ev}")
        if len(self.missing) == len(self.TRACEPOINTS):
            raise ConcernUnavailable("none of " + ", ".join(f"{c}:{e}" for c, e in self.TRACEPOINTS) + " exists")
        if "order" in (tracepoint_fields(*self.ORDER_FIELD) or ()):
            flags.append(f"-D{self.ORDER_FLAG}")     # the format shows TP_PROTO's (page, order, ...)
        return flags


class PageAllocProbe(TracepointConcern):
    name = "pagealloc"
    c_file = "pagealloc.c"
    order = 40
    TRACEPOINTS = (("kmem", "mm_page_alloc"), ("exceptions", "page_fault_user"))
    ORDER_FIELD, ORDER_FLAG = ("kmem", "mm_page_alloc"), "PA_ALLOC_HAS_ORDER"

    def read(self, bpf: Any, targets: list[int]) -> PageAllocReading:
        r = PageAllocReading(missing=list(self.missing))
        allocs = array_words(bpf[b"pa_allocs"])[:, 0]
        for idx in np.flatnonzero(allocs).tolist():
            slot, order = divmod(idx, PA_ORDERS)
            pid = targets[slot] if slot < len(targets) else 0
            if not pid:
                continue
            n = int(allocs[idx])
            p = r.per_pid.setdefault(pid, PidPageEvents())
            p.allocs += n
            if order != ORDER_UNKNOWN:
                p.alloc_pages += n << order
            r.alloc_orders[order] = r.alloc_orders.get(order, 0) + n
        faults = array_words(bpf[b"pa_faults"])[:, 0]
        for slot in np.flatnonzero(faults).tolist():
            pid = targets[slot] if slot < len(targets) else 0
            if pid:
                r.per_pid.setdefault(pid, PidPageEvents()).faults = int(faults[slot])
        return r

    def clear(self, bpf: Any) -> None:
        array_zero(bpf[b"pa_allocs"])
        array_zero(bpf[b"pa_faults"])
