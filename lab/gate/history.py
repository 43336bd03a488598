"""A metric across the stored runs of one experiment, as asv plots a benchmark across
commits: the report's history section and `balloon-lab history` read it from here.

"The same experiment" is the gate's own definition: runs whose specs agree on every
field the gate compares (lab/gate/inputs.py spec_differences: every field but
NOT_COMPARED_SPEC_FIELDS, so name, arms and trial counts may differ). A run the gate flagged carries a note starting with GATE_NOTE, written by
`balloon-lab gate` when the candidate is a stored run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lab.analysis import stats
from lab.gate.inputs import spec_differences
from lab.store.store import RunInfo, Store

GATE_NOTE = "gate: "


@dataclass(frozen=True)
class HistoryPoint:
    run_id: str
    created_at: str
    git_commit: str | None
    arm: str
    median: float
    ci_low: float | None
    ci_high: float | None
    n: int
    flagged: str | None      # the gate's note when it found a regression in this run
    load: float | None = None  # 1-minute load average when the run started: timings follow it


def gate_note(verdict: str, baseline_ref: str, regressed: list[str]) -> str:
    """The note `balloon-lab gate` leaves on a candidate run."""
    what = f": {', '.join(regressed[:8])}" + (" ..." if len(regressed) > 8 else "") if regressed else ""
    return f"{GATE_NOTE}{verdict} against {baseline_ref}{what}"


def gate_flag(run: RunInfo) -> str | None:
    """The last gate note of a run if the gate found a regression there."""
    notes = [n for n in (run.notes or "").splitlines() if n.startswith(GATE_NOTE)]
    return notes[-1] if notes and notes[-1].startswith(GATE_NOTE + "regression") else None


def same_experiment(store: Store, anchor: RunInfo) -> list[RunInfo]:
    """Runs of the anchor's experiment, oldest first, the anchor included; unfinished
    runs are left out (their numbers are partial)."""
    runs = [r for r in store.list_runs()
            if r.kind == anchor.kind and r.status == "complete" and not spec_differences(anchor.spec, r.spec)]
    if anchor.id not in {r.id for r in runs}:
        runs.append(anchor)
    return sorted(runs, key=lambda r: r.created_at)


def history(store: Store, metric: str, anchor_ref: str = "latest", arm: str | None = None,
            last: int = 60) -> list[HistoryPoint]:
    """Per run of the anchor's experiment (the newest `last` of them) and per arm (or
    the one `arm`): median of `metric` over measured ok trials with its bootstrap CI."""
    anchor = store.get_run(anchor_ref)
    out = []
    for run in same_experiment(store, anchor)[-last:]:
        table = store.metric_table(run.id)
        flag = gate_flag(run)
        for a, metrics in table.items():
            if (arm is not None and a != arm) or metric not in metrics:
                continue
            x = metrics[metric]
            med, lo, hi = stats.median_ci(x)
            load = (run.environment.get("loadavg") or [None])[0]
            out.append(HistoryPoint(run.id, run.created_at, run.environment.get("git_commit"), a, float(med),
                                    lo, hi, int(np.size(x)), flag, load))
    return out


def to_json(points: list[HistoryPoint]) -> list[dict[str, Any]]:
    return [p.__dict__ for p in points]
