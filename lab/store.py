"""The results store: one embedded SQLite database (WAL) holding every run and trial.

A trial (its row, its flattened metrics, its histograms) is written in ONE
transaction with SIGINT/SIGTERM deferred, so neither Ctrl-C nor SIGKILL can leave
half a trial behind: SQLite's atomic commit covers the kill, the deferral covers
Python raising KeyboardInterrupt between two INSERTs. A run whose process died
without finishing is recognised by its recorded pid (and that pid's start time, so
a reused pid is not mistaken for it) and reported as "interrupted".
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import re
import signal
import socket
import sqlite3
import threading
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from lab import metrics as M

RUN_STATUSES = ("running", "complete", "failed", "interrupted")
TRIAL_STATUSES = ("ok", "failed")
BASELINE_FORMAT = "balloon-lab-baseline"
BASELINE_VERSION = 1
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id            TEXT PRIMARY KEY,
    kind          TEXT NOT NULL,
    name          TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    finished_at   TEXT,
    status        TEXT NOT NULL CHECK (status IN ('running','complete','failed','interrupted')),
    spec          TEXT NOT NULL,
    command_line  TEXT NOT NULL,
    environment   TEXT NOT NULL,
    probe_backend TEXT,
    notes         TEXT,
    pid           INTEGER,
    pid_start     INTEGER,
    host          TEXT
);
CREATE TABLE IF NOT EXISTS trials (
    id          INTEGER PRIMARY KEY,
    run_id      TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    idx         INTEGER NOT NULL,
    round       INTEGER NOT NULL,
    arm         TEXT NOT NULL,
    warmup      INTEGER NOT NULL CHECK (warmup IN (0, 1)),
    status      TEXT NOT NULL CHECK (status IN ('ok','failed')),
    error       TEXT,
    started_at  TEXT NOT NULL,
    duration_s  REAL NOT NULL,
    result      TEXT,
    UNIQUE (run_id, idx)
);
CREATE TABLE IF NOT EXISTS metrics (
    trial_id INTEGER NOT NULL REFERENCES trials(id) ON DELETE CASCADE,
    name     TEXT NOT NULL,
    value    NOT NULL,
    kind     TEXT NOT NULL CHECK (kind IN ('timing','gauge','counter')),
    PRIMARY KEY (trial_id, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS histograms (
    trial_id INTEGER NOT NULL REFERENCES trials(id) ON DELETE CASCADE,
    name     TEXT NOT NULL,
    bucket   TEXT NOT NULL,
    count    INTEGER NOT NULL,
    PRIMARY KEY (trial_id, name, bucket)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS comparisons (
    run_id     TEXT PRIMARY KEY REFERENCES runs(id) ON DELETE CASCADE,
    created_at TEXT NOT NULL,
    data       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS trials_by_run ON trials (run_id, warmup, status);
"""


class StoreError(Exception):
    """A request the store cannot answer: unknown or ambiguous run, bad status, ..."""


class BaselineError(ValueError):
    """A baseline file that cannot be used; the message says why."""


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
    result: dict[str, Any] | None = None
    error: str | None = None
    id: int | None = None  # row id, set when read back


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

    @property
    def arms(self) -> list[str]:
        """Arm labels in schedule order (from the spec, plus any only seen in trials)."""
        return list(self.spec.get("_arm_labels") or self.spec.get("arms") or [])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Baseline:
    """A run exported to a file: what the gate compares against."""

    path: str
    run: dict[str, Any]
    spec: dict[str, Any]
    environment: dict[str, Any]
    table: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    rounds: dict[str, dict[str, np.ndarray]] | None = None  # the round of each sample, if recorded


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


def _proc_start(pid: int) -> int | None:
    """Start time of a live process in clock ticks since boot (field 22 of
    /proc/pid/stat); None if there is no such process or it is a zombie (dead, unreaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after the last ')'
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Defer SIGINT/SIGTERM until the block is done, then deliver them to the handlers
    that were in place, so Python cannot raise KeyboardInterrupt between two statements
    of one transaction. (A signal mask would not do: a process-directed signal goes to
    any thread not blocking it, e.g. a BLAS worker, and Python then runs the handler in
    the main thread anyway.) Handlers only run in the main thread, so a write from
    another thread needs no protection."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    old = {s: h for s, h in old.items() if h is not None}  # None: installed from C, leave it alone
    for s in old:
        signal.signal(s, lambda signum, _frame: pending.append(signum))
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for s in pending:
            signal.raise_signal(s)


class Store:
    """The results database at `path` (created with its directory unless create=False)."""

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.path = Path(path)
        if not self.path.exists():
            if not create:
                raise StoreError(f"no results database at {self.path}")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.path} has schema version {version}, newer than this lab's "
                                 f"{SCHEMA_VERSION}: upgrade balloon-lab")
            if version < SCHEMA_VERSION:
                with self._transaction():
                    for stmt in _SCHEMA.split(";"):
                        if stmt.strip():
                            self.db.execute(stmt)
                    self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path} is not a usable SQLite database: {e}") from None

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with _signals_deferred():
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    # --- runs -----------------------------------------------------------------------
    def create_run(self, spec: Any, kind: str | None = None, environment: Mapping[str, Any] | None = None,
                   *, notes: str | None = None, command_line: str | None = None) -> str:
        """Record a new run (status running, owned by this process); returns its id.
        `spec` is an ExperimentSpec (or its dict); its schedule's arm labels are kept."""
        if hasattr(spec, "to_dict"):
            spec_d = spec.to_dict()
            spec_d["_arm_labels"] = [p.label for p in spec.schedule()]
            command_line = command_line or spec.command_line()
        else:
            spec_d = dict(spec)
        kind = kind or spec_d.get("kind") or "balloon"
        env = dict(environment or {})
        run_id = uuid.uuid4().hex[:12]
        pid = os.getpid()
        with self._transaction() as db:
            db.execute(
                "INSERT INTO runs (id, kind, name, created_at, status, spec, command_line, environment,"
                " probe_backend, notes, pid, pid_start, host) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (run_id, kind, str(spec_d.get("name", "")), now_iso(), "running", dumps(spec_d),
                 command_line or "", dumps(env), env.get("probe_backend"), notes, pid,
                 _proc_start(pid), socket.gethostname()),
            )
        return run_id

    def set_probe_backend(self, run_id: str, backend: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE runs SET probe_backend=? WHERE id=?", (backend, run_id))

    def add_note(self, run_id: str, note: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE runs SET notes = CASE WHEN notes IS NULL OR notes = '' THEN ?"
                       " ELSE notes || char(10) || ? END WHERE id=?", (note, note, run_id))

    def finish_run(self, run_id: str, status: str) -> None:
        if status not in RUN_STATUSES or status == "running":
            raise StoreError(f"cannot finish a run as {status!r}; choose complete, failed or interrupted")
        with self._transaction() as db:
            cur = db.execute("UPDATE runs SET status=?, finished_at=? WHERE id=?", (status, now_iso(), run_id))
            if cur.rowcount != 1:
                raise StoreError(f"no run {run_id!r}")

    _RUN_QUERY = (
        "SELECT r.*, "
        " (SELECT count(*) FROM trials t WHERE t.run_id=r.id AND t.warmup=0 AND t.status='ok') AS n_ok,"
        " (SELECT count(*) FROM trials t WHERE t.run_id=r.id AND t.warmup=0 AND t.status='failed') AS n_failed,"
        " (SELECT count(*) FROM trials t WHERE t.run_id=r.id AND t.warmup=1) AS n_warm"
        " FROM runs r")

    def list_runs(self) -> list[RunInfo]:
        """Every run, newest first, with trial counts and dead runs shown as interrupted."""
        rows = self.db.execute(self._RUN_QUERY + " ORDER BY r.created_at DESC, r.rowid DESC").fetchall()
        return [self._run_info(r) for r in rows]

    def get_run(self, ref: str) -> RunInfo:
        """A run by id, unique id prefix, or "latest"; StoreError if unknown or ambiguous."""
        row = self.db.execute(self._RUN_QUERY + " WHERE r.id=?", (self.resolve_run_id(ref),)).fetchone()
        return self._run_info(row)

    def resolve_run_id(self, ref: str) -> str:
        ref = ref.strip().lower()
        if ref == "latest":
            row = self.db.execute("SELECT id FROM runs ORDER BY created_at DESC, rowid DESC LIMIT 1").fetchone()
            if row is None:
                raise StoreError(f"no runs yet in {self.path}")
            return row["id"]
        if not re.fullmatch(r"[0-9a-f]+", ref):
            raise StoreError(f"no run {ref!r} in {self.path} (run ids are hexadecimal)")
        ids = [r["id"] for r in self.db.execute("SELECT id FROM runs WHERE id LIKE ? ORDER BY id", (ref + "%",))]
        if not ids:
            raise StoreError(f"no run {ref!r} in {self.path}")
        if len(ids) > 1 and ref not in ids:
            raise StoreError(f"run id prefix {ref!r} is ambiguous: {', '.join(ids[:10])}")
        return ref if ref in ids else ids[0]

    def _run_info(self, r: sqlite3.Row) -> RunInfo:
        status = r["status"]
        if status == "running" and r["finished_at"] is None and self._owner_dead(r):
            status = "interrupted"
            with self._transaction() as db:  # persist, so other hosts see it too
                db.execute("UPDATE runs SET status='interrupted' WHERE id=? AND status='running'", (r["id"],))
        return RunInfo(
            id=r["id"], kind=r["kind"], name=r["name"], created_at=r["created_at"],
            finished_at=r["finished_at"], status=status, spec=json.loads(r["spec"]),
            command_line=r["command_line"], environment=json.loads(r["environment"]),
            probe_backend=r["probe_backend"], notes=r["notes"],
            trials_ok=r["n_ok"], trials_failed=r["n_failed"], warmups=r["n_warm"],
        )

    @staticmethod
    def _owner_dead(r: sqlite3.Row) -> bool:
        if r["host"] != socket.gethostname() or r["pid"] is None:
            return False  # another machine's run: cannot tell from here
        start = _proc_start(r["pid"])
        return start is None or (r["pid_start"] is not None and start != r["pid_start"])

    # --- trials -----------------------------------------------------------------------
    def add_trial(self, run_id: str, rec: TrialRecord) -> int:
        """Write one trial with its metrics and histograms atomically; returns its row id.
        Metrics are stored only for ok trials (failed ones keep their result for debugging)."""
        if rec.status not in TRIAL_STATUSES:
            raise StoreError(f"trial status {rec.status!r} is not one of {TRIAL_STATUSES}")
        result_json = dumps(rec.result) if rec.result is not None else None
        metric_rows: list[tuple[str, Any, str]] = []
        hist_rows: list[tuple[str, str, int]] = []
        if rec.status == "ok" and rec.result is not None:
            values, hists = M.flatten(rec.result)
            metric_rows = [(n, v, M.classify(n)) for n, v in values.items()]
            hist_rows = [(n, b, c) for n, h in hists.items() for b, c in h.items()]
        with self._transaction() as db:
            cur = db.execute(
                "INSERT INTO trials (run_id, idx, round, arm, warmup, status, error, started_at, duration_s, result)"
                " VALUES (?,?,?,?,?,?,?,?,?,?)",
                (run_id, rec.idx, rec.round, rec.arm, int(rec.warmup), rec.status, rec.error,
                 rec.started_at, float(rec.duration_s), result_json))
            tid = cur.lastrowid
            db.executemany("INSERT INTO metrics (trial_id, name, value, kind) VALUES (?,?,?,?)",
                           [(tid, n, v, k) for n, v, k in metric_rows])
            db.executemany("INSERT INTO histograms (trial_id, name, bucket, count) VALUES (?,?,?,?)",
                           [(tid, n, b, c) for n, b, c in hist_rows])
        return tid

    def trials(self, run_id: str, include_warmups: bool = False) -> list[TrialRecord]:
        q = "SELECT * FROM trials WHERE run_id=?" + ("" if include_warmups else " AND warmup=0") + " ORDER BY idx"
        return [TrialRecord(arm=r["arm"], idx=r["idx"], round=r["round"], warmup=bool(r["warmup"]),
                            status=r["status"], started_at=r["started_at"], duration_s=r["duration_s"],
                            result=json.loads(r["result"]) if r["result"] else None,
                            error=r["error"], id=r["id"])
                for r in self.db.execute(q, (run_id,))]

    def metric_table(self, run_id: str) -> dict[str, dict[str, np.ndarray]]:
        """{arm: {metric: samples}} over the measured (non-warm-up) ok trials, arms in
        schedule order, samples in trial order."""
        return self._table(run_id, "m.value")

    def round_table(self, run_id: str) -> dict[str, dict[str, np.ndarray]]:
        """Same shape as metric_table, holding each sample's round: samples of one round
        saw the same seed, so counters can be compared round by round."""
        return self._table(run_id, "t.round")

    def _table(self, run_id: str, column: str) -> dict[str, dict[str, np.ndarray]]:
        table: dict[str, dict[str, list[float]]] = {a: {} for a in self._arm_order(run_id)}
        rows = self.db.execute(
            f"SELECT t.arm, m.name, {column} FROM metrics m JOIN trials t ON t.id = m.trial_id"
            " WHERE t.run_id=? AND t.warmup=0 AND t.status='ok' ORDER BY t.idx, m.name", (run_id,))
        for arm, name, value in rows:
            table.setdefault(arm, {}).setdefault(name, []).append(value)
        return {arm: {n: np.asarray(v, dtype=float) for n, v in sorted(ms.items())}
                for arm, ms in table.items() if ms}

    def metric_rows(self, run_id: str) -> list[tuple]:
        """The tidy metrics table joined with its trials, one row per trial x metric
        (warm-ups and failed trials included; a failed trial, which has no metrics, as
        one row with metric None): (idx, arm, round, warmup, status, metric, kind, value)."""
        return self.db.execute(
            "SELECT t.idx, t.arm, t.round, t.warmup, t.status, m.name, m.kind, m.value"
            " FROM trials t LEFT JOIN metrics m ON m.trial_id = t.id WHERE t.run_id=? ORDER BY t.idx, m.name",
            (run_id,)).fetchall()

    def histogram_table(self, run_id: str) -> dict[str, dict[str, dict[str, int]]]:
        """{arm: {histogram: {bucket: count summed over measured ok trials}}}."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        rows = self.db.execute(
            "SELECT t.arm, h.name, h.bucket, sum(h.count) FROM histograms h JOIN trials t ON t.id = h.trial_id"
            " WHERE t.run_id=? AND t.warmup=0 AND t.status='ok' GROUP BY t.arm, h.name, h.bucket", (run_id,))
        for arm, name, bucket, count in rows:
            out.setdefault(arm, {}).setdefault(name, {})[bucket] = count
        return out

    def _arm_order(self, run_id: str) -> list[str]:
        row = self.db.execute("SELECT spec FROM runs WHERE id=?", (run_id,)).fetchone()
        if row is None:
            raise StoreError(f"no run {run_id!r}")
        spec = json.loads(row["spec"])
        return list(spec.get("_arm_labels") or spec.get("arms") or [])

    # --- comparisons ------------------------------------------------------------------
    def save_comparison(self, run_id: str, comparison: Any) -> None:
        """Store the run's comparison (a stats.Comparison or its dict), replacing any earlier one."""
        data = comparison.to_dict() if hasattr(comparison, "to_dict") else comparison
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO comparisons (run_id, created_at, data) VALUES (?,?,?)",
                       (run_id, now_iso(), dumps(data)))

    def get_comparison(self, run_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT data FROM comparisons WHERE run_id=?", (run_id,)).fetchone()
        return json.loads(row["data"]) if row else None

    # --- baselines --------------------------------------------------------------------
    def export_baseline(self, run_id: str, path: str | Path, *, allow_incomplete: bool = False) -> Path:
        """Write a run's spec, environment and per-arm per-metric samples to a JSON file
        (for committing into a repository as the CI gate's baseline)."""
        run = self.get_run(run_id)
        if run.status != "complete" and not allow_incomplete:
            raise StoreError(f"run {run.id} is {run.status}, not complete: a baseline must come from a "
                             "finished run (pass allow_incomplete to export it anyway)")
        table, rounds = self.metric_table(run.id), self.round_table(run.id)
        if not table:
            raise StoreError(f"run {run.id} has no measured ok trials to export")
        doc = {
            "format": BASELINE_FORMAT,
            "version": BASELINE_VERSION,
            "exported_at": now_iso(),
            "run": {k: getattr(run, k) for k in ("id", "name", "kind", "status", "created_at", "finished_at",
                                                 "command_line", "probe_backend", "trials_ok", "trials_failed")},
            "spec": run.spec,
            "environment": run.environment,
            "arms": {arm: {m: {"kind": M.classify(m), "samples": v.tolist(),
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
