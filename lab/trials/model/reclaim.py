"""The `reclaim` experiment: a guest frees memory; how fast, and how much, does the host get back?

One trial: boot a guest (VMM + guest process), let it allocate `free_mib` MiB, write
into it and free it again (the host now holds that memory for nothing), then one arm:

  none              nothing: the host keeps the memory (the baseline)
  inflate-<proto>   the management tool inflates the balloon by the freed amount
                    (`balloon` on the monitor), over protocol pfn, pfn-ranges,
                    bitmap or chunks; the guest gets the memory back only by deflate
  reporting         free page reporting (feature 5, queue 4) with Linux's defaults
                    unless given: order 9, capacity 32, 2 s delay

From the moment the free returns, the runner samples the memfd's allocated blocks
(fstat st_blocks, from the VMM) every `poll_s` and records the time until 90 % of
the freed memory is back, the host memory still held at the end, and the CPU time
(utime + stime from /proc) of the guest and the VMM over the same window. The
window ends when 99 % is back, or when nothing dropped for `settle_s` (longer than
the reporting delay), or at `timeout_s`. Verification: the guest's kept pages are
intact; for inflate, the usual balloon checks; for reporting, every block the guest
reported and still holds free holds no data in the memfd.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

from device.api import PROTOCOL_NAMES, MiB, ReportingParams
from lab.trials.monitor_client import MonitorError
from lab.trials.model.balloon_trial import BalloonTrial, TrialFailed
from lab.trials.model.processes import LabProcesses
from lab.trials.model.monitor_ops import verify

# none, an inflate by each protocol of the table (device/virtio/protocols.py), free page reporting
RECLAIM_ARMS = ("none", *(f"inflate-{p}" for p in PROTOCOL_NAMES), "reporting")
RETURN_SHARE = 0.90


@dataclass
class ReclaimTrial:
    arm: str
    guest_mib: int = 4096
    free_mib: int = 3072
    backing: str = "4k"
    reporting: ReportingParams = field(default_factory=ReportingParams)
    settle_s: float | None = None       # None: reporting delay + 1.5 s
    timeout_s: float = 120.0
    poll_s: float = 0.05
    seed: int = 1

    def __post_init__(self) -> None:
        if self.arm not in RECLAIM_ARMS:
            raise ValueError(f"unknown reclaim arm {self.arm!r}; choose from {', '.join(RECLAIM_ARMS)}")
        if not 0 < self.free_mib < self.guest_mib - 64:
            raise ValueError(f"free_mib must be in 1..{self.guest_mib - 65} (the guest keeps 64 MiB), "
                             f"got {self.free_mib}")
        if self.settle_s is None:
            self.settle_s = self.reporting.delay_s + 1.5


def _cpu_s(pid: int) -> float:
    """utime + stime of a process, seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def run_reclaim(t: ReclaimTrial) -> dict:
    """One trial; TrialFailed if a peer dies or a check cannot run."""
    inflate = t.arm.startswith("inflate-")
    protocol = t.arm.split("-", 1)[1] if inflate else "pfn"
    bt = BalloonTrial(protocol=protocol, guest_mib=t.guest_mib, inflate_mib=t.free_mib, workload="idle",
                      seed=t.seed, backing=t.backing, deflate=False)
    vmm, guest = {}, {}
    if t.arm == "reporting":
        r = t.reporting
        vmm = {"reporting": True}
        guest = {"reporting": True, "reporting_order": r.order, "reporting_capacity": r.capacity,
                 "reporting_delay_ms": int(round(r.delay_s * 1000))}
    try:
        lp = LabProcesses(bt, vmm, guest)
    except (MonitorError, OSError) as e:
        raise TrialFailed(f"starting the VMM and its guest failed: {type(e).__name__}: {e}") from e
    phase = "alloc-free"
    try:
        memfd = lambda: lp.qmp.execute("x-balloon-lab-memfd")["allocated_bytes"]
        base = memfd()
        lp.agent.execute("alloc-free", {"mib": t.free_mib, "seed": t.seed})
        t0 = time.monotonic()
        pids = lp.pids
        cpu0 = {k: _cpu_s(p) for k, p in pids.items()}
        peak = memfd()
        freed = peak - base
        target = bt.target_pages
        phase = "observing"
        if inflate:
            lp.qmp.execute("balloon", {"value": lp.info["ram_bytes"] - t.free_mib * MiB})
        timeline: list[tuple[float, int]] = [(0.0, peak)]
        t90 = None
        last, last_drop = peak, t0
        while True:
            time.sleep(t.poll_s)
            now = time.monotonic()
            m = memfd()
            timeline.append((round(now - t0, 4), m))
            if m < last - (2 << 20):
                last_drop = now
            last = min(last, m)
            back = peak - m
            if t90 is None and freed > 0 and back >= RETURN_SHARE * freed:
                t90 = now - t0
            done_inflate = not inflate or lp.qmp.execute("query-balloon")["actual"] == lp.info["ram_bytes"] - t.free_mib * MiB
            if (freed > 0 and back >= 0.99 * freed and done_inflate) or now - last_drop > t.settle_s \
                    or now - t0 > t.timeout_s:
                break
        window = time.monotonic() - t0
        cpu1 = {k: _cpu_s(p) for k, p in pids.items()}
        end = memfd()
        phase = "verifying"
        if inflate:
            lp.agent.execute("wait-target", {"target_pages": target, "timeout_s": t.timeout_s},
                             timeout=t.timeout_s + 30)
            check = verify(lp, target)
            ok, detail = check["ok"], check["checks"]
        else:
            g = lp.agent.execute("verify")
            detail = {"kept_pages_intact": g["held_ok"]}
            if t.arm == "reporting":
                info = lp.agent.execute("reporting-info")
                runs = info["reported_free_runs"]
                res = lp.qmp.execute("x-balloon-lab-check-free-runs", runs)
                detail["reported_blocks_hold_no_data"] = res["host_pages_with_data"] == 0
                detail["reported_host_pages_checked"] = res["host_pages_checked"]
            ok = all(v for k, v in detail.items() if isinstance(v, bool))
        rep_dev = lp.qmp.execute("x-balloon-lab-memfd")["reporting"]
        rep_guest = lp.agent.execute("reporting-info") if t.arm == "reporting" else None
        lp.check_alive()
    except (MonitorError, OSError) as e:
        raise lp.failure(phase, e) from e
    finally:
        lp.close()
    return {
        "arm": t.arm, "guest_mib": t.guest_mib, "free_mib": t.free_mib, "backing": t.backing,
        "reporting_params": asdict(t.reporting) if t.arm == "reporting" else None,
        "memfd_base_bytes": base, "memfd_peak_bytes": peak, "memfd_end_bytes": end,
        "freed_bytes": freed, "returned_bytes": peak - end, "host_left_bytes": end - base,
        "returned_share": (peak - end) / freed if freed else float("nan"),
        "time_to_90_s": t90, "window_s": window,
        "cpu_s": {k: cpu1[k] - cpu0[k] for k in cpu0},
        "device_reporting": rep_dev if t.arm == "reporting" else None,
        "guest_reporting": {k: v for k, v in (rep_guest or {}).items() if k != "reported_free_runs"} or None,
        "timeline": timeline, "verified": bool(ok), "verification": detail,
    }
