"""What the probes cost: the same work timed with the probes detached and attached.

measure_overhead() alternates (A B A B ...) between the session suspended (every
program detached, the module kept loaded, USDT semaphores released) and resumed,
on this very process, so drift hits both alike. `python -m probes.overhead` runs
the benchmarks behind docs/PROBES.md: 262144 single-page madvise(MADV_REMOVE) on a
memfd under each probe, plus each probe on the loop it is built to see.

The lab's runner measures the end-to-end figure itself: the same arm with and
without a ProbeSession (ProbeSession(enabled=False)), interleaved.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from device.virtio.discard import ResidentPages
from device.virtio.layout import PAGE_SIZE as PAGE
from probes.session import CONCERNS, DEFAULT_CONCERNS, ProbeReading, ProbeSession


@dataclass
class OverheadResult:
    label: str
    concerns: list[str]
    backend: str
    ops: int                                  # operations per run (for per-op figures)
    base_s: list[float] = field(default_factory=list)         # wall time per run
    probed_s: list[float] = field(default_factory=list)
    base_cpu_s: list[float] = field(default_factory=list)     # this process's CPU time (user + kernel,
    probed_cpu_s: list[float] = field(default_factory=list)   # BPF programs included): less noisy on a busy host
    reading: dict | None = None               # what the probes saw during the probed runs

    @property
    def base_median_s(self) -> float:
        return statistics.median(self.base_s)

    @property
    def probed_median_s(self) -> float:
        return statistics.median(self.probed_s)

    @property
    def ratio(self) -> float:
        return self.probed_median_s / self.base_median_s

    @property
    def added_ns_per_op(self) -> float:
        return (self.probed_median_s - self.base_median_s) / self.ops * 1e9

    @property
    def cpu_ratio(self) -> float:
        return statistics.median(self.probed_cpu_s) / statistics.median(self.base_cpu_s)

    @property
    def added_cpu_ns_per_op(self) -> float:
        return (statistics.median(self.probed_cpu_s) - statistics.median(self.base_cpu_s)) / self.ops * 1e9

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("reading")
        d.update(base_median_s=self.base_median_s, probed_median_s=self.probed_median_s, ratio=self.ratio,
                 base_ns_per_op=self.base_median_s / self.ops * 1e9,
                 probed_ns_per_op=self.probed_median_s / self.ops * 1e9, added_ns_per_op=self.added_ns_per_op,
                 base_cpu_ns_per_op=statistics.median(self.base_cpu_s) / self.ops * 1e9,
                 probed_cpu_ns_per_op=statistics.median(self.probed_cpu_s) / self.ops * 1e9,
                 cpu_ratio=self.cpu_ratio, added_cpu_ns_per_op=self.added_cpu_ns_per_op)
        return d


def measure_overhead(fn: Callable[[], None], repeats: int = 5, session: ProbeSession | None = None,
                     concerns: tuple[str, ...] = CONCERNS, ops: int = 1, label: str = "",
                     setup: Callable[[], None] | None = None) -> OverheadResult:
    """Time fn() `repeats` times without and with probes attached to this process, interleaved.

    `setup` runs untimed before every fn() (e.g. to re-populate memory). With a
    degraded session only the unprobed runs are real: probed_s repeats them and the
    result's backend says 'none'. The reading covers the probed runs only.
    """
    if repeats < 1:
        raise ValueError(f"repeats {repeats!r}: must be >= 1")
    own = session is None
    s = session if session is not None else ProbeSession(concerns=concerns)
    try:
        s.attach([os.getpid()])
        res = OverheadResult(label or getattr(fn, "__name__", "fn"), list(s.probes) or list(concerns),
                             s.backend, ops)
        s.clear()
        for _ in range(repeats):
            for probed in (False, True):
                (s.resume if probed else s.suspend)()
                if setup:
                    setup()
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                (res.probed_s if probed else res.base_s).append(dt)
                (res.probed_cpu_s if probed else res.base_cpu_s).append(dc)
        s.suspend()
        res.reading = s.read().to_json()
        res.backend = s.backend
        return res
    finally:
        if own:
            s.detach()


# --- the standard loops --------------------------------------------------------------
class MadviseLoop:
    """N single-page madvise(MADV_REMOVE) calls on a populated memfd (a PFN-mode discard),
    through the lab's bare-discard rig (device/virtio/discard.py ResidentPages). Populated
    with fallocate, so the pages are in the memfd but not mapped: the discard's own cost,
    without the zap of a mapping."""

    def __init__(self, pages: int) -> None:
        self.pages = pages
        self.rp = ResidentPages(pages, "balloon-lab-overhead")

    def populate(self) -> None:
        os.posix_fallocate(self.rp.fd, 0, self.pages * PAGE)

    def __call__(self) -> None:
        self.rp.discard_each()           # per page on purpose: the PFN protocol's cost


class EventfdLoop:
    """N eventfd writes + N reads (a kick and a wake-up each) on a registered eventfd."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.fd = os.eventfd(0)

    def __call__(self) -> None:
        w, r, fd = os.eventfd_write, os.eventfd_read, self.fd
        for _ in range(self.n):
            w(fd, 1)
            r(fd)


class TouchLoop:
    """Touch N fresh pages of a memfd (one page fault + one page allocation each)."""

    def __init__(self, pages: int) -> None:
        self.pages = pages
        self.fd = os.memfd_create("balloon-lab-touch", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, pages * PAGE)
        self.mm = mmap.mmap(self.fd, pages * PAGE)

    def reset(self) -> None:
        self.mm.madvise(mmap.MADV_REMOVE, 0, self.pages * PAGE)

    def __call__(self) -> None:
        mm = self.mm
        for off in range(0, self.pages * PAGE, PAGE):
            mm[off] = 1


class AuditLoop:
    """N stage begin/end marker pairs (sys.audit), the stage probe's unit of work."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self) -> None:
        audit = sys.audit
        for _ in range(self.n):
            audit("balloon-lab:bench:b")
            audit("balloon-lab:bench:e")


def run_benchmarks(pages: int = 262144, repeats: int = 5) -> list[OverheadResult]:
    """The figures in docs/PROBES.md (one session per probe set: compile once, interleave runs)."""
    out: list[OverheadResult] = []
    loop = MadviseLoop(pages)
    for concerns in [(c,) for c in DEFAULT_CONCERNS] + [("pagefree",), ("madvise", "syscall-time"), DEFAULT_CONCERNS,
                                                       CONCERNS]:
        out.append(measure_overhead(loop, repeats, concerns=concerns, ops=pages, setup=loop.populate,
                                    label=f"madvise-loop/{'+'.join(concerns)}"))
    s = ProbeSession(concerns=("kicks",))
    try:
        s.attach([os.getpid()])
        ev = EventfdLoop(pages // 4)
        s.register_eventfd(os.getpid(), ev.fd, 0, "kick")
        out.append(measure_overhead(ev, repeats, session=s, ops=ev.n, label="eventfd-loop/kicks"))
    finally:
        s.detach()
    touch = TouchLoop(pages // 4)
    out.append(measure_overhead(touch, repeats, concerns=("pagealloc",), ops=touch.pages, setup=touch.reset,
                                label="touch-loop/pagealloc"))
    audit = AuditLoop(pages // 16)
    out.append(measure_overhead(audit, repeats, concerns=("stages",), ops=audit.n, label="audit-loop/stages"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m probes.overhead", description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=262144)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    results = run_benchmarks(a.pages, a.repeats)
    if a.json:
        print(json.dumps([r.summary() for r in results], indent=1))
        return 0
    print(f"{'benchmark':<46}{'ops':>7}  {'wall ns/op: base':>16}{'probed':>8}{'ratio':>7}"
          f"  {'cpu ns/op: base':>15}{'probed':>8}{'added':>7}{'ratio':>7}")
    for r in results:
        s = r.summary()
        print(f"{r.label:<46}{r.ops:>7}  {s['base_ns_per_op']:>16.0f}{s['probed_ns_per_op']:>8.0f}{s['ratio']:>7.2f}"
              f"  {s['base_cpu_ns_per_op']:>15.0f}{s['probed_cpu_ns_per_op']:>8.0f}{s['added_cpu_ns_per_op']:>7.0f}"
              f"{s['cpu_ratio']:>7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
