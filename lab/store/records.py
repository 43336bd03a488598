"""What the store holds, as Python records: a trial, a run, and the JSON they are kept in.

Kept apart from the database code (lab/store/store.py) so that everything that builds or
reads a trial (the experiment loop, the queue's workers, the reports) shares one
definition; lab.store re-exports these names for its callers.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import numpy as np

RUN_STATUSES = ("running", "complete", "failed", "interrupted")
TRIAL_STATUSES = ("ok", "failed")


@dataclass
class TrialRecord:
    """One trial as recorded. `idx` orders trials within a run; `round` is the
    repetition (every arm runs once per round, warm-up rounds first)."""

    arm: str
    idx: int
    round: int
    warmup: bool
    status: str  # ok | failed
    started_at: str
    duration_s: float
    result: dict[str, Any] | None = None  # as stored: a balloon trial's is lab/results/trial_result.py's JSON
    error: str | None = None
    id: int | None = None  # row id, set when read back
    host_id: str | None = None  # which host ran it (None: this one, lab.machine.identity.host_id())
    host: dict[str, Any] | None = None  # that host's identity and load (None: measured when stored)


@dataclass
class RunInfo:
    id: str
    kind: str
    name: str
    created_at: str
    finished_at: str | None
    status: str
    spec: dict[str, Any]
    command_line: str
    environment: dict[str, Any]
    probe_backend: str | None
    notes: str | None
    trials_ok: int = 0
    trials_failed: int = 0
    warmups: int = 0
    hosts: list[str] = field(default_factory=list)  # host ids that ran its trials, first seen first

    @property
    def arms(self) -> list[str]:
        """Arm labels in schedule order (from the spec, plus any only seen in trials)."""
        return list(self.spec.get("_arm_labels") or self.spec.get("arms") or [])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def json_ready(obj: Any) -> Any:
    """Plain JSON values: numpy scalars/arrays unwrapped, non-finite floats -> None."""
    if isinstance(obj, Mapping):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_ready(obj.tolist())
    if isinstance(obj, np.generic):
        return json_ready(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"{type(obj).__name__} value {obj!r} cannot be stored as JSON")


def dumps(obj: Any, **kw: Any) -> str:
    return json.dumps(json_ready(obj), allow_nan=False, **kw)
