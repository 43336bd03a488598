"""Split virtqueue, both sides in one process over one real memfd (two mappings, as
the guest and the VMM have), kicks and calls through real eventfds."""
from __future__ import annotations

import os
import random
import signal
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device.virtio.ram import GuestRAM
from device.virtio.layout import GiB, MiB, GuestLayout
from device.virtio.device_queue import DeviceQueue, gather
from device.virtio.driver_queue import DriverQueue
from device.virtio.split_ring import (
    DESC_SIZE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    QueueFull,
    RingError,
    ring_area_bytes,
    ring_bytes,
    ring_layout,
    vring_need_event,
)

RING_BASE = 0x10000
IND_AREA = (0x200000, 0x40000)  # 16384 indirect descriptors
DATA = 0x400000  # guest buffers live from here


@pytest.fixture(autouse=True)
def no_hang():
    """A hostile ring must never hang the device: fail instead of waiting forever."""
    def boom(*_):
        raise TimeoutError("test hung")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


class Rams:
    def __init__(self, mib: int) -> None:
        self.layout = GuestLayout.pc(mib)
        self.vmm = GuestRAM.create(self.layout)
        self.guest = GuestRAM(self.vmm.fd, self.layout)  # the guest's own mapping

    def close(self) -> None:
        self.guest.close()
        self.vmm.close()


@pytest.fixture
def rams():
    r = Rams(64)
    yield r
    r.close()


@pytest.fixture
def big_rams():
    r = Rams(6144)  # RAM 0-3 GiB and 4-7 GiB, sparse memfd
    yield r
    r.close()


class EventFd:
    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK)

    def write(self) -> None:
        os.eventfd_write(self.fd, 1)

    def take(self) -> int:
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0


def make_pair(r: Rams, size: int = 256, *, event_idx: bool = True, indirect: bool = True,
              max_chain: int | None = None, area=IND_AREA):
    rl = ring_layout(RING_BASE, size)
    kick = EventFd()
    drv = DriverQueue(r.guest, 0, size, rl.desc_gpa, rl.avail_gpa, rl.used_gpa, event_idx=event_idx,
                      indirect=indirect, kick=kick.write, indirect_area=area)
    dev = DeviceQueue(r.vmm, 0, size, rl.desc_gpa, rl.avail_gpa, rl.used_gpa, event_idx=event_idx,
                      indirect=indirect, max_chain=max_chain)
    return drv, dev, kick, rl


# --- basics ----------------------------------------------------------------------------------
def test_vring_need_event_matches_definition():
    # event_idx in [old, new) modulo 2**16, checked against a brute-force set
    rng = random.Random(1)
    for _ in range(3000):
        old = rng.randrange(65536)
        n = rng.randrange(0, 300)
        new = (old + n) & 0xFFFF
        ev = rng.choice([rng.randrange(65536), (old + rng.randrange(0, 301)) & 0xFFFF, (old - 1) & 0xFFFF])
        assert vring_need_event(ev, new, old) == (ev in {(old + j) & 0xFFFF for j in range(n)})
    # the spec's note: used_event 0 -> notify after the first buffer
    assert vring_need_event(0, 1, 0)
    assert not vring_need_event(0, 2, 1)
    assert vring_need_event(65535, 0, 65535)  # wraps


def test_ring_bytes_and_layout():
    assert ring_bytes(256) == (4096, 6 + 512, 6 + 2048)
    rl = ring_layout(0x1000, 256)
    assert rl.desc_gpa == 0x1000 and rl.avail_gpa == 0x2000
    assert rl.used_gpa % 4 == 0 and rl.used_gpa >= rl.avail_gpa + 6 + 512
    assert rl.end == rl.used_gpa + 6 + 8 * 256 == 0x1000 + ring_area_bytes(256)
    legacy = ring_layout(0, 256, used_align=4096)
    assert legacy.used_gpa == 0x2000
    for bad in (0, 3, 100, 65536):
        with pytest.raises(RingError) as e:
            ring_bytes(bad)
        assert e.value.reason == "queue-size"
    with pytest.raises(ValueError):
        ring_layout(8, 256)


# --- wrap-around ------------------------------------------------------------------------------
def test_wraparound_varying_chains_past_2_16(rams):
    """5000 rounds of add-batch / kick / pop / push / get with chains of 1..7
    descriptors (readable then writable) on a 256 ring; idx wraps past 65535."""
    drv, dev, kick, _ = make_pair(rams)
    rng = random.Random(7)
    outstanding: dict[int, list] = {}
    token = 0
    total = 0
    for rnd in range(5000):
        for _ in range(rng.randrange(1, 30)):
            n_out, n_in = rng.randrange(0, 5), rng.randrange(0, 3)
            if n_out + n_in == 0:
                n_out = 1
            if n_out + n_in > drv.num_free:
                break
            out = [(DATA + 4096 * rng.randrange(1000), rng.randrange(1, 4097)) for _ in range(n_out)]
            inn = [(DATA + 4096 * rng.randrange(1000), rng.randrange(1, 4097)) for _ in range(n_in)]
            drv.add_buf(out, inn, token, indirect=False)
            outstanding[token] = [(a, ln, False) for a, ln in out] + [(a, ln, True) for a, ln in inn]
            token += 1
        drv.kick_if_needed()
        popped = []
        while (c := dev.pop_avail()) is not None:
            popped.append(c)
        # return them in a shuffled order: the driver must cope with out-of-order use
        rng.shuffle(popped)
        expect_len = {}
        for c in popped:
            wl = rng.randrange(0, c.writable_bytes + 1)
            dev.push_used(c.head, wl)
            expect_len[c.head] = (c, wl)
        dev.need_call()
        dev.enable_notifications()
        got = drv.get_used()
        assert len(got) == len(popped)
        for (tok, wl), c in zip(got, popped):
            assert outstanding.pop(tok) == c.elements
            assert wl == expect_len[c.head][1]
        drv.enable_interrupts()
        total += len(got)
    assert not outstanding
    assert total > 65536 + 1000, total
    assert drv.num_free == 256 and drv.in_flight == 0
    assert dev.last_avail_idx == total & 0xFFFF == dev.used_idx
    assert dev.chains == total and not dev.errors


# --- notification suppression -------------------------------------------------------------------
def test_event_idx_kicks_one_at_avail_event(rams):
    drv, dev, kick, _ = make_pair(rams)
    dev.set_avail_event(10)
    kicked_at = [i for i in range(30) if (drv.add_buf([(DATA, 64)], [], i), drv.kick_if_needed())[1]]
    assert kicked_at == [10]
    assert drv.kicks == 1 and drv.notifications_suppressed == 29
    assert kick.take() == 1  # exactly one real eventfd write


def test_event_idx_kicks_vhost_style(rams):
    """Device re-arms only when it drains: a busy device gets one kick, not ten."""
    drv, dev, kick, _ = make_pair(rams)
    for i in range(10):
        drv.add_buf([(DATA, 64)], [], i)
        drv.kick_if_needed()
    assert drv.kicks == 1 and drv.notifications_suppressed == 9 and kick.take() == 1
    while (c := dev.pop_avail()) is not None:
        dev.push_used(c.head)
    assert dev.enable_notifications() is False  # drained, re-armed at avail_event = 10
    drv.add_buf([(DATA, 64)], [], 10)
    assert drv.kick_if_needed() is True
    assert drv.kicks == 2 and kick.take() == 1
    assert drv.kick_if_needed() is False and drv.notifications_suppressed == 9  # nothing new: no decision


def test_event_idx_kicks_predicted_across_wrap(rams):
    """Random batches and random avail_event moves over > 2**16 buffers: the number
    of kicks is exactly what the spec predicts (avail_event written in the batch)."""
    drv, dev, kick, _ = make_pair(rams)
    rng = random.Random(3)
    predicted = 0
    idx = 0
    sent = 0
    while sent < 70000:
        ev = (idx + rng.randrange(-5, 40)) & 0xFFFF
        dev.set_avail_event(ev)
        n = rng.randrange(1, 33)
        for k in range(n):
            drv.add_buf([(DATA, 8)], [], k)
        drv.kick_if_needed()
        if ev in {(idx + j) & 0xFFFF for j in range(n)}:
            predicted += 1
        idx = (idx + n) & 0xFFFF
        sent += n
        while (c := dev.pop_avail()) is not None:
            dev.push_used(c.head)
        drv.get_used()
    assert drv.kicks == predicted and kick.take() == predicted
    assert 0 < predicted < sent


def test_no_event_idx_honours_no_notify(rams):
    drv, dev, kick, _ = make_pair(rams, event_idx=False)
    dev.disable_notifications()
    for i in range(5):
        drv.add_buf([(DATA, 8)], [], i)
        assert drv.kick_if_needed() is False
    assert dev.enable_notifications() is True  # work arrived while notifications were off
    drv.add_buf([(DATA, 8)], [], 5)
    assert drv.kick_if_needed() is True
    drv.add_buf([(DATA, 8)], [], 6)
    assert drv.kick_if_needed() is True  # flags only: every decision kicks
    assert (drv.kicks, drv.notifications_suppressed, kick.take()) == (2, 5, 2)


def test_event_idx_calls_predicted(rams):
    drv, dev, _, _ = make_pair(rams)
    call = EventFd()
    for i in range(40):
        drv.add_buf([(DATA, 8)], [], i)
    drv.kick_if_needed()
    heads = [dev.pop_avail().head for _ in range(40)]
    drv.set_used_event(24)  # call once used.idx reaches 25
    called_at = []
    for k, h in enumerate(heads):
        dev.push_used(h)
        if dev.need_call():
            call.write()
            called_at.append(k)
    assert called_at == [24] and call.take() == 1
    assert dev.calls == 1 and dev.calls_suppressed == 39
    # enable_interrupts re-arms at the driver's last seen used idx and reports pending work
    assert len(drv.get_used()) == 40
    assert drv.enable_interrupts() is False
    drv.add_buf([(DATA, 8)], [], 99)
    drv.kick_if_needed()
    dev.push_used(dev.pop_avail().head)
    assert dev.need_call() is True
    # disable_interrupts with EVENT_IDX: no call for the next buffers
    drv.get_used()
    drv.disable_interrupts()
    for i in range(20):
        drv.add_buf([(DATA, 8)], [], i)
        drv.kick_if_needed()
        dev.push_used(dev.pop_avail().head)
        assert dev.need_call() is False
        drv.get_used()


def test_no_event_idx_calls_honour_no_interrupt(rams):
    drv, dev, _, _ = make_pair(rams, event_idx=False)
    drv.disable_interrupts()
    for i in range(3):
        drv.add_buf([(DATA, 8)], [], i)
    drv.kick_if_needed()
    for _ in range(3):
        dev.push_used(dev.pop_avail().head)
        assert dev.need_call() is False
    assert drv.enable_interrupts() is True  # used buffers already pending
    drv.add_buf([(DATA, 8)], [], 3)
    drv.kick_if_needed()
    dev.push_used(dev.pop_avail().head)
    assert dev.need_call() is True
    assert (dev.calls, dev.calls_suppressed) == (1, 3)


# --- indirect descriptors --------------------------------------------------------------------------
def test_600_element_chain_goes_indirect(rams):
    drv, dev, _, _ = make_pair(rams)
    rng = np.random.default_rng(5)
    out = [(DATA + 4096 * int(p), 4096) for p in rng.choice(10000, 550, replace=False)]
    inn = [(DATA + 64 * k, 64) for k in range(50)]
    for k, (gpa, _) in enumerate(out[:3]):
        rams.guest.view(gpa, 4096)[:8] = struct.pack("<Q", 0xABC0 + k)
    head = drv.add_buf(out, inn, "big")
    assert drv.indirect_added == 1 and drv.num_free == 255
    drv.kick_if_needed()
    c = dev.pop_avail()
    assert c.head == head and c.indirect
    assert len(c.elements) == 600 and c.n_readable == 550
    assert c.elements == [(a, ln, False) for a, ln in out] + [(a, ln, True) for a, ln in inn]
    assert c.readable_bytes == 550 * 4096 and c.writable_bytes == 50 * 64
    assert dev.indirect_chains == 1 and dev.descriptors == 601
    views = c.readable()
    assert [struct.unpack_from("<Q", v)[0] for v in views[:3]] == [0xABC0, 0xABC1, 0xABC2]
    assert np.array_equal(c.gpas(), np.array([a for a, _ in out] + [a for a, _ in inn], dtype=np.uint64))
    dev.push_used(c.head, 100)
    assert drv.get_used() == [("big", 100)]
    assert drv.num_free == 256 and drv.indirect_free == IND_AREA[1] // DESC_SIZE


def test_indirect_forced_auto_and_area_reuse(rams):
    drv, dev, _, _ = make_pair(rams, size=8, area=(IND_AREA[0], 2 * 100 * DESC_SIZE))
    # fits directly: no indirect unless forced
    drv.add_buf([(DATA, 1)] * 3, [], "direct")
    assert drv.indirect_added == 0 and drv.num_free == 5
    drv.add_buf([(DATA, 1)], [(DATA, 2)], "forced", indirect=True)
    assert drv.indirect_added == 1 and drv.num_free == 4
    drv.add_buf([(DATA, 1)] * 6, [], "auto")  # 6 > 4 free -> indirect
    assert drv.indirect_added == 2 and drv.num_free == 3
    drv.kick_if_needed()
    chains = [dev.pop_avail() for _ in range(3)]
    assert [c.indirect for c in chains] == [False, True, True]
    assert [len(c.elements) for c in chains] == [3, 2, 6]
    for c in chains:
        dev.push_used(c.head)
    assert [t for t, _ in drv.get_used()] == ["direct", "forced", "auto"]
    # the area holds two 100-descriptor tables: reuse it many times, freeing as we go
    for i in range(50):
        drv.add_buf([(DATA, 4096)] * 100, [], i)
        drv.add_buf([(DATA, 4096)] * 100, [], -i)
        with pytest.raises(QueueFull):
            drv.add_buf([(DATA, 4096)] * 100, [], "no room")
        drv.kick_if_needed()
        for _ in range(2):
            c = dev.pop_avail()
            assert len(c.elements) == 100
            dev.push_used(c.head)
        assert len(drv.get_used()) == 2
    with pytest.raises(ValueError, match="larger than the indirect area"):
        drv.add_buf([(DATA, 4096)] * 201, [], "never")


def test_add_buf_refusals(rams):
    drv, dev, _, _ = make_pair(rams, size=16, indirect=False, area=None)
    with pytest.raises(ValueError, match="not negotiated"):
        drv.add_buf([(DATA, 1)] * 17, [], 0)
    with pytest.raises(ValueError, match="not negotiated"):
        drv.add_buf([(DATA, 1)], [], 0, indirect=True)
    with pytest.raises(ValueError, match="at least one"):
        drv.add_buf([], [], 0)
    with pytest.raises(ValueError, match="does not fit"):
        drv.add_buf([(DATA, 1 << 32)], [], 0)
    with pytest.raises(ValueError, match="2\\^32"):
        drv.add_buf([(DATA, (1 << 32) - 1), (DATA, 2)], [], 0)
    for i in range(4):
        drv.add_buf([(DATA, 1)] * 4, [], i)
    with pytest.raises(QueueFull):
        drv.add_buf([(DATA, 1)], [], 5)
    drv2, _, _, _ = make_pair(rams, size=16, indirect=True, area=None)
    with pytest.raises(ValueError, match="indirect_area"):
        drv2.add_buf([(DATA, 1)] * 17, [], 0)


def test_driver_refuses_bogus_used_id(rams):
    drv, dev, _, rl = make_pair(rams, size=16)
    drv.add_buf([(DATA, 1)], [], "a")
    drv.kick_if_needed()
    dev.pop_avail()
    dev.push_used(5)  # never handed out
    with pytest.raises(RingError) as e:
        drv.get_used()
    assert e.value.reason == "used-id"


def test_restore_resumes_a_queue(rams):
    """A second device instance (e.g. the migration destination) resumes the ring
    from the state of the first plus the used idx in guest RAM."""
    drv, dev, _, rl = make_pair(rams)
    for i in range(300):
        drv.add_buf([(DATA, 8)], [], i)
        drv.kick_if_needed()
        if i < 290:
            dev.push_used(dev.pop_avail().head)
        drv.get_used()
    for _ in range(3):  # popped, still in flight at the switch
        dev.pop_avail()
    st_ = dev.state()
    assert st_ == {"last_avail_idx": 293, "used_idx": 290}
    dev2 = DeviceQueue(rams.vmm, 0, 256, rl.desc_gpa, rl.avail_gpa, rl.used_gpa, event_idx=True, indirect=True)
    dev2.restore(st_["last_avail_idx"])
    assert dev2.state() == st_
    heads = [c.head for c in iter(dev2.pop_avail, None)]
    assert len(heads) == 7
    for h in heads:
        dev2.push_used(h)
    assert [t for t, _ in drv.get_used()] == list(range(293, 300))
    with pytest.raises(RingError):
        dev2.restore(1000, 0)


def test_gather_cap_and_data(rams):
    drv, dev, _, _ = make_pair(rams)
    rams.guest.view(DATA, 10)[:] = b"0123456789"
    rams.guest.view(DATA + 4096, 5)[:] = b"abcde"
    drv.add_buf([(DATA, 10), (DATA + 4096, 5)], [(DATA + 8192, 100)], 0)
    drv.kick_if_needed()
    c = dev.pop_avail()
    assert gather(c, 15) == b"0123456789abcde" == c.gather(1000)
    assert gather(c, 12, truncate=True) == b"0123456789ab"
    with pytest.raises(RingError) as e:
        gather(c, 14)
    assert e.value.reason == "gather-limit"
    assert [bytes(v) for v in c.readable()] == [b"0123456789", b"abcde"]
    assert len(c.writable()) == 1 and len(c.writable()[0]) == 100


# --- hostile rings ------------------------------------------------------------------------------------
class Raw:
    """Writes ring structures by hand into the guest mapping, as a hostile guest would."""

    def __init__(self, r: Rams, rl) -> None:
        self.ram, self.rl = r.guest, rl
        self.n = 0

    def desc(self, i: int, addr: int, ln: int, flags: int = 0, nxt: int = 0, table: int | None = None) -> None:
        base = self.rl.desc_gpa if table is None else table
        struct.pack_into("<QIHH", self.ram.view(base + DESC_SIZE * i, DESC_SIZE), 0, addr, ln, flags, nxt)

    def offer(self, head: int) -> None:
        struct.pack_into("<H", self.ram.view(self.rl.avail_gpa + 4 + 2 * (self.n % self.rl.size), 2), 0, head)
        self.n += 1
        self.set_idx(self.n)

    def set_idx(self, idx: int) -> None:
        struct.pack_into("<H", self.ram.view(self.rl.avail_gpa + 2, 2), 0, idx & 0xFFFF)


def hostile(r: Rams, size: int = 16, *, indirect: bool = True, max_chain: int | None = None):
    rl = ring_layout(RING_BASE, size)
    dev = DeviceQueue(r.vmm, 0, size, rl.desc_gpa, rl.avail_gpa, rl.used_gpa, event_idx=True,
                      indirect=indirect, max_chain=max_chain)
    return dev, Raw(r, rl)


def expect(dev: DeviceQueue, reason: str, head: int | None = -1) -> RingError:
    with pytest.raises(RingError) as e:
        dev.pop_avail()
    assert e.value.reason == reason, str(e.value)
    assert dev.errors[reason] >= 1
    if head != -1:
        assert e.value.head == head
    return e.value


TABLE = IND_AREA[0]


@pytest.mark.parametrize("case", [
    "avail-idx", "head-index", "next-index", "self-loop", "loop", "chain-too-long", "indirect-nested",
    "indirect-len-0", "indirect-len-24", "indirect-not-ram", "indirect-not-negotiated", "indirect-next",
    "indirect-loop", "indirect-next-index", "indirect-too-long", "indirect-table-too-big", "buffer-beyond-ram",
    "buffer-crosses-end", "buffer-addr-overflow", "desc-order",
])
def test_hostile_ring(rams, case):
    neg = case != "indirect-not-negotiated"
    mc = {"chain-too-long": 4, "indirect-too-long": 12, "indirect-table-too-big": 32}.get(case)
    dev, raw = hostile(rams, indirect=neg, max_chain=mc)
    ram_end = rams.layout.ram_bytes
    reason, head = case, 0
    if case == "avail-idx":
        raw.set_idx(17)
        head = None
    elif case == "head-index":
        raw.offer(16)
        reason, head = "desc-index", None
    elif case == "next-index":
        raw.desc(0, DATA, 8, VIRTQ_DESC_F_NEXT, 16)
        raw.offer(0)
        reason = "desc-index"
    elif case == "self-loop":
        raw.desc(0, DATA, 8, VIRTQ_DESC_F_NEXT, 0)
        raw.offer(0)
        reason = "desc-loop"
    elif case == "loop":
        for i in range(5):
            raw.desc(i, DATA, 8, VIRTQ_DESC_F_NEXT, i + 1)
        raw.desc(5, DATA, 8, VIRTQ_DESC_F_NEXT, 2)
        raw.offer(0)
        reason = "desc-loop"
    elif case == "chain-too-long":
        for i in range(6):
            raw.desc(i, DATA, 8, VIRTQ_DESC_F_NEXT if i < 5 else 0, i + 1)
        raw.offer(0)
    elif case == "indirect-nested":
        raw.desc(0, TABLE, 32, VIRTQ_DESC_F_INDIRECT)
        raw.desc(0, DATA, 8, VIRTQ_DESC_F_NEXT, 1, table=TABLE)
        raw.desc(1, TABLE, 16, VIRTQ_DESC_F_INDIRECT, 0, table=TABLE)
        raw.offer(0)
    elif case in ("indirect-len-0", "indirect-len-24"):
        raw.desc(0, TABLE, 0 if case.endswith("0") else 24, VIRTQ_DESC_F_INDIRECT)
        raw.offer(0)
        reason = "indirect-len"
    elif case == "indirect-not-ram":
        raw.desc(0, ram_end - 16, 32, VIRTQ_DESC_F_INDIRECT)
        raw.offer(0)
    elif case == "indirect-not-negotiated":
        raw.desc(0, TABLE, 16, VIRTQ_DESC_F_INDIRECT)
        raw.desc(0, DATA, 8, table=TABLE)
        raw.offer(0)
    elif case == "indirect-next":
        raw.desc(0, TABLE, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1)
        raw.desc(1, DATA, 8)
        raw.desc(0, DATA, 8, table=TABLE)
        raw.offer(0)
    elif case == "indirect-loop":
        raw.desc(0, TABLE, 4 * 16, VIRTQ_DESC_F_INDIRECT)
        for i, nx in enumerate([1, 2, 3, 1]):
            raw.desc(i, DATA, 8, VIRTQ_DESC_F_NEXT, nx, table=TABLE)
        raw.offer(0)
        reason = "desc-loop"
    elif case == "indirect-next-index":
        raw.desc(0, TABLE, 2 * 16, VIRTQ_DESC_F_INDIRECT)
        raw.desc(0, DATA, 8, VIRTQ_DESC_F_NEXT, 2, table=TABLE)
        raw.offer(0)
        reason = "desc-index"
    elif case == "indirect-too-long":
        # 3 direct descriptors, then an in-order table of 10: 13 elements > max_chain 12
        for i in range(3):
            raw.desc(i, DATA, 8, VIRTQ_DESC_F_NEXT, i + 1)
        raw.desc(3, TABLE, 10 * 16, VIRTQ_DESC_F_INDIRECT)
        for i in range(10):
            raw.desc(i, DATA, 8, VIRTQ_DESC_F_NEXT if i < 9 else 0, i + 1, table=TABLE)
        raw.offer(0)
        reason = "chain-too-long"
    elif case == "indirect-table-too-big":
        raw.desc(0, TABLE, 33 * 16, VIRTQ_DESC_F_INDIRECT)
        raw.offer(0)
        reason = "indirect-len"
    elif case == "buffer-beyond-ram":
        raw.desc(0, ram_end, 8)
        raw.offer(0)
        reason = "buffer-not-ram"
    elif case == "buffer-crosses-end":
        raw.desc(0, DATA, 8, VIRTQ_DESC_F_NEXT, 1)
        raw.desc(1, ram_end - 4096, 8192)
        raw.offer(0)
        reason = "buffer-not-ram"
    elif case == "buffer-addr-overflow":
        raw.desc(0, (1 << 64) - 8, 16)
        raw.offer(0)
        reason = "buffer-not-ram"
    elif case == "desc-order":
        raw.desc(0, DATA, 8, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 1)
        raw.desc(1, DATA, 8)
        raw.offer(0)
    err = expect(dev, reason, head)
    assert sum(dev.errors.values()) == 1 and dev.chains == 0
    if case == "avail-idx":
        assert dev.last_avail_idx == 0  # nothing consumed: the queue is broken, not skipped
        return
    # a consumed bad chain can be returned used and the ring keeps working
    if err.head is not None:
        dev.push_used(err.head, 0)
    raw.desc(7, DATA, 8)
    raw.offer(7)
    c = dev.pop_avail()
    assert c.head == 7 and c.elements == [(DATA, 8, False)]


def test_long_indirect_chain_with_loop_reported_as_loop(rams):
    # table of 512 entries, all linked in a big cycle: bounded walk, reason desc-loop
    dev, raw = hostile(rams)
    n = 512
    tbl = np.zeros(n, dtype=[("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])
    tbl["addr"], tbl["len"], tbl["flags"] = DATA, 8, VIRTQ_DESC_F_NEXT
    tbl["next"] = (np.arange(n) + 1) % n
    rams.guest.view(TABLE, n * 16)[:] = tbl.tobytes()
    raw.desc(0, TABLE, n * 16, VIRTQ_DESC_F_INDIRECT)
    raw.offer(0)
    expect(dev, "desc-loop", 0)


def test_loop_shorter_than_max_chain_is_still_a_loop(rams):
    # max_chain (4) below the queue size (16): a 2-cycle is diagnosed as a loop, a
    # straight chain of 5 as too long
    dev, raw = hostile(rams, max_chain=4)
    raw.desc(0, DATA, 8, VIRTQ_DESC_F_NEXT, 1)
    raw.desc(1, DATA, 8, VIRTQ_DESC_F_NEXT, 0)
    raw.offer(0)
    expect(dev, "desc-loop", 0)
    for i in range(2, 7):
        raw.desc(i, DATA, 8, VIRTQ_DESC_F_NEXT if i < 6 else 0, i + 1)
    raw.offer(2)
    expect(dev, "chain-too-long", 2)
    assert dev.errors == {"desc-loop": 1, "chain-too-long": 1}


@pytest.mark.parametrize("max_chain", [None, 32768])
def test_max_size_ring_full_loop_is_bounded(rams, max_chain):
    # a 32768 ring whose every descriptor chains to the next, cyclically: the walk stops
    # at max_chain (default 4096: chain-too-long) or, with max_chain = the ring size, at
    # the first revisit (desc-loop)
    size = 32768
    rl = ring_layout(0x1000000, size)
    dev = DeviceQueue(rams.vmm, 0, size, rl.desc_gpa, rl.avail_gpa, rl.used_gpa, event_idx=True, indirect=True,
                      max_chain=max_chain)
    tbl = np.zeros(size, dtype=[("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])
    tbl["addr"], tbl["len"], tbl["flags"] = DATA, 8, VIRTQ_DESC_F_NEXT
    tbl["next"] = (np.arange(size) + 1) % size
    rams.guest.view(rl.desc_gpa, size * 16)[:] = tbl.tobytes()
    struct.pack_into("<HH", rams.guest.view(rl.avail_gpa, 6), 0, 0, 1)
    with pytest.raises(RingError) as e:
        dev.pop_avail()
    assert e.value.reason == ("chain-too-long" if max_chain is None else "desc-loop")
    assert dev.descriptors == dev.walked == (4096 if max_chain is None else size)


def test_direct_then_indirect_is_valid(rams):
    """Spec: the device MUST handle normal descriptors followed by one indirect one."""
    dev, raw = hostile(rams)
    raw.desc(0, DATA, 100, VIRTQ_DESC_F_NEXT, 3)
    raw.desc(3, TABLE, 32, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE)  # WRITE here is ignored
    raw.desc(0, DATA + 4096, 200, VIRTQ_DESC_F_NEXT, 1, table=TABLE)
    raw.desc(1, DATA + 8192, 300, VIRTQ_DESC_F_WRITE, 0, table=TABLE)
    raw.offer(0)
    c = dev.pop_avail()
    assert c.indirect and c.elements == [(DATA, 100, False), (DATA + 4096, 200, False), (DATA + 8192, 300, True)]
    assert (c.n_readable, c.readable_bytes, c.writable_bytes) == (2, 300, 300)


def test_indirect_out_of_order_table(rams):
    """A table whose chain is not stored in index order takes the general walk."""
    dev, raw = hostile(rams)
    raw.desc(0, TABLE, 4 * 16, VIRTQ_DESC_F_INDIRECT)
    raw.desc(2, DATA + 2, 2, VIRTQ_DESC_F_NEXT, 0, table=TABLE)  # entry 0 -> ... order 0,3,1 (2 unused)
    raw.desc(0, DATA, 1, VIRTQ_DESC_F_NEXT, 3, table=TABLE)
    raw.desc(3, DATA + 3, 3, VIRTQ_DESC_F_NEXT, 1, table=TABLE)
    raw.desc(1, DATA + 1, 4, 0, 0, table=TABLE)
    raw.offer(0)
    c = dev.pop_avail()
    assert c.elements == [(DATA, 1, False), (DATA + 3, 3, False), (DATA + 1, 4, False)]


def test_ring_setup_refusals(rams, big_rams):
    rl = ring_layout(RING_BASE, 256)
    for size, desc, avail, used, reason in (
        (100, rl.desc_gpa, rl.avail_gpa, rl.used_gpa, "queue-size"),
        (256, rl.desc_gpa + 8, rl.avail_gpa, rl.used_gpa, "ring-align"),
        (256, rl.desc_gpa, rl.avail_gpa + 1, rl.used_gpa, "ring-align"),
        (256, rl.desc_gpa, rl.avail_gpa, rl.used_gpa + 2, "ring-align"),
        (256, rams.layout.ram_bytes - 2048, rl.avail_gpa, rl.used_gpa, "ring-not-ram"),
        (256, rl.desc_gpa, rl.avail_gpa, rams.layout.ram_bytes + 4096, "ring-not-ram"),
    ):
        with pytest.raises(RingError) as e:
            DeviceQueue(rams.vmm, 0, size, desc, avail, used, event_idx=True, indirect=True)
        assert e.value.reason == reason
    # rings straddling the 3 GiB edge into the MMIO hole
    rl = ring_layout(3 * GiB - 4096, 256)
    with pytest.raises(RingError) as e:
        DeviceQueue(big_rams.vmm, 0, 256, rl.desc_gpa, rl.avail_gpa, rl.used_gpa, event_idx=True, indirect=True)
    assert e.value.reason == "ring-not-ram"


def test_chain_bytes_and_hole_edges(big_rams):
    """On a 6144 MiB guest: buffers up to the 3 GiB edge and from 4 GiB are RAM (and
    translate to the right memfd offsets); one crossing into the hole is refused;
    a chain of more than 2^32 bytes is refused."""
    dev, raw = hostile(big_rams)
    edge = 3 * GiB
    big_rams.guest.view(4 * GiB, 4)[:] = b"high"
    big_rams.guest.view(edge - 4, 4)[:] = b"low!"
    raw.desc(0, edge - 8192, 8192, VIRTQ_DESC_F_NEXT, 1)
    raw.desc(1, 4 * GiB, 4096)
    raw.offer(0)
    c = dev.pop_avail()
    assert c.offsets == [edge - 8192, edge]  # high region starts at memfd offset 3 GiB
    assert bytes(c.readable()[0][-4:]) == b"low!" and bytes(c.readable()[1][:4]) == b"high"
    dev.push_used(c.head)
    raw.desc(2, edge - 4096, 8192)
    raw.offer(2)
    expect(dev, "buffer-not-ram", 2)
    raw.desc(3, 0, 3 * GiB, VIRTQ_DESC_F_NEXT, 4)
    raw.desc(4, 4 * GiB, 3 * GiB)
    raw.offer(3)
    expect(dev, "chain-bytes", 3)


def test_chunk_chain_over_hole_uses_vectorized_translation(big_rams):
    """A 600-run chunk request via indirect, runs on both sides of the hole."""
    drv, dev, _, _ = make_pair(big_rams)
    low = [(3 * GiB - (k + 1) * 8192, 4096) for k in range(300)]
    high = [(4 * GiB + k * 8192, 4096 * (1 + k % 3)) for k in range(300)]
    drv.add_buf(np.array(low + high, dtype=np.uint64), [], "chunks")
    drv.kick_if_needed()
    c = dev.pop_avail()
    assert c.indirect and len(c.elements) == 600
    exp_off = [g for g, _ in low] + [g - GiB for g, _ in high]
    assert c.offsets == exp_off
    dev.push_used(c.head)
    drv.get_used()
    bad = low[:20] + [(3 * GiB - 4096, 8192)]
    drv.add_buf(bad, [], "bad", indirect=True)
    drv.kick_if_needed()
    expect(dev, "buffer-not-ram")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    descs=st.lists(st.tuples(st.integers(0, (1 << 64) - 1) | st.integers(DATA, DATA + MiB),
                             st.integers(0, (1 << 32) - 1) | st.integers(0, 300),
                             st.integers(0, 0xFFFF) | st.sampled_from([0, 1, 2, 3, 4, 5]),
                             st.integers(0, 0xFFFF) | st.integers(0, 20)), min_size=16, max_size=16),
    table=st.binary(min_size=0, max_size=256),
    heads=st.lists(st.integers(0, 0xFFFF) | st.integers(0, 15), min_size=1, max_size=16),
    idx=st.integers(0, 0xFFFF) | st.integers(0, 16),
    max_chain=st.none() | st.integers(1, 20),
)
def test_fuzz_device_only_raises_ring_error(rams, descs, table, heads, idx, max_chain):
    """Garbage rings: pop_avail returns chains or raises RingError, never anything
    else, never hangs, and every returned chain lies inside guest RAM."""
    dev, raw = hostile(rams, max_chain=max_chain)
    rams.guest.view(TABLE, 256)[:] = table.ljust(256, b"\0")
    for i, (a, ln, fl, nx) in enumerate(descs):
        if fl & VIRTQ_DESC_F_INDIRECT and a % 2:
            a, ln = TABLE, (ln % 17) * 16
        raw.desc(i, a, ln, fl, nx)
    for k, h in enumerate(heads):
        struct.pack_into("<H", rams.guest.view(raw.rl.avail_gpa + 4 + 2 * k, 2), 0, h)
    raw.set_idx(idx)
    for _ in range(20):
        try:
            c = dev.pop_avail()
        except RingError:
            continue
        if c is None:
            break
        for (a, ln, _), off in zip(c.elements, c.offsets):
            assert rams.layout.translate(a, ln) == off
        assert len(c.elements) <= dev.max_chain
