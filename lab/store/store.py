"""The results store: an embedded SQLite database (WAL), or a PostgreSQL database shared
by many hosts, holding every run and trial (lab/store/sql.py is the dialect seam,
lab/store/schema.py the versioned schema, lab/store/records.py the records it holds,
lab/gate/baseline_file.py a run exported for the CI gate).

A trial (its row, its flattened metrics, its histograms) is written in ONE
transaction with SIGINT/SIGTERM deferred, so neither Ctrl-C nor SIGKILL can leave
half a trial behind: the engine's atomic commit covers the kill, the deferral covers
Python raising KeyboardInterrupt between two INSERTs. A run whose process died
without finishing is recognised by its recorded pid (and that pid's start time, so
a reused pid is not mistaken for it) and reported as "interrupted".
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from system.signals import signals_deferred
from lab.machine import identity as lab_host
from lab.results import metrics
from lab.store import guard as store_guard
from lab.store import schema as store_schema
from lab.store import sql as store_sql
from lab.store.guard import StoreError
from lab.results import trial_result

# the records are the store's vocabulary: its callers import them from here
from lab.store.records import RUN_STATUSES, TRIAL_STATUSES, RunInfo, TrialRecord, dumps, now_iso  # noqa: F401

SCHEMA_VERSION = store_schema.SCHEMA_VERSION


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


class Store:
    """The results database at `path`: a SQLite file (created with its directory unless
    create=False) or a postgresql:// URL (its tables created unless create=False)."""

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        pg = store_sql.is_postgres(path)
        self.path: str | Path = store_sql.redact(str(path)) if pg else Path(path)
        if not pg and not self.path.exists():
            if not create:
                raise StoreError(f"no results database at {self.path}")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dialect = store_sql.POSTGRES if pg else store_sql.SQLITE
        try:
            self.db, self.dialect = store_sql.connect(path if pg else self.path)   # checked (store_guard)
        except (ValueError, store_sql.ConnectError) as e:
            raise StoreError(str(e)) from None
        try:
            if pg and not create and store_sql.schema_version(self.db, self.dialect) == 0:
                raise StoreError(f"no balloon-lab results in {self.path} (no tables yet)")
            if store_sql.schema_version(self.db, self.dialect) != SCHEMA_VERSION:
                with self._transaction() as db:
                    store_schema.migrate(db, self.dialect, str(self.path))
            if create and not pg and not self.db.execute("PRAGMA application_id").fetchone()[0]:
                with self._transaction() as db:     # a store from before the stamp: mark it ours
                    store_guard.stamp(db)
        except StoreError:
            self.db.close()
            raise
        except ValueError as e:
            self.db.close()
            raise StoreError(str(e)) from None
        except Exception as e:  # psycopg.Error: not a store we can use
            self.db.close()
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise StoreError(f"{self.path} is not a usable {self.dialect.name} database: {first}") from None

    @property
    def is_postgres(self) -> bool:
        return self.dialect is store_sql.POSTGRES

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Any]:
        with signals_deferred():
            self.db.execute(self.dialect.begin)
            try:
                yield self.db
                self.db.execute("COMMIT")
            except BaseException:
                # SQLite may have rolled back already (a full disk does): the original
                # error is the one to report, never "no transaction is active"
                with contextlib.suppress(Exception):
                    self.db.execute("ROLLBACK")
                raise

    # --- runs -----------------------------------------------------------------------
    def create_run(self, spec: Any, kind: str | None = None, environment: Mapping[str, Any] | None = None,
                   *, notes: str | None = None, command_line: str | None = None, queued: bool = False) -> str:
        """Record a new run (status running, owned by this process); returns its id.
        `spec` is an ExperimentSpec (or its dict); its schedule's arm labels are kept.
        queued=True: workers run its trials (lab/testbed/task_queue.py), so no process owns it."""
        if hasattr(spec, "to_dict"):
            spec_d = spec.to_dict()
            spec_d["_arm_labels"] = [p.label for p in spec.schedule()]
            command_line = command_line or spec.command_line()
        else:
            spec_d = dict(spec)
        kind = kind or spec_d.get("kind") or "balloon"
        env = dict(environment or {})
        run_id = uuid.uuid4().hex[:12]
        pid = None if queued else os.getpid()
        with self._transaction() as db:
            db.execute(
                "INSERT INTO runs (id, kind, name, created_at, status, spec, command_line, environment,"
                " probe_backend, notes, pid, pid_start, host) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (run_id, kind, str(spec_d.get("name", "")), now_iso(), "running", dumps(spec_d),
                 command_line or "", dumps(env), env.get("probe_backend"), notes, pid,
                 None if pid is None else _proc_start(pid), socket.gethostname()),
            )
        return run_id

    def set_probe_backend(self, run_id: str, backend: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE runs SET probe_backend=? WHERE id=?", (backend, run_id))

    def add_note(self, run_id: str, note: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE runs SET notes = CASE WHEN notes IS NULL OR notes = '' THEN ?"
                       " ELSE notes || ? || ? END WHERE id=?", (note, "\n", note, run_id))

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
        rows = self.db.execute(self._RUN_QUERY + f" ORDER BY r.created_at DESC, {self.dialect.insertion_order} DESC"
                               ).fetchall()
        hosts: dict[str, list[str]] = {}
        for run_id, host_id in self.db.execute("SELECT run_id, host_id FROM trials WHERE host_id IS NOT NULL"
                                               " GROUP BY run_id, host_id ORDER BY run_id, min(idx)"):
            hosts.setdefault(run_id, []).append(host_id)
        return [self._run_info(r, hosts.get(r["id"], [])) for r in rows]

    def get_run(self, ref: str) -> RunInfo:
        """A run by id, unique id prefix, or "latest"; StoreError if unknown or ambiguous."""
        run_id = self.resolve_run_id(ref)
        row = self.db.execute(self._RUN_QUERY + " WHERE r.id=?", (run_id,)).fetchone()
        return self._run_info(row, self.hosts(run_id))

    def hosts(self, run_id: str) -> list[str]:
        """Host ids that ran the run's trials, in the order they first appear."""
        return [h for h, in self.db.execute("SELECT host_id FROM trials WHERE run_id=? AND host_id IS NOT NULL"
                                            " GROUP BY host_id ORDER BY min(idx)", (run_id,))]

    def resolve_run_id(self, ref: str) -> str:
        ref = ref.strip().lower()
        if ref == "latest":
            row = self.db.execute("SELECT r.id FROM runs r ORDER BY r.created_at DESC, "
                                  f"{self.dialect.insertion_order} DESC LIMIT 1").fetchone()
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

    def _run_info(self, r: Any, hosts: list[str]) -> RunInfo:
        status = r["status"]
        if status == "running" and r["finished_at"] is None and self._owner_dead(r):
            status = "interrupted"
            # persist, so other hosts see it too; a read-only or full store is still read
            with contextlib.suppress(StoreError), self._transaction() as db:
                db.execute("UPDATE runs SET status='interrupted' WHERE id=? AND status='running'", (r["id"],))
        return RunInfo(
            id=r["id"], kind=r["kind"], name=r["name"], created_at=r["created_at"],
            finished_at=r["finished_at"], status=status, spec=json.loads(r["spec"]),
            command_line=r["command_line"], environment=json.loads(r["environment"]),
            probe_backend=r["probe_backend"], notes=r["notes"],
            trials_ok=r["n_ok"], trials_failed=r["n_failed"], warmups=r["n_warm"], hosts=hosts,
        )

    @staticmethod
    def _owner_dead(r: Any) -> bool:
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
        result = trial_result.to_json(rec.result)      # a TrialResult, or any trial function's dict
        result_json = dumps(result) if result is not None else None
        metric_rows: list[tuple[str, Any, str]] = []
        hist_rows: list[tuple[str, str, int]] = []
        if rec.status == "ok" and result is not None:
            values, hists = metrics.flatten(result)
            metric_rows = [(n, v, metrics.classify(n)) for n, v in values.items()]
            hist_rows = [(n, b, c) for n, h in hists.items() for b, c in h.items()]
        host_id = rec.host_id or lab_host.host_id()
        host = rec.host if rec.host is not None else lab_host.identity(host_id).to_dict()
        with self._transaction() as db:
            tid = store_sql.insert_id(
                db, self.dialect,
                "INSERT INTO trials (run_id, idx, round, arm, warmup, status, error, started_at, duration_s, result,"
                " host_id, host) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (run_id, rec.idx, rec.round, rec.arm, int(rec.warmup), rec.status, rec.error,
                 rec.started_at, float(rec.duration_s), result_json, host_id, dumps(host)))
            db.executemany("INSERT INTO metrics (trial_id, name, value, kind) VALUES (?,?,?,?)",
                           [(tid, n, v, k) for n, v, k in metric_rows])
            db.executemany("INSERT INTO histograms (trial_id, name, bucket, count) VALUES (?,?,?,?)",
                           [(tid, n, b, c) for n, b, c in hist_rows])
        return tid

    def add_trial_once(self, run_id: str, rec: TrialRecord) -> bool:
        """add_trial, unless the run already holds trial rec.idx (a queued trial run again
        after its worker was taken for lost): then nothing is written and False returned."""
        try:
            self.add_trial(run_id, rec)
        except Exception:
            if self.trial_exists(run_id, rec.idx):
                return False
            raise
        return True

    def trial_exists(self, run_id: str, idx: int) -> bool:
        return self.db.execute("SELECT 1 FROM trials WHERE run_id=? AND idx=?", (run_id, idx)).fetchone() is not None

    def trial_count(self, run_id: str) -> int:
        """Trials stored for the run, warm-ups and failed ones included."""
        return int(self.db.execute("SELECT count(*) FROM trials WHERE run_id=?", (run_id,)).fetchone()[0])

    def record_attempt(self, run_id: str, idx: int, host_id: str | None, attempt: int, worker: str | None,
                       outcome: str, error: str | None) -> None:
        """Note a queued trial's attempt that did not produce the stored trial: it
        failed and was retried, or its worker was lost mid-trial ('lost')."""
        with self._transaction() as db:
            db.execute("INSERT INTO attempts (run_id, idx, host_id, attempt, worker, outcome, error, at)"
                       " VALUES (?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                       (run_id, idx, host_id, attempt, worker, outcome, error, now_iso()))

    def attempts(self, run_id: str) -> list[dict[str, Any]]:
        """The run's recorded retries, oldest first."""
        rows = self.db.execute("SELECT idx, host_id, attempt, worker, outcome, error, at FROM attempts"
                               " WHERE run_id=? ORDER BY id", (run_id,))
        return [dict(zip(("idx", "host_id", "attempt", "worker", "outcome", "error", "at"), r)) for r in rows]

    def trials(self, run_id: str, include_warmups: bool = False, *, host: str | None = None) -> list[TrialRecord]:
        """The run's trials in idx order (only those of host `host` if given)."""
        q = "SELECT * FROM trials WHERE run_id=?" + ("" if include_warmups else " AND warmup=0")
        q += (" AND host_id=?" if host is not None else "") + " ORDER BY idx"
        return [TrialRecord(arm=r["arm"], idx=r["idx"], round=r["round"], warmup=bool(r["warmup"]),
                            status=r["status"], started_at=r["started_at"], duration_s=r["duration_s"],
                            result=json.loads(r["result"]) if r["result"] else None,
                            error=r["error"], id=r["id"], host_id=r["host_id"],
                            host=json.loads(r["host"]) if r["host"] else None)
                for r in self.db.execute(q, (run_id,) + ((host,) if host is not None else ()))]

    def metric_table(self, run_id: str, host: str | None = None) -> dict[str, dict[str, np.ndarray]]:
        """{arm: {metric: samples}} over the measured (non-warm-up) ok trials, arms in
        schedule order, samples in trial order; only host `host`'s trials if given
        (timings of different hosts do not belong in one sample)."""
        return self._table(run_id, "m.value", host)

    def round_table(self, run_id: str, host: str | None = None) -> dict[str, dict[str, np.ndarray]]:
        """Same shape as metric_table, holding each sample's round: samples of one round
        saw the same seed, so counters can be compared round by round."""
        return self._table(run_id, "t.round", host)

    def _table(self, run_id: str, column: str, host: str | None = None) -> dict[str, dict[str, np.ndarray]]:
        table: dict[str, dict[str, list[float]]] = {a: {} for a in self._arm_order(run_id)}
        rows = self.db.execute(
            f"SELECT t.arm, m.name, {column} FROM metrics m JOIN trials t ON t.id = m.trial_id"
            " WHERE t.run_id=? AND t.warmup=0 AND t.status='ok'" + (" AND t.host_id=?" if host is not None else "")
            + " ORDER BY t.idx, m.name", (run_id,) + ((host,) if host is not None else ()))
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

    def metric_names(self, run_ids: list[str]) -> list[str]:
        """The metric names stored for these runs, sorted (what `--metrics` may name)."""
        marks = ",".join("?" * len(run_ids))
        return [r[0] for r in self.db.execute(
            "SELECT DISTINCT m.name FROM metrics m JOIN trials t ON t.id = m.trial_id"
            f" WHERE t.run_id IN ({marks}) ORDER BY m.name", tuple(run_ids))] if run_ids else []

    def histogram_table(self, run_id: str, host: str | None = None) -> dict[str, dict[str, dict[str, int]]]:
        """{arm: {histogram: {bucket: count summed over measured ok trials}}}."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        rows = self.db.execute(
            "SELECT t.arm, h.name, h.bucket, CAST(sum(h.count) AS BIGINT) FROM histograms h"
            " JOIN trials t ON t.id = h.trial_id WHERE t.run_id=? AND t.warmup=0 AND t.status='ok'"
            + (" AND t.host_id=?" if host is not None else "") + " GROUP BY t.arm, h.name, h.bucket",
            (run_id,) + ((host,) if host is not None else ()))
        for arm, name, bucket, count in rows:
            out.setdefault(arm, {}).setdefault(name, {})[bucket] = int(count)
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
            db.execute("INSERT INTO comparisons (run_id, created_at, data) VALUES (?,?,?) ON CONFLICT (run_id)"
                       " DO UPDATE SET created_at=excluded.created_at, data=excluded.data",
                       (run_id, now_iso(), dumps(data)))

    def get_comparison(self, run_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT data FROM comparisons WHERE run_id=?", (run_id,)).fetchone()
        return json.loads(row["data"]) if row else None
