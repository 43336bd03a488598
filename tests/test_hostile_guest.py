"""The real VMM (`python -m device.vmm.process`) against a hostile guest: device/guest/raw_guest.py, which
speaks docs/PROTOCOL.md from scratch and writes whatever ring contents a test wants.

Every bad-input case of DESIGN.md section 9 (and docs/BAD_INPUT.md) is played here:
the test checks the counter the monitor reports, the exact line in the VMM's log,
NEEDS_RESET where the spec calls for it, that the VMM keeps answering, and, from the
raw guest's own copy of the memfd (SEEK_DATA, the kernel's view), that no page lost
its data except the valid pages the guest named.
"""
from __future__ import annotations

import os
import struct
import threading
import time

import pytest

from device.guest.raw_guest import (FAILED, F_INDIRECT, F_NEXT, F_WRITE, GET_FEATURES, GET_STATUS, HEADER, NEEDS_RESET,
                                    SET_DIRTY_LOG, SET_VRING, SET_VRING_CALL, SET_VRING_KICK, U32, RingAddrs)
from lab.trials.model.hostile_vm import HostileVM

GUEST_MIB = 3200                      # RAM below 3 GiB, the hole, 128 MiB from 4 GiB
RING = {0: 0x10000, 1: 0x11000, 2: 0x12000}
BUF = 0x100000                        # request buffers (up to 512 KiB)
IND = 0x200000                        # indirect tables
DATA = 0x1000000 >> 12                # first PFN of the pages that hold data (16 MiB)
NDATA = 64
HOLE = (3 << 30) >> 12                # first PFN of the MMIO hole
HIGH = (4 << 30) >> 12                # first PFN above it
MAX_PFN = HIGH + (128 << 20 >> 12)    # one past the last RAM page


class HostileVMSession:
    """One VMM + raw guest, reset to a clean device before each test."""

    def __init__(self, protocol: str) -> None:
        self.vm = HostileVM(GUEST_MIB, protocol)
        self.g = self.vm.guest
        self.g.map_memory()
        self.protocol = protocol

    def start(self, queues=(0, 1), *, driver_ok: bool = True, features: int | None = None) -> None:
        g = self.g
        g.reset()
        if driver_ok:
            g.setup({q: RING[q] for q in queues}, features)
        else:
            g.negotiate(features)
            for q in queues:
                g.add_queue(q, RING[q])
        g.fill(DATA << 12, NDATA << 12)
        g.fill(HIGH << 12, 16 << 12)
        g.fill((HOLE - 8) << 12, 8 << 12)
        self.data_pfns = set(range(DATA, DATA + NDATA)) | set(range(HIGH, HIGH + 16)) | set(range(HOLE - 8, HOLE))
        assert g.pfns_with_data(self.data_pfns) == self.data_pfns

    def lost(self) -> set[int]:
        """Pages of the data set that no longer hold data (memfd SEEK_DATA)."""
        return self.data_pfns - self.g.pfns_with_data(self.data_pfns)

    def request(self, q: int, bufs: list[tuple[int, int, int]], *, wait: bool = True) -> bool:
        """Put one chain (gpa, len, flags) in descriptors 0.., offer it, kick; True once used."""
        ring = self.g.queues[q].ring
        for i, (a, ln, fl) in enumerate(bufs):
            nxt = i + 1 if i + 1 < len(bufs) else 0
            ring.desc(i, a, ln, fl | (F_NEXT if i + 1 < len(bufs) else 0), nxt)
        target = (ring.next_avail + 1) & 0xFFFF
        ring.offer([0])
        self.g.queues[q].kick()
        return self.g.queues[q].wait_used(target, 5.0) if wait else True

    def pfns(self, q: int, pfns: list[int]) -> bool:
        raw = struct.pack(f"<{len(pfns)}I", *pfns)
        self.g.write(BUF, raw)
        return self.request(q, [(BUF, len(raw), 0)])

    def bitmap(self, q: int, raw: bytes, split: int | None = 32) -> bool:
        self.g.write(BUF, raw)
        if split is None or split >= len(raw):
            return self.request(q, [(BUF, len(raw), 0)])
        return self.request(q, [(BUF, split, 0), (BUF + split, len(raw) - split, 0)])

    def errors(self) -> dict[str, int]:
        return self.vm.errors()

    def wait_needs_reset(self, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.g.status() & NEEDS_RESET:
                return True
            time.sleep(0.02)
        return False

    def alive(self) -> None:
        assert self.vm.alive(), "the VMM died"
        assert self.vm.qmp.execute("query-status")["status"] == "running"

    def close(self) -> None:
        self.vm.close()


def header(start_pfn: int, bmap_len: int, page_shift: int = 12, cmd: int = 0) -> bytes:
    return struct.pack("<HHHHQQQ", cmd, page_shift, 0, 0, 7, start_pfn, bmap_len)


@pytest.fixture(scope="module")
def pfn_vm():
    h = HostileVMSession("pfn")
    yield h
    h.close()


@pytest.fixture(scope="module")
def bitmap_vm():
    h = HostileVMSession("bitmap")
    yield h
    h.close()


@pytest.fixture(scope="module")
def chunks_vm():
    h = HostileVMSession("chunks")
    yield h
    h.close()


def delta(h: HostileVMSession, before: dict, reason: str) -> int:
    return h.errors().get(reason, 0) - before.get(reason, 0)


def eventually(h: HostileVMSession, before: dict, reason: str, at_least: int = 1, timeout: float = 10.0) -> int:
    """The counter once it reached `at_least` (the VMM serves kicks asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        d = delta(h, before, reason)
        if d >= at_least or time.monotonic() > deadline:
            return d
        time.sleep(0.02)


# ======================================================================================
# PFN wire format
# ======================================================================================
def test_out_of_range_and_hole_pfns_refused_rest_discarded(pfn_vm):
    h = pfn_vm
    h.start()
    e0 = h.errors()
    good = [DATA, DATA + 1, HIGH + 3]
    assert h.pfns(0, [DATA, HOLE, DATA + 1, HOLE + 0x3FFFF, MAX_PFN, 0xFFFFFFFF, HIGH + 3])
    assert delta(h, e0, "pfn-not-ram") == 4
    assert h.lost() == set(good)
    assert "refused 4 page(s) of one request ({'pfn-not-ram': 4}); first bad PFN 0xc0000; " \
           "nothing discarded for them" in h.vm.log()
    assert not h.g.status() & NEEDS_RESET          # a bad PFN is not a broken ring
    h.alive()


def test_deflate_of_pages_never_inflated(pfn_vm):
    h = pfn_vm
    h.start()
    e0 = h.errors()
    assert h.pfns(0, [DATA + 10, DATA + 11])
    assert h.pfns(1, [DATA + 10, DATA + 11, DATA + 12, DATA + 13])
    assert delta(h, e0, "deflate-not-inflated") == 2
    assert "({'deflate-not-inflated': 2}); first bad PFN 0x100c; nothing discarded for them" in h.vm.log()
    assert h.lost() == {DATA + 10, DATA + 11}        # deflate never discards anything
    c = h.vm.counters()
    assert c["deflate"]["pages"] >= 2 and c["ballooned_pages"] == 0
    h.alive()


def test_double_inflate_refused(pfn_vm):
    h = pfn_vm
    h.start()
    e0 = h.errors()
    assert h.pfns(0, [DATA + 20])
    assert h.pfns(0, [DATA + 20, DATA + 21])
    assert delta(h, e0, "already-inflated") == 1
    assert h.lost() == {DATA + 20, DATA + 21}


def test_pfn_array_too_long_or_ragged(pfn_vm):
    h = pfn_vm
    h.start()
    e0 = h.errors()
    assert h.pfns(0, [DATA + (i % NDATA) for i in range(257)])
    assert delta(h, e0, "pfn-array-too-long") == 1
    assert "refused guest input [pfn-array-too-long]" in h.vm.log()
    h.g.write(BUF, bytes(6))
    assert h.request(0, [(BUF, 6, 0)])
    assert delta(h, e0, "pfn-pfn-array-len") == 1
    assert "refused guest input [pfn-pfn-array-len]" in h.vm.log()
    assert h.lost() == set()


def test_writable_inflate_buffer_refused(pfn_vm):
    h = pfn_vm
    h.start()
    e0 = h.errors()
    h.g.write(BUF, struct.pack("<I", DATA))
    assert h.request(0, [(BUF, 4, F_WRITE)])
    assert delta(h, e0, "writable-buffer") == 1
    assert h.lost() == set()


def test_queue_used_before_driver_ok(pfn_vm):
    h = pfn_vm
    h.start(driver_ok=False)
    e0 = h.errors()
    h.g.write(BUF, struct.pack("<2I", DATA, DATA + 1))
    h.request(0, [(BUF, 8, 0)], wait=False)
    assert eventually(h, e0, "queue-before-driver-ok") >= 1
    assert h.g.queues[0].ring.used_idx() == 0       # nothing served
    assert "refused guest input [queue-before-driver-ok]" in h.vm.log()
    assert h.lost() == set()
    h.alive()


def test_naming_the_rings_own_page_is_refused(pfn_vm):
    h = pfn_vm
    h.start()
    e0 = h.errors()
    ring_pfn = RING[0] >> 12
    assert h.pfns(0, [ring_pfn, DATA + 30])
    assert delta(h, e0, "pfn-is-queue-memory") == 1
    assert h.g.pfns_with_data([ring_pfn]) == {ring_pfn}
    assert h.pfns(0, [DATA + 31])                    # the queue still works
    assert h.lost() == {DATA + 30, DATA + 31}


def test_stats_buffer_too_long_or_twice(pfn_vm):
    h = pfn_vm
    h.start(queues=(0, 1, 2))
    e0 = h.errors()
    q = h.g.queues[2]
    h.g.write(BUF, struct.pack("<HQ", 4, 12345) * 80)           # 800 bytes: more than 64 entries
    q.ring.desc(0, BUF, 800, 0, 0)
    q.ring.desc(1, BUF, 10, 0, 0)
    q.offer([0])
    q.kick()
    assert eventually(h, e0, "stats-len") == 1 and not h.g.status() & NEEDS_RESET
    q.offer([1])                                                 # a second buffer while one is held
    q.kick()
    assert q.wait_used(1)                                        # the first one comes back
    assert q.ring.used_elem(0) == (0, 0)
    assert delta(h, e0, "stats-twice") == 1
    stats = h.vm.qmp.execute("qom-get", {"path": "/machine/peripheral/balloon0", "property": "guest-stats"})
    assert stats["stats"]["stat-free-memory"] == 12345
    h.alive()


# ======================================================================================
# Broken rings: NEEDS_RESET
# ======================================================================================
@pytest.mark.parametrize("gpa,ln,where", [
    (3 << 30, 16, "in the MMIO hole"),
    ((3 << 30) - 8, 16, "across the 3 GiB edge"),
    (MAX_PFN << 12, 16, "past the end of RAM"),
    ((1 << 64) - 8, 16, "wrapping past 2^64"),
])
def test_descriptor_outside_ram_sets_needs_reset(pfn_vm, gpa, ln, where):
    h = pfn_vm
    h.start()
    e0 = h.errors()
    used0 = h.g.queues[0].ring.used_idx()
    h.request(0, [(gpa, ln, 0)], wait=False)
    assert h.wait_needs_reset(), where
    # refused, never used: the device returns no buffer for a chain it would not read
    assert not h.g.queues[0].wait_used(used0 + 1, 0.3)
    assert h.g.queues[0].ring.used_idx() == used0
    assert delta(h, e0, "ring-buffer-not-ram") == 1
    log = h.vm.log()
    assert f"refused guest input [ring-buffer-not-ram]" in log and f"buffer {gpa:#x}+0x10 is not inside one RAM region" in log
    assert "device NEEDS_RESET: queue 0: chain 0:" in log
    assert os.eventfd_read(h.g.config_fd) >= 1      # the driver was told (config interrupt)
    # a device that needs a reset serves nothing until it gets one
    assert not h.pfns(0, [DATA])
    assert delta(h, e0, "queue-after-reset") >= 1
    assert h.lost() == set()
    h.alive()


def test_descriptor_loop(pfn_vm):
    h = pfn_vm
    h.start()
    e0 = h.errors()
    h.g.write(BUF, struct.pack("<I", DATA))
    ring = h.g.queues[0].ring
    ring.desc(0, BUF, 4, F_NEXT, 1)
    ring.desc(1, BUF, 4, F_NEXT, 0)
    ring.offer([0])
    h.g.queues[0].kick()
    assert h.wait_needs_reset()
    assert delta(h, e0, "ring-desc-loop") == 1
    assert "refused guest input [ring-desc-loop]" in h.vm.log()
    assert h.lost() == set()
    h.alive()


def test_over_long_chains(pfn_vm):
    h = pfn_vm
    # an indirect table of more entries than max_chain (4096)
    h.start()
    e0 = h.errors()
    n = 4097
    h.g.write(IND, b"".join(struct.pack("<QIHH", BUF, 4, F_NEXT, i + 1) for i in range(n - 1))
              + struct.pack("<QIHH", BUF, 4, 0, 0))
    h.request(0, [(IND, 16 * n, F_INDIRECT)], wait=False)
    assert h.wait_needs_reset()
    assert delta(h, e0, "ring-indirect-len") == 1
    assert "has 4097 descriptors, more than max_chain 4096" in h.vm.log()
    # a chain of more than 2^32 bytes (each buffer inside RAM)
    h.start()
    e0 = h.errors()
    h.request(0, [(0, 5 << 29, 0), (0, 5 << 29, 0)], wait=False)
    assert h.wait_needs_reset()
    assert delta(h, e0, "ring-chain-bytes") == 1
    assert "more than the spec's 2^32" in h.vm.log()
    assert h.lost() == set()
    h.alive()


def test_avail_index_and_head_out_of_range(pfn_vm):
    h = pfn_vm
    h.start()
    e0 = h.errors()
    ring = h.g.queues[0].ring
    ring.set_avail_idx(9)                            # 9 chains on a ring of 8
    h.g.queues[0].kick()
    assert h.wait_needs_reset()
    assert delta(h, e0, "ring-avail-idx") == 1
    assert "avail idx 9 is 9 ahead of 0, more than the queue size 8" in h.vm.log()
    h.start()
    e0 = h.errors()
    ring = h.g.queues[0].ring
    ring.avail_entry(0, 8)                           # head 8 on a ring of 8
    ring.set_avail_idx(1)
    h.g.queues[0].kick()
    assert h.wait_needs_reset()
    assert delta(h, e0, "ring-desc-index") == 1
    h.alive()


def test_reset_recovers_after_needs_reset(pfn_vm):
    h = pfn_vm
    h.start()
    h.request(0, [(3 << 30, 16, 0)], wait=False)
    assert h.wait_needs_reset()
    h.start()                                        # RESET, negotiate again
    assert not h.g.status() & NEEDS_RESET
    assert h.pfns(0, [DATA + 40])
    assert h.lost() == {DATA + 40}
    assert h.vm.counters()["ballooned_pages"] == 1


@pytest.mark.slow
def test_guest_that_never_stops_adding_cannot_starve_the_monitor(pfn_vm):
    """A guest republishing chains as fast as the device uses them: without a budget
    the device would never leave its queue loop and the monitor would starve."""
    h = pfn_vm
    h.start()
    ring = h.g.queues[0].ring
    h.g.write(BUF, struct.pack("<I", DATA))
    ring.desc(0, BUF, 4, F_WRITE, 0)                 # refused (writable) and used at once: cheap
    for s in range(8):
        ring.avail_entry(s, 0)
    stop = threading.Event()

    kick = h.g.queues[0].kick

    def flood():
        while not stop.is_set():
            ring.set_avail_idx((ring.used_idx() + 8) & 0xFFFF)
            kick()

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    kick()
    served, slowest = 0, 0.0
    deadline = time.monotonic() + 60
    try:
        # the monitor must keep answering while the flood goes on for several budgets (1024 chains)
        while served < 4096 and time.monotonic() < deadline:
            t0 = time.monotonic()
            served = h.vm.qmp.execute("x-balloon-lab-counters", timeout=10)["errors"].get("writable-buffer", 0)
            slowest = max(slowest, time.monotonic() - t0)
            time.sleep(0.05)
    finally:
        stop.set()
        t.join()
    assert served >= 4096, f"the flood only got {served} chains served"
    assert slowest < 10
    h.alive()


# ======================================================================================
# Bitmap wire format
# ======================================================================================
@pytest.mark.parametrize("make,reason,logged", [
    (lambda: header(DATA, 1)[:20], "bitmap-truncated-header", "bitmap header needs 32 bytes, got 20"),
    (lambda: header(DATA, 1, page_shift=13) + b"\x01", "bitmap-bad-page-shift", "page_shift 13, expected 12"),
    (lambda: header(DATA, 9) + b"\x01", "bitmap-bitmap-len", "header says bmap_len 9, request carries 1 bytes"),
    (lambda: header(DATA, 1 << 40) + b"\x01", "bitmap-bitmap-too-large", "bmap_len 1099511627776 is more than"),
    (lambda: header(0, (MAX_PFN + 7) // 8 + 1) + bytes((MAX_PFN + 7) // 8 + 1), "bitmap-bitmap-too-large",
     "needs at most"),
    (lambda: header(MAX_PFN - 4, 1) + b"\xff", "bitmap-beyond-ram", "beyond guest RAM (max_pfn 0x108000)"),
])
def test_bitmap_bad_requests_refused(bitmap_vm, make, reason, logged):
    h = bitmap_vm
    h.start()
    e0 = h.errors()
    assert h.bitmap(0, make())                       # refused, but the chain comes back used
    assert delta(h, e0, reason) == 1
    log = h.vm.log()
    assert f"refused guest input [{reason}]" in log and logged in log
    assert not h.g.status() & NEEDS_RESET
    assert h.lost() == set()
    h.alive()


def test_bitmap_bits_in_the_hole_refused_rest_discarded(bitmap_vm):
    h = bitmap_vm
    h.start()
    e0 = h.errors()
    start = HOLE - 8                                 # 8 RAM pages, then 8 pages of hole
    assert h.bitmap(0, header(start, 2) + b"\xff\xff")
    assert delta(h, e0, "pfn-not-ram") == 8
    assert h.lost() == set(range(HOLE - 8, HOLE))


def test_bitmap_valid_request_split_anywhere(bitmap_vm):
    h = bitmap_vm
    h.start()
    assert h.bitmap(0, header(DATA, 2) + b"\x0f\x01", split=5)
    assert h.lost() == {DATA, DATA + 1, DATA + 2, DATA + 3, DATA + 8}


# ======================================================================================
# Chunks wire format
# ======================================================================================
@pytest.mark.parametrize("chunks,reason", [
    ([(DATA << 12, 0)], "chunks-zero-length"),
    ([((DATA << 12) + 8, 4096)], "chunks-unaligned"),
    ([(DATA << 12, 4096 * 3), ((DATA + 2) << 12, 4096)], "chunks-overlap"),
])
def test_chunks_bad_requests_refused(chunks_vm, chunks, reason):
    h = chunks_vm
    h.start()
    e0 = h.errors()
    assert h.request(0, [(g, n, 0) for g, n in chunks])
    assert delta(h, e0, reason) == 1
    assert f"refused guest input [{reason}]" in h.vm.log()
    assert h.lost() == set()
    assert not h.g.status() & NEEDS_RESET


def test_chunk_in_the_hole_is_a_descriptor_outside_ram(chunks_vm):
    h = chunks_vm
    h.start()
    e0 = h.errors()
    h.request(0, [(DATA << 12, 4096, 0), (HOLE << 12, 4096, 0)], wait=False)
    assert h.wait_needs_reset()
    assert delta(h, e0, "ring-buffer-not-ram") == 1
    assert h.lost() == set()                         # validated as a whole: not even the good chunk


def test_chunks_deflate_never_inflated(chunks_vm):
    h = chunks_vm
    h.start()
    e0 = h.errors()
    assert h.request(0, [(DATA << 12, 2 << 12, 0)])
    assert h.request(1, [(DATA << 12, 4 << 12, 0)])
    assert delta(h, e0, "deflate-not-inflated") == 2
    assert h.lost() == {DATA, DATA + 1}


# ======================================================================================
# The control plane
# ======================================================================================
def test_non_eventfd_as_kick_or_call_fd_refused(pfn_vm):
    h = pfn_vm
    g = h.g
    g.reset()
    g.negotiate()
    g.set_vring(0, RingAddrs.at(RING[0], 8))
    e0 = h.errors()
    r, w = os.pipe()
    try:
        for req, fd in ((SET_VRING_KICK, g.memfd), (SET_VRING_KICK, r), (SET_VRING_CALL, w)):
            code, reason = g.ctl.result(req, U32.pack(0), [fd])
            assert code == -22 and "expected an eventfd" in reason
    finally:
        os.close(r)
        os.close(w)
    assert delta(h, e0, "control-fd-not-eventfd") == 3
    assert "refused guest input [control-fd-not-eventfd]" in h.vm.log()
    h.alive()


def test_fds_on_requests_that_take_none_are_closed(pfn_vm):
    h = pfn_vm
    e0 = h.errors()
    nfds = len(os.listdir(f"/proc/{h.vm.vmm.pid}/fd"))
    r, w = os.pipe()
    try:
        for _ in range(50):
            h.g.ctl.call(GET_FEATURES, b"", [r, w])
    finally:
        os.close(r)
        os.close(w)
    assert len(os.listdir(f"/proc/{h.vm.vmm.pid}/fd")) <= nfds + 2
    assert delta(h, e0, "control-unexpected-fd") == 50
    h.alive()


def test_malformed_and_unknown_control_messages(pfn_vm):
    h = pfn_vm
    ctl = h.g.ctl
    e0 = h.errors()
    ctl.send_packet(HEADER.pack(GET_STATUS, 1, 100))          # size says 100, carries 0
    ctl.send_packet(HEADER.pack(GET_STATUS, 2, 0))            # protocol version 2
    ctl.send_packet(b"\x01\x02")                              # shorter than a header
    assert not ctl.pending(0.3)                               # refused without a reply
    assert ctl.result(99) == (-38, "unknown request 99")      # -ENOSYS (and all of the above was read)
    assert delta(h, e0, "control-malformed") == 3
    assert ctl.result(SET_DIRTY_LOG)[0] == -1                 # -EPERM: not the guest's to send
    code, reason = ctl.result(SET_VRING, struct.pack("<IIQQQ", 7, 8, 0, 0, 0))
    assert code == -22 and "queue 7 does not exist" in reason
    assert h.g.status() is not None                           # still answering, in step
    h.alive()


def test_ring_in_the_hole_fails_activation(pfn_vm):
    h = pfn_vm
    g = h.g
    g.reset()
    g.negotiate()
    assert g.set_vring(0, RingAddrs.at(3 << 30, 8)) == (0, "")   # addresses are checked at DRIVER_OK
    code, reason = g.driver_ok()
    assert code == -22 and "is not inside one RAM region" in reason
    assert g.status() & FAILED
    assert "refused guest input [activate]" in h.vm.log()
    h.alive()
