"""The shared device rig (device/rig.py) itself: its kicks are real eventfd writes the
device side reads, its requests are served and returned used with an interrupt, and
close() leaves no file descriptor behind."""
from __future__ import annotations

import os
import select
import struct

from device.rig import DeviceRig
from device.virtio.features import Q_DEFLATE, Q_INFLATE

BUF = 0x20000
PAGES = list(range(1000, 1008))           # 4 MiB in: guest data pages


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_an_inflate_through_the_rig_is_served_used_and_signalled(device_rig):
    rig = device_rig
    rig.fill(PAGES[0] << 12, len(PAGES) << 12)
    assert set(PAGES) <= rig.data_pfns()
    rig.write(BUF, struct.pack(f"<{len(PAGES)}I", *PAGES))
    head = rig.post(Q_INFLATE, [(BUF, 4 * len(PAGES), False)])
    os.eventfd_write(rig.driver_kick_fds[Q_INFLATE], 1)                  # the driver's kick ...
    assert select.select([rig.device.kick_fds[Q_INFLATE]], [], [], 0)[0]  # ... is the device's wake-up
    rig.serve(Q_INFLATE)
    assert not select.select([rig.device.kick_fds[Q_INFLATE]], [], [], 0)[0]
    assert rig.used(Q_INFLATE) == [(head, 0)]
    assert rig.interrupts(Q_INFLATE) == 1 and rig.interrupts(Q_INFLATE) == 0
    assert not set(PAGES) & rig.data_pfns()                               # gone from the memfd
    assert rig.device.inflate.pages == len(PAGES) and not rig.errors
    # and back: a deflate of the same pages
    assert rig.request(Q_DEFLATE, [(BUF, 4 * len(PAGES), False)]) == [(0, 0)]      # its own ring
    assert rig.device.ballooned_pages == 0


def test_a_bad_request_is_counted_not_raised(device_rig):
    rig = device_rig
    rig.request(Q_INFLATE, [(3 << 30, 4096, False)])                     # in the MMIO hole
    assert any(k.startswith("ring-") for k in rig.errors)


def test_close_leaves_no_descriptor_open():
    before = _open_fds()
    rig = DeviceRig(mib=16, protocol="bitmap")
    rig.start({0: 0x10000, 1: 0x11000, 2: 0x12000}, 8)
    assert _open_fds() > before
    rig.close()
    assert _open_fds() == before
