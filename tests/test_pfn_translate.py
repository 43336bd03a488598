"""The PFN path's per-page translation, done in numpy (device/vmm/balloon_device.py
_pfns_per_page), against the page-by-page loop it replaced: the same pages taken, in
the same order, the same refusals by reason, the same balloon state, on requests with
holes, pages named twice, pages already in (or not in) the balloon, and queue memory."""
from __future__ import annotations

import bisect
from collections import Counter

import numpy as np
import pytest

from device.vmm.balloon_device import IN_BALLOON, IN_GUEST, QUEUE_MEMORY, BalloonDevice, _refusal
from device.virtio.layout import PAGE_SHIFT, GuestLayout
from device.virtio.protocols import DecodedRequest, protocol_device_features
from device.virtio.ram import GuestRAM


def page_by_page(ballooned: bytearray, layout: GuestLayout, pfns: list[int], inflate: bool):
    """The former loop, written out: each page in request order, checked, then taken."""
    t = layout.table
    want, expect = (IN_BALLOON, IN_GUEST) if inflate else (IN_GUEST, IN_BALLOON)
    accepted, offsets, bad = [], [], Counter()
    for pfn in pfns:
        gpa = pfn << PAGE_SHIFT
        i = bisect.bisect_right(t.starts, gpa) - 1
        if i < 0 or gpa >= t.ends[i] or pfn >= len(ballooned):
            bad["pfn-not-ram"] += 1
            continue
        if ballooned[pfn] != expect:
            bad[_refusal(ballooned[pfn], inflate)] += 1
            continue
        ballooned[pfn] = want
        accepted.append(pfn)
        offsets.append(t.offsets[i] + gpa - t.starts[i])
    return accepted, offsets, bad


def as_request(pfns: np.ndarray) -> DecodedRequest:
    """A PFN request as the decoder hands it to the device."""
    raw = pfns.astype("<u4").tobytes()
    return DecodedRequest(len(raw), pfn_bytes=raw)


@pytest.fixture(scope="module")
def device():
    ram = GuestRAM.create(GuestLayout.pc(4096 + 64))     # two RAM regions, a hole between them
    dev = BalloonDevice(ram, protocol_device_features("pfn"))
    yield dev
    ram.close()


def hostile_request(rng: np.random.Generator, layout: GuestLayout) -> np.ndarray:
    """256 PFNs near the hole's edges and the top of RAM, some named two or three times."""
    hole = layout.regions[0].end_pfn
    pool = np.concatenate([np.arange(hole - 300, hole + 40), np.arange(layout.regions[1].first_pfn - 20,
                                                                       layout.regions[1].first_pfn + 300),
                           np.arange(layout.max_pfn - 200, layout.max_pfn)])
    return rng.choice(pool, 256).astype(np.uint32)


@pytest.mark.parametrize("seed", range(40))
def test_numpy_translation_takes_what_the_page_by_page_loop_takes(device: BalloonDevice, seed: int) -> None:
    rng = np.random.default_rng(seed)
    dev, layout = device, device.layout
    dev.ballooned_np[:] = IN_GUEST
    dev.ballooned_np[rng.choice(layout.max_pfn, 2000)] = IN_BALLOON
    dev.ballooned_np[rng.choice(layout.max_pfn, 200)] = QUEUE_MEMORY
    for inflate in (True, False, True):
        dev.reset_counters()
        pfns = hostile_request(rng, layout)
        ref_state = bytearray(dev.ballooned)
        accepted, offsets, bad = page_by_page(ref_state, layout, pfns.tolist(), inflate)
        errors_before = Counter(dev.errors)
        dev._pfns_per_page(as_request(pfns), dev.deflate if not inflate else dev.inflate, inflate)
        dev._settle()                  # the counters, as process_queue settles them once the request is used
        ctr = dev.inflate if inflate else dev.deflate
        assert ctr.pfns().tolist() == accepted                       # the same pages, in request order
        assert bytes(dev.ballooned) == bytes(ref_state)
        assert Counter(dev.errors) - errors_before == bad
        assert ctr.translations == 256 and ctr.pages == len(accepted)
        assert ctr.refused_pages == sum(bad.values())
        assert ctr.discard_calls == (len(offsets) if inflate else 0)  # one madvise per page taken


def test_offsets_of_both_regions_are_the_page_by_page_ones(device: BalloonDevice) -> None:
    layout = device.layout
    pfns = np.array([0, 1, layout.regions[0].end_pfn - 1, layout.regions[1].first_pfn,
                     layout.max_pfn - 1, layout.regions[0].end_pfn], dtype=np.int64)
    offs, ok = layout.translate_pfns(pfns)
    _, ref, bad = page_by_page(bytearray(layout.max_pfn), layout, pfns.tolist(), True)
    assert ok.tolist() == [True] * 5 + [False] and bad == {"pfn-not-ram": 1}
    assert offs[ok].tolist() == ref


def one_region_request(rng: np.random.Generator, layout: GuestLayout, region: int) -> np.ndarray:
    """256 PFNs inside one RAM region (the device's two-call span path), some named twice."""
    r = layout.regions[region]
    lo = int(rng.integers(r.first_pfn, r.end_pfn - 600))
    return rng.choice(np.arange(lo, lo + 600), 256).astype(np.uint32)


@pytest.mark.parametrize("seed", range(20))
def test_a_request_inside_one_region_takes_what_the_page_by_page_loop_takes(device: BalloonDevice,
                                                                            seed: int) -> None:
    rng = np.random.default_rng(1000 + seed)
    dev, layout = device, device.layout
    dev.ballooned_np[:] = IN_GUEST
    for inflate in (True, False, True, True):
        dev.reset_counters()
        pfns = one_region_request(rng, layout, seed % 2)
        if seed % 4 == 0:                              # no page named twice: every page taken
            pfns = rng.permutation(np.unique(pfns))
        if seed % 5 == 1:
            dev.ballooned_np[int(pfns[7])] = QUEUE_MEMORY
        ref_state = bytearray(dev.ballooned)
        accepted, offsets, bad = page_by_page(ref_state, layout, pfns.tolist(), inflate)
        errors_before = Counter(dev.errors)
        dev._pfns_per_page(as_request(pfns), dev.inflate if inflate else dev.deflate, inflate)
        dev._settle()
        ctr = dev.inflate if inflate else dev.deflate
        assert ctr.pfns().tolist() == accepted
        assert bytes(dev.ballooned) == bytes(ref_state)
        assert Counter(dev.errors) - errors_before == bad
        assert ctr.translations == pfns.size and ctr.discard_calls == (len(offsets) if inflate else 0)


def test_the_span_path_translates_only_what_one_region_holds(device: BalloonDevice) -> None:
    layout = device.layout
    r0, r1 = layout.regions
    inside = np.array([r1.first_pfn + 5, r1.first_pfn, layout.max_pfn - 1], dtype=np.int64)
    in_order, offs = layout.translate_pfn_span(inside)
    assert in_order.tolist() == sorted(inside.tolist())
    assert offs is not None and offs.tolist() == layout.translate_pfns(inside)[0].tolist()
    low = np.array([7, 0, r0.end_pfn - 1], dtype=np.int64)          # the first region: offsets are gpas
    assert layout.translate_pfn_span(low)[1].tolist() == (low << PAGE_SHIFT).tolist()
    crossing = np.array([r0.end_pfn - 1, r1.first_pfn], dtype=np.int64)
    assert layout.translate_pfn_span(crossing)[1] is None
    in_hole = np.array([r0.end_pfn, r1.first_pfn + 1], dtype=np.int64)    # starts in the hole
    assert layout.translate_pfn_span(in_hole)[1] is None
    beyond = np.array([r1.first_pfn, layout.max_pfn], dtype=np.int64)     # ends beyond RAM
    assert layout.translate_pfn_span(beyond)[1] is None
