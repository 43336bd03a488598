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

import functools
import time
from typing import Callable, Protocol

from lab.results.ring_cost import lab_cost
from lab.results.trial_result import OpResult, TrialResult
from lab.trials.model.balloon_trial import BalloonTrial, TrialFailed
from lab.trials.model.monitor_ops import attach_probes, balloon_op, verify
from lab.trials.model.processes import LabProcesses
from lab.trials.model.ring_floor import FloorFailed, measure_floors
from lab.trials.monitor_client import MonitorError
from lab.trials.probing import probe_summary as _probe_summary
from workloads.metrics import must_be_zero_failures


class Pace(Protocol):
    """Who decides when each cycle starts (`run --paced`: `balloon-lab ab` runs the two
    sides' cycles in turn), and hears each cycle's record when it ends."""

    def before(self, cycle: int, retouch: Callable[[], object] | None) -> None:
        """Start cycle `cycle` when its turn comes; `retouch` (cycles after the first)
        gives deflated memory its contents back, before the turn or inside it."""

    def after(self, cycle: int, record: dict) -> None: ...


def run_balloon(t: BalloonTrial, probes=None, on_started=None, pace: Pace | None = None) -> dict:
    """Run one trial: its result as stored (TrialResult.to_json(), the `balloon-lab run
    --json` object); raises TrialFailed (never returns a half-measured result)."""
    return run_balloon_trial(t, probes, on_started, pace).to_json()


def run_balloon_trial(t: BalloonTrial, probes=None, on_started=None, pace: Pace | None = None) -> TrialResult:
    """Run one trial; raises TrialFailed (never returns a half-measured result).
    With t.cycles > 1 the inflate/deflate repeats in the same processes (the probes,
    if any, read the first cycle); the first cycle is the result's top level, the
    others its `cycles` list. The ring's floor is measured first, before the trial's
    processes start (lab/trials/model/ring_floor.py)."""
    try:
        floors = measure_floors(t.guest_mib)
    except FloorFailed as e:
        raise TrialFailed(str(e)) from e
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
        target = t.target_pages
        done = []
        for c in range(1, t.cycles + 1):
            retouch = None
            if c > 1:
                phase = f"cycle {c}: workload-retouch"
                retouch = functools.partial(lp.agent.execute, "workload-retouch")
            if pace is not None:
                pace.before(c, retouch)
            elif retouch is not None:
                retouch()
            phase = "inflate" if c == 1 else f"cycle {c}: inflate"
            inflate = balloon_op(lp, "inflate", target, probes if c == 1 else None)
            v_inflate = verify(lp, target)
            deflate = v_deflate = None
            if t.deflate:
                phase = "deflate" if c == 1 else f"cycle {c}: deflate"
                deflate = balloon_op(lp, "deflate", 0, probes if c == 1 else None)
                v_deflate = verify(lp, 0)
            done.append((inflate, v_inflate, deflate, v_deflate))
            if pace is not None:
                pace.after(c, _cycle_record(*done[-1]))
        inflate, v_inflate, deflate, v_deflate = done[0]
        cycles = [_cycle_record(*d) for d in done[1:]]
        freed = inflate["memfd_bytes_before"] - inflate["memfd_bytes_after"]
        phase = "finishing"
        wl = lp.agent.execute("workload-stop")
        pids = lp.pids
        final = lp.qmp.execute("x-balloon-lab-counters")
        lp.check_alive()
    except (MonitorError, OSError) as e:     # a peer died or stalled: say which, never a half result
        raise lp.failure(phase, e) from e
    finally:
        lp.close()
    verified, workload_bad = trial_verified(v_inflate, v_deflate, cycles, wl)
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
        floors=floors,
        lab_cost={k: lab_cost(op["stages_ns"], op["requests"], floors) for k, op in ops.items()},
        verification={"after_inflate": v_inflate, "after_deflate": v_deflate,
                      "workload": {"ok": not workload_bad, "must_be_zero": workload_bad}},
        verified=bool(verified),
        errors=final["errors"],
        probes=_probe_summary({k: op["probes"] for k, op in ops.items()}, probes),
        trial_wall_ns=time.perf_counter_ns() - wall0,
        cycles=cycles or None,
    )


def trial_verified(v_inflate: dict, v_deflate: dict | None, cycles: list[dict], workload_stop: dict
                   ) -> tuple[bool, list[str]]:
    """(whether every check of the trial passed, the workload's must-be-zero figures above
    0): both operations' checks, every later cycle's, and the workload's own (churn's
    `corruptions`: held pages whose contents changed while the balloon worked)."""
    workload_bad = must_be_zero_failures(workload_stop)
    ok = (v_inflate["ok"] and (v_deflate is None or v_deflate["ok"]) and all(c["verified"] for c in cycles)
          and not workload_bad)
    return bool(ok), workload_bad


def _cycle_record(inflate: dict, v_inflate: dict, deflate: dict | None, v_deflate: dict | None) -> dict:
    """One inflate/deflate cycle as `cycles` holds it: its ops' fields (as the trial's top
    level and `deflate` hold them), stage times and verdict."""
    ops = {k: v for k, v in (("inflate", inflate), ("deflate", deflate)) if v is not None}
    return {**_op_result(inflate).to_json(),
            "deflate": _op_result(deflate).to_json() if deflate is not None else None,
            "stages_ns": {k: op["stages_ns"] for k, op in ops.items()},
            "verified": bool(v_inflate["ok"] and (v_deflate is None or v_deflate["ok"]))}

def _op_result(op: dict) -> OpResult:
    """balloon_op's dict as the trial result holds it: its stage times and probe
    reading go to the trial's `stages_ns` and `probes`, `kind` is where it sits."""
    return OpResult.from_json({k: v for k, v in op.items() if k not in ("kind", "stages_ns", "probes")})
