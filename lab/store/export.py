"""Tidy export of stored runs for notebooks: one row per trial x metric.

Columns (EXPORT_COLUMNS, in this order; docs/EXPORT.md documents them):

    run_id, run_name, trial, arm, round, warmup, status, metric, kind, unit, value

`kind` and `unit` come from lab/results/metrics.py, where each metric's classification and
unit are declared; a count's unit is "count". A failed trial has no metrics and
appears as one row with empty metric/kind/unit/value, so the failure is not lost.
Filtering `status == "ok" and not warmup` and taking per-(arm, metric) medians gives
exactly the medians `balloon-lab show` prints.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import IO, Iterable, Iterator, Sequence

from lab.results import metrics
from lab.store.store import Store

FORMATS = ("csv", "jsonl", "parquet")
COUNT_UNIT = "count"


@dataclass(frozen=True)
class ExportRow:
    run_id: str
    run_name: str
    trial: int          # the trial's index in its run (schedule order)
    arm: str
    round: int          # repetition; every arm runs once per round, warm-up rounds first
    warmup: bool
    status: str         # ok | failed
    metric: str | None
    kind: str | None    # timing | gauge | counter
    unit: str | None    # ns, us, ms, s, bytes, count
    value: float | int | None


EXPORT_COLUMNS = tuple(f.name for f in fields(ExportRow))


def export_rows(store: Store, run_ids: Iterable[str], patterns: Sequence[str] = ()) -> Iterator[ExportRow]:
    """The runs' rows; with glob `patterns`, only the metrics they match (and the
    failed trials' metric-less rows)."""
    for run_id in run_ids:
        run = store.get_run(run_id)
        for idx, arm, rnd, warmup, status, name, kind, value in store.metric_rows(run.id):
            if name is not None and not metrics.matching([name], patterns):
                continue
            unit = None if name is None else (metrics.unit(name) or COUNT_UNIT)
            yield ExportRow(run.id, run.name, idx, arm, rnd, bool(warmup), status, name, kind, unit, value)


def write_csv(rows: Iterable[ExportRow], out: IO[str]) -> int:
    w = csv.writer(out, lineterminator="\n")
    w.writerow(EXPORT_COLUMNS)
    n = 0
    for r in rows:
        w.writerow(["" if v is None else ("true" if v is True else "false" if v is False else v)
                    for v in astuple(r)])
        n += 1
    return n


def write_jsonl(rows: Iterable[ExportRow], out: IO[str]) -> int:
    n = 0
    for r in rows:
        d = dict(zip(EXPORT_COLUMNS, astuple(r)))
        if isinstance(d["value"], float) and not math.isfinite(d["value"]):
            d["value"] = None
        out.write(json.dumps(d) + "\n")
        n += 1
    return n


def write_parquet(rows: Iterable[ExportRow], path: Path) -> int:
    """Parquet with explicit column types (value as float64: ints and floats mix)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    schema = pa.schema([("run_id", pa.string()), ("run_name", pa.string()), ("trial", pa.int64()),
                        ("arm", pa.string()), ("round", pa.int64()), ("warmup", pa.bool_()),
                        ("status", pa.string()), ("metric", pa.string()), ("kind", pa.string()),
                        ("unit", pa.string()), ("value", pa.float64())])
    cols: dict[str, list] = {c: [] for c in EXPORT_COLUMNS}
    for r in rows:
        for c, v in zip(EXPORT_COLUMNS, astuple(r)):
            cols[c].append(float(v) if c == "value" and v is not None else v)
    pq.write_table(pa.table(cols, schema=schema), path)
    return len(cols["run_id"])
