"""Loader for pagealloc.c: page allocations by order, frees, user page faults, per pid.

Standalone: `python -m probes.pagealloc -p PID [-d SECONDS] [--json]`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from probes.bpf import Concern, ConcernUnavailable, array_items, array_zero
from probes.tracefs import tracepoint_exists, tracepoint_fields

PA_ORDERS = 33                       # pagealloc.c: orders 0..31 and 32 = unknown
ORDER_UNKNOWN = PA_ORDERS - 1
TRACEPOINTS = (("kmem", "mm_page_alloc"), ("kmem", "mm_page_free"),
               ("kmem", "mm_page_free_batched"), ("exceptions", "page_fault_user"))


@dataclass
class PidPageEvents:
    allocs: int = 0
    alloc_pages: int = 0
    frees: int = 0
    free_pages: int = 0
    frees_batched: int = 0
    faults: int = 0


@dataclass
class PageAllocReading:
    per_pid: dict[int, PidPageEvents] = field(default_factory=dict)
    alloc_orders: dict[int, int] = field(default_factory=dict)   # order -> allocations (all pids)
    missing: list[str] = field(default_factory=list)             # tracepoints this kernel lacks

    def total(self, attr: str) -> int:
        return sum(getattr(p, attr) for p in self.per_pid.values())


class PageAllocProbe(Concern):
    name = "pagealloc"
    c_file = "pagealloc.c"
    order = 40

    def __init__(self) -> None:
        self.missing: list[str] = []

    def cflags(self) -> list[str]:
        flags = []
        self.missing = []
        for cat, ev in TRACEPOINTS:
            if tracepoint_exists(cat, ev):
                flags.append(f"-DHAVE_TP_{ev}")
            else:
                self.missing.append(f"{cat}:{ev}")
        if len(self.missing) == len(TRACEPOINTS):
            raise ConcernUnavailable("none of " + ", ".join(f"{c}:{e}" for c, e in TRACEPOINTS) + " exists")
        if "order" in (tracepoint_fields("kmem", "mm_page_alloc") or ()):
            flags.append("-DPA_ALLOC_HAS_ORDER")
        if "order" in (tracepoint_fields("kmem", "mm_page_free") or ()):
            flags.append("-DPA_FREE_HAS_ORDER")
        return flags

    def read(self, bpf: Any, targets: list[int]) -> PageAllocReading:
        r = PageAllocReading(missing=list(self.missing))
        for idx, n in array_items(bpf[b"pa_allocs"]):
            slot, order = divmod(idx, PA_ORDERS)
            pid = targets[slot] if slot < len(targets) else 0
            if not n or not pid:
                continue
            p = r.per_pid.setdefault(pid, PidPageEvents())
            p.allocs += n
            if order != ORDER_UNKNOWN:
                p.alloc_pages += n << order
            r.alloc_orders[order] = r.alloc_orders.get(order, 0) + n
        for slot, v in array_items(bpf[b"pa_events"]):
            pid = targets[slot] if slot < len(targets) else 0
            if not pid or not (v.frees or v.frees_batched or v.faults):
                continue
            p = r.per_pid.setdefault(pid, PidPageEvents())
            p.frees, p.free_pages, p.frees_batched, p.faults = v.frees, v.free_pages, v.frees_batched, v.faults
        return r

    def clear(self, bpf: Any) -> None:
        array_zero(bpf[b"pa_allocs"])
        array_zero(bpf[b"pa_events"])

