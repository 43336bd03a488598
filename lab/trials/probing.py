"""How a trial uses the probes: the session a command or a worker opens, and the
`probes` field of a trial result, shared by both backends' trial runners.

lab/trials/model/runner.py (the lab's VMM + guest) and lab/trials/qemu/trial.py (QEMU + Linux)
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


def open_probes(enabled: bool, extra: list[str] | tuple[str, ...] = ()):
    """A probe session (the default probes and the opt-in `extra` ones), or None when
    probes are off. Degrades (backend none) without eBPF."""
    if not enabled:
        return None
    from probes.session import DEFAULT_CONCERNS, ProbeSession
    return ProbeSession(enabled=True, concerns=DEFAULT_CONCERNS + tuple(extra))
