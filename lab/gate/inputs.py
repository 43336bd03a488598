"""The gate's two sides: a stored run or a baseline file, read into per-arm samples.

Input that cannot give an answer (a missing run or file, malformed JSON, an unfinished
run, different experiments) raises GateInputError: exit 2, distinct from a regression
(exit 1). lab/gate/compare.py decides; this module only reads and refuses.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from lab.gate.baseline_file import BaselineError, load_baseline
from lab.store.store import Store, StoreError

# Every field of the spec defines the experiment (if one differs, or one side lacks it,
# the runs measure different things), except these, which say how much was measured or
# what it is called, not what (tests/test_gate.py checks every ExperimentSpec field is
# one or the other, so a new field is compared unless it is named here):
NOT_COMPARED_SPEC_FIELDS = {
    "name": "a label",
    "trials": "the sample size: the gate asks for enough ok trials itself (--min-trials)",
    "warmups": "trials not measured",
    "arms": "gated arm by arm: an arm missing from the candidate is a regression, a new one a note",
    "_arm_labels": "the arms' labels as scheduled (arms, and the probe-overhead arm)",
    "probe_overhead": "one extra unprobed arm for the overhead table; the gated arms are unchanged",
}


class GateInputError(Exception):
    """The gate cannot decide (exit 2); the message says what to fix."""


@dataclass
class GateInput:
    """One side of the gate: a stored run or a baseline file."""

    ref: str
    source: str  # run | file
    run_id: str | None
    name: str
    spec: dict[str, Any]
    environment: dict[str, Any]
    table: dict[str, dict[str, np.ndarray]]
    rounds: dict[str, dict[str, np.ndarray]] | None = None  # round of each sample, aligned with table
    # per scheduled arm: (ok measured trials, failed measured trials, first error); None for
    # baseline files, whose ok trials are the samples they carry
    outcomes: dict[str, tuple[int, int, str | None]] | None = None
    span: tuple[str | None, str | None] = (None, None)    # the run's start and end (ISO), if known

    def ok_trials(self, arm: str) -> int:
        """Measured trials of `arm` that succeeded (the most samples any metric has)."""
        if self.outcomes is not None and arm in self.outcomes:
            return self.outcomes[arm][0]
        return max((len(v) for v in self.table.get(arm, {}).values()), default=0)

    @property
    def arms(self) -> list[str]:
        """Every arm this side scheduled or measured, in schedule order."""
        labels = list(self.spec.get("_arm_labels") or self.spec.get("arms") or [])
        return labels + [a for a in self.table if a not in labels]

    @property
    def reference_arm(self) -> str | None:
        """The spec's first arm (every other arm is compared with it), if it has data."""
        labels = self.spec.get("_arm_labels") or self.spec.get("arms") or []
        return next((a for a in labels if a in self.table), next(iter(self.table), None))

    def describe(self) -> str:
        where = f"run {self.run_id}" if self.source == "run" else f"file {self.ref}"
        if self.source == "file" and self.run_id:
            where += f" (run {self.run_id})"
        n = {arm: max((len(v) for v in ms.values()), default=0) for arm, ms in self.table.items()}
        return f"{where} {self.name!r}, trials per arm: " + ", ".join(f"{a}={k}" for a, k in n.items())

    def to_dict(self) -> dict[str, Any]:
        return {"ref": self.ref, "source": self.source, "run_id": self.run_id, "name": self.name}


def load_input(ref: str, db_path: str | Path, side: str = "input", host: str | None = None) -> GateInput:
    """A run id (or prefix, or "latest") in the store at db_path, or a baseline JSON file.
    `side` ("baseline"/"candidate") names it in error messages; `host` keeps only that
    host's trials of a run (lab/gate/hosts.py pairs the hosts)."""
    p = Path(ref)
    if p.is_file():
        try:
            b = load_baseline(p)
        except BaselineError as e:
            raise GateInputError(f"{side}: {e}") from None
        return GateInput(ref, "file", b.run.get("id"), b.run.get("name") or b.spec.get("name", ""),
                         b.spec, b.environment, b.table, b.rounds,
                         span=(b.run.get("created_at"), b.run.get("finished_at")))
    if "/" in ref or ref.endswith(".json") or p.exists():
        raise GateInputError(f"{side}: file {ref} does not exist (or is not a file)")
    try:
        store = Store(db_path, create=False)
    except StoreError as e:
        raise GateInputError(f"{side}: {ref!r} is neither a file nor a run: {e}") from None
    try:
        run = store.get_run(ref)
        # A candidate whose every trial failed is an answer (its arms regressed), not unusable input.
        finished = ("complete", "failed") if side == "candidate" else ("complete",)
        if run.status not in finished:
            raise GateInputError(f"{side}: run {run.id} is {run.status}, not complete: gate only finished runs")
        table, rounds = store.metric_table(run.id, host), store.round_table(run.id, host)
        outcomes: dict[str, tuple[int, int, str | None]] = {a: (0, 0, None) for a in run.arms}
        for t in store.trials(run.id, include_warmups=False, host=host):
            ok, bad, err = outcomes.get(t.arm, (0, 0, None))
            if t.status == "ok":
                ok += 1
            else:
                bad, err = bad + 1, err or (t.error or "?").splitlines()[0]
            outcomes[t.arm] = (ok, bad, err)
    except StoreError as e:
        raise GateInputError(f"{side}: {e}") from None
    finally:
        store.close()
    return GateInput(ref, "run", run.id, run.name, run.spec, run.environment, table, rounds, outcomes,
                     span=(run.created_at, run.finished_at))


def spec_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """How two specs (baseline, candidate) differ in what they measure: every field but
    NOT_COMPARED_SPEC_FIELDS, a field only one side has included."""
    out = []
    for k in sorted((set(a) | set(b)) - set(NOT_COMPARED_SPEC_FIELDS)):
        if k not in a or k not in b:
            out.append(f"{k}: {'absent' if k not in a else repr(a[k])} vs {'absent' if k not in b else repr(b[k])}")
        elif a[k] != b[k]:
            out.append(f"{k}: {a[k]!r} vs {b[k]!r}")
    return out
