"""Which code a fuzz run executed: a digest of the sources it imports, taken at its start and end.

A fuzz run imports the checkout's files as they are when each worker starts. A case it
saves replays as found only on the same code: a failure that does not replay may be
the code that ran then, not chance (the 1,000,000-execution run's one hang was a chunk
that ran while a fix was undone in its checkout, docs/BAD_INPUT.md). So a run stamps
its report and every saved case with the digest of what an execution runs (device/,
fuzz/, system/: the fuzzer never imports lab/), says when the sources changed while it
ran, and `--replay` says which cases were found by other code.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("device", "fuzz", "system")


def source_digest(root: Path = ROOT) -> str:
    """sha256 (16 hex digits) over the path and bytes of every .py file of the packages
    an execution runs, in path order."""
    h = hashlib.sha256()
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            h.update(str(f.relative_to(root)).encode() + b"\0")
            h.update(f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def found_elsewhere(cases: list[dict], here: str) -> list[str]:
    """The digests, other than `here`, that saved cases were found with (cases without
    one, e.g. the kept corpus, name no code and are not counted)."""
    return sorted({c["source_digest"] for c in cases if c.get("source_digest") not in (None, here)})
