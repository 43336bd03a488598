"""Loader for pagealloc.c: page allocations by order, frees, user page faults, per pid.

Standalone: `python -m probes.pagealloc -p PID [-d SECONDS] [--json]`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from probes.bpf import Concern, ConcernUnavailable
from probes.tracefs import tracepoint_exists, tracepoint_fields

ORDER_UNKNOWN = 255
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

    def read(self, bpf: Any) -> PageAllocReading:
        r = PageAllocReading(missing=list(self.missing))
        for k, v in bpf[b"pa_allocs"].items():
            p = r.per_pid.setdefault(k.tgid, PidPageEvents())
            p.allocs += v.value
            if k.order != ORDER_UNKNOWN:
                p.alloc_pages += v.value << k.order
            r.alloc_orders[k.order] = r.alloc_orders.get(k.order, 0) + v.value
        for k, v in bpf[b"pa_events"].items():
            p = r.per_pid.setdefault(k.value, PidPageEvents())
            p.frees, p.free_pages, p.frees_batched, p.faults = v.frees, v.free_pages, v.frees_batched, v.faults
        return r

    def clear(self, bpf: Any) -> None:
        bpf[b"pa_allocs"].clear()
        bpf[b"pa_events"].clear()


if __name__ == "__main__":
    from probes.standalone import main

    raise SystemExit(main(["pagealloc"]))
