"""Where the lab keeps its generated files.

Everything generated (database, reports) lives under `<repo>/out/`, which git ignores,
so results never end up committed by accident. BALLOON_LAB_DB overrides the database
path (useful in CI, where the workspace may be read-only).
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DB_ENV = "BALLOON_LAB_DB"


def out_dir(create: bool = True) -> Path:
    """`<repo>/out`, created on demand."""
    d = REPO_ROOT / "out"
    if create:
        d.mkdir(parents=True, exist_ok=True)
    return d


def default_db_path() -> Path:
    """The results database: $BALLOON_LAB_DB, else `<repo>/out/balloon-lab.db`."""
    env = os.environ.get(DB_ENV)
    if env:
        return Path(env)
    return out_dir(create=False) / "balloon-lab.db"


def db_option(fn):
    """The `--db PATH` option every command shares (default: default_db_path())."""
    import click

    return click.option("--db", "db_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                        help=f"Results database (default: ${DB_ENV} or <repo>/out/balloon-lab.db).")(fn)
