"""Where the lab keeps its generated files.

Everything generated (database, reports) lives under `<repo>/out/`, which git ignores,
so results never end up committed by accident (the database's own path, and
BALLOON_LAB_DB that overrides it, are lab/store/db_path.py's).
"""
from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def out_dir(create: bool = True) -> Path:
    """`<repo>/out`, created on demand."""
    d = REPO_ROOT / "out"
    if create:
        d.mkdir(parents=True, exist_ok=True)
    return d
