"""The control-plane and migration fuzzers (fuzz/control_target.py, fuzz/migration_target.py):
short clean runs, and their oracles catching bugs planted in the real code."""
from __future__ import annotations

import random

import numpy as np
import pytest

from device.vmm import control_peer
from device.vmm.balloon_device import BalloonDevice
from device.vmm.hint_queues import HintQueues
from device.virtio import dirty_log
from fuzz import control_target, engine, migration_target
from fuzz.time_limit import hang_timer


@pytest.mark.parametrize("family", ["control", "migration"])
def test_short_run_is_clean(family):
    res = engine.run_fuzz(150, seed=5, workers=1, family=family)
    assert res.execs == 150 and res.by_target == {family: 150}
    assert (res.crashes, res.hangs, res.oob_discards) == (0, 0, 0), res.failures[:3]
    assert res.signatures > 20          # the generators reach many different behaviours


def _session(case: dict, run=control_target.run_control):
    state = control_target.ControlWorkerState()
    try:
        with hang_timer():
            return run(state, case, 5.0)
    finally:
        state.close()


def test_control_oracle_sees_a_lost_reply(monkeypatch):
    # the bug the fuzzer found: a reply queue of 1 never let the throttled guest in again
    case = {"t": "control", "proto": "pfn", "hint": "none", "max_queued": 1,
            "steps": [["setup", [0, 1]], ["flood", 100], ["serve", 5], ["read", 1000]]}
    assert _session(case)[0] is None
    real = control_peer.DeviceChannel.may_read

    def buggy(self):
        if self.throttled and len(self.outq) < self.max_queued // 2:
            self.throttled = False
        elif not self.throttled and len(self.outq) >= self.max_queued:
            self.throttled = True
            self.throttle_episodes += 1
        return not self.throttled
    monkeypatch.setattr(control_peer.DeviceChannel, "may_read", buggy)
    failure, detail, _ = _session(case)
    # on the VMM's own loop code the guest that is never let in again leaves its requests
    # unread on a readable socket: the loop never goes quiet (the VMM would spin)
    assert failure == "hang" and "never went quiet" in detail, (failure, detail)
    monkeypatch.setattr(control_peer.DeviceChannel, "may_read", real)


def test_control_oracle_sees_a_discard_nobody_named(monkeypatch):
    case = {"t": "control", "proto": "pfn", "hint": "none", "max_queued": 64,
            "steps": [["setup", [0, 1]], ["inflate", [140, 141]], ["serve", 2]]}
    assert _session(case)[0] is None
    real = BalloonDevice._discard

    def one_more(self, ctr, offsets, lengths, *stages):   # discards the page after each named one too
        real(self, ctr, list(offsets) + [o + 4096 for o in offsets], lengths, *stages)
    monkeypatch.setattr(BalloonDevice, "_discard", one_more)
    failure, detail, _ = _session(case)
    assert failure == "oob-discard" and "142" in detail


def test_migration_oracles_see_wrong_hints_and_an_unsealed_log(monkeypatch):
    rng = random.Random(11)
    cases = [migration_target.gen_migration(rng) for _ in range(40)]
    run = migration_target.run_migration
    assert all(_session(c, run)[0] is None for c in cases)
    # a hint device that marks one page more than the guest hinted
    real = HintQueues._free_page_chain

    def sloppy(self, chain):
        r = real(self, chain)
        if self.hinted.any():
            self.hinted[np.flatnonzero(self.hinted)[-1] + 1] = True
        return r
    monkeypatch.setattr(HintQueues, "_free_page_chain", sloppy)
    up = {"t": "migration", "proto": "pfn", "hint": "upstream", "max_queued": 64,
          "steps": [["setup", [0, 1, 3, 5]], ["attach"], ["answer", 0, 1], ["hint-start"], ["cmd-id", "current"],
                    ["hint", [[40 << 12, 2 << 12]]], ["round1"]]}
    failure, detail, _ = _session(up, run)
    assert failure == "crash" and "no hint named" in detail
    monkeypatch.setattr(HintQueues, "_free_page_chain", real)
    # a dirty log whose size is not sealed: the guest shrinks it
    monkeypatch.setattr(dirty_log, "seal_size", lambda fd: None)
    shrink = dict(up, steps=up["steps"][:3] + [["shrink-log"]])
    failure, detail, _ = _session(shrink, run)
    assert failure == "crash" and "not sealed" in detail
