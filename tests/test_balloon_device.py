"""The balloon device's inflate/deflate paths through the shared DeviceRig (device/rig.py:
real memfd, real kick and call eventfds, the driver side in-process): what gets
discarded is read back from the kernel (SEEK_DATA), not from the device's bookkeeping."""
from __future__ import annotations

import numpy as np
import pytest

from device.rig import DeviceRig
from device.virtio import wire
from device.virtio.features import (F_RING_EVENT_IDX, Q_DEFLATE, Q_INFLATE, S_ACKNOWLEDGE, S_DRIVER, S_FEATURES_OK,
                                    S_NEEDS_RESET, bit)
from device.virtio.protocols import protocol_device_features
from device.virtio.layout import PAGE_SHIFT, PAGE_SIZE

RING_BASE = 1 << 20        # 1 MiB: rings
BUF = 2 << 20              # 2 MiB: request buffer (64 KiB)
DATA_FROM = 4 << 20        # pages from 4 MiB up hold data the balloon may take


def balloon_rig(make_device_rig, protocol: str = "pfn", populate_mib: int = 64, mib: int = 6144) -> DeviceRig:
    """A live device over 6 GiB (two RAM regions), inflate and deflate queues of 256
    without EVENT_IDX, request buffers populated, guest data from DATA_FROM and 4 GiB."""
    rig = make_device_rig(mib=mib, protocol=protocol)
    features = protocol_device_features(protocol) & ~bit(F_RING_EVENT_IDX)
    rig.start({Q_INFLATE: RING_BASE, Q_DEFLATE: RING_BASE + 65536}, 256, features=features)
    rig.fill(BUF, 65536, 0x01)                                  # request buffers: populated up front
    for gpa in (DATA_FROM, 4 << 30):                            # guest data the balloon might take
        rig.fill(gpa, populate_mib << 20, 0xAB)
    return rig


@pytest.fixture
def rig(make_device_rig):
    return balloon_rig(make_device_rig)


def send(rig: DeviceRig, qi: int, bufs) -> None:
    """One request of device-readable (gpa, len) buffers, kicked and served."""
    rig.request(qi, [(g, n, False) for g, n in bufs])


def pfns(rig: DeviceRig, qi: int, pfns) -> None:
    raw = wire.encode_pfns(np.asarray(pfns, dtype=np.int64))
    rig.write(BUF, raw)
    send(rig, qi, [(BUF, len(raw))])


def lo(n: int) -> list[int]:
    return [(DATA_FROM >> PAGE_SHIFT) + i for i in range(n)]


def test_pfn_inflate_discards_exactly_the_named_pages(rig):
    before = rig.data_pfns()
    named = lo(100)[::3] + [((4 << 30) >> PAGE_SHIFT) + 5]
    pfns(rig, Q_INFLATE, named)
    assert rig.data_pfns() == before - set(named)
    c = rig.device.inflate
    assert (c.pages, c.discard_calls, c.translations, c.requests) == (len(named), len(named), len(named), 1)
    assert rig.device.ballooned_pages == len(named)


@pytest.mark.parametrize("bad,reason", [
    ((3 << 30) >> PAGE_SHIFT, "pfn-not-ram"),                  # in the MMIO hole
    (((3 << 30) >> PAGE_SHIFT) + 262143, "pfn-not-ram"),       # last page of the hole
    ((7 << 30) >> PAGE_SHIFT, "pfn-not-ram"),                  # one past the end of RAM
    (0xFFFFFFFF, "pfn-not-ram"),                               # largest le32
])
def test_pfn_not_ram_refused_rest_discarded(rig, bad, reason):
    before = rig.data_pfns()
    good = lo(8)
    pfns(rig, Q_INFLATE, good[:4] + [bad] + good[4:])
    assert rig.device.errors[reason] == 1
    assert rig.data_pfns() == before - set(good)
    assert rig.device.inflate.refused_pages == 1 and rig.device.inflate.pages == 8
    assert rig.device.live                                         # a bad PFN is not a broken ring


def test_double_inflate_and_deflate_of_unballooned_refused(rig):
    pfns(rig, Q_INFLATE, lo(4))
    pfns(rig, Q_INFLATE, lo(4))
    assert rig.device.errors["already-inflated"] == 4 and rig.device.inflate.discard_calls == 4
    pfns(rig, Q_DEFLATE, lo(8))
    assert rig.device.errors["deflate-not-inflated"] == 4
    assert rig.device.deflate.pages == 4 and rig.device.ballooned_pages == 0


def test_pfn_array_too_long_or_ragged_refused(rig):
    before = rig.data_pfns()
    pfns(rig, Q_INFLATE, lo(257))
    assert rig.device.errors["pfn-array-too-long"] == 1
    rig.write(BUF, bytes(6))
    send(rig, Q_INFLATE, [(BUF, 6)])                            # not a multiple of 4
    assert rig.device.errors["pfn-pfn-array-len"] == 1
    assert rig.data_pfns() == before


def test_writable_buffer_refused(rig):
    before = rig.data_pfns()
    raw = wire.encode_pfns(np.asarray(lo(4)))
    rig.write(BUF, raw)
    rig.request(Q_INFLATE, [(BUF, len(raw), True)])             # device-writable
    assert rig.device.errors["writable-buffer"] == 1
    assert rig.data_pfns() == before


def test_descriptor_outside_ram_sets_needs_reset(rig):
    before = rig.data_pfns()
    send(rig, Q_INFLATE, [((3 << 30) + 4096, 1024)])            # buffer in the hole
    assert rig.device.status & S_NEEDS_RESET
    assert any(k.startswith("ring-") for k in rig.device.errors)
    pfns(rig, Q_INFLATE, lo(4))                                 # a device needing reset does nothing
    assert rig.data_pfns() == before
    assert rig.device.errors["queue-after-reset"] >= 1


def test_queue_used_before_driver_ok(rig):
    rig.device.status = S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK
    before = rig.data_pfns()
    pfns(rig, Q_INFLATE, lo(4))
    assert rig.device.errors["queue-before-driver-ok"] == 1
    assert rig.data_pfns() == before


@pytest.mark.parametrize("protocol", ["pfn-ranges", "bitmap", "chunks"])
def test_range_protocols_one_discard_per_run_split_at_region_edge(make_device_rig, protocol):
    r = balloon_rig(make_device_rig, protocol)
    r.device.driver_features = protocol_device_features(protocol)  # indirect + format bit
    edge = (3 << 30) >> PAGE_SHIFT
    # runs: 5 pages at 4 MiB, 3 pages ending exactly at the 3 GiB edge, 6 pages just above 4 GiB
    runs = [(DATA_FROM >> PAGE_SHIFT, 5), (edge - 3, 3), ((4 << 30) >> PAGE_SHIFT, 6)]
    r.fill((edge - 3) << PAGE_SHIFT, 3 * PAGE_SIZE, 0xCD)
    before = r.data_pfns()
    pf = wire.runs_to_pfns(np.array([s for s, _ in runs]), np.array([n for _, n in runs]))
    if protocol == "pfn-ranges":
        pfns(r, Q_INFLATE, pf)
    elif protocol == "bitmap":
        for raw in wire.encode_bitmap_requests(pf, pages_per_request=1 << 18, cmd=0):
            r.write(BUF, raw)
            send(r, Q_INFLATE, [(BUF, 32), (BUF + 32, len(raw) - 32)])
    else:
        send(r, Q_INFLATE, [(s << PAGE_SHIFT, n << PAGE_SHIFT) for s, n in runs])
    assert r.data_pfns() == before - set(pf.tolist())
    assert r.device.inflate.discard_calls == 3 and r.device.inflate.pages == 14
    assert not r.device.errors


def test_bitmap_hostile_headers_refused(make_device_rig):
    r = balloon_rig(make_device_rig, "bitmap")
    r.device.driver_features = protocol_device_features("bitmap")
    before = r.data_pfns()
    good = wire.encode_bitmap_requests(np.asarray(lo(16)), pages_per_request=4096, cmd=0)[0]
    cases = {
        "bitmap-truncated-header": good[:20],
        "bitmap-bad-page-shift": good[:2] + (13).to_bytes(2, "little") + good[4:],
        "bitmap-bitmap-len": good[:24] + (999).to_bytes(8, "little") + good[32:],
    }
    for reason, raw in cases.items():
        r.write(BUF, raw)
        send(r, Q_INFLATE, [(BUF, len(raw))])
        assert r.device.errors[reason] == 1, (reason, dict(r.device.errors))
    # a bitmap whose set bits run past the end of RAM
    huge = wire.BitmapHeader(0, 12, 0, 0, 1, r.layout.max_pfn - 8, 4).pack() + b"\xff" * 4
    r.write(BUF, huge)
    send(r, Q_INFLATE, [(BUF, len(huge))])
    assert r.data_pfns() == before
    assert r.device.inflate.discard_calls == 0
