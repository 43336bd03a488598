"""Live migration at GiB scale between real VMM processes (slow: minutes in all).

Timings are never asserted here (the machine is shared): what is checked is what the
migration must guarantee and what the hints must save in pages and bytes, which
are counters. The time ratio against the published figures is measured by
`balloon-lab migrate` (docs/MIGRATION.md)."""
from __future__ import annotations

import pytest

from lab.trials.model.migrate_runner import MigrateTrial, run_migration

pytestmark = pytest.mark.slow

GIB8 = 8192


@pytest.fixture(scope="module")
def idle_8g():
    """The seed's experiment: an idle 8 GiB guest (the idle workload's defaults), 10 Gbit/s."""
    return {h: run_migration(MigrateTrial(hint=h, guest_mib=GIB8, workload="idle", timeout_s=1200))
            for h in ("none", "upstream", "bitmap")}


def test_idle_8g_all_designs_verified(idle_8g):
    for h, r in idle_8g.items():
        assert r["verified"], (h, r["verification"])
        assert r["verification"]["vmm"]["differing_pages"] == 0
        assert r["verification"]["guest"]["pages_checked"] == r["workload"]["prepare"]["used_pages"]


def test_idle_8g_hints_cut_the_wire_bytes_and_the_scan(idle_8g):
    none = idle_8g["none"]
    prep = none["workload"]["prepare"]
    assert none["pages_examined"] >= GIB8 * 256                       # unhinted: every guest page examined
    assert none["pages_sent"] >= prep["used_pages"] + prep["stale_pages"]  # stale (free but dirty) pages sent
    for h in ("upstream", "bitmap"):
        r = idle_8g[h]
        assert r["bytes_sent"] <= 0.25 * none["bytes_sent"], h
        assert r["pages_examined"] <= 0.25 * none["pages_examined"], h  # never-touched pages are not scanned
        assert r["pages_hinted"] >= prep["stale_pages"], h


def test_idle_8g_host_memory_stays_near_the_touched_memory(idle_8g):
    for h, r in idle_8g.items():
        m = r["memory"]
        touched = m["guest_touched_bytes"]
        assert m["source_memfd_bytes_after"] == m["source_memfd_bytes_before"], h   # nothing faulted in
        assert m["destination_memfd_peak_bytes"] <= touched, h
        # both memfds plus every process's anonymous memory: at most twice the touched memory + 1 GiB
        assert m["host_peak_bytes"] <= 2 * touched + (1 << 30), (h, m)


@pytest.mark.parametrize("hint", ["upstream", "bitmap"])
def test_dirty_guest_writing_into_hinted_pages_loses_nothing(hint):
    r = run_migration(MigrateTrial(hint=hint, guest_mib=2048, workload="dirty",
                                   workload_params={"rate_mib_s": 128.0, "free_write_share": 0.5},
                                   timeout_s=1200))
    assert r["verified"], r["verification"]
    assert r["verification"]["vmm"]["differing_pages"] == 0
    assert r["downtime_ms"] is not None and r["stop_copy_pages"] > 0
    assert r["workload"]["stop"]["free_pages_written"] > 0
    if hint == "bitmap":
        assert r["pages_hinted_then_dirtied"] > 0    # hinted free, reused during round 1, re-sent
