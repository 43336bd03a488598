"""Faults of the host around the results store, with the real CLI and real files.

A damaged store (16 KiB of random bytes in the middle of a store a real `compare`
wrote) and foreign files (a text file, another program's SQLite database, a SQLite
file with another application id) get one line and exit 2 from every command that
reads or writes a store, never a traceback, and nothing is written into a foreign
file. kill -9 in the middle of a trial's transaction leaves a store that opens,
passes quick_check, holds only whole trials and shows the run as interrupted. A full
disk (a real tmpfs of 400 KiB, mounted and removed by the test) stops `compare` with
one line, and every trial stored before it is still there.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lab.store.store import Store

ROOT = Path(__file__).resolve().parents[1]
from conftest import BALLOON_LAB  # noqa: E402  (this checkout's CLI, or BALLOON_LAB_UNDER_TEST)
SMALL = ["--guest-mib", "128", "--inflate-mib", "64", "--no-probes", "--warmups", "0"]

# every command that opens a store, with the arguments it needs beside --db
STORE_COMMANDS = {
    "runs": ["runs"],
    "show": ["show", "latest"],
    "export": ["export", "latest"],
    "report": ["report", "latest", "-o", "{tmp}/r.html"],
    "history": ["history", "stages_ns.inflate.total"],
    "gate": ["gate", "--baseline", "latest", "--candidate", "latest"],
    "compare": ["compare", "--arms", "pfn", "--trials", "1", *SMALL],
    "db push": ["db", "push", "--from", "{db}", "--to", "{tmp}/copy.db"],
}


def cli(args: list[str], db: Path, tmp: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """The command, with its scratch directories in `tmp` (so its one line is not joined by
    a note about another test's killed command, lab/trials/orphans.py)."""
    args = [a.format(tmp=tmp, db=db) for a in args]
    if args[:2] != ["db", "push"]:
        args += ["--db", str(db)]
    return subprocess.run([BALLOON_LAB, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TMPDIR": str(tmp)})


def assert_one_line_refusal(out: subprocess.CompletedProcess, what: str) -> None:
    err = out.stderr.strip()
    assert out.returncode == 2, (out.returncode, err[-3000:])
    assert "Traceback" not in err and len(err.splitlines()) == 1, err[-3000:]
    assert re.search(what, err), err
    assert not out.stdout.strip(), out.stdout[:500]


@pytest.fixture(scope="module")
def real_store(tmp_path_factory) -> Path:
    """A store written by a real `compare` (2 arms x 3 trials)."""
    db = tmp_path_factory.mktemp("store") / "balloon-lab.db"
    out = subprocess.run([BALLOON_LAB, "compare", "--arms", "pfn,chunks", "--trials", "3", *SMALL, "--quiet",
                          "--db", str(db)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    with sqlite3.connect(db) as c:          # fold the WAL in: the damage goes into the one file
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return db


@pytest.fixture(scope="module")
def damaged_store(real_store, tmp_path_factory) -> Path:
    """16 KiB of random bytes written into the middle of the real store."""
    db = tmp_path_factory.mktemp("damaged") / "balloon-lab.db"
    shutil.copy(real_store, db)
    size = db.stat().st_size
    assert size > 64 << 10, size
    with open(db, "r+b") as f:
        f.seek(size // 2 - (8 << 10))
        f.write(random.Random(25).randbytes(16 << 10))
    return db


@pytest.mark.parametrize("command", sorted(STORE_COMMANDS))
def test_damaged_store_is_one_line_and_exit_2_from_every_command(command, damaged_store, tmp_path):
    before = hashlib.sha256(damaged_store.read_bytes()).hexdigest()
    out = cli(STORE_COMMANDS[command], damaged_store, tmp_path)
    assert_one_line_refusal(out, rf"results database {re.escape(str(damaged_store))} is damaged .*\.recover")
    assert hashlib.sha256(damaged_store.read_bytes()).hexdigest() == before     # nothing written to it


def _foreign(kind: str, path: Path) -> None:
    if kind == "text":
        path.write_text("run,arm,value\n1,pfn,3\n" * 200)
    elif kind == "other-program":
        with sqlite3.connect(path) as c:      # e.g. a browser's history, given by mistake
            c.execute("CREATE TABLE moz_places (id INTEGER PRIMARY KEY, url TEXT)")
            c.executemany("INSERT INTO moz_places (url) VALUES (?)", [(f"https://example.org/{i}",) for i in range(50)])
    elif kind == "application-id":
        with sqlite3.connect(path) as c:
            c.execute("PRAGMA application_id=1234")
            c.execute("CREATE TABLE runs (x)")


FOREIGN = {"text": r"is a text file, not a balloon-lab results database",
           "other-program": r"is a SQLite database of another program \(tables: moz_places\)",
           "application-id": r"another program's SQLite database \(application id 0x000004d2\)"}


# every command on another program's database (the one a migration would write into);
# the text file and the foreign application id on a reader and a writer
FOREIGN_CASES = [(c, "other-program") for c in sorted(STORE_COMMANDS)] + [
    (c, k) for k in ("text", "application-id") for c in ("runs", "compare")]


@pytest.mark.parametrize("command,kind", FOREIGN_CASES)
def test_foreign_file_is_one_line_and_exit_2_and_left_alone(command, kind, tmp_path):
    db = tmp_path / "given.db"
    _foreign(kind, db)
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    out = cli(STORE_COMMANDS[command], db, tmp_path)
    assert_one_line_refusal(out, FOREIGN[kind])
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    assert not Path(f"{db}-wal").exists()                 # not even switched to WAL mode


def test_a_store_is_stamped_with_the_labs_application_id(tmp_path):
    Store(tmp_path / "new.db").close()
    with sqlite3.connect(tmp_path / "new.db") as c:
        assert c.execute("PRAGMA application_id").fetchone()[0] == 0x424C4142
    old = tmp_path / "old.db"                  # a store from before the stamp is recognised by its tables
    Store(old).close()
    with sqlite3.connect(old) as c:
        c.execute("PRAGMA application_id=0")
    Store(old, create=False).close()
    Store(old).close()                         # opened for writing: stamped now
    with sqlite3.connect(old) as c:
        assert c.execute("PRAGMA application_id").fetchone()[0] == 0x424C4142


# --- kill -9 in the middle of a write -----------------------------------------------------
WRITER = textwrap.dedent("""
    import sys, time
    from lab.trials.spec import ExperimentSpec
    from lab.store.store import Store, TrialRecord, now_iso

    store = Store(sys.argv[1])
    run = store.create_run(ExperimentSpec(name="killed", arms=["pfn"], trials=50, warmups=0, probes=False), "balloon", {})
    real = store.db
    class PauseBeforeHistograms:           # holds the trial's transaction open between two INSERTs
        def __getattr__(self, name):
            return getattr(real, name)
        def executemany(self, sql, rows):
            if sql.startswith("INSERT INTO histograms"):
                print("mid-write", flush=True)
                time.sleep(30)
            return real.executemany(sql, rows)
    res = {"verified": True, "pages": 1, "kicks": 2, "stages_ns": {"inflate": {"total": 5}},
           "run_length_hist": {str(b): b for b in range(1, 400)}}
    for i in range(int(sys.argv[2])):
        store.add_trial(run, TrialRecord(arm="pfn", idx=i, round=i, warmup=False, status="ok", started_at=now_iso(),
                                         duration_s=0.1, result=res))
    print("whole", flush=True)
    store.db = PauseBeforeHistograms()
    store.add_trial(run, TrialRecord(arm="pfn", idx=99, round=99, warmup=False, status="ok", started_at=now_iso(),
                                     duration_s=0.1, result=res))
""")


def test_kill_9_in_the_middle_of_a_trial_write_leaves_a_usable_store_and_an_interrupted_run(tmp_path):
    db = tmp_path / "lab.db"
    for n in (3, 1):                            # two runs, each killed inside its last trial's transaction
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(n)], stdout=subprocess.PIPE, text=True,
                             cwd=ROOT)
        assert p.stdout.readline().strip() == "whole"
        assert p.stdout.readline().strip() == "mid-write"
        os.kill(p.pid, signal.SIGKILL)
        assert p.wait(10) == -signal.SIGKILL
        p.stdout.close()
    assert Path(f"{db}-wal").exists()           # what the killed writer left behind
    out = subprocess.run([BALLOON_LAB, "runs", "--db", str(db)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = [ln.split() for ln in out.stdout.splitlines() if "killed" in ln]
    assert len(rows) == 2 and all(r[-1] == "interrupted" for r in rows), out.stdout
    assert sorted(r[-2] for r in rows) == ["1/0", "3/0"], out.stdout        # the half trial is not there
    with Store(db) as s:                        # opens for writing: quick_check passed
        assert s.db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        per_trial = s.db.execute("SELECT t.idx, count(h.bucket) FROM trials t LEFT JOIN histograms h"
                                 " ON h.trial_id = t.id GROUP BY t.id").fetchall()
        assert {c for _i, c in per_trial} == {399} and 99 not in {i for i, _c in per_trial}
        assert not s.db.execute("SELECT count(*) FROM metrics WHERE trial_id NOT IN (SELECT id FROM trials)"
                                ).fetchone()[0]
        assert {r.status for r in s.list_runs()} == {"interrupted"}
        run = s.create_run({"name": "after", "arms": ["pfn"]}, "balloon", {})   # and takes new runs
        s.finish_run(run, "complete")


# --- a full disk ----------------------------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path):
    """A real 400 KiB tmpfs, unmounted after the test."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (root is needed): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
def test_full_disk_during_a_run_is_one_line_and_keeps_every_trial_stored_before(small_fs, tmp_path):
    db = small_fs / "lab.db"
    out = subprocess.run([BALLOON_LAB, "compare", "--arms", "pfn,chunks", "--trials", "20", *SMALL, "--db", str(db)],
                         capture_output=True, text=True, timeout=600)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    progress = [ln for ln in lines if re.match(r"\[\s*\d+/40\]", ln)]
    errors = [ln for ln in lines if ln.startswith("balloon-lab compare:")]
    assert len(errors) == 1 and lines[-1] == errors[0], out.stderr[-3000:]
    ok = sum(" ok " in ln for ln in progress)
    assert 2 <= ok < 40, out.stderr[-3000:]
    assert re.search(rf"run [0-9a-f]+ stopped: results database {re.escape(str(db))} cannot be written: the disk "
                     rf"is full .*; what it held before is kept.*\({ok} trials of this run stored", errors[0]), errors[0]
    # still full: the store is read as it is; every trial reported ok is in it, whole
    shown = subprocess.run([BALLOON_LAB, "runs", "--db", str(db)], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and f"{ok}/0" in shown.stdout, shown.stderr + shown.stdout
    copy = tmp_path / "copy.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as src, sqlite3.connect(copy) as dst:
        src.backup(dst)
    with Store(copy) as s:
        run = s.get_run("latest")
        assert run.trials_ok == ok and run.status in ("failed", "interrupted")
        counts = {c for _t, c in s.db.execute("SELECT trial_id, count(*) FROM metrics GROUP BY trial_id")}
        assert len(counts) <= 2 and min(counts) > 50          # pfn and chunks trials: each whole
