"""Twin trials (lab/trials/twins.py): timings from a trial whose probes were really detached,
counts from its probed twin; and the round's seed for both."""
from __future__ import annotations

import mmap
import os
import sys

import pytest

from lab.trials import twins
from lab.trials.arm_trial import run_trial
from lab.trials.spec import ExperimentSpec
from probes.bpf import ebpf_skip_reason

PAGE = 4096
_MISSING = ebpf_skip_reason()
if _MISSING:
    print(f"\nSKIPPING eBPF twin tests: {_MISSING}", file=sys.stderr)
ebpf = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")


def test_merge_takes_every_number_from_the_unprobed_twin_and_the_probe_readings_from_the_probed():
    unprobed = {"verified": True, "pages": 10, "wall_ns": 100, "stages_ns": {"inflate": {"total": 90, "alloc": 5}},
                "deflate": {"wall_ns": 40, "kicks": 3, "interrupts": 3}, "rss_bytes": {"vmm": 500},
                "trial_wall_ns": 1000, "probes": {"backend": "none"}, "pids": {"vmm": 1}}
    probed = {"verified": True, "pages": 10, "wall_ns": 130, "stages_ns": {"inflate": {"total": 120, "alloc": 6}},
              "deflate": {"wall_ns": 50, "kicks": 4, "interrupts": 5}, "rss_bytes": {"vmm": 700},
              "trial_wall_ns": 1400,
              "probes": {"backend": "bcc", "madvise_kernel_ns": 77, "stages": {"discard": {"ns": 60}}},
              "pids": {"vmm": 2}}
    m = twins.merge_twins(unprobed, probed, "unprobed")
    assert (m["wall_ns"], m["stages_ns"]["inflate"], m["deflate"]["wall_ns"], m["trial_wall_ns"]) == \
        (100, {"total": 90, "alloc": 5}, 40, 1000)
    # the scheduling gauges are the unprobed twin's too, as are the pids they belong to
    assert (m["deflate"]["kicks"], m["deflate"]["interrupts"], m["rss_bytes"], m["pids"]) == (3, 3, {"vmm": 500},
                                                                                                {"vmm": 1})
    assert m["probes"] == probed["probes"]                  # the probes' own readings: the probed twin's
    t = m["twin"]
    assert t["design"] == "twin" and t["first"] == "unprobed" and t["probed_pids"] == {"vmm": 2}
    assert t["probed_timings"] == {"wall_ns": 130, "stages_ns": {"inflate": {"total": 120, "alloc": 6}},
                                   "deflate": {"wall_ns": 50}, "trial_wall_ns": 1400}
    assert t["probed_gauges"] == {"deflate": {"kicks": 4, "interrupts": 5}, "rss_bytes": {"vmm": 700}}
    assert t["stages_from"] == {"inflate": "unprobed"} and t["from_probed"] == []
    # which twin every number came from, checkable on the stored result
    assert twins.values_digest(m) == t["digests"]["unprobed"] != t["digests"]["probed"]
    unprobed["verified"] = False
    assert twins.merge_twins(unprobed, probed, "probed")["verified"] is False


def test_twins_that_differ_in_an_exact_counter_fail_the_trial():
    unprobed = {"verified": True, "pages": 10, "discard_calls": 10, "probes": {}}
    probed = {"verified": True, "pages": 11, "discard_calls": 10, "probes": {}}
    with pytest.raises(twins.TwinsDisagree, match=r"differ in 1 exact counter\(s\), first pages: 10 unprobed, 11 "
                                                  r"probed: one seed must give one guest layout"):
        twins.merge_twins(unprobed, probed, "probed")


def test_what_only_the_probes_measure_comes_whole_from_the_probed_twin():
    """The real stack's discard calls and discard stage exist only in the probed twin
    (the probes count them): the counter goes in, and that operation's whole stage
    breakdown is the probed twin's, so its shares divide figures of one run."""
    unprobed = {"verified": True, "pages": 64, "inflate": {"wall_ns": 500, "kicks": 2},
                "stages_ns": {"inflate": {"total": 500}, "deflate": {"total": 300}}, "probes": None}
    probed = {"verified": True, "pages": 64, "discard_calls": 64, "inflate": {"wall_ns": 650, "kicks": 3},
              "stages_ns": {"inflate": {"total": 650, "discard": 200}, "deflate": {"total": 330}},
              "probes": {"backend": "bcc"}}
    m = twins.merge_twins(unprobed, probed, "unprobed")
    assert m["discard_calls"] == 64
    assert m["stages_ns"] == {"inflate": {"total": 650, "discard": 200}, "deflate": {"total": 300}}
    assert m["inflate"] == {"wall_ns": 500, "kicks": 2}     # the operation's time: still the unprobed twin's
    assert m["twin"]["stages_from"] == {"inflate": "probed", "deflate": "unprobed"}
    assert m["twin"]["from_probed"] == ["discard_calls", "stages_ns.inflate.discard"]


@pytest.mark.ebpf
@ebpf
def test_probes_detached_see_nothing_and_attach_again_after():
    from probes.session import ProbeSession

    s = ProbeSession(enabled=True)
    try:
        s.attach([os.getpid()])
        assert s.active, s.reason
        fd = os.memfd_create("twin-test", os.MFD_CLOEXEC)
        os.ftruncate(fd, 64 * PAGE)
        mm = mmap.mmap(fd, 64 * PAGE)

        def loop() -> None:
            for off in range(0, 64 * PAGE, PAGE):
                mm.madvise(mmap.MADV_REMOVE, off, PAGE)

        s.clear()
        with twins.probes_detached(s):
            loop()
            assert s.module.suspended
        assert s.read().advice.get("MADV_REMOVE", 0) == 0
        loop()
        assert s.read().advice.get("MADV_REMOVE") == 64
    finally:
        s.detach()


@pytest.mark.slow
@pytest.mark.ebpf
@ebpf
def test_twin_trial_timings_unprobed_counts_probed_seed_plus_round():
    from probes.session import ProbeSession

    spec = ExperimentSpec(arms=["pfn"], guest_mib=256, inflate_mib=64, seed=5, trials=1, warmups=0)
    s = ProbeSession(enabled=True)
    try:
        r = run_trial(spec, "pfn", s, rnd=1)
    finally:
        s.detach()
    assert r["verified"] and r["workload"]["seed"] == 6
    t = r["twin"]
    assert t["design"] == "twin" and t["first"] == "probed" and t["counter_mismatches"] == []
    assert t["probed_pids"]["vmm"] != r["pids"]["vmm"] == t["unprobed_pids"]["vmm"]   # two pairs of processes
    assert twins.values_digest(r) == t["digests"]["unprobed"]
    p = r["probes"]
    assert p["backend"] == "bcc" and p["madvise_calls"] >= r["discard_calls"] == 64 * 256
    assert p["stages"]["discard"]["madvise_calls"] == r["discard_calls"]
    probed_total = t["probed_timings"]["stages_ns"]["inflate"]["total"]
    # the probe's own clock timed the probed twin's inflate (USDT markers), not the stored one
    assert abs(p["stages"]["inflate"]["ns"] - probed_total) < 0.05 * probed_total
    assert r["stages_ns"]["inflate"]["total"] != probed_total


@pytest.mark.slow
def test_rounds_use_seed_plus_round():
    spec = ExperimentSpec(arms=["chunks"], guest_mib=128, inflate_mib=64, seed=3, trials=1, warmups=0, probes=False)
    a, b = run_trial(spec, "chunks", None, rnd=0), run_trial(spec, "chunks", None, rnd=1)
    assert (a["workload"]["seed"], b["workload"]["seed"]) == (3, 4)
    assert a["run_length_hist"] != b["run_length_hist"]        # another guest layout per round


def test_overhead_table_pairs_each_trial_with_its_twin():
    from lab.store.store import TrialRecord

    def rec(arm, rnd, unprobed_ms, probed_ms, warmup=False, status="ok"):
        res = {"stages_ns": {"inflate": {"total": unprobed_ms * 1e6}},
               "twin": {"probed_timings": {"stages_ns": {"inflate": {"total": probed_ms * 1e6}}}}}
        return TrialRecord(arm=arm, idx=rnd, round=rnd, warmup=warmup, status=status, started_at="", duration_s=1,
                           result=res)

    trials = [rec("pfn", r, 100 + r, 120 + 1.2 * r) for r in range(5)] + [rec("pfn", 9, 1, 1000, warmup=True)]
    trials += [rec("bitmap", r, 50, 50) for r in range(5)] + [rec("bitmap", 8, 1, 1000, status="failed")]
    rows = {o.arm: o for o in twins.arm_overheads(trials)}
    assert rows["pfn"].pairs == 5 and rows["pfn"].ratio[0] == pytest.approx(1.2)
    assert rows["bitmap"].pairs == 5 and rows["bitmap"].ratio == (1.0, 1.0, 1.0)
    text = twins.overhead_table(trials)
    assert "+20.0 %" in text and "+0.0 %" in text
    assert twins.overhead_table([rec("pfn", 0, 1, 1)][:0]) == ""
