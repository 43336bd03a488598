"""One balloon trial, end to end, as real processes.

Starts a VMM (which starts its guest), attaches the probes to both pids, shapes the
guest's memory with a workload, inflates to the target through the monitor's
`balloon` command exactly as a management tool would drive QEMU, verifies, deflates,
verifies, and shuts everything down. The result is one JSON-able dict (the
`balloon-lab run --json` object). `verified` is true only when every check passed:
kept pages hash the same, ballooned pages hold no data in the memfd (the kernel's
SEEK_DATA view), the device's and the driver's balloon agree, and `actual` reached
the target.
"""
from __future__ import annotations

import time

from device.virtio.layout import MiB, PAGE_SHIFT
from lab.results.trial_result import OpResult, TrialResult
from lab.trials.model.balloon_trial import BalloonTrial, TrialFailed
from lab.trials.model.monitor_ops import attach_probes, balloon_op, verify
from lab.trials.model.processes import LabProcesses
from lab.trials.monitor_client import MonitorError
from lab.trials.probing import probe_summary as _probe_summary


def run_balloon(t: BalloonTrial, probes=None, on_started=None) -> dict:
    """Run one trial: its result as stored (TrialResult.to_json(), the `balloon-lab run
    --json` object); raises TrialFailed (never returns a half-measured result)."""
    return run_balloon_trial(t, probes, on_started).to_json()

def run_balloon_trial(t: BalloonTrial, probes=None, on_started=None) -> TrialResult:
    """Run one trial; raises TrialFailed (never returns a half-measured result)."""
    wall0 = time.perf_counter_ns()
    try:
        lp = LabProcesses(t)
    except (MonitorError, OSError) as e:
        raise TrialFailed(f"starting the VMM and its guest failed: {type(e).__name__}: {e}") from e
    phase = "setting up"
    try:
        if on_started is not None:
            on_started(lp)
        if probes is not None:
            attach_probes(probes, lp)
        phase = "workload-prepare"
        prep = lp.agent.execute("workload-prepare", {"name": t.workload, "params": t.workload_params,
                                                     "seed": t.seed})
        lp.agent.execute("workload-start")
        target = round(t.inflate_mib * MiB) >> PAGE_SHIFT
        phase = "inflate"
        inflate = balloon_op(lp, "inflate", target, probes)
        v_inflate = verify(lp, target)
        freed = inflate["memfd_bytes_before"] - inflate["memfd_bytes_after"]
        deflate = v_deflate = None
        if t.deflate:
            phase = "deflate"
            deflate = balloon_op(lp, "deflate", 0, probes)
            v_deflate = verify(lp, 0)
        phase = "finishing"
        wl = lp.agent.execute("workload-stop")
        pids = lp.pids
        final = lp.qmp.execute("x-balloon-lab-counters")
        lp.check_alive()
    except (MonitorError, OSError) as e:     # a peer died or stalled: say which, never a half result
        raise lp.failure(phase, e) from e
    finally:
        lp.close()
    verified = v_inflate["ok"] and (v_deflate is None or v_deflate["ok"])
    # The top level is the inflate (the operation the protocols are compared on);
    # `deflate` holds the same fields for the way back. No number appears twice
    # (lab/results/trial_result.py: stage times and probe readings have their own fields).
    ops = {k: v for k, v in (("inflate", inflate), ("deflate", deflate)) if v is not None}
    driver = lp.guest_info["driver"]
    return TrialResult(
        protocol=t.protocol, guest_mib=t.guest_mib, inflate_mib=t.inflate_mib, pids=pids,
        workload={"name": t.workload, "params": t.workload_params, "seed": t.seed,
                  "prepare": prep.get("summary"), "stop": wl},
        wire_format=driver["wire_format"], batch_pages=driver["batch_pages"],
        discard=t.discard, guest_init_on_alloc=t.init_on_alloc,
        backing=t.backing, partial_tracking=t.partial_tracking, alloc_policy=t.alloc_policy,
        inflate=_op_result(inflate), deflate=_op_result(deflate) if deflate is not None else None,
        memfd_freed_bytes=freed,
        stages_ns={k: op["stages_ns"] for k, op in ops.items()},
        verification={"after_inflate": v_inflate, "after_deflate": v_deflate},
        verified=bool(verified),
        errors=final["errors"],
        probes=_probe_summary({k: op["probes"] for k, op in ops.items()}, probes),
        trial_wall_ns=time.perf_counter_ns() - wall0,
    )

def _op_result(op: dict) -> OpResult:
    """balloon_op's dict as the trial result holds it: its stage times and probe
    reading go to the trial's `stages_ns` and `probes`, `kind` is where it sits."""
    return OpResult.from_json({k: v for k, v in op.items() if k not in ("kind", "stages_ns", "probes")})
