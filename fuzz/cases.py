"""The ring and device cases' vocabulary: constants, guest layouts, steps, outcomes.

A case is a plain dict (JSON-able, fuzz/corpus.py): the guest layout it runs on, the
protocol, each queue's descriptors and avail heads, the request bytes laid into guest
memory (`mem`, inside BUF_AREA) and the steps (`kicks`: a queue index is a guest kick,
a negative number one of the VMM's own steps). Generators, mutators, the oracle and
the targets all read this module; it reads nothing of theirs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from device.virtio.layout import MiB, PAGE_SHIFT, PAGE_SIZE, GuestLayout, Region
from fuzz.regions import RamRegion, RegionTable, pc_regions

QUEUES = (0, 1, 2, 3, 5)            # inflate, deflate, stats, free-page hint, misc
# Steps that are not guest kicks: what the VMM does on its side between them.
STATS_POLL = -1                     # return the held stats buffer (qom-get guest-stats)
HINT_START, HINT_REQUEST, HINT_STOP, HINT_DONE = -2, -3, -4, -5   # migration asks for / ends free-page hints
VMM_STEPS = (STATS_POLL, HINT_START, HINT_REQUEST, HINT_STOP, HINT_DONE)
BUF_AREA = (0x8000, 0x40000)        # request buffers and indirect tables live here
DATA_BYTE = 0xA5
U64_MAX = (1 << 64) - 1
DATA_PAGE = bytes([DATA_BYTE]) * PAGE_SIZE


def ring_gpa(q: int) -> int:
    """Each queue's ring gets its own page below BUF_AREA."""
    return 0x1000 * (1 + q)


@dataclass
class FuzzLayout:
    """A guest layout the fuzzer uses, and which of its pages hold data before every exec:
    `layout` is the device's (GuestLayout, what the device under test is given),
    `regions` the fuzzer's own table of the same guest (fuzz/regions.py), which the
    oracle reads, so a bug in the device's table cannot hide itself."""

    name: str
    layout: GuestLayout
    regions: RegionTable
    fill: list[tuple[int, int]]          # guest-physical (gpa, length) ranges that hold data

    @property
    def max_pfn(self) -> int:
        return self.regions.max_pfn

    def interesting_pfns(self) -> list[int]:
        out = {0, 1, 2, 7, 8, 0x3F, 0x40, 0x41}
        for r in self.regions.regions:
            first, end = r.gpa >> PAGE_SHIFT, (r.gpa + r.size) >> PAGE_SHIFT
            out |= {first, first + 1, end - 1, end - 2, end, end + 1}
        mp_ = self.max_pfn
        out |= {mp_ - 1, mp_, mp_ + 1, mp_ + 7, mp_ + 8, (1 << 20), (1 << 31), (1 << 32) - 1, (1 << 32) - 2}
        return sorted(x for x in out if x >= 0)

    @property
    def ram_mask(self) -> np.ndarray:
        """Boolean per PFN below max_pfn: RAM or not (cached; the fuzzer's own table)."""
        if not hasattr(self, "_ram_mask"):
            self._ram_mask = self.regions.ram_mask()
        return self._ram_mask

    def data_pfns(self) -> list[tuple[int, int]]:
        """(first pfn, count) of the fill ranges."""
        return [(g >> PAGE_SHIFT, n >> PAGE_SHIFT) for g, n in self.fill]


def _both(regions: tuple[tuple[int, int, int], ...]) -> tuple[GuestLayout, RegionTable]:
    """A test layout given as (gpa, size, memfd offset) triples: the device's GuestLayout
    and the fuzzer's own table of it."""
    return (GuestLayout(tuple(Region(g, n, o) for g, n, o in regions)),
            RegionTable(tuple(RamRegion(g, n, o) for g, n, o in regions)))


def make_layout(name: str) -> FuzzLayout:
    """A new FuzzLayout by name (LAYOUTS); fuzz_layout() keeps one of each."""
    if name == "mini":      # 1 MiB RAM, a 1 MiB hole, 1 MiB RAM: every page holds data
        return FuzzLayout(name, *_both(((0, MiB, 0), (2 * MiB, MiB, MiB))), [(0, MiB), (2 * MiB, MiB)])
    if name == "flat":      # one region, nothing past it
        return FuzzLayout(name, *_both(((0, MiB, 0),)), [(0, MiB)])
    if name == "pc":        # the lab's PC layout (3 GiB, hole, 4 MiB above 4 GiB), sparse: the device's
        # GuestLayout.pc and the fuzzer's own reading of docs/PROTOCOL.md, each on its own
        return FuzzLayout(name, GuestLayout.pc(3072 + 4), pc_regions(3072 + 4),
                          [(0, MiB), ((3 << 30) - (256 << 10), 256 << 10), (4 << 30, 4 * MiB)])
    raise ValueError(f"unknown fuzz layout {name!r}")


LAYOUTS = ("mini", "flat", "pc")
LAYOUT_WEIGHTS = (0.6, 0.2, 0.2)
_LAYOUT_CACHE: dict[str, FuzzLayout] = {}


def fuzz_layout(name: str) -> FuzzLayout:
    """The FuzzLayout of this name (made once per process)."""
    if name not in _LAYOUT_CACHE:
        _LAYOUT_CACHE[name] = make_layout(name)
    return _LAYOUT_CACHE[name]


def kick_steps(case: dict) -> list[tuple[int, int | None]]:
    """(queue or VMM step, avail idx to publish first or None) for each step of a case."""
    return [(k[0], k[1]) if isinstance(k, list) else (k, None) for k in case["kicks"]]


def copy_case(case: dict) -> dict:
    """A copy deep enough for mutation (bytes are immutable and shared); deepcopy is slow."""
    c = dict(case)
    if "queues" in c:
        c["queues"] = {q: dict(qd, desc=[list(d) for d in qd["desc"]], heads=list(qd["heads"]))
                       for q, qd in c["queues"].items()}
    for k in ("mem", "chunks"):
        if k in c:
            c[k] = [list(x) for x in c[k]]
    for k in ("pre", "kicks", "bufs"):
        if k in c:
            c[k] = list(c[k])
    return c


@dataclass
class Outcome:
    """What one exec of a case did: its behaviour (signature) and any failure."""

    signature: tuple
    failure: str | None = None        # "crash", "hang", "oob-discard"
    detail: str = ""

