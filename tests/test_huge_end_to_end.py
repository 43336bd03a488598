"""End to end, real processes: a THP and a hugetlb guest ballooned with whole host pages,
and free page reporting returning a guest's freed memory that the guest then reuses
without any deflate. Figures come from the memfd (st_blocks, SEEK_DATA / pread)."""
from __future__ import annotations

import time

import pytest

from device.virtio.backing import BackingError, ensure_backing, hugetlb_pool
from device.guest.page_reporting_driver import ReportingParams
from lab.trials.model.reclaim import ReclaimTrial, run_reclaim
from lab.trials.model.balloon_trial import BalloonTrial
from lab.trials.model.processes import LabProcesses
from lab.trials.model.runner import run_balloon
from system import knobs

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _give_knobs_back():
    """The knobs `_needs` raises are held by this pytest process: give them back after
    each test (through the holders registry, so the next lab command sees them gone)."""
    yield
    knobs.restore_all()


def _needs(backing: str, mib: int) -> None:
    try:
        ensure_backing(backing, mib * MiB)
    except BackingError as e:
        pytest.skip(f"--backing {backing} unavailable here: {e}")


@pytest.mark.slow
def test_thp_bitmap_with_whole_host_pages_frees_exactly_the_ballooned_bytes():
    _needs("thp", 512)
    r = run_balloon(BalloonTrial(protocol="bitmap", guest_mib=512, inflate_mib=448, backing="thp",
                                 alloc_policy="hugepage-aware"))
    assert r["verified"], r["verification"]
    assert r["memfd_freed_bytes"] == 448 * MiB
    hp = r["host_pages"]
    assert hp["discarded_host_pages"] == 224 and hp["partial_host_pages"] == 0
    assert r["discard_calls"] <= 8                     # one call per run of adjacent host pages
    assert r["bytes_on_ring"] < 200                    # page_shift 21: one bit per 2 MiB block


@pytest.mark.slow
def test_hugetlb_guest_balloons_whole_pages_and_verifies():
    before = hugetlb_pool().total
    _needs("hugetlb", 256)
    r = run_balloon(BalloonTrial(protocol="chunks", guest_mib=256, inflate_mib=128, backing="hugetlb",
                                 alloc_policy="hugepage-aware", workload_params={"used_share": 0.2}))
    assert r["verified"], r["verification"]
    assert r["memfd_freed_bytes"] == 128 * MiB
    assert r["verification"]["after_inflate"]["whole_host_pages"] == 64
    knobs.restore_all()
    assert hugetlb_pool().total == before           # the machine has its pool back


@pytest.mark.slow
def test_reporting_returns_freed_memory_and_the_guest_reuses_it_without_deflate():
    params = ReportingParams(delay_s=0.3)
    r = run_reclaim(ReclaimTrial("reporting", guest_mib=512, free_mib=256, reporting=params, settle_s=1.5))
    assert r["verified"], r["verification"]
    assert r["returned_share"] >= 0.9 and r["time_to_90_s"] is not None
    assert r["time_to_90_s"] >= params.delay_s                  # nothing before the delay
    assert r["guest_reporting"]["blocks"] > 0 and r["device_reporting"]["reported_bytes"] > 0
    # reuse: the guest allocates the reported pages again, writes them, and needs no deflate
    lp = LabProcesses(BalloonTrial(guest_mib=512, inflate_mib=1, workload="idle"), vmm={"reporting": True},
                      guest={"reporting": True, "reporting_delay_ms": 300})
    try:
        mem = lambda: lp.qmp.execute("x-balloon-lab-memfd")["allocated_bytes"]
        lp.agent.execute("alloc-free", {"mib": 128})
        high = mem()
        deadline = time.monotonic() + 10
        while mem() > high - 100 * MiB and time.monotonic() < deadline:
            time.sleep(0.05)
        low = mem()
        assert low <= high - 100 * MiB
        first = lp.agent.execute("reporting-info")["blocks"]
        lp.agent.execute("alloc-free", {"mib": 128})           # reuse of reported pages: no deflate
        assert mem() >= low + 100 * MiB
        assert lp.agent.execute("verify")["held_ok"]
        deadline = time.monotonic() + 10
        while lp.agent.execute("reporting-info")["blocks"] <= first and time.monotonic() < deadline:
            time.sleep(0.05)
        info = lp.agent.execute("reporting-info")
        assert info["blocks"] > first                          # freed again: reported again
        res = lp.qmp.execute("x-balloon-lab-check-free-runs", info["reported_free_runs"])
        assert res["host_pages_checked"] > 0 and res["host_pages_with_data"] == 0
        counters = lp.qmp.execute("x-balloon-lab-counters")
        assert counters["deflate"]["requests"] == 0 and not counters["errors"]
    finally:
        lp.close()
