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
    """A guest layout the fuzzer uses, and which of its pages hold data before every exec."""

    name: str
    layout: GuestLayout
    fill: list[tuple[int, int]]          # guest-physical (gpa, length) ranges that hold data

    @property
    def max_pfn(self) -> int:
        return self.layout.max_pfn

    def interesting_pfns(self) -> list[int]:
        out = {0, 1, 2, 7, 8, 0x3F, 0x40, 0x41}
        for r in self.layout.regions:
            out |= {r.first_pfn, r.first_pfn + 1, r.end_pfn - 1, r.end_pfn - 2, r.end_pfn, r.end_pfn + 1}
        mp_ = self.max_pfn
        out |= {mp_ - 1, mp_, mp_ + 1, mp_ + 7, mp_ + 8, (1 << 20), (1 << 31), (1 << 32) - 1, (1 << 32) - 2}
        return sorted(x for x in out if x >= 0)

    @property
    def ram_mask(self) -> np.ndarray:
        """Boolean per PFN below max_pfn: RAM or not (cached)."""
        if not hasattr(self, "_ram_mask"):
            self._ram_mask = self.layout.ram_pfn_mask(np.arange(self.max_pfn))
        return self._ram_mask

    def data_pfns(self) -> list[tuple[int, int]]:
        """(first pfn, count) of the fill ranges."""
        return [(g >> PAGE_SHIFT, n >> PAGE_SHIFT) for g, n in self.fill]


def make_layout(name: str) -> FuzzLayout:
    """A new FuzzLayout by name (LAYOUTS); fuzz_layout() keeps one of each."""
    if name == "mini":      # 1 MiB RAM, a 1 MiB hole, 1 MiB RAM: every page holds data
        lay = GuestLayout((Region(0, MiB, 0), Region(2 * MiB, MiB, MiB)))
        return FuzzLayout(name, lay, [(0, MiB), (2 * MiB, MiB)])
    if name == "flat":      # one region, nothing past it
        lay = GuestLayout((Region(0, MiB, 0),))
        return FuzzLayout(name, lay, [(0, MiB)])
    if name == "pc":        # the lab's PC layout (3 GiB, hole, 4 MiB above 4 GiB), sparse
        lay = GuestLayout.pc(3072 + 4)
        return FuzzLayout(name, lay, [(0, MiB), ((3 << 30) - (256 << 10), 256 << 10), (4 << 30, 4 * MiB)])
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

