"""Whole trials as real processes: VMM + guest over a memfd, eventfds and virtqueues,
driven through the monitor exactly as `balloon-lab run` does."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lab.trials.model.balloon_trial import BalloonTrial
from lab.trials.model.runner import run_balloon

from conftest import BALLOON_LAB as _CLI  # noqa: E402
BALLOON_LAB = [_CLI]


def cli_json(*args: str, timeout: float = 600) -> dict:
    out = subprocess.run(BALLOON_LAB + list(args) + ["--json"], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_pfn_512_of_1024_exact():
    """One madvise per page, the memfd shrinks by exactly what was ballooned."""
    r = cli_json("run", "--protocol", "pfn", "--guest-mib", "1024", "--inflate-mib", "512", "--no-probes")
    assert r["verified"] is True
    assert r["protocol"] == "pfn" and r["pages"] == 131072
    assert r["discard_calls"] == 131072 and r["translations"] == 131072
    assert r["memfd_freed_bytes"] == 536870912
    assert r["requests"] == 512                       # 256 PFNs per request, as Linux
    assert 0 < r["kicks"] <= r["requests"]
    for op in ("inflate", "deflate"):
        st = r["stages_ns"][op]
        assert set(st) == {"alloc", "encode", "transmit", "translate", "discard", "total"}
        assert all(v >= 0 for v in st.values()) and st["total"] > 0
    assert r["stages_ns"]["deflate"]["discard"] == 0  # deflate frees nothing on the host
    assert r["deflate"]["pages"] == 131072
    checks = r["verification"]["after_inflate"]["checks"]
    assert all(checks.values()), checks


@pytest.mark.parametrize("protocol", ["pfn-ranges", "bitmap", "chunks"])
def test_range_protocols_discard_once_per_run(protocol):
    r = run_balloon(BalloonTrial(protocol=protocol, guest_mib=512, inflate_mib=256))
    assert r["verified"], r["verification"]
    assert r["pages"] == 65536
    assert r["memfd_freed_bytes"] == 256 << 20
    assert r["discard_calls"] == r["runs"] == r["translations"]
    if protocol == "pfn-ranges":                      # merged within a request, never across
        assert r["requests"] <= r["runs"] < r["requests"] + 100
    else:                                             # an aged guest's free memory is in long runs
        assert r["runs"] < 100
    assert sum(r["run_length_hist"].values()) == r["runs"]


@pytest.mark.parametrize("protocol", ["pfn", "bitmap", "chunks"])
def test_fragmented_guest_gives_short_runs(protocol):
    r = run_balloon(BalloonTrial(protocol=protocol, guest_mib=512, inflate_mib=128, workload="fragment",
                                 workload_params={"share": 0.6, "degree": 1.0}))
    assert r["verified"], r["verification"]
    assert r["runs"] > 0.5 * r["pages"]              # isolated pages: about one run per page
    if protocol != "pfn":
        assert r["discard_calls"] == r["runs"]


def test_unverified_run_exits_nonzero_on_bad_spec():
    out = subprocess.run(BALLOON_LAB + ["run", "--guest-mib", "512", "--inflate-mib", "600"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--inflate-mib" in out.stderr


@pytest.mark.slow
def test_pfn_two_regions_4096_of_6144():
    """A guest with RAM below 3 GiB and above 4 GiB: the balloon crosses the hole."""
    r = cli_json("run", "--protocol", "pfn", "--guest-mib", "6144", "--inflate-mib", "4096", "--no-probes")
    assert r["verified"] is True
    assert r["discard_calls"] == 4096 * 256
    assert r["memfd_freed_bytes"] == 4096 << 20


@pytest.mark.slow
def test_idle_16g_guest_costs_what_it_touched():
    out = subprocess.run(BALLOON_LAB + ["bench", "idle-memory", "--guest-mib", "16384", "--touched-mib", "1024",
                                        "--inflate-mib", "512", "--json"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)
    assert r["verified"]
    assert r["memfd_over_touched"] < 1.15
    assert r["rss_over_touched"] < 1.4


def test_deflate_on_oom_gives_pages_back_under_pressure():
    """DEFLATE_ON_OOM: with most of its memory ballooned, a guest that needs memory
    takes pages back from the balloon (telling the device), instead of failing."""
    from device.virtio.layout import MiB, PAGE_SHIFT
    from lab.trials.model.processes import LabProcesses
    from lab.trials.model.monitor_ops import balloon_op, verify
    t = BalloonTrial(protocol="bitmap", guest_mib=512, inflate_mib=384)
    lp = LabProcesses(t)
    try:
        lp.agent.execute("workload-prepare", {"name": "aged", "params": {}, "seed": 1})
        target = (384 * MiB) >> PAGE_SHIFT
        balloon_op(lp, "inflate", target, None)
        assert verify(lp, target)["ok"]
        # a hog wanting 40 % of RAM: only ~17 % is free, the rest must come from the balloon
        hog = lp.agent.execute("workload-prepare", {"name": "hog", "params": {"share": 0.4}, "seed": 2})
        assert hog["summary"]["shortfall_pages"] == 0
        info = lp.agent.execute("info")
        actual = info["driver"]["actual"]
        assert actual < target
        v = verify(lp, actual)
        assert v["ok"], v                      # device and driver agree on the smaller balloon
        c = lp.qmp.execute("x-balloon-lab-counters")
        assert c["deflate"]["pages"] == target - actual
        assert lp.qmp.execute("query-balloon")["actual"] == (512 * MiB) - (actual << PAGE_SHIFT)
    finally:
        lp.close()


def test_monitor_speaks_qmp_and_polls_guest_stats():
    """The monitor follows QMP: greeting, capabilities, QEMU's command names; guest
    stats come from the stats virtqueue (the device returns the buffer to poll)."""
    from device.virtio.layout import MiB, PAGE_SHIFT
    from lab.trials.monitor_client import MonitorError
    from lab.trials.model.processes import LabProcesses
    from lab.trials.model.monitor_ops import balloon_op
    lp = LabProcesses(BalloonTrial(protocol="pfn", guest_mib=256, inflate_mib=64))
    try:
        assert "QMP" in lp.qmp.greeting
        assert lp.qmp.execute("query-balloon") == {"actual": 256 * MiB}
        s1 = lp.qmp.execute("qom-get", {"path": "/machine/peripheral/balloon0", "property": "guest-stats"})
        assert s1["stats"]["stat-total-memory"] == 256 * MiB
        free0 = s1["stats"]["stat-free-memory"]
        balloon_op(lp, "inflate", (64 * MiB) >> PAGE_SHIFT, None)
        s2 = lp.qmp.execute("qom-get", {"path": "/machine/peripheral/balloon0", "property": "guest-stats"})
        assert s2["stats"]["stat-total-memory"] == 192 * MiB          # the guest's view shrank
        assert s2["stats"]["stat-free-memory"] == free0 - 64 * MiB
        assert s2["last-update"] >= s1["last-update"] > 0
        assert lp.qmp.execute("query-balloon") == {"actual": 192 * MiB}
        for bad in ({"value": 0}, {"value": "x"}, {"value": 257 * MiB}):
            with pytest.raises(MonitorError, match="value"):
                lp.qmp.execute("balloon", bad)
        with pytest.raises(MonitorError, match="CommandNotFound"):
            lp.qmp.execute("no-such-command")
    finally:
        lp.close()
