"""Twin trials: timings the probes do not bias, counts the probes do see.

The probes cost time where they look: about 0.8 us per madvise(2) and more per page
through the kmem tracepoints, so an arm that makes one syscall per page (pfn) is
slowed by some 20 % while an arm with nine calls (bitmap) is not. Timing every arm
with the probes on biases every ratio in favour of the range protocols.

So with probes on, each trial of an arm runs twice, as two independent VMM + guest
pairs with the same seed (the same guest layout):

- the *unprobed twin*: the BPF programs are detached from their tracepoints for its
  whole length (ProbeSession.suspend()) and its processes are never probe targets;
- the *probed twin*: probes attached to its pids, as before.

The twins run back to back, their order alternating by round (unprobed first in even
rounds), so drift hits both alike. The stored trial is the probed twin's result with
every timing (per lab.results.metrics: stage times, wall times) replaced by the unprobed
twin's; the probes' own readings (kernel time inside madvise, stage shares) stay the
probed twin's. The probed twin's replaced timings are kept under result["twin"]
(not a metric: lab.results.metrics skips it), which gives the per-arm probe overhead
(`overhead_table`) from the same run at no extra cost.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from lab.results import metrics
from lab.analysis import stats
from fmt.numbers import THOUSANDS

TWIN_KEY = "twin"
DESIGN_TWIN = "twin"          # timings from unprobed twins, counts and kernel shares from probed ones
DESIGN_PROBED = "probed"      # timings taken with the probes attached (biased where probes see much)
DESIGN_UNPROBED = "unprobed"  # no probes at all
# The probe readings are measured by the probes themselves: they always come from the probed twin.
PROBE_KEY = "probes"
OVERHEAD_METRIC = ("stages_ns", "inflate", "total")


@contextmanager
def probes_detached(session: Any) -> Iterator[None]:
    """Every BPF program detached from its tracepoint (and USDT semaphores released) for
    the block, so the code inside runs at full speed; re-attached afterwards."""
    active = session is not None and getattr(session, "active", False) and session.module is not None
    if active:
        session.suspend()
    try:
        yield
    finally:
        if active:
            session.resume()


def run_twins(run_one: Callable[[Any], dict], session: Any, rnd: int) -> dict:
    """Run the unprobed and the probed twin (order alternating by round) and merge them.

    run_one(session_or_None) runs one trial; it is called once with None inside
    probes_detached(session) and once with the session."""
    def unprobed() -> dict:
        with probes_detached(session):
            return run_one(None)

    if rnd % 2 == 0:
        first, u = "unprobed", unprobed()
        p = run_one(session)
    else:
        first, p = "probed", run_one(session)
        u = unprobed()
    return merge_twins(u, p, first)


def merge_twins(unprobed: Mapping[str, Any], probed: Mapping[str, Any], first: str) -> dict:
    """The probed result with its timings taken from the unprobed twin (see module doc)."""
    timings = {n for n in metrics.flatten({k: v for k, v in probed.items() if k != PROBE_KEY})[0]
               if metrics.classify(n) == metrics.TIMING}
    merged, replaced = _swap_timings(probed, unprobed, "", timings)
    mismatches = counter_mismatches(unprobed, probed)
    merged["verified"] = bool(probed.get("verified")) and bool(unprobed.get("verified"))
    merged[TWIN_KEY] = {
        "design": DESIGN_TWIN, "first": first, "probed_timings": replaced,
        "unprobed_pids": unprobed.get("pids"), "unprobed_verified": bool(unprobed.get("verified")),
        "counter_mismatches": mismatches,
    }
    return merged


def _swap_timings(probed: Mapping[str, Any], unprobed: Mapping[str, Any], prefix: str,
                  timings: set[str]) -> tuple[dict, dict]:
    out: dict[str, Any] = {}
    replaced: dict[str, Any] = {}
    for key, value in probed.items():
        name = f"{prefix}{key}"
        other = unprobed.get(key) if isinstance(unprobed, Mapping) else None
        if key == PROBE_KEY and not prefix:
            out[key] = value
        elif isinstance(value, Mapping) and isinstance(other, Mapping):
            out[key], sub = _swap_timings(value, other, name + ".", timings)
            if sub:
                replaced[key] = sub
        elif _is_number(value) and _is_number(other) and name in timings:
            out[key], replaced[key] = other, value
        else:
            out[key] = value
    return out, replaced


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def counter_mismatches(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Exact counters (outside the probes) that differ between two twins: with one seed
    they must not, so any entry here says the guest layout was not reproduced."""
    ma, _ = metrics.flatten({k: v for k, v in a.items() if k not in (PROBE_KEY, TWIN_KEY)})
    mb, _ = metrics.flatten({k: v for k, v in b.items() if k not in (PROBE_KEY, TWIN_KEY)})
    return [f"{k}: {ma[k]} unprobed, {mb[k]} probed" for k in sorted(set(ma) & set(mb))
            if metrics.classify(k) == metrics.COUNTER and ma[k] != mb[k]]


def timing_design(results: list[Mapping[str, Any]]) -> str:
    """Which design produced the timings of these trial results."""
    if results and all(isinstance(r.get(TWIN_KEY), Mapping) for r in results):
        return DESIGN_TWIN
    probed = [r for r in results if (r.get(PROBE_KEY) or {}).get("backend") == "bcc"]
    return DESIGN_PROBED if probed else DESIGN_UNPROBED


DESIGN_TEXT = {
    DESIGN_TWIN: "from unprobed twin trials (probes detached), counts and kernel shares from the probed twins",
    DESIGN_PROBED: "taken WITH the probes attached (they slow per-page protocols most; see docs/PROBES.md)",
    DESIGN_UNPROBED: "without probes",
}


@dataclass
class ArmOverhead:
    """One arm's inflate total with the probes detached vs attached, over its twin pairs."""

    arm: str
    pairs: int
    unprobed_ms: tuple[float, float | None, float | None]   # median, CI low, CI high
    probed_ms: tuple[float, float | None, float | None]
    ratio: tuple[float, float | None, float | None]         # median of per-pair probed/unprobed, with CI

    @property
    def overhead_pct(self) -> float:
        return 100.0 * (self.ratio[0] - 1.0)


def _dig(d: Mapping[str, Any] | None, path: tuple[str, ...]) -> float | None:
    for k in path:
        if not isinstance(d, Mapping):
            return None
        d = d.get(k)
    return float(d) if _is_number(d) else None


def arm_overheads(trials: list[Any], metric: tuple[str, ...] = OVERHEAD_METRIC) -> list[ArmOverhead]:
    """Per arm, from the ok measured twin trials (TrialRecord-like: arm, status, warmup, result)."""
    by_arm: dict[str, list[tuple[float, float]]] = {}
    for t in trials:
        if t.status != "ok" or t.warmup or not isinstance(t.result, Mapping):
            continue
        twin = t.result.get(TWIN_KEY)
        u = _dig(t.result, metric)
        p = _dig(twin.get("probed_timings") if isinstance(twin, Mapping) else None, metric)
        if u is not None and p is not None and u > 0:
            by_arm.setdefault(t.arm, []).append((u, p))
    out = []
    for arm, pairs in by_arm.items():
        u = np.array([a for a, _ in pairs]) / 1e6
        p = np.array([b for _, b in pairs]) / 1e6
        out.append(ArmOverhead(arm, len(pairs), stats.median_ci(u), stats.median_ci(p), stats.median_ci(p / u)))
    return out


def _ci(m: tuple[float, float | None, float | None], fmt: str) -> str:
    med, lo, hi = m
    f = lambda v: format(v, fmt).replace(",", THOUSANDS)  # noqa: E731  (the lab's one grouping)
    if lo is None or hi is None or math.isnan(med):
        return f(med)
    return f"{f(med)} [{f(lo)}, {f(hi)}]"


def overhead_table(trials: list[Any]) -> str:
    """The probe-overhead table `compare` and `show` print for twin runs ("" otherwise)."""
    rows = arm_overheads(trials)
    if not rows:
        return ""
    cells = [(r.arm, str(r.pairs), _ci(r.unprobed_ms, ",.1f"), _ci(r.probed_ms, ",.1f"), _ci(r.ratio, ".3f"),
              f"{r.overhead_pct:+.1f} %") for r in rows]
    head = ("arm", "pairs", "probes detached ms", "probes attached ms", "attached/detached (per pair)", "overhead")
    widths = [max(len(c[i]) for c in cells + [head]) for i in range(len(head))]
    fmt = lambda c: "  ".join(v.ljust(w) if i in (0, 2, 3, 4) else v.rjust(w)  # noqa: E731
                              for i, (v, w) in enumerate(zip(c, widths))).rstrip()
    return "\n".join(["probe overhead on the inflate total, per arm (twin pairs; medians [95 % bootstrap CI]):",
                      fmt(head)] + [fmt(c) for c in cells])


def mismatch_notes(trials: list[Any]) -> list[str]:
    """Trials whose twins disagreed on an exact counter (the layout was not reproduced)."""
    out = []
    for t in trials:
        twin = t.result.get(TWIN_KEY) if isinstance(t.result, Mapping) else None
        if isinstance(twin, Mapping) and twin.get("counter_mismatches"):
            out.append(f"{t.arm} round {t.round}: twins differ in {twin['counter_mismatches'][0]}"
                       + (f" (+{len(twin['counter_mismatches']) - 1} more)"
                          if len(twin["counter_mismatches"]) > 1 else ""))
    return out
