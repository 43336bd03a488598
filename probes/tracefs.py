"""The running kernel's tracepoints, read from tracefs.

BCC builds each TRACEPOINT_PROBE's argument struct from the running kernel's format
file, so a field that does not exist on this kernel fails the compile. The loaders
ask here first which tracepoints exist and which field names they carry, and pass
the answers to the C code as -D flags (or leave a concern out, with the reason).
"""
from __future__ import annotations

import os
import re
from functools import lru_cache

TRACEFS_CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
_FIELD_RE = re.compile(r"field:[^;]*?([A-Za-z_][A-Za-z0-9_]*)(\[[^\]]*\])?;")


def tracefs_mounts() -> list[str]:
    """Mount points of tracefs (from /proc/self/mounts; readable without root)."""
    try:
        with open("/proc/self/mounts") as f:
            return [line.split()[1] for line in f if len(line.split()) > 2 and line.split()[2] == "tracefs"]
    except OSError:
        return []


def tracefs_root() -> str | None:
    """The first mounted tracefs (the one with an events/ directory), or None."""
    for root in TRACEFS_CANDIDATES:
        if os.path.isdir(os.path.join(root, "events")):
            return root
    return None


@lru_cache(maxsize=None)
def tracepoint_fields(category: str, event: str) -> frozenset[str] | None:
    """Field names of category:event on this kernel, or None if the tracepoint is missing."""
    root = tracefs_root()
    if root is None:
        return None
    try:
        with open(os.path.join(root, "events", category, event, "format")) as f:
            text = f.read()
    except OSError:
        return None
    return frozenset(m.group(1) for m in _FIELD_RE.finditer(text))


def tracepoint_exists(category: str, event: str) -> bool:
    return tracepoint_fields(category, event) is not None


def pick_field(category: str, event: str, candidates: tuple[str, ...]) -> str | None:
    """The first of `candidates` that category:event has on this kernel (names moved across versions)."""
    fields = tracepoint_fields(category, event)
    if fields is None:
        return None
    for name in candidates:
        if name in fields:
            return name
    return None
