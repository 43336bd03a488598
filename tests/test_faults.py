"""Killed and stalled peers, with the real processes (lab/trials/model/runner.py) and the real store.

kill -9 of the guest mid-inflate: the VMM survives, reports GUEST_LOST, keeps answering
its monitor, and its accounting agrees with the memfd (SEEK_DATA). kill -9 of the VMM
mid-inflate: the guest driver notices the hang-up, the runner raises TrialFailed naming
the dead peer, and run_experiment records a failed trial, never half of one. A SIGSTOPped
VMM or guest hits a timeout (made short here) with a message that says which peer.
"""
from __future__ import annotations

import os
import re
import signal
import threading
import time

import pytest

from device.virtio.layout import MiB, PAGE_SHIFT
from lab.trials.experiment import run_experiment
from lab.trials.monitor_client import QMPClient
from lab.trials.model.balloon_trial import BalloonTrial, TrialFailed
from lab.trials.model.processes import LabProcesses
from lab.trials.model.runner import run_balloon
from lab.trials.spec import ExperimentSpec
from lab.store.store import Store

pytestmark = pytest.mark.slow


class KillWhenInflating:
    """on_started hook: from a second monitor connection, wait until the device has
    ballooned `min_pages`, then send `sig` to the VMM or the guest."""

    def __init__(self, who: str, sig: int, min_pages: int = 4000) -> None:
        self.who, self.sig, self.min_pages = who, sig, min_pages
        self.fired = threading.Event()
        self.pid: int | None = None
        self.pages_at_kill: int | None = None
        self.error: Exception | None = None

    def __call__(self, lp: LabProcesses) -> None:
        self.pid = lp.vmm.pid if self.who == "vmm" else lp.info["guest_pid"]
        threading.Thread(target=self._watch, args=(lp.monitor_path,), daemon=True).start()

    def _watch(self, path: str) -> None:
        try:
            mon = QMPClient(path, timeout=10)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                pages = mon.execute("x-balloon-lab-counters")["inflate"]["pages"]
                if pages >= self.min_pages:
                    self.pages_at_kill = pages
                    os.kill(self.pid, self.sig)
                    self.fired.set()
                    break
                time.sleep(0.005)
            mon.close()
        except Exception as e:      # surfaces in the test through .fired / .error
            self.error = e


def gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def test_kill_guest_mid_inflate_vmm_survives_and_accounting_is_consistent():
    t = BalloonTrial(protocol="pfn", guest_mib=1024, inflate_mib=896, timeout_s=30, device_timeout_s=10)
    lp = LabProcesses(t)
    try:
        ram = lp.info["ram_bytes"]
        lp.agent.execute("workload-prepare", {"name": "aged", "params": {}, "seed": 1})
        killer = KillWhenInflating("guest", signal.SIGKILL, min_pages=20000)
        killer(lp)
        lp.qmp.execute("balloon", {"value": ram - (896 * MiB)})
        assert killer.fired.wait(60), killer.error
        deadline = time.monotonic() + 15
        while lp.qmp.execute("query-status")["status"] != "guest-lost":
            assert time.monotonic() < deadline, "the VMM never noticed the guest's death"
            time.sleep(0.05)
        # the VMM survives, says what happened, keeps answering its monitor
        assert lp.vmm.poll() is None
        info = lp.qmp.execute("x-balloon-lab-info")
        assert "killed by SIGKILL" in info["guest_exit"]
        assert any(e["event"] == "GUEST_LOST" and "SIGKILL" in e["data"]["reason"] for e in lp.qmp.events)
        with pytest.raises(Exception, match="No balloon device has been activated"):
            lp.qmp.execute("balloon", {"value": ram // 2})
        # its accounting agrees with the memfd: every page it counts as ballooned is gone
        # (SEEK_DATA), it counts exactly the pages it discarded, and they were the inflate's
        c = lp.qmp.execute("x-balloon-lab-counters")
        v = lp.qmp.execute("x-balloon-lab-verify")
        assert v["ballooned_with_data"] == 0
        assert v["ballooned_pages"] == c["ballooned_pages"] == c["inflate"]["pages"] >= killer.pages_at_kill
        assert c["inflate"]["discard_calls"] == c["inflate"]["pages"]        # pfn: one discard per page
        assert c["actual"] <= c["ballooned_pages"]                             # the guest reported no more
        assert c["memfd_allocated_bytes"] <= ram - (c["ballooned_pages"] << PAGE_SHIFT)
        assert not c["errors"]
    finally:
        lp.close()
    assert gone(lp.vmm.pid)


def test_kill_guest_mid_inflate_trial_fails_clearly():
    killer = KillWhenInflating("guest", signal.SIGKILL)
    t = BalloonTrial(protocol="pfn", guest_mib=512, inflate_mib=448, timeout_s=30, device_timeout_s=10)
    with pytest.raises(TrialFailed) as ei:
        run_balloon(t, on_started=killer)
    assert killer.fired.is_set(), killer.error
    msg = str(ei.value)
    assert msg.startswith("inflate failed: ") and f"guest process {killer.pid} died" in msg, msg
    assert "killed by SIGKILL" in msg, msg                    # what the VMM saw when it reaped it


def test_kill_vmm_mid_inflate_records_a_failed_trial_and_nothing_half_written(tmp_path):
    """Round 0 loses its VMM mid-inflate, round 1 runs normally: the store holds one
    failed trial (error, no result, no metrics) and one complete ok trial."""
    spec = ExperimentSpec(name="fault", arms=["pfn"], trials=2, warmups=0, probes=False, guest_mib=512,
                          inflate_mib=448)
    killers: list[KillWhenInflating] = []

    def trial(spec, arm, rnd):
        t = BalloonTrial(protocol=arm, guest_mib=spec.guest_mib, inflate_mib=spec.inflate_mib, timeout_s=30,
                         device_timeout_s=20)
        hook = None
        if rnd == 0:
            hook = KillWhenInflating("vmm", signal.SIGKILL)
            killers.append(hook)
        return run_balloon(t, on_started=hook)

    store = Store(tmp_path / "lab.db")
    try:
        t0 = time.monotonic()
        run_id = run_experiment(spec, trial, store, progress=False, env={"test": "faults"})
        trials = store.trials(run_id)
        assert [r.status for r in trials] == ["failed", "ok"]
        bad, good = trials
        k = killers[0]
        assert k.fired.is_set(), k.error
        # the runner names the dead peer; the guest either saw the hang-up or died with its
        # VMM (guests die with their VMM: system/signals.py die_with_parent), never a timeout
        assert f"VMM process {k.pid} died (killed by SIGKILL)" in bad.error, bad.error
        assert ("the VMM closed the control socket while the inflate request was in flight" in bad.error
                or re.search(r"guest process \d+ died", bad.error)), bad.error
        assert time.monotonic() - t0 < 120          # detected at once, not after the 20 s device timeout x N
        assert bad.result is None
        n_metrics = store.db.execute("SELECT COUNT(*) FROM metrics WHERE trial_id=?", (bad.id,)).fetchone()[0]
        n_hist = store.db.execute("SELECT COUNT(*) FROM histograms WHERE trial_id=?", (bad.id,)).fetchone()[0]
        assert n_metrics == 0 and n_hist == 0
        assert good.result["verified"] is True
        assert store.db.execute("SELECT COUNT(*) FROM metrics WHERE trial_id=?", (good.id,)).fetchone()[0] > 0
        # the orphaned guest went away by itself once its VMM was gone
        assert gone(good.result["pids"]["guest"])
    finally:
        store.close()


def test_stopped_vmm_hits_the_guest_drivers_timeout():
    killer = KillWhenInflating("vmm", signal.SIGSTOP)
    t = BalloonTrial(protocol="pfn", guest_mib=512, inflate_mib=448, timeout_s=10, device_timeout_s=1.5)
    t0 = time.monotonic()
    try:
        with pytest.raises(TrialFailed) as ei:
            run_balloon(t, on_started=killer)
    finally:
        if killer.pid:
            try:
                os.kill(killer.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert killer.fired.is_set(), killer.error
    msg = str(ei.value)
    assert f"VMM process {killer.pid} is stopped" in msg, msg
    assert "DeviceTimeout: device did not use the inflate request within 1.5 s (stalled or dead VMM)" in msg, msg
    assert time.monotonic() - t0 < 60
    assert gone(killer.pid)


def test_stopped_guest_hits_the_runners_timeout():
    killer = KillWhenInflating("guest", signal.SIGSTOP)
    t = BalloonTrial(protocol="pfn", guest_mib=512, inflate_mib=448, timeout_s=3, device_timeout_s=10)
    t0 = time.monotonic()
    with pytest.raises(TrialFailed) as ei:
        run_balloon(t, on_started=killer)
    assert killer.fired.is_set(), killer.error
    msg = str(ei.value)
    assert f"guest process {killer.pid} is stopped" in msg, msg
    assert "no answer from" in msg and "within 6 s" in msg, msg
    assert time.monotonic() - t0 < 60
    assert gone(killer.pid)
