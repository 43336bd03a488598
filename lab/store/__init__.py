"""The results store: every run and trial in SQLite or PostgreSQL, its schema, records, copies and exports.

    db_path.py                Where the results database is (BALLOON_LAB_DB or <repo>/out/balloon-lab.db); --db.
    guard.py                  What can be wrong with a results file, said in one line: damaged, foreign, full.
    export.py                 Tidy export of stored runs for notebooks: one row per trial x metric.
    pg_local.py               A private PostgreSQL server in a temporary directory, for tests and benchmarks.
    push.py                   Copy runs from one results store to another (`balloon-lab db push`).
    records.py                What the store holds, as Python records: a trial, a run, and the JSON they are kept in.
    schema.py                 The results store's schema, as a list of migrations, one per version.
    sql.py                    The SQL dialect seam of the results store: SQLite (embedded default) or PostgreSQL.
    store.py                  Store: every run and trial, written atomically, in SQLite (WAL) or PostgreSQL.
"""
