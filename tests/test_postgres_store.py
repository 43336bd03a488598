"""The results store on a real PostgreSQL server (started for the session in a temporary
directory by tests/conftest.py), beside SQLite: same schema, same answers, same
all-or-nothing trials, runs pushed between them without duplicates."""
from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import numpy as np
import psycopg
import pytest
from click.testing import CliRunner

from lab.machine import identity as host
from lab.store import schema as store_schema
from lab.store import sql as store_sql
from lab.cli.group import main as cli
from lab.store.store import Store, StoreError, TrialRecord, now_iso
from test_store import SPEC, result, trial

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


def _fill(store: Store, name: str = "t", scale: int = 1) -> str:
    run = store.create_run({**SPEC.to_dict(), "name": name, "_arm_labels": ["pfn", "bitmap"]}, "balloon",
                           {"kernel": "6.1"})
    store.add_trial(run, trial("pfn", 0, result(999), warmup=True))
    for i in range(3):
        store.add_trial(run, trial("pfn", 1 + 2 * i, result((400 + i) * 10**7 * scale)))
        store.add_trial(run, trial("bitmap", 2 + 2 * i, result((60 + i) * 10**7 * scale, madvise=40)))
    store.add_trial(run, trial("bitmap", 7, result(1, verified=False), status="failed", error="not verified"))
    store.add_note(run, "first")
    store.add_note(run, "second")
    store.finish_run(run, "complete")
    from lab.trials.experiment import analyse_run
    analyse_run(store, run)
    return run


def test_postgres_store_answers_like_sqlite(pg_db, tmp_path):
    with Store(pg_db) as pg, Store(tmp_path / "lab.db") as lite:
        assert pg.is_postgres and not lite.is_postgres
        runs = {s: _fill(s) for s in (pg, lite)}
        for s in (pg, lite):
            assert store_sql.schema_version(s.db, s.dialect) == store_schema.SCHEMA_VERSION == 2
        a, b = (s.metric_table(runs[s]) for s in (pg, lite))
        assert list(a) == list(b) == ["pfn", "bitmap"]
        for arm in a:
            assert set(a[arm]) == set(b[arm])
            for m in a[arm]:
                np.testing.assert_array_equal(a[arm][m], b[arm][m])
        assert pg.histogram_table(runs[pg]) == lite.histogram_table(runs[lite])
        assert pg.round_table(runs[pg])["pfn"]["pages"].tolist() == [0, 1, 2]
        ra, rb = pg.get_run(runs[pg][:6]), lite.get_run(runs[lite])
        assert (ra.trials_ok, ra.trials_failed, ra.warmups, ra.status, ra.notes) == \
               (rb.trials_ok, rb.trials_failed, rb.warmups, rb.status, rb.notes) == (6, 1, 1, "complete", "first\nsecond")
        assert ra.hosts == rb.hosts == [host.host_id()]
        assert pg.resolve_run_id("latest") == runs[pg]
        ta = pg.trials(runs[pg], include_warmups=True)
        assert [t.result for t in ta] == [t.result for t in lite.trials(runs[lite], include_warmups=True)]
        assert ta[0].host["machine_id"] == host.machine_id() and ta[0].host["host_id"] == host.host_id()
        assert pg.get_comparison(runs[pg]) == lite.get_comparison(runs[lite]) is not None
        pg.save_comparison(runs[pg], {"x": 2})  # upsert replaces
        assert pg.get_comparison(runs[pg]) == {"x": 2}


def test_postgres_trial_is_all_or_nothing(pg_db):
    with Store(pg_db) as store:
        run = store.create_run(SPEC, "balloon", {})
        store.db.execute("CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                         "RAISE EXCEPTION 'disk on fire'; END $$")
        store.db.execute("CREATE TRIGGER boom BEFORE INSERT ON histograms FOR EACH ROW EXECUTE FUNCTION boom()")
        with pytest.raises(psycopg.Error, match="disk on fire"):
            store.add_trial(run, trial("pfn", 0, result(10**9)))
        for table in ("trials", "metrics", "histograms"):
            assert store.db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0
        store.db.execute("DROP TRIGGER boom ON histograms")
        assert store.add_trial_once(run, trial("pfn", 0, result(10**9)))
        assert not store.add_trial_once(run, trial("pfn", 0, result(10**9)))  # already there: nothing written
        assert store.trial_count(run) == 1


def test_version_1_sqlite_store_is_migrated(tmp_path):
    path = tmp_path / "v1.db"
    db = sqlite3.connect(path)
    for stmt in store_schema.statements(1, store_sql.SQLITE):
        db.execute(stmt)
    db.execute("INSERT INTO runs (id, kind, name, created_at, status, spec, command_line, environment, host)"
               " VALUES ('abc123', 'balloon', 'old', '2024-01-01T00:00:00+00:00', 'complete', '{}', '', '{}', 'oldbox')")
    db.execute("INSERT INTO trials (run_id, idx, round, arm, warmup, status, started_at, duration_s)"
               " VALUES ('abc123', 0, 0, 'pfn', 0, 'ok', '2024-01-01T00:00:00+00:00', 1.0)")
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    with Store(path, create=False) as store:
        assert store.db.execute("PRAGMA user_version").fetchone()[0] == store_schema.SCHEMA_VERSION
        assert store.get_run("abc").hosts == ["oldbox"]
        assert store.attempts("abc123") == []


def test_newer_schema_is_refused(pg_db):
    Store(pg_db).close()
    with psycopg.connect(pg_db, autocommit=True) as c:
        c.execute("INSERT INTO balloon_lab_schema (version) VALUES (99)")
    with pytest.raises(StoreError, match="schema version 99, newer than this lab's"):
        Store(pg_db)


def test_push_twice_copies_each_run_once_and_show_is_the_same(pg_db, tmp_path):
    lite = tmp_path / "local.db"
    with Store(lite) as s:
        ids = [_fill(s, f"run{i}", scale=i + 1) for i in range(3)]
    runner = CliRunner()
    first = runner.invoke(cli, ["db", "push", "--from", str(lite), "--to", pg_db])
    assert first.exit_code == 0 and "pushed 3 runs" in first.output, first.output
    second = runner.invoke(cli, ["db", "push", "--from", str(lite), "--to", pg_db])
    assert second.exit_code == 0 and "pushed 0 runs" in second.output and "skipped: 3" in second.output
    with Store(pg_db) as pg:
        assert sorted(r.id for r in pg.list_runs()) == sorted(ids)
        assert pg.db.execute("SELECT count(*) FROM trials").fetchone()[0] == 3 * 8
    for run in ids:
        a = runner.invoke(cli, ["show", run, "--db", str(lite)])
        b = runner.invoke(cli, ["show", run, "--db", pg_db])
        assert a.exit_code == b.exit_code == 0
        assert a.output == b.output and f"run {run}" in a.output
    bad = runner.invoke(cli, ["runs", "--db", pg_db.replace("host=", "host=/nonexistent")])
    assert bad.exit_code == 2 and "cannot connect to" in bad.output


def test_runs_via_environment_variable(pg_db, monkeypatch):
    with Store(pg_db) as s:
        run = _fill(s)
    monkeypatch.setenv("BALLOON_LAB_DB", pg_db)
    out = CliRunner().invoke(cli, ["runs", "--host", host.host_id()])
    assert out.exit_code == 0 and run in out.output


def test_concurrent_writers_lose_no_trial(pg_db):
    from store_throughput import write_concurrently

    res = write_concurrently(pg_db, writers=8, trials=160)
    assert res["lost"] == 0 and res["idx_complete"] and res["trials_stored"] == 160
    assert res["metric_rows"] == res["metric_rows_expected"]
