"""What can be wrong with a results file, said in one line: damaged, foreign, full.

SQLite reports a damaged page only when a query reaches it ("database disk image is
malformed", maybe long after the file was opened, maybe while rows are fetched), a
full disk as "database or disk is full", and another program's database not at all
(its tables are simply not ours, and the store's migration would add its own to them).
So:

- every statement of the store goes through GuardedConnection, which turns the
  engine's file-level failures (corrupt, not a database, full, I/O error, read-only,
  locked) into a StoreError naming the file and what to do, wherever they surface;
  SQL errors (a bug, a UNIQUE violation the store expects) pass through unchanged;
- a file is checked when it is opened (check_sqlite_file): its 16-byte header, the
  application id balloon-lab stamps into every store it writes, and its tables, so a
  foreign database is refused before anything is written into it; then PRAGMA
  quick_check (every page is read, no index cross-checked: 0.39 s for a 463 MB file
  in the page cache here, so ~1 ms per MiB), so damage is found before a run spends an
  hour measuring and then cannot store its trials, and `runs` does not list a damaged
  store as if it were whole.
"""
from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

SQLITE_HEADER = b"SQLite format 3\x00"
APPLICATION_ID = 0x424C4142        # "BLAB", PRAGMA application_id of a balloon-lab store
_APPLICATION_ID_OFFSET = 68         # big-endian u32 in the database header
STORE_TABLES = frozenset({"runs", "trials", "metrics", "histograms", "comparisons"})


class StoreError(Exception):
    """A request the store cannot answer (unknown or ambiguous run, bad status, ...), or
    a file it cannot use (damaged, foreign, full disk); the message is one line."""


def salvage_hint(path: Path) -> str:
    """What a user can do with a damaged file (the sqlite3 shell's .recover, if installed)."""
    if shutil.which("sqlite3"):
        return (f"keep a copy of it; `sqlite3 {path} .recover | sqlite3 {path.with_suffix('.recovered.db')}` "
                "salvages what is readable, then use --db with the new file")
    return "keep a copy of it and point --db at a new file (Debian's `sqlite3` package can salvage rows: .recover)"


# SQLite result codes (e.sqlite_errorname) that say something about the file, not the SQL
_FILE_FAULTS = {
    "SQLITE_CORRUPT": "is damaged",
    "SQLITE_NOTADB": "is not a SQLite database",
    "SQLITE_FULL": "cannot be written: the disk is full",
    "SQLITE_IOERR": "cannot be read or written (I/O error)",
    "SQLITE_READONLY": "is read-only",
    "SQLITE_BUSY": "is locked by another process",
    "SQLITE_LOCKED": "is locked by another process",
    "SQLITE_CANTOPEN": "cannot be opened",
    "SQLITE_PERM": "cannot be opened (permission denied)",
}


def file_fault(e: sqlite3.Error, path: Path) -> StoreError | None:
    """The one-line StoreError for an engine error about the file itself, or None for
    an error of the SQL (which the caller re-raises unchanged)."""
    name = getattr(e, "sqlite_errorname", "") or ""
    what = next((v for k, v in _FILE_FAULTS.items() if name == k or name.startswith(k + "_")), None)
    if what is None:
        return None
    first = (str(e).strip().splitlines() or [name])[0]
    msg = f"results database {path} {what} (SQLite: {first})"
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        msg += "; " + salvage_hint(path)
    elif name.startswith("SQLITE_FULL"):
        msg += "; what it held before is kept: free some space and run again"
    return StoreError(msg)


def _guarded(path: Path, fn, *a):
    """fn(*a), with a file-level engine error turned into its StoreError."""
    try:
        return fn(*a)
    except sqlite3.Error as e:
        err = file_fault(e, path)
        if err is None:
            raise
        raise err from None


class GuardedCursor:
    """A sqlite3 cursor whose file-level failures while fetching become StoreErrors."""

    def __init__(self, cur: sqlite3.Cursor, path: Path) -> None:
        self._cur, self._path = cur, path

    def fetchone(self) -> Any:
        return _guarded(self._path, self._cur.fetchone)

    def fetchall(self) -> list:
        return _guarded(self._path, self._cur.fetchall)

    def __iter__(self) -> Iterator[Any]:
        while True:
            row = _guarded(self._path, self._cur.fetchone)
            if row is None:
                return
            yield row

    def __getattr__(self, name: str) -> Any:      # rowcount, lastrowid, description
        return getattr(self._cur, name)


class GuardedConnection:
    """A sqlite3 connection whose file-level failures become StoreErrors naming the file."""

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self._db, self.path = db, path

    def execute(self, sql: str, params: Sequence[Any] = ()) -> GuardedCursor:
        return GuardedCursor(_guarded(self.path, self._db.execute, sql, params), self.path)

    def executemany(self, sql: str, seq: Iterable[Sequence[Any]]) -> GuardedCursor:
        return GuardedCursor(_guarded(self.path, self._db.executemany, sql, seq), self.path)

    def __getattr__(self, name: str) -> Any:      # close, in_transaction, row_factory
        return getattr(self._db, name)


def _header(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(100)
    except OSError as e:
        raise StoreError(f"results database {path} cannot be read: {e.strerror}") from None


def check_sqlite_file(db: GuardedConnection, path: Path) -> None:
    """Refuse a file that is not a balloon-lab store, or a damaged one (StoreError, one
    line); an empty file or a store passes, so the caller may create or migrate it."""
    head = _header(path)
    if head and not head.startswith(SQLITE_HEADER):
        kind = "a text file" if _looks_like_text(head) else "not a SQLite database"
        raise StoreError(f"{path} is {kind}, not a balloon-lab results database: give --db a results file "
                         "(or a new path, which is created)")
    app_id = int.from_bytes(head[_APPLICATION_ID_OFFSET:_APPLICATION_ID_OFFSET + 4], "big") if len(head) >= 72 else 0
    if app_id not in (0, APPLICATION_ID):
        raise StoreError(f"{path} is another program's SQLite database (application id {app_id:#010x}), not a "
                         "balloon-lab results database; nothing was written to it")
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'"
                                       " AND name NOT LIKE 'sqlite_%'")}
    if app_id == 0 and tables and not STORE_TABLES <= tables:
        shown = ", ".join(sorted(tables)[:6]) + (", ..." if len(tables) > 6 else "")
        raise StoreError(f"{path} is a SQLite database of another program (tables: {shown}), not a balloon-lab "
                         "results database; nothing was written to it")
    if tables:
        found = [ln.strip() for r in db.execute("PRAGMA quick_check(3)") for ln in str(r[0]).splitlines()]
        found = [ln for ln in found if ln and not ln.startswith("***")]
        if found != ["ok"]:
            raise StoreError(f"results database {path} is damaged (SQLite quick_check: {found[0] if found else '?'}"
                             f"{' ...' if len(found) > 1 else ''}); nothing was written to it; {salvage_hint(path)}")


def _looks_like_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c >= 32 or c in b"\t\r\n" for c in head)


def stamp(db: Any) -> None:
    """Mark the file as a balloon-lab store (inside the caller's write transaction)."""
    db.execute(f"PRAGMA application_id={APPLICATION_ID}")
