"""The results store's schema, as a list of migrations, one per version.

History (the number is the schema version a database records once migrated):
  1  runs, trials, metrics, histograms, comparisons (the first store).
  2  trials.host_id and trials.host (the identity of the host that ran the trial, JSON,
     see lab/machine/identity.py); attempts (every failed or lost attempt of a queued trial, so
     bounded retries are recorded). Version-1 trials take their run's host name.

A database is migrated forward when opened, in one transaction; a database newer than
this lab is refused. The DDL is written once for both engines with the dialect's
column types filled in (lab/store/sql.py).
"""
from __future__ import annotations

from typing import Any

from lab.store import sql as store_sql

_V1 = """
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
    id          {id_pk},
    run_id      TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    idx         INTEGER NOT NULL,
    round       INTEGER NOT NULL,
    arm         TEXT NOT NULL,
    warmup      INTEGER NOT NULL CHECK (warmup IN (0, 1)),
    status      TEXT NOT NULL CHECK (status IN ('ok','failed')),
    error       TEXT,
    started_at  TEXT NOT NULL,
    duration_s  {real} NOT NULL,
    result      TEXT,
    UNIQUE (run_id, idx)
);
CREATE TABLE IF NOT EXISTS metrics (
    trial_id BIGINT NOT NULL REFERENCES trials(id) ON DELETE CASCADE,
    name     TEXT NOT NULL,
    value    {number} NOT NULL,
    kind     TEXT NOT NULL CHECK (kind IN ('timing','gauge','counter')),
    PRIMARY KEY (trial_id, name)
){without_rowid};
CREATE TABLE IF NOT EXISTS histograms (
    trial_id BIGINT NOT NULL REFERENCES trials(id) ON DELETE CASCADE,
    name     TEXT NOT NULL,
    bucket   TEXT NOT NULL,
    count    BIGINT NOT NULL,
    PRIMARY KEY (trial_id, name, bucket)
){without_rowid};
CREATE TABLE IF NOT EXISTS comparisons (
    run_id     TEXT PRIMARY KEY REFERENCES runs(id) ON DELETE CASCADE,
    created_at TEXT NOT NULL,
    data       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS trials_by_run ON trials (run_id, warmup, status)
"""

_V2 = """
ALTER TABLE trials ADD COLUMN host_id TEXT;
ALTER TABLE trials ADD COLUMN host TEXT;
UPDATE trials SET host_id = (SELECT r.host FROM runs r WHERE r.id = trials.run_id);
CREATE INDEX IF NOT EXISTS trials_by_host ON trials (run_id, host_id);
CREATE TABLE IF NOT EXISTS attempts (
    id       {id_pk},
    run_id   TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    idx      INTEGER NOT NULL,
    host_id  TEXT,
    attempt  INTEGER NOT NULL,
    worker   TEXT,
    outcome  TEXT NOT NULL CHECK (outcome IN ('failed','lost')),
    error    TEXT,
    at       TEXT NOT NULL,
    UNIQUE (run_id, idx, attempt, outcome)
)
"""

MIGRATIONS: tuple[str, ...] = (_V1, _V2)
SCHEMA_VERSION = len(MIGRATIONS)


def statements(version: int, dialect: store_sql.Dialect) -> list[str]:
    """The DDL/DML that takes a database from version-1 to `version`."""
    return [s.strip() for s in dialect.ddl(MIGRATIONS[version - 1]).split(";") if s.strip()]


def migrate(db: Any, dialect: store_sql.Dialect, where: str) -> int:
    """Bring the database to SCHEMA_VERSION inside the caller's transaction; returns the
    version found. ValueError if the database is newer than this lab."""
    store_sql.lock_schema(db, dialect)
    found = store_sql.schema_version(db, dialect)
    if found > SCHEMA_VERSION:
        raise ValueError(f"{where} has schema version {found}, newer than this lab's {SCHEMA_VERSION}: "
                         "upgrade balloon-lab")
    for version in range(found + 1, SCHEMA_VERSION + 1):
        for stmt in statements(version, dialect):
            db.execute(stmt)
        store_sql.set_schema_version(db, dialect, version)
    return found
