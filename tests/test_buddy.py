"""The guest kernel model's buddy allocator, on real guest layouts (6 GiB: two RAM
regions around the 3-4 GiB MMIO hole; 16 GiB for the memory budget)."""
from __future__ import annotations

import numpy as np
import pytest

from device.guest.buddy import MAX_ORDER, BuddyAllocator
from device.virtio.layout import GiB, GuestLayout, PAGE_SHIFT
from workloads.shapes import run_lengths

HOLE = (3 * GiB >> PAGE_SHIFT, 4 * GiB >> PAGE_SHIFT)


@pytest.fixture
def layout6() -> GuestLayout:
    return GuestLayout.pc(6144)


@pytest.fixture
def a6(layout6) -> BuddyAllocator:
    return BuddyAllocator(layout6)


def in_hole(p: np.ndarray) -> np.ndarray:
    return (p >= HOLE[0]) & (p < HOLE[1])


def test_fresh_allocator_is_all_order10_but_kernel(a6, layout6):
    assert a6.free_pages_count == layout6.ram_pages - 4096
    counts = a6.order_counts()
    assert counts[MAX_ORDER] * 1024 == a6.free_pages_count
    assert sum(counts.values()) == counts[MAX_ORDER]
    assert a6.used_pages_count == 4096
    assert not in_hole(a6.free_blocks(MAX_ORDER)).any()
    a6.check()


def test_no_hole_page_ever_handed_out(a6, layout6):
    pages = a6.alloc_pages(layout6.ram_pages)  # more than there is: gets all free pages
    assert len(pages) == layout6.ram_pages - 4096
    assert np.all(np.diff(np.sort(pages)) > 0)  # no page twice
    assert not in_hole(pages).any()
    assert layout6.ram_pfn_mask(pages).all()
    assert (pages >= 4096).all()  # the kernel's pages stay the kernel's
    assert a6.free_pages_count == 0
    assert a6.alloc_block(0) is None and a6.take_free_block(10) is None
    a6.check()


def test_alloc_free_round_trip_restores_order10_blocks(a6):
    before = a6.order_counts()
    rng = np.random.default_rng(7)
    batches = [a6.alloc_pages(int(n)) for n in rng.integers(1, 50000, 20)]
    a6.check()
    assert a6.order_counts() != before
    order = rng.permutation(len(batches))
    for i in order:  # free in random order, each batch shuffled
        a6.free_pages(rng.permutation(batches[i]))
        a6.check()
    assert a6.order_counts() == before


def test_random_interleaving_keeps_invariants(a6):
    rng = np.random.default_rng(11)
    held: list[np.ndarray] = []
    for _ in range(60):
        if held and rng.random() < 0.45:
            b = held.pop(int(rng.integers(len(held))))
            # free a random part now, the rest later: splits blocks unevenly
            cut = int(rng.integers(len(b) + 1))
            a6.free_pages(b[:cut])
            if cut < len(b):
                held.append(b[cut:])
        else:
            held.append(a6.alloc_pages(int(rng.integers(1, 30000))))
        a6.check()
    a6.free_pages(np.concatenate(held))
    a6.check()
    assert a6.order_counts()[MAX_ORDER] * 1024 == a6.free_pages_count


def test_batch_alloc_equals_successive_single_page_allocs(layout6):
    """The vectorized batch must hand out exactly what Linux's one-page-at-a-time
    allocation would: same pages, same order, same free lists afterwards."""
    def fragmented() -> BuddyAllocator:
        a = BuddyAllocator(layout6)
        p = a.alloc_pages(300000)
        rng = np.random.default_rng(3)
        a.free_pages(p[rng.random(len(p)) < 0.3])  # a mix of orders 0..10
        return a

    x, y = fragmented(), fragmented()
    assert sum(1 for k, v in x.order_counts().items() if v) >= 6
    batch = x.alloc_pages(20000)
    single = np.concatenate([y.alloc_pages(1) for _ in range(20000)])
    assert np.array_equal(batch, single)
    assert x.order_counts() == y.order_counts()
    for k in range(MAX_ORDER + 1):
        assert np.array_equal(x.free_blocks(k), y.free_blocks(k))


def test_idle_guest_gives_long_runs_fragmented_gives_short(a6, layout6):
    idle = a6.alloc_pages(200000)
    runs = run_lengths(idle)
    assert len(runs) == 1 and runs[0] == 200000
    # fragment: every other page of 1 GiB held
    a6.free_pages(idle)
    region = a6.alloc_pages(1 << 18)
    a6.free_pages(region[::2])
    frag = a6.alloc_pages(50000)
    assert np.all(run_lengths(frag) == 1)  # isolated pages first (order 0 is taken first)
    assert len(run_lengths(frag)) == 50000


def test_lowest_orders_first_and_split_gives_lower_half(a6):
    blk = a6.alloc_block(10)
    a6.free_pages(np.array([blk + 5]))  # order-0 block
    a6.free_pages(np.arange(blk + 8, blk + 16))  # order-3 block
    p = a6.alloc_pages(1)
    assert p.tolist() == [blk + 5]
    p = a6.alloc_pages(3)  # order 3 split: lower pages first
    assert p.tolist() == [blk + 8, blk + 9, blk + 10]
    assert a6.free_blocks(0).tolist() == [blk + 11] and a6.free_blocks(2).tolist() == [blk + 12]
    a6.check()


def test_double_free_and_bad_pfns_refused_without_change(a6, layout6):
    p = a6.alloc_pages(1000)
    a6.free_pages(p[:10])
    snap = (a6.order_counts(), a6.free_pages_count)
    with pytest.raises(ValueError, match="double free"):
        a6.free_pages(p[5:20])  # 5 already free
    with pytest.raises(ValueError, match="double free.*appears twice"):
        a6.free_pages(np.array([p[30], p[30]]))
    with pytest.raises(ValueError, match="MMIO hole"):
        a6.free_pages(np.array([p[40], HOLE[0] + 7]))
    with pytest.raises(ValueError, match="not guest RAM"):
        a6.free_pages(np.array([layout6.max_pfn]))
    with pytest.raises(ValueError, match="not guest RAM"):
        a6.free_pages(np.array([-1]))
    with pytest.raises(ValueError, match="kernel"):
        a6.free_pages(np.array([0]))
    with pytest.raises(ValueError, match="integers"):
        a6.free_pages(np.array([1.5]))
    assert (a6.order_counts(), a6.free_pages_count) == snap
    a6.free_pages(p[10:])  # the pages named alongside the bad ones are still allocated
    a6.check()


def test_free_page_mask_and_hint_blocks(a6, layout6):
    p = a6.alloc_pages(5000)
    a6.free_pages(p[::3])
    mask = a6.free_page_mask()
    assert mask.shape == (layout6.max_pfn,) and mask.dtype == bool
    assert int(mask.sum()) == a6.free_pages_count
    assert np.array_equal(mask, a6.is_free(np.arange(layout6.max_pfn)))
    assert not mask[HOLE[0] : HOLE[1]].any()
    b10 = a6.free_blocks_at_least(10)
    assert np.array_equal(b10, a6.free_blocks(10))
    b9 = a6.free_blocks_at_least(9)
    assert len(b9) == 2 * len(b10) + a6.order_counts()[9]
    assert np.all(b9 % 512 == 0) and all(mask[s : s + 512].all() for s in b9[:50])
    n10 = a6.order_counts()[10]
    blk = a6.take_free_block(10)
    assert blk % 1024 == 0 and a6.order_counts()[10] == n10 - 1
    assert a6.is_allocated(np.arange(blk, blk + 1024)).all()
    a6.free_pages(np.arange(blk, blk + 1024))
    assert a6.order_counts()[10] == n10
    a6.check()


def test_alloc_block_splits_smallest_larger(a6):
    s = a6.alloc_block(3)
    assert s % 8 == 0
    counts = a6.order_counts()
    assert [counts[k] for k in range(3, 10)] == [1] * 7  # upper halves of the split order-10 block
    with pytest.raises(ValueError, match="order"):
        a6.alloc_block(11)
    a6.free_pages(np.arange(s, s + 8))
    assert a6.order_counts()[10] * 1024 == a6.free_pages_count
    a6.check()


def test_oom_callback_frees_then_retries_once(a6, layout6):
    everything = a6.alloc_pages(a6.free_pages_count)
    calls = []

    def deflate(short: int) -> int:
        calls.append(short)
        k = len(calls)
        return a6.free_pages(everything[(k - 1) * 100 : k * 100])

    got = a6.alloc_pages(300, oom_callback=deflate)
    assert calls == [300] and len(got) == 100  # one retry only, with what was freed
    a6.set_oom_notifier(deflate)
    assert len(a6.alloc_pages(5, notify_oom=False)) == 0 and calls == [300]  # the balloon's own path
    assert len(a6.alloc_pages(5)) == 5 and calls == [300, 5]
    assert len(a6.alloc_pages(95, notify_oom=False)) == 95  # the rest of what was freed
    assert len(a6.alloc_pages(5, oom_callback=lambda short: 0)) == 0 and calls == [300, 5]
    assert a6.stats["oom_calls"] == 3
    a6.check()


def test_reserve_is_contiguous_and_not_freeable(a6):
    r = a6.reserve(5)
    assert np.array_equal(r, np.arange(r[0], r[0] + 5))
    assert a6.kernel_pages == 4096 + 5
    with pytest.raises(ValueError, match="kernel"):
        a6.free_pages(r[:1])
    a6.check()
    a6.unreserve(r)
    assert a6.kernel_pages == 4096
    assert a6.order_counts()[10] * 1024 == a6.free_pages_count
    a6.check()


def test_alloc_range_exact_and_refusals(a6):
    p = a6.alloc_range(10000, 3000)
    assert np.array_equal(p, np.arange(10000, 13000))
    a6.check()
    with pytest.raises(ValueError, match="not free RAM"):
        a6.alloc_range(12000, 10)
    with pytest.raises(ValueError, match="not free RAM"):
        a6.alloc_range(HOLE[0] - 4, 8)
    a6.free_pages(p)
    assert a6.order_counts()[10] * 1024 == a6.free_pages_count


def test_16gib_allocator_is_cheap():
    lay = GuestLayout.pc(16384)
    a = BuddyAllocator(lay)
    assert a.order_counts()[10] == (lay.ram_pages - 4096) // 1024
    # one byte per PFN (17 GiB of PFN space incl. the hole) plus small free lists
    assert a.nbytes < 5 * 2**20
    p = a.alloc_pages(1 << 18)  # 1 GiB
    assert len(run_lengths(p)) == 1
    assert a.nbytes < 5 * 2**20
    a.free_pages(p)
    assert a.order_counts()[10] == (lay.ram_pages - 4096) // 1024
