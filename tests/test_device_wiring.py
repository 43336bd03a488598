"""The device's explicit wiring: queue registration, the listener, the one region table.

A real BalloonDevice over a real memfd with a real driver-side queue: a queue's chains go
to the one handler its owner registered; a queue nobody registered returns them used,
0 bytes written, uncounted (as before registration existed); the listener given at
construction hears of `actual` and kick-fd changes; GuestLayout's region table answers
every translation the same way in its per-range and vectorized forms.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device.vmm.balloon_device import BalloonDevice
from device.vmm.hint_queues import HintQueues
from device.vmm.page_reporting_device import ReportingDevice
from device.virtio.driver_queue import DriverQueue
from device.virtio.features import (CFG_ACTUAL, F_RING_EVENT_IDX, Q_FREE_PAGE, Q_INFLATE, Q_MISC, Q_REPORTING,
                                    Q_STATS, S_ACKNOWLEDGE, S_DRIVER, S_DRIVER_OK, S_FEATURES_OK, bit)
from device.virtio.protocols import protocol_device_features
from device.virtio.layout import GiB, MiB, BadAddress, GuestLayout
from device.virtio.ram import GuestRAM
from device.virtio.split_ring import ring_layout
from device.virtio.transport import DeviceListener

RING = 1 << 20          # the free page hint queue's ring
CMD = 2 << 20           # a 4-byte buffer the driver offers on it


@pytest.fixture
def ram():
    r = GuestRAM.create(GuestLayout.pc(64))
    yield r
    r.close()


def live_device(ram: GuestRAM, **kw) -> tuple[BalloonDevice, DriverQueue]:
    """A live device with the free page hint queue (3) set up, and the driver's side of it.
    FREE_PAGE_HINT is in every protocol's features, so queue 3 always exists."""
    feats = protocol_device_features("pfn")
    dev = BalloonDevice(ram, feats, **kw)
    dev.driver_features = feats & ~bit(F_RING_EVENT_IDX)
    lay = ring_layout(RING, 16)
    dev.vrings[Q_FREE_PAGE] = lay
    drv = DriverQueue(ram, Q_FREE_PAGE, 16, lay.desc_gpa, lay.avail_gpa, lay.used_gpa, event_idx=False,
                      indirect=False, kick=lambda: None)
    dev.activate()
    dev.status = S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK
    return dev, drv


def offer(drv: DriverQueue, dev: BalloonDevice) -> list[tuple[object, int]]:
    """The driver offers one 4-byte readable buffer, the device serves the kick; returns
    what came back used as (token, written length)."""
    drv.add_buf([(CMD, 4)], [], "cmd")
    drv.kick_if_needed()
    dev.process_queue(Q_FREE_PAGE)
    return drv.get_used()


def test_a_second_registration_of_a_queue_is_refused(ram):
    dev = BalloonDevice(ram, protocol_device_features("pfn"))
    for index in (Q_INFLATE, Q_STATS):                           # the device's own queues are taken
        with pytest.raises(ValueError, match=f"queue {index} already has a handler"):
            dev.register_queue(index, lambda chain: 0)
    hints = HintQueues(dev)
    hints.register_queues(dev.register_queue)
    with pytest.raises(ValueError, match=f"queue {Q_FREE_PAGE} already has a handler"):
        hints.register_queues(dev.register_queue)                # one owner per queue
    with pytest.raises(ValueError, match=f"queue {Q_MISC} already has a handler"):
        dev.register_queue(Q_MISC, lambda chain: 0)
    ReportingDevice(dev).register_queues(dev.register_queue)     # queue 4 is still free
    with pytest.raises(ValueError, match=f"queue {Q_REPORTING} already has a handler"):
        ReportingDevice(dev).register_queues(dev.register_queue)
    with pytest.raises(ValueError, match="queue 6 does not exist"):
        dev.register_queue(6, lambda chain: 0)


def test_unregistered_queue_returns_chains_used_uncounted(ram):
    dev, drv = live_device(ram)
    assert offer(drv, dev) == [("cmd", 0)]                       # used, 0 bytes written
    assert offer(drv, dev) == [("cmd", 0)]
    assert dict(dev.errors) == {} and dev.live                   # nothing refused, nothing broken
    assert dev.queues[Q_FREE_PAGE].chains == 2


def test_registered_handler_gets_the_chain_and_sets_the_used_length(ram):
    dev, drv = live_device(ram)
    seen = []
    dev.register_queue(Q_FREE_PAGE, lambda chain: seen.append(chain.gather(4)) or 4)
    ram.view(CMD, 4)[:] = (7).to_bytes(4, "little")
    assert offer(drv, dev) == [("cmd", 4)]
    assert seen == [(7).to_bytes(4, "little")]


def test_hint_queues_registered_by_their_owner_serve_queue_3(ram):
    dev, drv = live_device(ram)
    hints = HintQueues(dev)
    hints.register_queues(dev.register_queue)
    ram.view(CMD, 4)[:] = (2).to_bytes(4, "little")              # a cmd_id before any was asked for
    assert offer(drv, dev) == [("cmd", 0)]
    assert hints.stats["stale_hints"] == 1                       # served by the hint queues...
    assert not dev.errors                                        # ... which ignore a stale id quietly


def test_listener_hears_actual_and_kick_fd_changes(ram):
    actual, kicks = [], []
    dev = BalloonDevice(ram, protocol_device_features("pfn"),
                        listener=DeviceListener(kick_fds_changed=lambda: kicks.append(dict(dev.kick_fds)),
                                                actual_changed=actual.append))
    dev.write_config(CFG_ACTUAL, (42).to_bytes(4, "little"))
    dev.write_config(CFG_ACTUAL, (42).to_bytes(4, "little"))     # every write, changed or not
    assert actual == [42, 42]
    fd = os.eventfd(0)
    dev.kick_fds[Q_INFLATE] = fd
    dev.reset()                                                   # closes the kick fds: the loop must forget them
    assert kicks == [{}]
    quiet = BalloonDevice(ram, protocol_device_features("pfn"))   # no listener: nobody to tell
    quiet.write_config(CFG_ACTUAL, (1).to_bytes(4, "little"))
    quiet.reset()


LAYOUTS = [GuestLayout.pc(64), GuestLayout.pc(3 * 1024 + 512)]   # one region; two, around the hole


@settings(max_examples=300, deadline=None)
@given(which=st.sampled_from([0, 1]),
       ranges=st.lists(st.tuples(st.sampled_from([0, 60 * MiB, 3 * GiB - 8192, 3 * GiB, 4 * GiB - 4096, 4 * GiB,
                                                  4 * GiB + 512 * MiB - 4096, 5 * GiB]),
                                 st.integers(-8192, 8192), st.integers(0, 3 * 4096)), min_size=1, max_size=40))
def test_translate_many_answers_as_translate(which, ranges):
    """The vectorized translation the device queue uses for long chains and the per-range
    one agree on every range: same offset when inside one RAM region, refused otherwise."""
    layout = LAYOUTS[which]
    gpas = [max(base + delta, 0) for base, delta, _ in ranges]
    lens = [ln for _, _, ln in ranges]
    offsets, ok = layout.translate_many(np.array(gpas, dtype=np.uint64), np.array(lens, dtype=np.uint64))
    for k, (gpa, ln) in enumerate(zip(gpas, lens)):
        try:
            want = layout.translate(gpa, ln)
        except BadAddress:
            assert not ok[k]
        else:
            assert ok[k] and int(offsets[k]) == want


def test_region_table_is_built_once_by_the_layout(ram):
    """The device and its queues read the layout's table; none builds its own."""
    dev, _drv = live_device(ram)
    table = ram.layout.table
    assert dev.layout is ram.layout and dev.queues[Q_FREE_PAGE].layout is ram.layout
    assert table.starts == [r.gpa for r in ram.layout.regions]
    assert table.offset_array.tolist() == [r.offset for r in ram.layout.regions]
    assert not any(isinstance(v, np.ndarray) for v in vars(dev.queues[Q_FREE_PAGE]).values()
                   if v is not None and not isinstance(v, memoryview))
