"""Every protocol allocates in the same calls and writes `actual` as often: only
encoding and transmission differ between the arms (device/guest/balloon_driver.py)."""
from __future__ import annotations

import pytest

from lab.trials.model.balloon_trial import BalloonTrial
from lab.trials.model.runner import run_balloon

pytestmark = pytest.mark.slow


def test_same_allocation_calls_and_config_writes_for_every_protocol():
    # 512 MiB = 131072 pages: two allocator calls of 65536 and one pass (one `actual` write)
    # for every protocol; before, pfn made 2 calls and 2 writes where bitmap/chunks made 1 and 1
    seen = {}
    for protocol in ("pfn", "bitmap", "chunks"):
        r = run_balloon(BalloonTrial(protocol=protocol, guest_mib=640, inflate_mib=512, workload="idle"))
        assert r["verified"]
        seen[protocol] = (r["alloc_calls"], r["config_writes"], r["deflate"]["alloc_calls"],
                          r["deflate"]["config_writes"])
    assert set(seen.values()) == {(2, 1, 1, 1)}, seen
