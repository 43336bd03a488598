"""The fuzzer's bounds and oracles can fail: planted bugs, caught the first time.

* A slow handler planted in the real code (a queue handler, a decoder, the ring walker)
  makes one wake-up cost 80 ms of CPU: every target reports it as `slow-wakeup` on the
  first execution that meets it, with what the wake-up served; nothing re-runs it.
* Every target runs on the VMM's own event-loop code with the real per-wake-up budget:
  a request larger than one wake-up's budget is served over several wake-ups.
* The out-of-range oracle has its own region table (fuzz/regions.py): a bug planted in
  the device's table (GuestLayout.pc putting the memory above 4 GiB one page too low
  in the memfd) is caught as an out-of-range discard; with the device's table in the
  oracle, device and oracle would have moved together.
"""
from __future__ import annotations

import random
import struct

import numpy as np
import pytest

from device.vmm.balloon_device import BalloonDevice
from device.vmm.budget import DISCARDS_PER_WAKEUP, cpu_time
from device.virtio import wire
from device.virtio.device_queue import DeviceQueue
from device.virtio.layout import GuestLayout, Region
from fuzz import cases, control_target, engine, formats_target, generators
from fuzz.decoder_target import run_decoder
from fuzz.device_target import DeviceTarget
from fuzz.regions import pc_regions
from fuzz.time_limit import hang_timer
from fuzz.wakeups import WAKEUP_BOUND_S

SLOW_S = 0.080


def burn(seconds: float) -> None:
    t0 = cpu_time()
    while cpu_time() - t0 < seconds:
        pass


def slowed(fn):
    def slow(*a, **kw):
        burn(SLOW_S)
        return fn(*a, **kw)
    return slow


@pytest.fixture(autouse=True)
def quiet_and_timed():
    engine.quiet()
    with hang_timer():
        yield


def inflate_case(pfns: list[int], layout: str = "mini", proto: str = "pfn") -> dict:
    case = {"t": "device", "layout": layout, "proto": proto, "qsize": 8, "hint": "none", "indirect": False,
            "event_idx": False, "status": "live", "pre": [], "queues": {}, "mem": [], "kicks": []}
    b = generators.CaseBuilder(case, random.Random(1))
    raw = struct.pack(f"<{len(pfns)}I", *pfns)
    b.chain(0, [(b.buf(raw, 4), len(raw), False)], False)
    case["queues"][0]["idx"] = 1
    case["kicks"].append(0)
    return case


def assert_slow(o, what: str) -> None:
    assert o.failure == "slow-wakeup", o
    assert f"more than the {WAKEUP_BOUND_S * 1e3:.0f} ms bound" in o.detail and what in o.detail, o.detail
    ms = float(o.detail.split(" used ", 1)[1].split(" ms", 1)[0])
    assert ms >= SLOW_S * 1e3, o.detail


# --- a slow handler planted in the real code, every target ------------------------------------
def test_device_target_catches_a_slow_queue_handler_the_first_time(monkeypatch):
    target = DeviceTarget()
    try:
        case = inflate_case([0x50, 0x51])
        assert target.run_device(case, 5.0).failure is None                 # as it is: fine
        monkeypatch.setattr(BalloonDevice, "_inflate_chain", slowed(BalloonDevice._inflate_chain))
        assert_slow(target.run_device(case, 5.0), "kick on queue 0")      # the first execution
    finally:
        target.close()


def test_ring_target_catches_a_slow_chain_walk(monkeypatch):
    target = DeviceTarget()
    try:
        case = dict(inflate_case([0x50]), t="ring")
        assert target.run_ring(case, 5.0).failure is None
        monkeypatch.setattr(DeviceQueue, "pop_avail", slowed(DeviceQueue.pop_avail))
        assert_slow(target.run_ring(case, 5.0), "walking chain ")
    finally:
        target.close()


def test_decoder_target_catches_a_slow_decoder(monkeypatch):
    case = {"t": "pfn", "data": struct.pack("<4I", 1, 2, 3, 4), "max_pfn": 256}
    assert run_decoder(case, 5.0).failure is None
    monkeypatch.setattr(wire, "decode_pfns", slowed(wire.decode_pfns))
    assert_slow(run_decoder(case, 5.0), "decoding a 16-byte PFN array")


def test_report_target_catches_a_slow_report_handler(monkeypatch):
    from device.vmm.page_reporting_device import ReportingDevice
    target = formats_target.ReportTarget()
    try:
        case = {"t": "report", "backing": "4k", "pre": [], "chain": [[2 << 20, 2 << 20, True]]}
        assert target.run(case)[1] is None
        monkeypatch.setattr(ReportingDevice, "_report_chain", slowed(ReportingDevice._report_chain))
        sig, failure, detail = target.run(case)
        assert failure == "slow-wakeup" and "the report chain's kick" in detail, (failure, detail)
    finally:
        target.close()


def test_control_target_catches_a_slow_control_request(monkeypatch):
    from device.virtio.transport import VirtioTransport
    case = {"t": "control", "proto": "pfn", "hint": "none", "max_queued": 64,
            "steps": [["setup", [0, 1]], ["msg", 1, 1, None, "", []], ["serve", 2]]}
    state = control_target.ControlWorkerState()
    try:
        assert control_target.run_control(state, case, 5.0)[0] is None
        monkeypatch.setattr(VirtioTransport, "handle", slowed(VirtioTransport.handle))
        failure, detail, _ = control_target.run_control(state, case, 5.0)
        assert failure == "slow-wakeup" and "step 1: msg" in detail, (failure, detail)
    finally:
        state.close()


def test_a_slow_wakeup_is_counted_and_kept_as_a_case_not_rerun(monkeypatch):
    """In a run, each execution that met the planted slow handler is one slow wake-up
    (no re-runs to confirm it), and its case is kept with the failures."""
    monkeypatch.setattr(wire, "decode_pfns", slowed(wire.decode_pfns))
    res = engine.fuzz_worker(40, seed=3, limit_s=5.0, family="rings")
    pfn_execs = res.by_target.get("pfn", 0)
    assert pfn_execs and res.slow_wakeups >= pfn_execs
    slow = [f for f in res.failures if f["kind"] == "slow-wakeup"]
    assert len(slow) == res.slow_wakeups and all(f["case"]["t"] for f in slow)
    assert any(k.startswith("pfn: decoding") for k in res.slow_by_what), res.slow_by_what


# --- the real budget per wake-up ------------------------------------------------------------------
def test_device_target_serves_a_big_request_over_several_wakeups_of_the_real_budget(monkeypatch):
    """Requests of more discards than one wake-up's budget (DISCARDS_PER_WAKEUP) are served
    in several wake-ups (the device yields and re-kicks itself), as in the VMM, not in one."""
    import fuzz.device_target as device_target
    from fuzz.wakeups import FuzzLoop

    made: list = []

    class CountingLoop(FuzzLoop):
        def __init__(self, dev, wakeups):
            super().__init__(dev, wakeups)
            made.append(wakeups)
    monkeypatch.setattr(device_target, "FuzzLoop", CountingLoop)
    pfns = list(range(4096, 4096 + 2 * DISCARDS_PER_WAKEUP + 10))           # > 2 budgets of per-page discards
    case = {"t": "device", "layout": "pc", "proto": "pfn", "qsize": 16, "hint": "none", "indirect": False,
            "event_idx": False, "status": "live", "pre": [], "queues": {}, "mem": [], "kicks": []}
    b = generators.CaseBuilder(case, random.Random(1))
    for k in range(0, len(pfns), 256):                                        # 256 PFNs per request
        raw = struct.pack(f"<{len(pfns[k:k + 256])}I", *pfns[k:k + 256])
        b.chain(0, [(b.buf(raw, 4), len(raw), False)], False)
    case["queues"][0]["idx"] = len(case["queues"][0]["heads"])
    case["kicks"].append(0)
    target = DeviceTarget()
    try:
        o = target.run_device(case, 10.0)
        assert o.failure is None, o
        assert made and made[0].count >= 3, made[0].count if made else None   # three wake-ups at least
    finally:
        target.close()


# --- the oracle's own region table ---------------------------------------------------------------------
@pytest.mark.parametrize("mib", [4, 3072, 3076, 4096, 65536])
def test_the_fuzzers_region_table_agrees_with_the_devices(mib):
    mine, dev = pc_regions(mib), GuestLayout.pc(mib)
    assert [(r.gpa, r.size, r.memfd_offset) for r in mine.regions] == [(r.gpa, r.size, r.offset) for r in dev.regions]
    pfns = np.array([0, 1, 100, mine.max_pfn - 1, (3 << 30) >> 12, (4 << 30) >> 12])
    pfns = pfns[pfns < mine.max_pfn]
    ram = mine.ram_mask()[pfns]
    assert np.array_equal(mine.pfn_to_offset(pfns[ram]), dev.pfn_to_offset(pfns[ram]))


def test_a_bug_in_the_devices_region_table_is_an_out_of_range_discard(monkeypatch):
    case = inflate_case([(4 << 30 >> 12) + 1], layout="pc")       # a page above 4 GiB, inside the fill
    target = DeviceTarget()
    try:
        assert target.run_device(case, 5.0).failure is None
    finally:
        target.close()
    real_pc = GuestLayout.pc.__func__

    def shifted(cls, guest_mib):                       # high memory one page too low: it overlaps low memory
        lay = real_pc(cls, guest_mib)
        low, high = lay.regions
        return cls((low, Region(high.gpa, high.size, high.offset - 4096)))
    monkeypatch.setattr(GuestLayout, "pc", classmethod(shifted))
    monkeypatch.setattr(cases, "_LAYOUT_CACHE", {})
    target = DeviceTarget()
    try:
        o = target.run_device(case, 5.0)
        assert o.failure == "oob-discard", o
        assert f"pages [{4 << 30 >> 12}]" in o.detail, o.detail        # the page before the named one
    finally:
        target.close()
