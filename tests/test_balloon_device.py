"""The balloon device's inflate/deflate paths with a real driver-side queue over a real
memfd: what gets discarded is read back from the kernel (SEEK_DATA), not from the
device's bookkeeping."""
from __future__ import annotations

import os

import numpy as np
import pytest

from device.virtio import wire
from device.host.balloon_device import BalloonDevice
from device.virtio.features import (F_PAGE_BITMAP, F_PAGE_CHUNKS, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, Q_DEFLATE,
                             Q_INFLATE, S_ACKNOWLEDGE, S_DRIVER, S_DRIVER_OK, S_FEATURES_OK, S_NEEDS_RESET, bit)
from device.virtio.protocols import protocol_device_features
from device.virtio.ram import GuestRAM
from device.virtio.layout import PAGE_SHIFT, PAGE_SIZE, GuestLayout
from device.virtio.driver_queue import DriverQueue
from device.virtio.split_ring import ring_layout

RING_BASE = 1 << 20        # 1 MiB: rings
BUF = 2 << 20              # 2 MiB: request buffer (64 KiB)
IND = 3 << 20              # indirect tables
DATA_FROM = 4 << 20        # pages from 4 MiB up hold data the balloon may take


class Rig:
    """A device and the driver side of its inflate/deflate queues, in one process."""

    def __init__(self, protocol: str = "pfn", mib: int = 6144, populate_mib: int = 64) -> None:
        self.layout = GuestLayout.pc(mib)
        self.ram = GuestRAM.create(self.layout)
        feats = protocol_device_features(protocol)
        self.dev = BalloonDevice(self.ram, feats, ranges_policy=protocol == "pfn-ranges")
        self.dev.driver_features = feats & ~bit(F_RING_EVENT_IDX)
        self.kicks = 0
        self.q = {}
        for i, qi in enumerate((Q_INFLATE, Q_DEFLATE)):
            lay = ring_layout(RING_BASE + i * 65536, 256)
            self.dev.vrings[qi] = type("V", (), {"size": 256, "desc": lay.desc_gpa, "avail": lay.avail_gpa,
                                                 "used": lay.used_gpa})()
            self.q[qi] = DriverQueue(self.ram, qi, 256, lay.desc_gpa, lay.avail_gpa, lay.used_gpa, event_idx=False,
                                     indirect=True, kick=self._kick, indirect_area=(IND + i * 65536, 65536))
        self.dev.activate()
        self.dev.status = S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK
        self.ram.view(BUF, 65536)[:] = b"\x01" * 65536        # request buffers: populated up front
        # guest data the balloon might take: low RAM and just above the hole
        for gpa in (DATA_FROM, 4 << 30):
            self.ram.view(gpa, populate_mib << 20)[:] = b"\xab" * (populate_mib << 20)

    def _kick(self) -> None:
        self.kicks += 1

    def send(self, qi: int, bufs) -> None:
        q = self.q[qi]
        q.add_buf(bufs, [], "req")
        q.kick_if_needed()
        self.dev.process_queue(qi)
        q.get_used()

    def pfns(self, qi: int, pfns) -> None:
        raw = wire.encode_pfns(np.asarray(pfns, dtype=np.int64))
        self.ram.view(BUF, len(raw))[:] = raw
        self.send(qi, [(BUF, len(raw))])

    def data_pfns(self) -> set[int]:
        mask = self.ram.data_page_mask()
        return set(self.layout.offset_to_pfn(np.flatnonzero(mask).astype(np.int64) << PAGE_SHIFT).tolist())

    def close(self) -> None:
        self.ram.close()


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


def lo(n: int) -> list[int]:
    return [(DATA_FROM >> PAGE_SHIFT) + i for i in range(n)]


def test_pfn_inflate_discards_exactly_the_named_pages(rig):
    before = rig.data_pfns()
    named = lo(100)[::3] + [((4 << 30) >> PAGE_SHIFT) + 5]
    rig.pfns(Q_INFLATE, named)
    assert rig.data_pfns() == before - set(named)
    c = rig.dev.inflate
    assert (c.pages, c.discard_calls, c.translations, c.requests) == (len(named), len(named), len(named), 1)
    assert rig.dev.ballooned_pages == len(named)


@pytest.mark.parametrize("bad,reason", [
    ((3 << 30) >> PAGE_SHIFT, "pfn-not-ram"),                  # in the MMIO hole
    (((3 << 30) >> PAGE_SHIFT) + 262143, "pfn-not-ram"),       # last page of the hole
    ((7 << 30) >> PAGE_SHIFT, "pfn-not-ram"),                  # one past the end of RAM
    (0xFFFFFFFF, "pfn-not-ram"),                               # largest le32
])
def test_pfn_not_ram_refused_rest_discarded(rig, bad, reason):
    before = rig.data_pfns()
    good = lo(8)
    rig.pfns(Q_INFLATE, good[:4] + [bad] + good[4:])
    assert rig.dev.errors[reason] == 1
    assert rig.data_pfns() == before - set(good)
    assert rig.dev.inflate.refused_pages == 1 and rig.dev.inflate.pages == 8
    assert rig.dev.live                                         # a bad PFN is not a broken ring


def test_double_inflate_and_deflate_of_unballooned_refused(rig):
    rig.pfns(Q_INFLATE, lo(4))
    rig.pfns(Q_INFLATE, lo(4))
    assert rig.dev.errors["already-inflated"] == 4 and rig.dev.inflate.discard_calls == 4
    rig.pfns(Q_DEFLATE, lo(8))
    assert rig.dev.errors["deflate-not-inflated"] == 4
    assert rig.dev.deflate.pages == 4 and rig.dev.ballooned_pages == 0


def test_pfn_array_too_long_or_ragged_refused(rig):
    before = rig.data_pfns()
    rig.pfns(Q_INFLATE, lo(257))
    assert rig.dev.errors["pfn-array-too-long"] == 1
    rig.ram.view(BUF, 6)[:] = b"\x00" * 6
    rig.send(Q_INFLATE, [(BUF, 6)])                            # not a multiple of 4
    assert rig.dev.errors["pfn-pfn-array-len"] == 1
    assert rig.data_pfns() == before


def test_writable_buffer_refused(rig):
    before = rig.data_pfns()
    raw = wire.encode_pfns(np.asarray(lo(4)))
    rig.ram.view(BUF, len(raw))[:] = raw
    q = rig.q[Q_INFLATE]
    q.add_buf([], [(BUF, len(raw))], "w")
    q.kick_if_needed()
    rig.dev.process_queue(Q_INFLATE)
    assert rig.dev.errors["writable-buffer"] == 1
    assert rig.data_pfns() == before


def test_descriptor_outside_ram_sets_needs_reset(rig):
    before = rig.data_pfns()
    rig.send(Q_INFLATE, [((3 << 30) + 4096, 1024)])            # buffer in the hole
    assert rig.dev.status & S_NEEDS_RESET
    assert any(k.startswith("ring-") for k in rig.dev.errors)
    rig.pfns(Q_INFLATE, lo(4))                                 # a device needing reset does nothing
    assert rig.data_pfns() == before
    assert rig.dev.errors["queue-after-reset"] >= 1


def test_queue_used_before_driver_ok(rig):
    rig.dev.status = S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK
    before = rig.data_pfns()
    rig.pfns(Q_INFLATE, lo(4))
    assert rig.dev.errors["queue-before-driver-ok"] == 1
    assert rig.data_pfns() == before


@pytest.mark.parametrize("protocol", ["pfn-ranges", "bitmap", "chunks"])
def test_range_protocols_one_discard_per_run_split_at_region_edge(protocol):
    r = Rig(protocol)
    try:
        r.dev.driver_features = protocol_device_features(protocol)  # indirect + format bit
        edge = (3 << 30) >> PAGE_SHIFT
        # runs: 5 pages at 4 MiB, 3 pages ending exactly at the 3 GiB edge, 6 pages just above 4 GiB
        runs = [(DATA_FROM >> PAGE_SHIFT, 5), (edge - 3, 3), ((4 << 30) >> PAGE_SHIFT, 6)]
        r.ram.view((edge - 3) << PAGE_SHIFT, 3 * PAGE_SIZE)[:] = b"\xcd" * (3 * PAGE_SIZE)
        before = r.data_pfns()
        pf = wire.runs_to_pfns(np.array([s for s, _ in runs]), np.array([n for _, n in runs]))
        if protocol == "pfn-ranges":
            r.pfns(Q_INFLATE, pf)
        elif protocol == "bitmap":
            for raw in wire.encode_bitmap_requests(pf, pages_per_request=1 << 18, cmd=0):
                r.ram.view(BUF, len(raw))[:] = raw
                r.send(Q_INFLATE, [(BUF, 32), (BUF + 32, len(raw) - 32)])
        else:
            r.send(Q_INFLATE, [(s << PAGE_SHIFT, n << PAGE_SHIFT) for s, n in runs])
        assert r.data_pfns() == before - set(pf.tolist())
        assert r.dev.inflate.discard_calls == 3 and r.dev.inflate.pages == 14
        assert not r.dev.errors
    finally:
        r.close()


def test_bitmap_hostile_headers_refused():
    r = Rig("bitmap")
    try:
        r.dev.driver_features = protocol_device_features("bitmap")
        before = r.data_pfns()
        good = wire.encode_bitmap_requests(np.asarray(lo(16)), pages_per_request=4096, cmd=0)[0]
        cases = {
            "bitmap-truncated-header": good[:20],
            "bitmap-bad-page-shift": good[:2] + (13).to_bytes(2, "little") + good[4:],
            "bitmap-bitmap-len": good[:24] + (999).to_bytes(8, "little") + good[32:],
        }
        for reason, raw in cases.items():
            r.ram.view(BUF, len(raw))[:] = raw
            r.send(Q_INFLATE, [(BUF, len(raw))])
            assert r.dev.errors[reason] == 1, (reason, dict(r.dev.errors))
        # a bitmap whose set bits run past the end of RAM
        huge = wire.BitmapHeader(0, 12, 0, 0, 1, r.layout.max_pfn - 8, 4).pack() + b"\xff" * 4
        r.ram.view(BUF, len(huge))[:] = huge
        r.send(Q_INFLATE, [(BUF, len(huge))])
        assert r.data_pfns() == before
        assert r.dev.inflate.discard_calls == 0
    finally:
        r.close()
