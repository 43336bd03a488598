"""dirty: a guest that keeps writing memory, for live-migration convergence tests.

prepare() lays memory out like `idle` (its in-use pages are the holding
"dirty.ws", the working set). start() runs a thread that writes `rate_mib_s`
MiB/s in `tick_hz` ticks: a `free_write_share` of each tick's pages go into free
memory (a run inside a random free 4 MiB block that it allocates briefly, fills and
frees again: free-but-dirty pages a free-page hint may have covered) and the rest rewrite random pages of the working
set, or of the pages a `targets(mem)` callback returns, with a new seed per tick.
Every write goes through GuestPageContents, so an attached dirty log sees it and the
holdings record exactly what each held page must contain (mem.verify() checks it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from device.guest.page_contents import GuestPageContents
from workloads.base import BackgroundWorkload, param
from workloads.idle import IdleParams, shape_idle

_M64 = (1 << 64) - 1
PAGES_PER_MIB = 256

TargetsFn = Callable[[GuestPageContents], np.ndarray]


@dataclass(frozen=True)
class DirtyParams:
    rate_mib_s: float = param(64.0, 0.0, 10000.0, lo_open=True, help="MiB written per second")
    free_write_share: float = param(0.5, 0.0, 1.0, help="share of the writes that go into free pages")
    tick_hz: float = param(100.0, 1.0, 1000.0, help="write batches per second")
    used_share: float = param(0.05, 0.0, 1.0, help="working set: share of RAM in use (held), as idle")
    stale_share: float = param(0.20, 0.0, 1.0, help="share of RAM free but holding stale data, as idle")
    regions: int = param(4, 1, 64, help="clusters the working set is spread over")


class Dirty(BackgroundWorkload):
    name = "dirty"
    Params = DirtyParams
    HOLDING = "dirty.ws"

    def __init__(self, params: DirtyParams, seed: int, targets: TargetsFn | None = None) -> None:
        super().__init__(params, seed)
        self.targets = targets
        self._rng = np.random.default_rng([self.seed, 0xD127])
        self._carry = 0.0
        self.held_pages_written = 0
        self.free_pages_written = 0
        self.ticks_short = 0

    def validate(self) -> None:
        p = self.params
        if p.used_share + p.stale_share > 1.0:
            raise ValueError(f"workload 'dirty': used_share + stale_share must be <= 1.0, "
                             f"got {p.used_share} + {p.stale_share}")

    def set_targets(self, targets: TargetsFn | None) -> None:
        """Choose which held pages the thread rewrites (default: its working set)."""
        self.targets = targets

    def prepare(self, mem: GuestPageContents) -> dict:
        p = self.params
        return shape_idle(mem, IdleParams(p.used_share, p.stale_share, p.regions, 3), self.seed, self.HOLDING)

    def _rate(self) -> float:
        return self.params.tick_hz

    def _step(self, mem: GuestPageContents) -> None:
        p = self.params
        self._carry += p.rate_mib_s * PAGES_PER_MIB / p.tick_hz
        n = int(self._carry)
        self._carry -= n
        n_free = int(round(n * p.free_write_share))
        n_held = n - n_free
        tick_seed = (self.seed * 0xD1B54A32D192ED03 + self.steps) & _M64
        if n_held:
            with mem.lock:  # the pool must still be held when rewritten
                pool = self.targets(mem) if self.targets is not None else mem.holding(self.HOLDING)
                pool = np.asarray(pool, dtype=np.int64)
                pool = pool[mem.is_held(pool)]
                if len(pool):
                    k = min(n_held, len(pool))
                    sel = self._rng.choice(pool, size=k, replace=False) if k < len(pool) else pool
                    mem.rewrite(sel, tick_seed)
                    self.held_pages_written += k
                    if k < n_held:
                        self.ticks_short += 1
        if n_free:
            pages = self._borrow_free(mem, n_free)
            if len(pages):
                mem.touch_stale(pages, tick_seed ^ 0xF3EE)
                self.free_pages_written += len(pages)
            if len(pages) < n_free:
                self.ticks_short += 1

    def _borrow_free(self, mem: GuestPageContents, n: int) -> np.ndarray:
        """Allocate n free pages at random places in free memory: runs inside randomly
        chosen free order-10 blocks (so the writes spread over free memory as a busy
        guest's page cache does, instead of recycling the same few hot pages), or
        whatever the allocator hands out when no such block is left."""
        out: list[np.ndarray] = []
        left = n
        blocks = mem.alloc.free_blocks(10)
        if len(blocks):
            for b in self._rng.choice(blocks, size=min(len(blocks), -(-n // 1024)), replace=False).tolist():
                k = min(left, 1024)
                start = int(b) + int(self._rng.integers(0, 1024 - k + 1))
                try:
                    out.append(mem.alloc.alloc_range(start, k))
                except ValueError:  # taken meanwhile (the balloon, another workload)
                    continue
                left -= k
        if left:
            out.append(mem.alloc.alloc_pages(left, notify_oom=False))
        return np.concatenate(out) if out else np.empty(0, dtype=np.int64)

    def _finish(self, mem: GuestPageContents) -> dict:
        pages = self.held_pages_written + self.free_pages_written
        secs = max(self._t1 - self._t0, 1e-9)
        return {"ticks": self.steps, "held_pages_written": self.held_pages_written,
                "free_pages_written": self.free_pages_written, "bytes_written": pages * 4096,
                "achieved_mib_s": pages / PAGES_PER_MIB / secs, "ticks_short": self.ticks_short}
