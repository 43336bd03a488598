"""The guest kernel model's page allocator: a binary buddy allocator (orders 0..10)
over the guest's RAM PFNs.

Why it exists: which pages the balloon gets, and how contiguous they are, depends
on the guest's fragmentation, and that is what decides how much the range and
bitmap protocols save over per-PFN messages. So the allocator hands out pages the
way Linux's buddy allocator does (lowest order first, split the smallest larger
block, lower half out, upper halves back to the lower orders), and it must work
at 16 GiB without a Python object or a Python loop per page:

* one uint8 state byte per PFN over [0, max_pfn rounded up to an order-10 block):
  NOT_RAM, KERNEL, USED, FREE_TAIL, or 0..10 = head of a free block of that order.
  Head bytes make the buddy test O(1) and vectorized; the whole array also gives
  vectorized double-free detection (4.4 MiB for a 16 GiB guest);
* per order, a sorted numpy int64 array of free block start PFNs (an idle 8 GiB
  guest is ~2048 order-10 entries). Allocation takes the lowest PFNs first, so a
  run is deterministic for a given history.

Buddy blocks are naturally aligned, so "every page of these order-k blocks" is a
row fancy-index on the state array reshaped to (-1, 2**k): no per-page loop.
"""
from __future__ import annotations

import threading
from typing import Callable

import numpy as np

from device.virtio.layout import GuestLayout

MAX_ORDER = 10  # orders 0..10, like Linux's MAX_PAGE_ORDER
MAX_BLOCK = 1 << MAX_ORDER

# per-page state values (0..MAX_ORDER = head of a free block of that order)
FREE_TAIL = 0xFC  # free, inside a free block but not its head
USED = 0xFD  # allocated (alloc_pages / alloc_block / alloc_range / take_free_block / reserve)
KERNEL = 0xFE  # the guest kernel's own pages: never freeable
NOT_RAM = 0xFF  # MMIO hole or beyond RAM

OomCallback = Callable[[int], int]


def _aligned_blocks(start: int, end: int) -> list[tuple[int, int]]:
    """Decompose the PFN range [start, end) into maximal naturally aligned buddy
    blocks (start, order). Loops per block piece: at most ~2*MAX_ORDER pieces plus
    the order-10 middle, which the caller expands with arange."""
    out: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        order = MAX_ORDER
        while order > 0 and (pos & ((1 << order) - 1) or pos + (1 << order) > end):
            order -= 1
        out.append((pos, order))
        pos += 1 << order
    return out


def _blocks_by_order(start: int, end: int) -> dict[int, np.ndarray]:
    """Like _aligned_blocks, but the order-10 middle as one arange (an idle 16 GiB
    guest is 4096 blocks: no Python loop per block either)."""
    res: dict[int, list[np.ndarray]] = {}
    if end <= start:
        return {}
    a = -(-start // MAX_BLOCK) * MAX_BLOCK
    b = (end // MAX_BLOCK) * MAX_BLOCK
    if a < b:
        res.setdefault(MAX_ORDER, []).append(np.arange(a, b, MAX_BLOCK, dtype=np.int64))
        pieces = _aligned_blocks(start, a) + _aligned_blocks(b, end)
    else:
        pieces = _aligned_blocks(start, end)
    for s, o in pieces:
        res.setdefault(o, []).append(np.array([s], dtype=np.int64))
    return {o: np.sort(np.concatenate(v)) for o, v in res.items()}


class BuddyAllocator:
    """Buddy allocator over guest RAM PFNs; thread-safe (one lock guards all state)."""

    def __init__(self, layout: GuestLayout, reserved_pages: int = 4096) -> None:
        if reserved_pages < 0 or reserved_pages > layout.ram_pages:
            raise ValueError(
                f"reserved_pages must be in [0, {layout.ram_pages}] (the guest's RAM pages), got {reserved_pages}"
            )
        self.layout = layout
        self.max_pfn = layout.max_pfn
        self.ram_pages = layout.ram_pages
        self.lock = threading.Lock()
        self._oom_notifier: OomCallback | None = None
        # padded to a whole order-10 block so every buddy index and reshape is in bounds
        self._padded = -(-self.max_pfn // MAX_BLOCK) * MAX_BLOCK
        self._state = np.full(self._padded, NOT_RAM, dtype=np.uint8)
        self._free: list[np.ndarray] = [np.empty(0, dtype=np.int64) for _ in range(MAX_ORDER + 1)]
        self._nfree = 0
        self.kernel_pages = reserved_pages
        # Free page reporting (device/guest/page_reporting_driver.py) sets these: one flag per
        # aligned 2**reported_order block, "reported to the host and not freed since".
        self.reported: np.ndarray | None = None
        self.reported_order = 0
        self.free_listener: Callable[[np.ndarray], None] | None = None   # called after free_pages
        # counters for reports and probes
        self.stats = {"alloc_calls": 0, "pages_allocated": 0, "free_calls": 0, "pages_freed": 0,
                      "oom_calls": 0, "oom_pages_freed": 0, "hint_blocks_taken": 0}

        left = reserved_pages
        for r in layout.regions:
            lo, hi = r.first_pfn, r.end_pfn
            k = min(left, hi - lo)
            self._state[lo : lo + k] = KERNEL
            left -= k
            self._add_range_free(lo + k, hi)

    # ------------------------------------------------------------------ internals
    def _rows(self, order: int) -> np.ndarray:
        """The state array viewed as one row per aligned order-`order` block."""
        return self._state.reshape(-1, 1 << order)

    def _mark_blocks(self, order: int, starts: np.ndarray, value: int) -> None:
        if len(starts):
            self._rows(order)[starts >> order] = value

    def _list_insert(self, order: int, starts: np.ndarray) -> None:
        """Insert free blocks (state already FREE_TAIL) into the sorted free list and
        mark their heads."""
        if not len(starts):
            return
        starts = np.sort(starts)
        lst = self._free[order]
        self._free[order] = np.insert(lst, np.searchsorted(lst, starts), starts)
        self._state[starts] = order

    def _list_remove(self, order: int, starts: np.ndarray) -> None:
        if not len(starts):
            return
        lst = self._free[order]
        pos = np.searchsorted(lst, starts)
        if np.any(pos >= len(lst)) or np.any(lst[np.minimum(pos, len(lst) - 1)] != starts):
            raise AssertionError(f"buddy allocator state corrupt: order-{order} blocks missing from free list")
        self._free[order] = np.delete(lst, pos)

    def _add_range_free(self, start: int, end: int) -> None:
        """Make every page of [start, end) a free page (they were not free before)."""
        if end <= start:
            return
        self._state[start:end] = FREE_TAIL
        for o, starts in _blocks_by_order(start, end).items():
            self._list_insert(o, starts)
        self._nfree += end - start

    def _take_front(self, order: int, count: int) -> np.ndarray:
        lst = self._free[order]
        taken, self._free[order] = lst[:count], lst[count:]
        return taken

    def _alloc_locked(self, n: int) -> np.ndarray:
        """n order-0 pages, in the order Linux would hand them out one by one.

        Sequentially, the allocator drains order 0, then splits one order-1 block
        (lower page out, upper page to order 0, then that one), and so on: each
        split block is consumed completely, in ascending PFN order, before the next
        block is touched, because its leftover pieces always sit at lower orders
        than any other free block. So the batch result is: all order-0 blocks, then
        whole order-1 blocks, ..., and finally a prefix of one block whose remainder
        goes back to the free lists as aligned pieces. Vectorized per order."""
        out: list[np.ndarray] = []
        need = n
        for order in range(MAX_ORDER + 1):
            if need <= 0:
                break
            size = 1 << order
            lst = self._free[order]
            whole = min(need >> order, len(lst))
            if whole:
                starts = self._take_front(order, whole)
                self._mark_blocks(order, starts, USED)
                out.append((starts[:, None] + np.arange(size, dtype=np.int64)).ravel())
                need -= whole << order
            if 0 < need < size and len(self._free[order]):
                # the last, partially used block: its prefix goes out, the rest is
                # returned to the lower orders exactly as successive splits leave it
                s = int(self._take_front(order, 1)[0])
                self._state[s : s + need] = USED
                self._state[s + need : s + size] = FREE_TAIL
                for ps, po in _aligned_blocks(s + need, s + size):
                    self._list_insert(po, np.array([ps], dtype=np.int64))
                out.append(np.arange(s, s + need, dtype=np.int64))
                need = 0
        pages = np.concatenate(out) if out else np.empty(0, dtype=np.int64)
        self._nfree -= len(pages)
        return pages

    def _alloc_block_locked(self, order: int) -> int | None:
        for o in range(order, MAX_ORDER + 1):
            if len(self._free[o]):
                s = int(self._take_front(o, 1)[0])
                # split: lower part out, upper halves back to orders o-1 .. order
                for k in range(o - 1, order - 1, -1):
                    half = s + (1 << k)
                    self._list_insert(k, np.array([half], dtype=np.int64))
                self._state[s : s + (1 << order)] = USED
                self._nfree -= 1 << order
                return s
        return None

    def _check_order(self, order: int) -> None:
        if not isinstance(order, (int, np.integer)) or isinstance(order, bool) or not 0 <= order <= MAX_ORDER:
            raise ValueError(f"order must be an integer in [0, {MAX_ORDER}], got {order!r}")

    # ------------------------------------------------------------------ allocation
    def set_oom_notifier(self, callback: OomCallback | None) -> None:
        """Register the deflate-on-OOM hook (Linux's register_oom_notifier): called with
        the shortfall when an allocation that may OOM comes up short; returns the
        number of pages it freed."""
        self._oom_notifier = callback

    def alloc_pages(self, n: int, oom_callback: OomCallback | None = None, *, notify_oom: bool = True) -> np.ndarray:
        """Allocate n order-0 pages (int64 PFNs, in hand-out order). Returns fewer
        than n when memory runs out; then `oom_callback` (or the registered notifier,
        if notify_oom) is called once with the shortfall, outside the lock, and the
        allocation retried once. The balloon's own inflate passes notify_oom=False
        (Linux's balloon allocates with __GFP_NORETRY and never triggers the OOM path)."""
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
            raise ValueError(f"alloc_pages: n must be a non-negative integer, got {n!r}")
        n = int(n)
        with self.lock:
            pages = self._alloc_locked(n)
            self.stats["alloc_calls"] += 1
            self.stats["pages_allocated"] += len(pages)
        cb = oom_callback if oom_callback is not None else (self._oom_notifier if notify_oom else None)
        if len(pages) < n and cb is not None:
            short = n - len(pages)
            freed = int(cb(short) or 0)
            with self.lock:
                self.stats["oom_calls"] += 1
                self.stats["oom_pages_freed"] += max(freed, 0)
            if freed > 0:
                with self.lock:
                    more = self._alloc_locked(short)
                    self.stats["pages_allocated"] += len(more)
                pages = np.concatenate([pages, more])
        return pages

    def alloc_block(self, order: int) -> int | None:
        """One naturally aligned block of 2**order pages (start PFN), or None."""
        self._check_order(order)
        with self.lock:
            s = self._alloc_block_locked(order)
            self.stats["alloc_calls"] += 1
            if s is not None:
                self.stats["pages_allocated"] += 1 << order
        return s

    def alloc_blocks(self, order: int, count: int) -> np.ndarray:
        """Up to `count` naturally aligned blocks of 2**order pages (sorted start PFNs),
        taken whole from the free lists of order >= `order` (a larger block is split into
        pieces of this order, the pieces not taken go back to the order-`order` list).
        Never splits a smaller block: what the huge-page-aware balloon wants. Vectorized."""
        self._check_order(order)
        count = int(count)
        if count <= 0:
            return np.empty(0, dtype=np.int64)
        out: list[np.ndarray] = []
        with self.lock:
            need = count
            for k in range(order, MAX_ORDER + 1):
                if need <= 0:
                    break
                per = 1 << (k - order)
                take = min(len(self._free[k]), -(-need // per))
                if not take:
                    continue
                starts = self._take_front(k, take)
                pieces = (starts[:, None] + np.arange(per, dtype=np.int64) * (1 << order)).ravel()
                mine, rest = pieces[:need], pieces[need:]
                self._mark_blocks(order, mine, USED)
                if rest.size:           # the last block's unused tail goes back as aligned free blocks
                    lo, hi = int(rest[0]), int(rest[-1]) + (1 << order)
                    self._state[lo:hi] = FREE_TAIL
                    for ps, po in _aligned_blocks(lo, hi):
                        self._list_insert(po, np.array([ps], dtype=np.int64))
                out.append(mine)
                need -= mine.size
            got = np.sort(np.concatenate(out)) if out else np.empty(0, dtype=np.int64)
            self._nfree -= got.size << order
            self.stats["alloc_calls"] += 1
            self.stats["pages_allocated"] += got.size << order
        return got

    def take_free_block(self, order: int = MAX_ORDER) -> int | None:
        """Allocate one free block of 2**order pages for free-page hinting (Linux's
        get_free_page_and_send allocates an order-10 block and holds it until DONE);
        never triggers OOM handling. None when no block of that size is left."""
        self._check_order(order)
        with self.lock:
            s = self._alloc_block_locked(order)
            if s is not None:
                self.stats["hint_blocks_taken"] += 1
        return s

    def alloc_range(self, start_pfn: int, npages: int) -> np.ndarray:
        """Allocate exactly the PFNs [start_pfn, start_pfn+npages) (Linux's
        alloc_contig_range): workloads use it to place memory where a real guest's
        would be. ValueError, changing nothing, unless every page is free RAM."""
        start_pfn, npages = int(start_pfn), int(npages)
        if npages < 0 or start_pfn < 0 or start_pfn + npages > self.max_pfn:
            raise ValueError(f"alloc_range: [{start_pfn}, {start_pfn + npages}) is outside [0, max_pfn={self.max_pfn})")
        with self.lock:
            self._carve_locked(start_pfn, npages)
            self.stats["alloc_calls"] += 1
            self.stats["pages_allocated"] += npages
        return np.arange(start_pfn, start_pfn + npages, dtype=np.int64)

    def _carve_locked(self, start: int, n: int) -> None:
        end = start + n
        st = self._state[start:end]
        bad = np.flatnonzero(~((st <= MAX_ORDER) | (st == FREE_TAIL)))
        if len(bad):
            p = start + int(bad[0])
            raise ValueError(f"PFN {p} in [{start}, {end}) is not free RAM ({self._describe(p)})")
        # the free blocks overlapping the range: per order, starts in (start - 2**k, end)
        for k in range(MAX_ORDER + 1):
            lst = self._free[k]
            i0, i1 = np.searchsorted(lst, [start - (1 << k) + 1, end])
            if i1 <= i0:
                continue
            blocks = lst[i0:i1].copy()
            self._free[k] = np.delete(lst, np.arange(i0, i1))
            self._mark_blocks(k, blocks, FREE_TAIL)
            # only the first and last block can stick out of the range
            for b in {int(blocks[0]), int(blocks[-1])}:
                for lo, hi in ((b, min(start, b + (1 << k))), (max(end, b), b + (1 << k))):
                    for ps, po in _aligned_blocks(lo, hi):
                        self._list_insert(po, np.array([ps], dtype=np.int64))
        self._state[start:end] = USED
        self._nfree -= n

    def reserve(self, n: int) -> np.ndarray:
        """Take n physically contiguous pages for the kernel (rings, buffers): the
        lowest free run long enough. They become KERNEL pages (free_pages refuses
        them; unreserve() gives them back). MemoryError if no such run exists."""
        if not isinstance(n, (int, np.integer)) or n <= 0:
            raise ValueError(f"reserve: n must be a positive integer, got {n!r}")
        n = int(n)
        with self.lock:
            free = (self._state[: self.max_pfn] <= MAX_ORDER) | (self._state[: self.max_pfn] == FREE_TAIL)
            edges = np.diff(np.concatenate(([0], free.view(np.int8), [0])))
            starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
            ok = np.flatnonzero(ends - starts >= n)
            if not len(ok):
                raise MemoryError(f"reserve: no run of {n} contiguous free pages left")
            s = int(starts[ok[0]])
            self._carve_locked(s, n)
            self._state[s : s + n] = KERNEL
            self.kernel_pages += n
        return np.arange(s, s + n, dtype=np.int64)

    def unreserve(self, pfns: np.ndarray) -> None:
        """Give pages taken by reserve() back to the free lists."""
        pfns = self._as_pfns(pfns, "unreserve")
        with self.lock:
            st = self._state[pfns]
            bad = np.flatnonzero(st != KERNEL)
            if len(bad):
                p = int(pfns[bad[0]])
                raise ValueError(f"unreserve: PFN {p} is not a reserved page ({self._describe(p)})")
            self._state[pfns] = USED
            self.kernel_pages -= len(pfns)
            self._free_locked(np.sort(pfns))

    # ------------------------------------------------------------------ freeing
    def _describe(self, pfn: int) -> str:
        if pfn < 0 or pfn >= self.max_pfn:
            return f"beyond RAM, max_pfn is {self.max_pfn}"
        s = int(self._state[pfn])
        if s == NOT_RAM:
            return "not RAM: MMIO hole"
        if s == KERNEL:
            return "reserved for the kernel"
        if s == USED:
            return "allocated"
        return "already free"

    @staticmethod
    def _as_pfns(pfns, what: str) -> np.ndarray:
        a = np.asarray(pfns)
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{what}: PFNs must be integers, got dtype {a.dtype}")
        return a.astype(np.int64, copy=False).ravel()

    def free_pages(self, pfns: np.ndarray) -> int:
        """Free order-0 pages, merging buddies (vectorized: sort, then per order pair
        up blocks freed together and blocks whose buddy is already a free block).
        Everything is checked before anything changes: a page that is not RAM, is
        kernel-reserved, is already free or appears twice raises ValueError and the
        allocator is left as it was. Returns the number of pages freed."""
        pfns = self._as_pfns(pfns, "free_pages")
        if not len(pfns):
            return 0
        pfns = np.sort(pfns)
        with self.lock:
            out = np.flatnonzero((pfns < 0) | (pfns >= self.max_pfn))
            if len(out):
                p = int(pfns[out[0]])
                raise ValueError(f"free_pages: PFN {p} is not guest RAM (valid PFNs are below max_pfn {self.max_pfn})")
            dup = np.flatnonzero(pfns[1:] == pfns[:-1])
            if len(dup):
                raise ValueError(f"free_pages: double free: PFN {int(pfns[dup[0]])} appears twice in one call")
            st = self._state[pfns]
            bad = np.flatnonzero(st != USED)
            if len(bad):
                p = int(pfns[bad[0]])
                what = "double free" if st[bad[0]] <= MAX_ORDER or st[bad[0]] == FREE_TAIL else "refused"
                raise ValueError(f"free_pages: {what}: PFN {p} is {self._describe(p)} ({len(bad)} bad PFNs in this call)")
            self._free_locked(pfns)
            self.stats["free_calls"] += 1
            self.stats["pages_freed"] += len(pfns)
        if self.free_listener is not None:       # outside the lock (Linux: page_reporting_notify_free)
            self.free_listener(pfns)
        return len(pfns)

    def _free_locked(self, cur: np.ndarray) -> None:
        """cur: sorted, validated USED pages. Merge upward one order at a time."""
        n = len(cur)
        if self.reported is not None:
            # free page reporting: a block freed again holds data, it must be reported anew
            self.reported[cur >> self.reported_order] = False
        self._state[cur] = FREE_TAIL
        for k in range(MAX_ORDER):
            size = 1 << k
            if not len(cur):
                break
            # (a) both buddies in this batch: sorted, so they are neighbours
            lower = (cur & size) == 0
            pair = np.zeros(len(cur), dtype=bool)
            if len(cur) > 1:
                pair[:-1] = lower[:-1] & (cur[1:] == cur[:-1] + size)
            partner = np.zeros(len(cur), dtype=bool)
            partner[1:] = pair[:-1]
            single = ~(pair | partner)
            # (b) buddy already a free block of order k
            cand = cur[single]
            buddy = cand ^ size
            has = self._state[buddy] == k
            merged_b = np.minimum(cand[has], buddy[has])
            self._list_remove(k, np.sort(buddy[has]))
            self._state[buddy[has]] = FREE_TAIL
            self._list_insert(k, cand[~has])
            cur = np.sort(np.concatenate([cur[pair], merged_b]))
        self._list_insert(MAX_ORDER, cur)
        self._nfree += n

    # ------------------------------------------------------------------ introspection
    @property
    def free_pages_count(self) -> int:
        return self._nfree

    @property
    def used_pages_count(self) -> int:
        """RAM pages not free (kernel-reserved included)."""
        return self.ram_pages - self._nfree

    def free_blocks(self, order: int) -> np.ndarray:
        """Start PFNs of the free blocks of exactly this order (sorted copy)."""
        self._check_order(order)
        with self.lock:
            return self._free[order].copy()

    def order_counts(self) -> dict[int, int]:
        with self.lock:
            return {k: len(self._free[k]) for k in range(MAX_ORDER + 1)}

    def free_page_mask(self) -> np.ndarray:
        """bool over [0, max_pfn): True for free pages, built by walking the free lists
        (what the seed's free-page bitmap does), allocating nothing."""
        mask = np.zeros(self._padded, dtype=bool)
        with self.lock:
            for k in range(MAX_ORDER + 1):
                if len(self._free[k]):
                    mask.reshape(-1, 1 << k)[self._free[k] >> k] = True
        return mask[: self.max_pfn]

    def free_blocks_at_least(self, order: int) -> np.ndarray:
        """Sorted start PFNs of every aligned 2**order-page chunk that lies in a free
        block of order >= `order` (larger blocks are listed as their 2**order pieces,
        so every entry is exactly 2**order pages)."""
        self._check_order(order)
        with self.lock:
            parts = [(self._free[k][:, None] + np.arange(0, 1 << k, 1 << order, dtype=np.int64)).ravel()
                     for k in range(order, MAX_ORDER + 1) if len(self._free[k])]
        return np.sort(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)

    def is_free(self, pfns: np.ndarray) -> np.ndarray:
        """bool per PFN: currently free (False for non-RAM and out-of-range PFNs)."""
        pfns = self._as_pfns(pfns, "is_free")
        ok = (pfns >= 0) & (pfns < self.max_pfn)
        st = self._state[np.where(ok, pfns, 0)]
        return ok & ((st <= MAX_ORDER) | (st == FREE_TAIL))

    def is_allocated(self, pfns: np.ndarray) -> np.ndarray:
        """bool per PFN: allocated by alloc_* (not free, not kernel, RAM)."""
        pfns = self._as_pfns(pfns, "is_allocated")
        ok = (pfns >= 0) & (pfns < self.max_pfn)
        return ok & (self._state[np.where(ok, pfns, 0)] == USED)

    @property
    def nbytes(self) -> int:
        """Bytes of numpy state the allocator holds (state array + free lists)."""
        return self._state.nbytes + sum(a.nbytes for a in self._free)

    def check(self) -> None:
        """Full consistency check (tests, debugging): free lists, head bytes, and free
        page count agree; every free block is aligned RAM; no two free buddies of the
        same order were left unmerged. O(RAM) numpy work."""
        with self.lock:
            mask = np.zeros(self._padded, dtype=bool)
            for k in range(MAX_ORDER + 1):
                lst = self._free[k]
                assert np.all(np.diff(lst) > 0), f"order {k} list not sorted/unique"
                assert np.all(lst % (1 << k) == 0), f"order {k} block not aligned"
                assert np.all(self._state[lst] == k), f"order {k} head byte wrong"
                rows = mask.reshape(-1, 1 << k)[lst >> k]
                assert not rows.any(), f"order {k} blocks overlap"
                mask.reshape(-1, 1 << k)[lst >> k] = True
                if k < MAX_ORDER and len(lst):
                    assert not np.any(self._state[lst ^ (1 << k)] == k), f"order {k} unmerged buddies"
            st = self._state
            freeish = (st <= MAX_ORDER) | (st == FREE_TAIL)
            assert np.array_equal(mask, freeish), "free lists and state bytes disagree"
            assert int(mask.sum()) == self._nfree, "free page count wrong"
            assert np.count_nonzero(st <= MAX_ORDER) == sum(len(x) for x in self._free), "stray head bytes"
