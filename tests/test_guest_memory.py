"""Guest page contents on a real memfd: pattern, fingerprints, verification, dirty log."""
from __future__ import annotations

import os

import numpy as np
import pytest

from device.guest.buddy import BuddyAllocator
from device.guest.page_contents import GuestPageContents
from device.virtio.ram import GuestRAM
from device.virtio.layout import GiB, PAGE_SHIFT, PAGE_SIZE, GuestLayout

HIGH = 4 * GiB >> PAGE_SHIFT  # first PFN above the MMIO hole


@pytest.fixture
def gm():
    lay = GuestLayout.pc(6144)  # sparse: costs only what is written
    ram = GuestRAM.create(lay)
    mem = GuestPageContents(ram, BuddyAllocator(lay))
    yield mem
    mem.close()
    ram.close()


def read_page(mem: GuestPageContents, pfn: int) -> np.ndarray:
    off = int(mem.layout.pfn_to_offset(np.array([pfn]))[0])
    return np.frombuffer(os.pread(mem.ram.fd, PAGE_SIZE, off), dtype=np.uint64)


def some_pages(mem: GuestPageContents) -> np.ndarray:
    """Allocated pages on both sides of the hole, some contiguous, some scattered."""
    a = mem.alloc
    low = a.alloc_range(5000, 300)
    high = a.alloc_range(HIGH + 77, 40)
    scattered = np.array([a.alloc_block(0) for _ in range(5)])
    return np.concatenate([low[::3], high, scattered, a.alloc_range(600000, 1)])


def test_memfd_grows_only_for_written_pages(gm):
    assert gm.ram.allocated_bytes() == 0
    p = some_pages(gm)
    gm.write_pattern(p, seed=9)
    assert gm.ram.allocated_bytes() == len(p) * PAGE_SIZE
    mask = gm.ram.data_page_mask()
    rows = gm.layout.pfn_to_offset(p) >> PAGE_SHIFT
    assert mask.sum() == len(p) and mask[rows].all()
    # fingerprinting or expecting never faults untouched memory in
    gm.fingerprints(np.arange(HIGH, HIGH + 20000))
    gm.expected_fingerprints(np.arange(0, 1 << 20), 3)
    assert gm.ram.allocated_bytes() == len(p) * PAGE_SIZE


def test_pattern_is_nonzero_deterministic_and_fingerprints_match(gm):
    p = some_pages(gm)
    gm.write_pattern(p, seed=1)
    fp = gm.fingerprints(p)
    assert np.array_equal(fp, gm.expected_fingerprints(p, 1))
    assert len(set(fp.tolist())) == len(p)  # distinct per page
    assert not np.array_equal(fp, gm.expected_fingerprints(p, 2))  # and per seed
    for pfn in (int(p[0]), int(p[-1])):
        words = read_page(gm, pfn)
        assert np.all(words != 0)
    # order of the query does not matter
    perm = np.random.default_rng(0).permutation(len(p))
    assert np.array_equal(gm.fingerprints(p[perm]), fp[perm])
    # a never-written page reads as zeros: fingerprint 0, never the expected value
    assert gm.fingerprints(np.array([HIGH + 5000]))[0] == 0


def test_verify_catches_one_changed_byte_and_a_discarded_page(gm):
    p = some_pages(gm)
    gm.hold("data", p, seed=5)
    res = gm.verify()
    assert res.ok and res.pages_checked == len(p) and res.bad_pfns == []

    victim = int(p[len(p) // 2])
    view = gm.ram.page_view(victim)
    old = view[1234]
    view[1234] = old ^ 0x01
    res = gm.verify()
    assert not res.ok and res.bad_pfns == [victim] and res.bad_count == 1
    view[1234] = old
    del view
    assert gm.verify().ok

    gone = int(p[-3])  # above the hole: offsets differ from PFNs there
    off = int(gm.layout.pfn_to_offset(np.array([gone]))[0])
    before = gm.ram.allocated_bytes()
    gm.ram.discard(off, PAGE_SIZE)
    assert gm.ram.allocated_bytes() == before - PAGE_SIZE
    res = gm.verify()
    assert not res.ok and res.bad_pfns == [gone]
    assert gm.ram.allocated_bytes() == before - PAGE_SIZE  # verification read it without faulting it in


def test_holdings_release_rewrite_and_refusals(gm):
    a = gm.alloc
    free0 = a.free_pages_count
    x = a.alloc_pages(1000)
    y = a.alloc_pages(500)
    gm.hold("x", x, 1)
    gm.hold("y", y, 2)
    assert gm.holdings() == {"x": 1000, "y": 500}
    assert np.array_equal(gm.held_pfns(), np.sort(np.concatenate([x, y])))
    with pytest.raises(ValueError, match="already exists"):
        gm.hold("x", a.alloc_pages(1), 1)
    with pytest.raises(ValueError, match="already held by 'x'"):
        gm.hold("z", x[:3], 1)
    with pytest.raises(ValueError, match="not an allocated page"):
        gm.hold("z", a.free_blocks(10)[:1], 1)
    with pytest.raises(ValueError, match="not guest RAM"):
        gm.hold("z", np.array([3 * GiB >> PAGE_SHIFT]), 1)
    with pytest.raises(ValueError, match="seed"):
        gm.hold("z", a.alloc_pages(1), -1)
    with pytest.raises(ValueError, match="no holding named 'nope'"):
        gm.release("nope")
    assert "z" not in gm.holdings()

    gm.rewrite(x[:100], 77)  # the record follows the data
    assert gm.verify().ok
    assert np.array_equal(gm.fingerprints(x[:100]), gm.expected_fingerprints(x[:100], 77))
    with pytest.raises(ValueError, match="not held"):
        gm.rewrite(a.alloc_pages(1), 3)

    assert gm.release("x") == 1000
    assert gm.verify().pages_checked == 500
    assert a.is_free(x).all()
    gm.release("y")
    assert a.free_pages_count == free0 - 3  # the three single pages taken by the refusals above
    a.check()


def test_touch_stale_leaves_free_pages_with_data(gm):
    a = gm.alloc
    p = a.alloc_pages(2048)
    gm.touch_stale(p, 4)
    assert a.is_free(p).all()
    assert gm.ram.allocated_bytes() == 2048 * PAGE_SIZE
    assert np.array_equal(gm.fingerprints(p), gm.expected_fingerprints(p, 4))
    with pytest.raises(ValueError, match="not an allocated page"):
        gm.touch_stale(p[:1], 4)  # already free: writing it would be a use-after-free
    a.check()


def test_dirty_log_sees_every_write(gm):
    dirty = np.zeros(gm.layout.max_pfn, dtype=np.uint8)
    inflight = np.zeros(1, dtype=np.uint64)
    with pytest.raises(ValueError, match="dirty log"):
        gm.attach_dirty_log(np.zeros(10, dtype=np.uint8))
    gm.attach_dirty_log(dirty, inflight)
    a = gm.alloc
    held = a.alloc_pages(3000)
    gm.hold("h", held, 1)
    stale = a.alloc_pages(1000)
    gm.touch_stale(stale, 2)
    gm.rewrite(held[:10], 3)
    gm.write_pattern(np.array([HIGH + 1]), 4)
    want = np.zeros_like(dirty)
    want[np.concatenate([held, stale, [HIGH + 1]])] = 1
    assert np.array_equal(dirty, want)
    assert inflight[0] == 0
    # the kernel's own oracle agrees with the log
    rows = gm.layout.pfn_to_offset(np.flatnonzero(dirty)) >> PAGE_SHIFT
    assert gm.ram.data_page_mask()[rows].all()
    gm.detach_dirty_log()
    dirty[:] = 0
    gm.rewrite(held[:10], 5)
    assert not dirty.any()


def test_large_scattered_fingerprints_bounded(gm):
    """64 MiB of pages spread with gaps over 1.5 GiB: chunked reads still agree."""
    a = gm.alloc
    p = a.alloc_pages(3 * 2**18 // 2)  # 1.5 GiB allocated...
    sel = p[np.random.default_rng(1).random(len(p)) < 0.04]  # ...~60 MiB of it written
    gm.write_pattern(sel, 8)
    assert np.array_equal(gm.fingerprints(sel), gm.expected_fingerprints(sel, 8))
    assert gm.ram.allocated_bytes() == len(sel) * PAGE_SIZE
