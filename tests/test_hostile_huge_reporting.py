"""The real VMM on a THP backing with free page reporting, against the raw hostile guest
(device/guest/raw_guest.py): page_shift values in bitmap headers, and bad reporting chains on
queue 4. Each refusal is counted and logged, nothing outside the named (and valid)
pages loses data per the memfd's SEEK_DATA, and the VMM keeps answering."""
from __future__ import annotations

import pytest

from device.virtio.backing import BackingError, ensure_backing
from device.virtio.features import F_REPORTING, bit
from device.guest.raw_guest import F_WRITE, NEEDS_RESET
from lab.trials.model.hostile_vm import HostileVM
from test_hostile_guest import DATA, GUEST_MIB, HIGH, HOLE, MAX_PFN, RING, HostileVMSession, delta, header

HUGE = 512
BLOCK = DATA                      # 16 MiB: a 2 MiB-aligned block that holds the test's data pages
RING4 = 0x13000


class HugeHostileVMSession(HostileVMSession):
    def __init__(self, protocol: str) -> None:
        try:
            ensure_backing("thp")
        except BackingError as e:
            pytest.skip(f"no shmem THP here: {e}")
        self.vm = HostileVM(GUEST_MIB, protocol, vmm={"backing": "thp", "reporting": True})
        self.g = self.vm.guest
        self.g.map_memory()
        self.protocol = protocol

    def start_reporting(self) -> None:
        RING[4] = RING4
        self.start(queues=(0, 1, 4))
        assert self.g.features & bit(F_REPORTING)


@pytest.fixture(scope="module")
def huge_vm():
    h = HugeHostileVMSession("bitmap")
    yield h
    h.close()
    RING.pop(4, None)


@pytest.mark.parametrize("shift", [0, 11, 13, 20, 22, 63, 0xFFFF])
def test_page_shift_values_other_than_12_and_21_are_refused(huge_vm, shift):
    h = huge_vm
    h.start()
    e0 = h.errors()
    assert h.bitmap(0, header(BLOCK, 1, page_shift=shift) + b"\x01")
    assert delta(h, e0, "bitmap-bad-page-shift") == 1
    assert f"page_shift {shift}, expected 12 or 21" in h.vm.log()
    assert h.lost() == set() and not h.g.status() & NEEDS_RESET
    h.alive()


@pytest.mark.parametrize("make,reason", [
    (lambda: header(BLOCK + 8, 1, page_shift=21) + b"\x01", "bitmap-unaligned-start"),
    (lambda: header(MAX_PFN - HUGE, 1, page_shift=21) + b"\x03", "bitmap-beyond-ram"),
    (lambda: header(0, (MAX_PFN // HUGE + 7) // 8 + 1, page_shift=21) + bytes((MAX_PFN // HUGE + 7) // 8 + 1),
     "bitmap-bitmap-too-large"),
])
def test_page_shift_21_bad_requests_refused(huge_vm, make, reason):
    h = huge_vm
    h.start()
    e0 = h.errors()
    assert h.bitmap(0, make())
    assert delta(h, e0, reason) == 1
    assert h.lost() == set()
    h.alive()


def test_page_shift_21_frees_the_whole_block_and_refuses_its_hole_part(huge_vm):
    h = huge_vm
    h.start()
    e0 = h.errors()
    assert h.bitmap(0, header(BLOCK, 1, page_shift=21) + b"\x01")          # one whole 2 MiB block
    assert h.lost() == set(range(DATA, DATA + 64))
    assert h.bitmap(0, header(HOLE - HUGE, 1, page_shift=21) + b"\x03")    # RAM block, then a hole block
    assert delta(h, e0, "pfn-not-ram") == HUGE
    assert set(range(HOLE - 8, HOLE)) <= h.lost()
    h.alive()


def test_a_partially_ballooned_host_page_keeps_its_data(huge_vm):
    h = huge_vm
    h.start()
    assert h.bitmap(0, header(HIGH, 2) + b"\xff\x00")                     # 8 of 512 sub-pages
    assert h.lost() == set()


@pytest.mark.parametrize("chain,reason", [
    ([(BLOCK << 12, 2 << 20, 0)], "report-readable-buffer"),
    ([((BLOCK << 12) + 8, 2 << 20, F_WRITE)], "report-unaligned"),
    ([(BLOCK << 12, 0, F_WRITE)], "report-zero-length"),
    ([(BLOCK << 12, 2 << 20, F_WRITE), ((BLOCK + 8) << 12, 4096, F_WRITE)], "report-overlap"),
    ([(0, 2 << 20, F_WRITE)], "report-not-free"),                          # the rings' own pages
])
def test_bad_reports_refused_whole(huge_vm, chain, reason):
    h = huge_vm
    h.start_reporting()
    e0 = h.errors()
    assert h.request(4, chain)
    assert delta(h, e0, reason) == 1
    assert f"refused guest input [{reason}]" in h.vm.log()
    assert h.lost() == set() and not h.g.status() & NEEDS_RESET
    h.alive()


def test_report_naming_a_ballooned_page_is_refused_and_a_hole_is_outside_ram(huge_vm):
    h = huge_vm
    h.start_reporting()
    e0 = h.errors()
    assert h.bitmap(0, header(BLOCK + 100, 1) + b"\x01")                  # one ballooned page in the block
    assert h.request(4, [(BLOCK << 12, 2 << 20, F_WRITE)])
    assert delta(h, e0, "report-not-free") == 1 and h.lost() == set()
    h.request(4, [(HOLE << 12, 2 << 20, F_WRITE)], wait=False)
    assert h.wait_needs_reset()
    assert delta(h, e0, "ring-buffer-not-ram") == 1 and h.lost() == set()


def test_a_valid_report_frees_whole_host_pages_only(huge_vm):
    h = huge_vm
    h.start_reporting()
    assert h.request(4, [((HIGH) << 12, 4096 * 16, F_WRITE)])               # smaller than a host page
    assert h.lost() == set()
    assert h.request(4, [(BLOCK << 12, 2 << 20, F_WRITE), (HIGH << 12, 2 << 20, F_WRITE)])
    assert h.lost() == set(range(DATA, DATA + 64)) | set(range(HIGH, HIGH + 16))
    h.alive()
