"""The `probes` field of a trial result, shared by both backends' trial runners.

lab/runner.py (the lab's VMM + guest) and lab/backends/qemu/trial.py (QEMU + Linux)
both put what the probes saw into their result the same way; this module holds that
one shape so neither runner has to import the other.
"""
from __future__ import annotations


def probe_summary(readings: dict, probes) -> dict:
    """What the probes saw during the inflate at the top level, the deflate beside it."""
    if probes is None:
        return {"backend": "none", "reason": "probes off"}
    out = dict(readings.get("inflate") or {})
    if readings.get("deflate") is not None:
        out["deflate"] = readings["deflate"]
    return out
