"""Where the results database is: `<repo>/out/balloon-lab.db`, or BALLOON_LAB_DB (a path
or a postgresql:// URL; useful in CI, where the workspace may be read-only), and the
`--db` option every command shares.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path

from lab.paths import out_dir

DB_ENV = "BALLOON_LAB_DB"


def default_db_path() -> Path | str:
    """The results database: $BALLOON_LAB_DB (a path or a postgresql:// URL), else
    `<repo>/out/balloon-lab.db`."""
    env = os.environ.get(DB_ENV)
    if env:
        return as_db_target(env)
    return out_dir(create=False) / "balloon-lab.db"


def as_db_target(text: str) -> Path | str:
    """A SQLite file path, or a postgresql:// URL kept as text (a Path would fold its //)."""
    from lab.store.sql import is_postgres
    return text if is_postgres(text) else Path(text)


def db_option(fn):
    """The `--db PATH|URL` option every command shares (default: default_db_path())."""
    import click

    def convert(_ctx, _param, value):
        if value is None:
            return None
        if not value.strip():
            raise click.BadParameter("is empty: give a SQLite file or a postgresql:// URL")
        target = as_db_target(value)
        if isinstance(target, Path) and target.is_dir():
            raise click.BadParameter(f"{value} is a directory, not a database file")
        return target

    return click.option("--db", "db_path", metavar="PATH|URL", default=None, callback=convert,
                        help=f"Results database: a SQLite file or a postgresql:// URL (default: ${DB_ENV} "
                             "or <repo>/out/balloon-lab.db).")(fn)



def is_default_db(target: Path | str) -> bool:
    """Whether `target` is the store commands open when no --db is given."""
    default, target = default_db_path(), as_db_target(str(target))
    if isinstance(target, Path) and isinstance(default, Path):
        return target.expanduser().resolve() == default.resolve()
    return str(target) == str(default)


def next_command(*words: str, db: Path | str | None = None, **options: object) -> str:
    """A `balloon-lab ...` line the user may run next: the command and its arguments,
    then the options the user gave (host="h1" -> --host h1; None: not given), and the
    store (--db) unless it is the default one, so the line works as printed."""
    argv = ["balloon-lab", *words]
    for name, value in options.items():
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    if db is not None and not is_default_db(db):
        argv += ["--db", str(db)]
    return shlex.join(argv)
