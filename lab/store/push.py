"""Copy runs from one results store to another (`balloon-lab db push`), e.g. a laptop's
SQLite file into the PostgreSQL store many hosts share.

Each run goes over in ONE transaction on the destination (its row, trials, metrics,
histograms, comparison and recorded attempts), so an interrupted push leaves whole runs
or none. Run ids are globally unique, so a run the destination already holds is
skipped: pushing twice copies nothing the second time. A run still being written is
skipped too (push it once it has finished).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lab.store import sql as store_sql
from lab.store.store import Store

_RUN_COLS = ("id", "kind", "name", "created_at", "finished_at", "status", "spec", "command_line", "environment",
             "probe_backend", "notes", "pid", "pid_start", "host")
_TRIAL_COLS = ("idx", "round", "arm", "warmup", "status", "error", "started_at", "duration_s", "result",
               "host_id", "host")
_ATTEMPT_COLS = ("idx", "host_id", "attempt", "worker", "outcome", "error", "at")


@dataclass
class PushResult:
    copied: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)   # the destination had them
    running: list[str] = field(default_factory=list)   # not finished: not copied


def _insert(cols: tuple[str, ...], table: str) -> str:
    return f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"


def push(src: Store, dst: Store, run_refs: list[str] | None = None) -> PushResult:
    """Copy the runs named (ids or prefixes; default: all) from src into dst."""
    out = PushResult()
    runs = [src.get_run(r) for r in run_refs] if run_refs else src.list_runs()
    have = {r for r, in dst.db.execute("SELECT id FROM runs")}
    for run in sorted(runs, key=lambda r: r.created_at):
        if run.id in have:
            out.already.append(run.id)
        elif run.status == "running":
            out.running.append(run.id)
        elif _copy_run(src, dst, run.id):
            out.copied.append(run.id)
        else:  # another push got there first
            out.already.append(run.id)
    return out


def _copy_run(src: Store, dst: Store, run_id: str) -> bool:
    s = src.db
    run = s.execute(f"SELECT {', '.join(_RUN_COLS)} FROM runs WHERE id=?", (run_id,)).fetchone()
    trials = s.execute(f"SELECT id, {', '.join(_TRIAL_COLS)} FROM trials WHERE run_id=? ORDER BY idx",
                       (run_id,)).fetchall()
    with dst._transaction() as db:
        if db.execute(_insert(_RUN_COLS, "runs") + " ON CONFLICT (id) DO NOTHING", tuple(run)).rowcount == 0:
            return False
        for t in trials:
            new_id = store_sql.insert_id(db, dst.dialect, _insert(("run_id",) + _TRIAL_COLS, "trials"),
                                 (run_id,) + tuple(t)[1:])
            db.executemany("INSERT INTO metrics (trial_id, name, value, kind) VALUES (?,?,?,?)",
                           [(new_id, n, v, k) for n, v, k in
                            s.execute("SELECT name, value, kind FROM metrics WHERE trial_id=?", (t[0],))])
            db.executemany("INSERT INTO histograms (trial_id, name, bucket, count) VALUES (?,?,?,?)",
                           [(new_id, n, b, c) for n, b, c in
                            s.execute("SELECT name, bucket, count FROM histograms WHERE trial_id=?", (t[0],))])
        comp = s.execute("SELECT created_at, data FROM comparisons WHERE run_id=?", (run_id,)).fetchone()
        if comp is not None:
            db.execute("INSERT INTO comparisons (run_id, created_at, data) VALUES (?,?,?)", (run_id, *comp))
        db.executemany(_insert(("run_id",) + _ATTEMPT_COLS, "attempts"),
                       [(run_id, *a) for a in s.execute(f"SELECT {', '.join(_ATTEMPT_COLS)} FROM attempts"
                                                         " WHERE run_id=? ORDER BY id", (run_id,))])
    return True
