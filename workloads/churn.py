"""churn: allocation/free cycles in a background thread while the balloon works.

Each cycle allocates `batch_pages` pages (a normal guest allocation: it may trigger
the driver's deflate-on-OOM hook), writes a pattern into them and keeps them as a
holding; while churn holds more than `held_share` of RAM (or when an allocation
came up short) it checks the oldest batch against its expected fingerprints and
frees it. A page whose data changed while churn held it counts as a corruption:
the balloon must never take or discard a page in use, so corruptions must stay 0.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from device.guest.page_contents import GuestPageContents
from workloads.base import BackgroundWorkload, param

_M64 = (1 << 64) - 1


@dataclass(frozen=True)
class ChurnParams:
    batch_pages: int = param(256, 1, 1 << 18, help="pages allocated (and later freed) per cycle")
    rate: float = param(100.0, 0.0, 100000.0, lo_open=True, help="cycles per second")
    held_share: float = param(0.05, 0.0, 1.0, help="cap on the share of RAM churn holds at once")


class Churn(BackgroundWorkload):
    name = "churn"
    Params = ChurnParams

    def __init__(self, params: ChurnParams, seed: int) -> None:
        super().__init__(params, seed)
        self._live: deque[tuple[str, int]] = deque()
        self._held = 0
        self.cycles = 0
        self.pages_allocated = 0
        self.pages_freed = 0
        self.corruptions = 0
        self.short_allocs = 0
        self.pages_checked = 0

    def prepare(self, mem: GuestPageContents) -> dict:
        return {"note": "churn shapes nothing before start()"}

    def _rate(self) -> float:
        return self.params.rate

    def _cap(self, mem: GuestPageContents) -> int:
        return int(self.params.held_share * mem.alloc.ram_pages)

    def _retire_oldest(self, mem: GuestPageContents) -> None:
        name, n = self._live.popleft()
        res = mem.verify([name])
        self.pages_checked += res.pages_checked
        self.corruptions += res.bad_count
        mem.release(name)
        self._held -= n
        self.pages_freed += n

    def _step(self, mem: GuestPageContents) -> None:
        c = self.cycles
        self.cycles += 1
        pages = mem.alloc.alloc_pages(self.params.batch_pages)
        self.pages_allocated += len(pages)
        if len(pages) < self.params.batch_pages:
            self.short_allocs += 1
        if len(pages):
            name = f"churn:{self.seed}:{c}"
            mem.hold(name, pages, (self.seed * 0x9E3779B97F4A7C15 + c) & _M64)
            self._live.append((name, len(pages)))
            self._held += len(pages)
        cap = self._cap(mem)
        while self._live and (self._held > cap or len(pages) < self.params.batch_pages):
            self._retire_oldest(mem)
            if len(pages) < self.params.batch_pages and self._held <= cap:
                break

    def _finish(self, mem: GuestPageContents) -> dict:
        while self._live:
            self._retire_oldest(mem)
        return {"cycles": self.cycles, "pages_churned": self.pages_allocated, "pages_freed": self.pages_freed,
                "pages_checked": self.pages_checked, "corruptions": self.corruptions,
                "short_allocs": self.short_allocs}
