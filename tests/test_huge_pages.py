"""Huge host pages: the per-host-page sub-page tracker (full and QEMU's), page_shift 21
bitmaps, the huge-page-aware balloon allocation, and the device over a real THP memfd,
where what was freed is read back from the kernel (st_blocks, SEEK_DATA)."""
from __future__ import annotations

import numpy as np
import pytest

from device.virtio import wire
from device.guest.alloc_policy import allocate_for_balloon
from device.virtio.backing import BackingError, ensure_backing
from device.guest.buddy import BuddyAllocator
from device.virtio.features import F_RING_EVENT_IDX, Q_DEFLATE, Q_INFLATE, bit
from device.virtio.protocols import protocol_device_features
from device.rig import DeviceRig
from device.vmm.huge_pages import HostPageTracker, host_page_runs
from device.virtio.layout import PAGE_SHIFT, GuestLayout

PER = 512


# --- the tracker ------------------------------------------------------------------------------
def test_full_tracking_discards_a_host_page_whose_sub_pages_came_in_any_requests():
    t = HostPageTracker(4 * PER, 21, "full")
    assert t.inflate(np.arange(0, 256)).size == 0                       # half of host page 0
    assert t.inflate(np.arange(PER + 3, PER + 10)).size == 0            # a bit of host page 1
    assert t.inflate(np.arange(256, 512)[::-1]).tolist() == [0]         # the rest, in any order
    assert t.snapshot()["partial_host_pages"] == 1 and t.snapshot()["whole_discarded"] == 1


def test_qemu_tracking_forgets_a_partial_page_when_another_host_page_comes_or_the_request_ends():
    t = HostPageTracker(4 * PER, 21, "qemu")
    assert t.inflate(np.arange(0, 256)).size == 0
    assert t.inflate(np.arange(256, 512)).size == 0          # whole now, but over two requests: kept
    assert t.snapshot()["whole_not_discarded"] == 1
    seq = np.concatenate([np.arange(PER, PER + 100), [3 * PER], np.arange(PER + 100, 2 * PER)])
    assert t.inflate(seq).size == 0                          # interrupted by a page of host page 3
    assert t.inflate(np.arange(2 * PER, 3 * PER)).tolist() == [2]       # one unbroken request: freed


def test_deflate_of_a_partial_page_and_of_a_discarded_one():
    t = HostPageTracker(2 * PER, 21, "full")
    t.inflate(np.arange(0, 300))
    t.deflate(np.arange(0, 10))                               # partial: nothing to free, bits cleared
    assert t.inflate(np.arange(300, PER)).size == 0          # 10 sub-pages are back in the guest
    assert t.inflate(np.arange(0, 10)).tolist() == [0]
    t.deflate(np.array([5]))                                  # a discarded page is partial again...
    assert not t.discarded[0] and t.count[0] == PER - 1
    assert t.inflate(np.array([5])).tolist() == [0]          # ...and freed again when whole


def test_full_tracking_never_frees_a_host_page_that_is_not_whole_random_sequences():
    rng = np.random.default_rng(16)
    t = HostPageTracker(8 * PER, 21, "full")
    ballooned = np.zeros(8 * PER, dtype=bool)
    for _ in range(300):
        free = np.flatnonzero(~ballooned)
        held = np.flatnonzero(ballooned)
        if held.size and rng.random() < 0.3:
            out = rng.choice(held, size=min(held.size, int(rng.integers(1, 600))), replace=False)
            ballooned[out] = False
            t.deflate(out)
            continue
        if not free.size:
            continue
        take = rng.choice(free, size=min(free.size, int(rng.integers(1, 700))), replace=False)
        ballooned[take] = True
        done = t.inflate(take)
        whole = ballooned.reshape(-1, PER).all(axis=1)
        assert whole[done].all()
        assert np.array_equal(t.discarded, whole)           # every whole host page got freed, once


def test_host_page_runs_merge_neighbours():
    offs, lens = host_page_runs(np.array([1, 2, 3, 7]), 21)
    assert offs.tolist() == [1 << 21, 7 << 21] and lens.tolist() == [3 << 21, 1 << 21]


# --- page_shift 21 bitmaps ---------------------------------------------------------------------
def test_page_shift_21_bitmaps_round_trip_and_refuse_what_they_must():
    blocks = np.array([2, 3, 9])
    (raw,) = wire.encode_bitmap_requests(blocks, pages_per_request=64, page_shift=21, cmd=0)
    hdr, s, ln = wire.decode_bitmap(raw, max_pfn=16 * PER, page_shifts=wire.BITMAP_PAGE_SHIFTS)
    assert hdr.page_shift == 21 and hdr.start_pfn == 2 * PER
    assert s.tolist() == [2 * PER, 9 * PER] and ln.tolist() == [2 * PER, PER]
    with pytest.raises(wire.WireError) as e:                 # the default still takes 4 KiB bitmaps only
        wire.decode_bitmap(raw, max_pfn=16 * PER)
    assert e.value.reason == "bad-page-shift"
    bad = wire.BitmapHeader(0, 21, 0, 0, 1, 5, 1).pack() + b"\x01"
    with pytest.raises(wire.WireError) as e:
        wire.decode_bitmap(bad, max_pfn=16 * PER, page_shifts=wire.BITMAP_PAGE_SHIFTS)
    assert e.value.reason == "unaligned-start"
    past = wire.BitmapHeader(0, 21, 0, 0, 1, 15 * PER, 1).pack() + b"\x03"
    with pytest.raises(wire.WireError) as e:
        wire.decode_bitmap(past, max_pfn=16 * PER, page_shifts=wire.BITMAP_PAGE_SHIFTS)
    assert e.value.reason == "beyond-ram"
    for shift in (0, 11, 13, 20, 22, 63, 0xFFFF):
        raw = wire.BitmapHeader(0, shift, 0, 0, 1, 0, 1).pack() + b"\x01"
        with pytest.raises(wire.WireError) as e:
            wire.decode_bitmap(raw, max_pfn=16 * PER, page_shifts=wire.BITMAP_PAGE_SHIFTS)
        assert e.value.reason == "bad-page-shift"


# --- allocation ----------------------------------------------------------------------------------
def test_hugepage_aware_allocation_takes_whole_aligned_blocks_first_and_keeps_the_buddy_sound():
    a = BuddyAllocator(GuestLayout.pc(256))
    linux = allocate_for_balloon(a, 1000, "linux")
    assert linux.whole_blocks == 0
    got = allocate_for_balloon(a, 5 * PER + 100, "hugepage-aware")
    assert got.whole_blocks == 5 and got.pages.size == 5 * PER + 100
    whole = got.pages[: 5 * PER].reshape(5, PER)
    assert (whole[:, 0] % PER == 0).all() and (np.diff(whole, axis=1) == 1).all()
    a.check()
    a.free_pages(np.concatenate([linux.pages, got.pages]))
    a.check()


# --- the device over a real THP memfd -------------------------------------------------------------
def thp_rig(make_device_rig, tracking: str) -> DeviceRig:
    """A pfn device over a 64 MiB THP memfd (DeviceRig), inflate and deflate queues of 64
    without EVENT_IDX, guest data from 4 MiB: 30 huge pages."""
    try:
        ensure_backing("thp")
    except BackingError as e:
        pytest.skip(f"no shmem THP here: {e}")
    rig = make_device_rig(mib=64, backing="thp", protocol="pfn", partial_tracking=tracking)
    rig.start({Q_INFLATE: 0x10000, Q_DEFLATE: 0x20000}, 64,
              features=protocol_device_features("pfn") & ~bit(F_RING_EVENT_IDX))
    rig.ram.mem[4 << 20:] = b"\xab" * ((60) << 20)
    return rig


def send_pfns(rig: DeviceRig, qi: int, pfns) -> None:
    raw = wire.encode_pfns(np.asarray(pfns, dtype=np.int64))
    rig.write(0x40000, raw)
    rig.request(qi, [(0x40000, len(raw), False)])


@pytest.mark.parametrize("tracking", ["full", "qemu"])
def test_linux_sized_pfn_requests_on_thp_free_a_host_page_only_with_full_tracking(make_device_rig, tracking):
    r = thp_rig(make_device_rig, tracking)
    hp = 5                                                   # host page 5: PFNs 2560..3071
    before = r.ram.allocated_bytes()
    for k in range(0, PER, 256):                             # Linux's 256-PFN requests
        send_pfns(r, Q_INFLATE, np.arange(hp * PER + k, hp * PER + k + 256))
    freed = before - r.ram.allocated_bytes()
    v = r.device.verify_discarded()
    assert v["ballooned_with_data"] == 0 and v["whole_host_pages"] == 1
    if tracking == "full":
        assert freed == 2 << 20 and v["whole_with_data"] == 0
        assert not r.ram.host_pages_with_data(np.array([hp]))[0]
    else:                                                    # QEMU: each request holds half of it
        assert freed == 0 and v["whole_with_data"] == 1
    # deflate of part of it, re-inflate: freed again (full) / still kept (qemu)
    send_pfns(r, Q_DEFLATE, np.arange(hp * PER, hp * PER + 8))
    r.ram.mem[(hp * PER) << PAGE_SHIFT:(hp * PER + 8) << PAGE_SHIFT] = b"\x11" * (8 << PAGE_SHIFT)  # reuse
    assert r.ram.host_pages_with_data(np.array([hp]))[0]
    send_pfns(r, Q_INFLATE, np.arange(hp * PER, hp * PER + 8))
    assert r.ram.host_pages_with_data(np.array([hp]))[0] == (tracking == "qemu")
    # a partially ballooned host page keeps its data until whole
    send_pfns(r, Q_INFLATE, np.arange(7 * PER, 7 * PER + 100))
    assert r.ram.host_pages_with_data(np.array([7]))[0]
    assert r.device.errors.get("device-internal", 0) == 0
