"""Baseline files: a finished run's per-arm samples in versioned JSON, committed into a
repository as what the CI gate compares a candidate with (lab/gate/inputs.py reads it).

A baseline holds one host's trials (timings of two hosts are not one sample) and the
round of each sample, so counters can be compared round by round.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lab.results import metrics
from lab.store.store import Store, StoreError
from lab.store.records import dumps, now_iso

BASELINE_FORMAT = "balloon-lab-baseline"
BASELINE_VERSION = 1


class BaselineError(ValueError):
    """A baseline file that cannot be used; the message says why."""


@dataclass
class Baseline:
    """A run exported to a file: what the gate compares against."""

    path: str
    run: dict[str, Any]
    spec: dict[str, Any]
    environment: dict[str, Any]
    table: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    rounds: dict[str, dict[str, np.ndarray]] | None = None  # the round of each sample, if recorded


def export_baseline(store: Store, run_id: str, path: str | Path, *, allow_incomplete: bool = False,
                    host: str | None = None) -> Path:
    """Write a run's spec, environment and per-arm per-metric samples to a JSON file
    (for committing into a repository as the CI gate's baseline). A baseline holds one
    host's trials (timings of two hosts are not one sample): `host` picks it when the
    run ran on several."""
    run = store.get_run(run_id)
    if run.status != "complete" and not allow_incomplete:
        raise StoreError(f"run {run.id} is {run.status}, not complete: a baseline must come from a "
                         "finished run (--allow-incomplete exports it anyway)")
    if host is None and len(run.hosts) > 1:
        raise StoreError(f"run {run.id} ran on hosts {', '.join(run.hosts)}: export one host's baseline "
                         "(--host)")
    if host is not None and host not in run.hosts:
        raise StoreError(f"run {run.id} has no trials on host {host!r} (hosts: {', '.join(run.hosts) or 'none'})")
    host = host or (run.hosts[0] if run.hosts else None)
    table, rounds = store.metric_table(run.id, host), store.round_table(run.id, host)
    if not table:
        raise StoreError(f"run {run.id} has no measured ok trials to export")
    doc = {
        "format": BASELINE_FORMAT,
        "version": BASELINE_VERSION,
        "exported_at": now_iso(),
        "run": {k: getattr(run, k) for k in ("id", "name", "kind", "status", "created_at", "finished_at",
                                             "command_line", "probe_backend", "trials_ok", "trials_failed")}
               | {"host_id": host},
        "spec": run.spec,
        "environment": run.environment,
        "arms": {arm: {m: {"kind": metrics.classify(m), "samples": v.tolist(),
                           "rounds": rounds[arm][m].astype(int).tolist()} for m, v in ms.items()}
                 for arm, ms in table.items()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def load_baseline(path: str | Path) -> Baseline:
    """Read a file written by export_baseline; BaselineError names what is wrong."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise BaselineError(f"baseline file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BaselineError(f"cannot read baseline file {p}: {e}") from None
    except json.JSONDecodeError as e:
        raise BaselineError(f"baseline file {p} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != BASELINE_FORMAT:
        raise BaselineError(f"{p} is not a balloon-lab baseline (no \"format\": \"{BASELINE_FORMAT}\")")
    if doc.get("version") != BASELINE_VERSION:
        raise BaselineError(f"{p} has baseline version {doc.get('version')!r}; this lab reads {BASELINE_VERSION}")
    arms = doc.get("arms")
    if not isinstance(arms, dict) or not arms:
        raise BaselineError(f"{p} has no \"arms\" with samples")
    table: dict[str, dict[str, np.ndarray]] = {}
    rounds: dict[str, dict[str, np.ndarray]] = {}
    for arm, ms in arms.items():
        if not isinstance(ms, dict):
            raise BaselineError(f"{p}: arms.{arm} is not a table of metrics")
        table[arm], rounds[arm] = {}, {}
        for m, entry in ms.items():
            samples = entry.get("samples") if isinstance(entry, dict) else None
            if not _numbers(samples):
                raise BaselineError(f"{p}: arms.{arm}.{m}.samples must be a non-empty list of numbers")
            table[arm][m] = np.asarray(samples, dtype=float)
            if "rounds" in entry:
                if not _numbers(entry["rounds"]) or len(entry["rounds"]) != len(samples):
                    raise BaselineError(f"{p}: arms.{arm}.{m}.rounds must list one round per sample")
                rounds[arm][m] = np.asarray(entry["rounds"], dtype=float)
    for key in ("run", "spec", "environment"):
        if not isinstance(doc.get(key, {}), dict):
            raise BaselineError(f"{p}: \"{key}\" must be an object")
    complete = all(set(rounds[a]) == set(table[a]) for a in table)
    return Baseline(path=str(p), run=doc.get("run", {}), spec=doc.get("spec", {}),
                    environment=doc.get("environment", {}), table=table, rounds=rounds if complete else None)


def _numbers(xs: Any) -> bool:
    return (isinstance(xs, list) and bool(xs)
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs))
