"""Workloads on a real memfd-backed guest: the memory shape each leaves, measured
from the allocator and from the memfd's own data extents, and their activity."""
from __future__ import annotations

import time

import numpy as np
import pytest

from device.guest.buddy import BuddyAllocator
from device.guest.page_contents import GuestPageContents
from device.virtio.ram import GuestRAM
from device.virtio.layout import PAGE_SHIFT, PAGE_SIZE, GuestLayout
from lab.trials.model.runner import trial_verified
from workloads import WORKLOADS, describe_workloads, make_workload, parse_params, run_lengths
from workloads.metrics import must_be_zero_failures


def guest(mib: int):
    lay = GuestLayout.pc(mib)
    ram = GuestRAM.create(lay)
    return GuestPageContents(ram, BuddyAllocator(lay))


@pytest.fixture
def g512():
    mem = guest(512)
    yield mem
    mem.close()
    mem.ram.close()


def data_pfns(mem: GuestPageContents) -> np.ndarray:
    """PFNs the kernel says hold data (SEEK_DATA/SEEK_HOLE), not our bookkeeping."""
    rows = np.flatnonzero(mem.ram.data_page_mask())
    return mem.layout.offset_to_pfn(rows << PAGE_SHIFT)


def free_runs(mem: GuestPageContents) -> np.ndarray:
    return run_lengths(np.flatnonzero(mem.alloc.free_page_mask()))


# ------------------------------------------------------------------ idle
def test_idle_default_shape(g512):
    mem, a = g512, g512.alloc
    ram = a.ram_pages
    s = make_workload("idle", {}, seed=1).prepare(mem)
    held = mem.held_pfns()
    # 5 % in use, measured from the allocator
    assert abs(len(held) - 0.05 * ram) <= 1
    assert a.used_pages_count - a.kernel_pages == len(held)
    # in use + stale = what the memfd really holds (20 % stale)
    data = data_pfns(mem)
    assert len(data) == s["used_pages"] + s["stale_pages"]
    assert abs(len(data) - 0.25 * ram) <= 2
    assert np.isin(held, data).all()
    stale = np.setdiff1d(data, held)
    assert a.is_free(stale).all()  # stale pages are free memory
    assert abs(len(stale) - 0.20 * ram) <= 2
    # the rest never touched: 75 % of RAM is holes in the memfd
    assert abs((ram - len(data)) - 0.75 * ram) <= 2
    # realistic placement: a few clusters, not all at the bottom, stale elsewhere
    assert 2 <= len(run_lengths(held)) <= 4
    assert held.max() - held.min() > ram // 4
    assert not (held < a.kernel_pages + len(held)).all()
    # free memory stays in large blocks
    assert a.order_counts()[10] * 1024 / a.free_pages_count > 0.95
    assert mem.verify().ok


def test_idle_shares_are_parameters(g512):
    mem, a = g512, g512.alloc
    make_workload("idle", {"used_share": 0.10, "stale_share": 0.0, "regions": 2}, seed=2).prepare(mem)
    assert abs(len(mem.held_pfns()) - 0.10 * a.ram_pages) <= 1
    assert len(data_pfns(mem)) == len(mem.held_pfns())
    assert len(run_lengths(mem.held_pfns())) <= 2


def test_idle_same_seed_same_shape():
    shapes = []
    for _ in range(2):
        mem = guest(256)
        make_workload("idle", {}, seed=42).prepare(mem)
        shapes.append(mem.held_pfns())
        mem.close(), mem.ram.close()
    assert np.array_equal(shapes[0], shapes[1])


# ------------------------------------------------------------------ hog
def test_hog_holds_its_share(g512):
    mem = g512
    s = make_workload("hog", {"share": 0.3}, seed=3).prepare(mem)
    n = int(round(0.3 * mem.alloc.ram_pages))
    assert s["held_pages"] == n == len(mem.held_pfns())
    assert mem.ram.allocated_bytes() == n * PAGE_SIZE
    assert mem.verify().ok


# ------------------------------------------------------------------ fragment
@pytest.mark.parametrize("share", [0.5, 1.0])
def test_fragment_run_lengths_shift_with_degree(share):
    medians, single_share = [], []
    for degree in (0.0, 0.3, 0.7, 1.0):
        mem = guest(128)
        s = make_workload("fragment", {"share": share, "degree": degree}, seed=4).prepare(mem)
        shaped = mem.held_pfns()
        lo, hi = shaped.min(), shaped.max()
        free = np.flatnonzero(mem.alloc.free_page_mask())
        inside = free[(free >= lo) & (free <= hi)]
        runs = run_lengths(inside)
        medians.append(float(np.median(runs)))
        single_share.append(runs[runs == 1].sum() / runs.sum())
        assert mem.verify().ok
        assert s["held_pages"] + s["freed_pages"] == s["shaped_pages"]
        assert len(data_pfns(mem)) == s["shaped_pages"]  # freed pages hold stale data
        if degree == 1.0:
            # free pages alternate with held ones
            assert np.all(runs == 1) and np.all(run_lengths(shaped) == 1)
            # and the balloon's next allocation gets isolated pages
            assert np.all(run_lengths(mem.alloc.alloc_pages(2000, notify_oom=False)) == 1)
        if degree == 0.0:
            assert mem.alloc.order_counts()[10] * 1024 == mem.alloc.free_pages_count
        mem.close(), mem.ram.close()
    assert medians == sorted(medians, reverse=True) and medians[0] >= 512 * medians[-1]
    assert single_share[0] == 0.0 and single_share[-1] == 1.0


def test_fragment_without_stale_data(g512):
    s = make_workload("fragment", {"share": 0.4, "degree": 1.0, "stale": False}, seed=5).prepare(g512)
    assert len(data_pfns(g512)) == s["held_pages"]


# ------------------------------------------------------------------ churn
def test_churn_runs_clean_beside_a_balloon(g512):
    mem, a = g512, g512.alloc
    make_workload("idle", {}, seed=6).prepare(mem)
    free0 = a.free_pages_count
    w = make_workload("churn", {"batch_pages": 128, "rate": 200, "held_share": 0.02}, seed=7)
    w.start(mem)
    # the balloon's side: inflate and deflate in the main thread meanwhile
    deadline = time.monotonic() + 0.6
    while time.monotonic() < deadline:
        b = a.alloc_pages(20000, notify_oom=False)
        assert not mem.is_held(b).any()
        a.free_pages(b)
    st = w.stop()
    assert st["cycles"] > 0 and st["pages_churned"] > 0
    assert st["corruptions"] == 0
    assert st["pages_checked"] == st["pages_freed"] == st["pages_churned"]
    assert a.free_pages_count == free0  # churn gave everything back
    assert mem.verify().ok
    a.check()


def test_churn_counts_a_corrupted_page(g512):
    mem = g512
    w = make_workload("churn", {"batch_pages": 64, "rate": 500, "held_share": 0.05}, seed=8)
    w.start(mem)
    victim = None
    for _ in range(200):
        with mem.lock:
            names = [n for n in mem.holdings() if n.startswith("churn:")]
            if names:
                victim = int(mem.holding(names[0])[0])
                off = int(mem.layout.pfn_to_offset(np.array([victim]))[0])
                mem.ram.discard(off, PAGE_SIZE)  # what a buggy balloon would do
                break
        time.sleep(0.01)
    st = w.stop()
    assert victim is not None
    assert st["corruptions"] == 1
    # issue 22: such a trial is not verified, whatever the balloon's own checks said
    ok = {"ok": True}
    assert must_be_zero_failures(st) == ["corruptions=1"]
    assert trial_verified(ok, ok, [], st) == (False, ["corruptions=1"])
    assert trial_verified(ok, ok, [], {**st, "corruptions": 0}) == (True, [])


# ------------------------------------------------------------------ dirty
def test_dirty_writes_are_logged_and_recorded(g512):
    mem = g512
    log_all = np.zeros(mem.layout.max_pfn, dtype=np.uint8)
    mem.attach_dirty_log(log_all)
    w = make_workload("dirty", {"rate_mib_s": 64, "stale_share": 0.05}, seed=9)
    w.prepare(mem)
    allp = mem.layout.ram_pfns()
    before = mem.fingerprints(allp)
    log_run = np.zeros(mem.layout.max_pfn, dtype=np.uint8)  # like a migration's first harvest
    mem.attach_dirty_log(log_run)
    w.start(mem)
    time.sleep(0.4)
    st = w.stop()
    log_all |= log_run
    assert st["held_pages_written"] > 0 and st["free_pages_written"] > 0
    assert abs(st["held_pages_written"] - st["free_pages_written"]) <= st["ticks"]  # half and half
    changed = allp[mem.fingerprints(allp) != before]
    ws = mem.holding("dirty.ws")
    assert np.isin(ws, changed).any() and not np.isin(changed, ws).all()  # held and free pages
    assert log_run[changed].all()  # every page whose bytes changed is in the log
    assert mem.verify().ok  # the record says what each held page holds now
    # the kernel's own oracle: exactly the pages ever written through GuestPageContents hold data
    assert np.array_equal(np.sort(data_pfns(mem)), np.flatnonzero(log_all))


def test_dirty_targets_callback(g512):
    mem = g512
    w = make_workload("dirty", {"rate_mib_s": 32, "free_write_share": 0.0}, seed=10)
    w.prepare(mem)
    ws = mem.holding("dirty.ws")
    chosen, others = ws[:100], ws[100:]
    before = mem.fingerprints(others)
    w.set_targets(lambda m: chosen)
    w.start(mem)
    time.sleep(0.2)
    st = w.stop()
    assert st["held_pages_written"] > 0 and st["free_pages_written"] == 0
    assert np.array_equal(mem.fingerprints(others), before)
    assert mem.verify().ok


def test_background_thread_error_is_reported(g512):
    w = make_workload("dirty", {"rate_mib_s": 32, "free_write_share": 0.0}, seed=11)
    w.prepare(g512)
    w.set_targets(lambda m: (_ for _ in ()).throw(RuntimeError("boom")))
    w.start(g512)
    time.sleep(0.05)
    with pytest.raises(RuntimeError, match="boom"):
        w.stop()


# ------------------------------------------------------------------ validation
def test_registry_and_static_start_stop(g512):
    assert set(WORKLOADS) == {"idle", "aged", "hog", "fragment", "churn", "dirty"}
    w = make_workload("hog", {"share": 0.01}, seed=0)
    w.prepare(g512)
    w.start(g512)
    assert w.stop() == {}
    info = describe_workloads()
    assert {p.name for p in info["idle"]} == {"used_share", "stale_share", "regions", "stale_regions"}


@pytest.mark.parametrize("name,params,msg", [
    ("nosuch", {}, r"unknown workload 'nosuch'; choose from: idle, aged, hog, fragment, churn, dirty"),
    ("idle", {"used": 0.1}, r"no parameter 'used'; its parameters are: used_share \(float in \[0.0, 1.0\]\)"),
    ("idle", {"used_share": "lots"}, r"'used_share' must be a number \(float in \[0.0, 1.0\]\), got 'lots'"),
    ("idle", {"used_share": 1.5}, r"'used_share' must be float in \[0.0, 1.0\], got 1.5"),
    ("idle", {"used_share": True}, r"'used_share' must be a number"),
    ("idle", {"used_share": float("nan")}, r"'used_share' must be a number .*NaN"),
    ("idle", {"used_share": 0.6, "stale_share": 0.6}, r"used_share \+ stale_share must be <= 1.0"),
    ("idle", {"regions": 0}, r"'regions' must be int in \[1, 64\], got 0"),
    ("idle", {"regions": 2.5}, r"'regions' must be an integer \(int in \[1, 64\]\), got 2.5"),
    ("fragment", {"degree": -0.1}, r"'degree' must be float in \[0.0, 1.0\], got -0.1"),
    ("fragment", {"stale": 1}, r"'stale' must be a bool"),
    ("churn", {"rate": 0}, r"'rate' must be float in \(0.0, 100000.0\], got 0.0"),
    ("churn", {"batch_pages": 0}, r"'batch_pages' must be int in \[1, 262144\], got 0"),
    ("dirty", {"rate_mib_s": -5}, r"'rate_mib_s' must be float in \(0.0, 10000.0\]"),
    ("hog", [("share", 1)], r"must be a mapping"),
])
def test_parameter_validation_messages(name, params, msg):
    with pytest.raises(ValueError, match=msg):
        make_workload(name, params, seed=1)


def test_seed_validation_and_cli_parsing():
    with pytest.raises(ValueError, match="seed"):
        make_workload("idle", {}, seed=-1)
    p = parse_params("fragment", ["share=0.25", "degree=1", "stale=false"])
    assert p == {"share": 0.25, "degree": 1.0, "stale": False}
    assert make_workload("fragment", p, seed=1).params.stale is False
    with pytest.raises(ValueError, match="'share' must be a number"):
        make_workload("hog", parse_params("hog", ["share=half"]), seed=1)
    with pytest.raises(ValueError, match="name=value"):
        parse_params("hog", ["share"])
    assert make_workload("churn", parse_params("churn", ["batch_pages=0x100"]), 1).params.batch_pages == 256


def test_aged_touches_every_free_page(g512):
    """aged: in-use share held, and every other free page backed by the memfd, so the
    balloon's discards free exactly what it takes."""
    w = make_workload("aged", {"used_share": 0.1}, seed=5)
    s = w.prepare(g512)
    alloc = g512.alloc
    assert s["untouched_free_pages"] == 0
    free = np.flatnonzero(alloc.free_page_mask())
    data = g512.ram.data_page_mask()
    offs = g512.layout.pfn_to_offset(free) >> 12
    assert data[offs].all()
    assert len(g512.held_pfns()) == round(0.1 * alloc.ram_pages)
    assert g512.verify().ok
    assert alloc.order_counts()[10] > 0     # free memory still in large blocks
