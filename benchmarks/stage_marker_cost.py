"""What a stage costs: the hand-written marker pair against `with stage(...)`, per call.

    .venv/bin/python benchmarks/stage_marker_cost.py --calls 200000 --repeats 7

The device and the driver time their stages (alloc, encode, transmit, translate,
discard) with device/virtio/stage.py's `stage` context manager; before, each stage
was written by hand:

    _audit("balloon-lab:encode:b"); t0 = _now(); ...; rep.encode_ns += _now() - t0; _audit("balloon-lab:encode:e")

Both fire the same two `python:audit` USDT markers and add the same clock difference to
the same field. This times N empty stages of each form, with the USDT semaphore off
(no probe attached: sys.audit returns at once) and on (the stage probe attached to this
process, probes/stages.c: every marker is a uprobe trap), interleaved repeat by repeat,
and prints the median ns per stage and the ratio, and how much of each empty stage
lands inside the time it accumulates (the *_ns fields: the clock reads' own cost, and
for stage() the return from __enter__ and the call of __exit__). "on" needs root and BCC; without
them only "off" is measured, and the output says why.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from device.virtio.stage import stage  # noqa: E402

_now = time.perf_counter_ns
_audit = sys.audit


@dataclass
class Report:
    encode_ns: int = 0


def hand_written(n: int, rep: Report) -> None:
    """The pair as balloon_driver.py wrote it before stage()."""
    for _ in range(n):
        _audit("balloon-lab:encode:b")
        t0 = _now()
        rep.encode_ns += _now() - t0
        _audit("balloon-lab:encode:e")


def context_manager(n: int, rep: Report) -> None:
    for _ in range(n):
        with stage("encode", rep):
            pass


def empty_loop(n: int, rep: Report) -> None:
    for _ in range(n):
        pass


FORMS: dict[str, Callable[[int, Report], None]] = {"hand-written pair": hand_written,
                                                    "with stage()": context_manager}


def per_call_ns(fn: Callable[[int, Report], None], n: int) -> tuple[float, float]:
    """(wall ns per stage, ns per stage the stage itself accumulated into encode_ns)."""
    rep = Report()
    t0 = _now()
    fn(n, rep)
    return (_now() - t0) / n, rep.encode_ns / n


def measure(n: int, repeats: int, probes) -> tuple[dict, dict]:
    """({semaphore state: {form: [wall ns per stage, one per repeat]}}, the same for the
    ns the stages accumulated), forms and states interleaved."""
    states = ["off"] + (["on"] if probes is not None else [])
    wall: dict[str, dict[str, list[float]]] = {s: {f: [] for f in FORMS} for s in states}
    timed: dict[str, dict[str, list[float]]] = {s: {f: [] for f in FORMS} for s in states}
    loop = statistics.median(per_call_ns(empty_loop, n)[0] for _ in range(repeats))
    for r in range(repeats):
        for state in states if r % 2 == 0 else states[::-1]:
            if probes is not None:
                probes.suspend() if state == "off" else probes.resume()
            forms = list(FORMS.items())
            for name, fn in forms if r % 2 == 0 else forms[::-1]:
                w, t = per_call_ns(fn, n)
                wall[state][name].append(w - loop)
                timed[state][name].append(t)
    return wall, timed


def attach_probe(quiet: bool):
    """The stage probe on this process (semaphore on), or (None, why not)."""
    try:
        from probes.session import ProbeSession
        from probes.stages import audit_semaphore
    except ImportError as e:
        return None, f"probes unavailable: {e}"
    session = ProbeSession(concerns=("stages",), quiet=quiet)
    if not session.active:
        return None, session.reason
    session.attach([os.getpid()])
    if audit_semaphore(os.getpid()) in (None, 0):
        session.detach()
        return None, f"the python:audit semaphore did not go up: {session.missing}"
    return session, ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=200_000, help="stages per timed loop")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-probe", action="store_true", help="measure with the semaphore off only")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    session, why = (None, "--no-probe") if a.no_probe else attach_probe(quiet=a.json)
    try:
        res, timed = measure(a.calls, a.repeats, session)
        if session is not None:
            session.resume()
            session.clear()
            with stage("check"):
                pass
            seen = session.read().stages.get("check", {}).get("count")
        else:
            seen = None
    finally:
        if session is not None:
            session.detach()
    summary = {state: {form: statistics.median(v) for form, v in forms.items()} for state, forms in res.items()}
    inside = {state: {form: statistics.median(v) for form, v in forms.items()} for state, forms in timed.items()}
    doc = {"calls": a.calls, "repeats": a.repeats, "python": sys.executable, "loadavg": os.getloadavg(),
           "ns_per_stage": summary, "timed_ns_per_stage": inside, "samples": res, "probe": why or "attached",
           "probe_saw_check_stage": seen}
    if a.json:
        print(json.dumps(doc, indent=1))
        return 0
    print(f"ns per stage (median of {a.repeats} x {a.calls} stages, the empty loop subtracted; "
          f"load average {doc['loadavg'][0]:.2f})")
    print(f"{'USDT semaphore':<16}{'hand-written pair':>19}{'with stage()':>14}{'ratio':>8}{'added ns':>10}"
          f"   {'inside *_ns: pair':>18}{'stage()':>9}")
    for state, forms in summary.items():
        hand, cm = forms["hand-written pair"], forms["with stage()"]
        t_hand, t_cm = inside[state]["hand-written pair"], inside[state]["with stage()"]
        print(f"{state:<16}{hand:>19.0f}{cm:>14.0f}{cm / hand:>8.2f}{cm - hand:>10.0f}   {t_hand:>18.0f}{t_cm:>9.0f}")
    if session is None:
        print(f"(semaphore on not measured: {why})")
    else:
        print(f"(the probe counted {seen} stage for one `with stage(\"check\")` block)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
