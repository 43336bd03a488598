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
rounds), so drift hits both alike. The stored trial is the unprobed twin's result,
every timing, gauge (kicks, interrupts, wake-ups, RSS, what a workload did before it
was stopped) and counter of it, plus the probed twin's probe readings under `probes`
(measured by the probes themselves: they always come from the probed twin, and each
share the report computes from them, e.g. the kernel's share of the discard stage, is
computed within that one twin). What only the probes can measure goes in from the
probed twin and says so: a counter (the real stack's discard calls; exact, the same in
either twin), and a stage (the real stack's discard stage): then that operation's
whole stage breakdown is the probed twin's (`twin.stages_from`), so a stage share
never divides figures of two runs; the unprobed twin's time of that operation is still
its `wall_ns`.

The exact counters of the two twins must be equal: one seed, one guest layout. When
they are not, the trial fails (TwinsDisagree), it does not count.

Under result["twin"] (not a metric: lab.results.metrics skips it) are the probed twin's
timings and gauges (`probed_timings`, `probed_gauges`: the per-arm probe overhead,
`overhead_table`, comes from them at no extra cost), both twins' pids, and a digest of
each twin's metrics (`values_digest`), by which a stored trial shows which twin each of
its numbers came from.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from lab.results import metrics
from fmt.numbers import THOUSANDS

TWIN_KEY = "twin"
DESIGN_TWIN = "twin"          # every number from the unprobed twin, probe readings from the probed one
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


class TwinsDisagree(RuntimeError):
    """The two twins of a trial differ in an exact counter: the trial does not count."""


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


def values_digest(result: Mapping[str, Any]) -> str:
    """A digest of a result's metrics (values and histograms, probe readings left out):
    equal digests, equal numbers."""
    values, hists = metrics.flatten({k: v for k, v in result.items() if k != PROBE_KEY})
    text = json.dumps([sorted(values.items()), sorted((k, sorted(h.items())) for k, h in hists.items())])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def merge_twins(unprobed: Mapping[str, Any], probed: Mapping[str, Any], first: str) -> dict:
    """The unprobed twin's result with the probed twin's probe readings (see module doc);
    TwinsDisagree when their exact counters differ."""
    mismatches = counter_mismatches(unprobed, probed)
    if mismatches:
        raise TwinsDisagree(f"the twins of this trial differ in {len(mismatches)} exact counter(s), "
                            f"first {mismatches[0]}: one seed must give one guest layout, so the trial does not "
                            "count")
    merged = copy.deepcopy(dict(unprobed))
    merged[PROBE_KEY] = copy.deepcopy(probed.get(PROBE_KEY))
    u_vals, _ = metrics.flatten({k: v for k, v in unprobed.items() if k != PROBE_KEY})
    p_vals, _ = metrics.flatten({k: v for k, v in probed.items() if k != PROBE_KEY})
    only_probed = sorted(set(p_vals) - set(u_vals))
    stages_from = {op: "unprobed" for op in (unprobed.get("stages_ns") or {})}
    for name in only_probed:
        path = name.split(".")
        if path[0] == "stages_ns":                   # a stage only the probes measure
            stages_from[path[1]] = "probed"
        else:                                        # a counter (or gauge) only the probes count
            _put(merged, path, p_vals[name])
    for op, where in stages_from.items():
        if where == "probed":
            merged["stages_ns"][op] = copy.deepcopy(probed["stages_ns"][op])
    merged["verified"] = bool(probed.get("verified")) and bool(unprobed.get("verified"))
    merged[TWIN_KEY] = {
        "design": DESIGN_TWIN, "first": first,
        "probed_timings": _kind_tree(probed, p_vals, metrics.TIMING),
        "probed_gauges": _kind_tree(probed, p_vals, metrics.GAUGE),
        "unprobed_pids": unprobed.get("pids"), "probed_pids": probed.get("pids"),
        "unprobed_verified": bool(unprobed.get("verified")),
        "stages_from": stages_from, "from_probed": only_probed,
        "digests": {"unprobed": values_digest(unprobed), "probed": values_digest(probed)},
        "counter_mismatches": [],
    }
    return merged


def _put(tree: dict, path: list[str], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _kind_tree(result: Mapping[str, Any], flat: Mapping[str, Any], kind: str) -> dict:
    """The metrics of one kind, nested as in the result (metric names are dotted paths)."""
    out: dict = {}
    for name, value in flat.items():
        if metrics.classify(name) == kind:
            _put(out, name.split("."), value)
    return out


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
    DESIGN_TWIN: "from unprobed twin trials (probes detached), as are every gauge and counter; probe readings "
                 "(and the kernel's shares computed from them) from the probed twins",
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
        m = metric
        if isinstance(twin, Mapping) and (twin.get("stages_from") or {}).get(metric[1]) == "probed":
            m = (metric[1], "wall_ns")    # that stage breakdown is the probed twin's: compare the op's wall times
        u = _dig(t.result, m)
        p = _dig(twin.get("probed_timings") if isinstance(twin, Mapping) else None, m)
        if u is not None and p is not None and u > 0:
            by_arm.setdefault(t.arm, []).append((u, p))
    out = []
    for arm, pairs in by_arm.items():
        u = np.array([a for a, _ in pairs]) / 1e6
        p = np.array([b for _, b in pairs]) / 1e6
        from lab.analysis import stats      # scipy: imported here, so a trial (`run`) does not wait 1-2 s for it
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


def stage_notes(trials: list[Any]) -> list[str]:
    """Arms whose stage breakdown of an operation is the probed twin's (a stage only the
    probes measure, e.g. the real stack's discard), so the reader knows which twin a
    share comes from."""
    seen: dict[tuple[str, str], int] = {}
    for t in trials:
        twin = t.result.get(TWIN_KEY) if isinstance(t.result, Mapping) else None
        for op, where in ((twin or {}).get("stages_from") or {}).items() if isinstance(twin, Mapping) else ():
            if where == "probed":
                seen[(t.arm, op)] = seen.get((t.arm, op), 0) + 1
    return [f"{arm} {op}: stage breakdown (every stage and its total) from the probed twins of {n} trial(s): "
            f"a stage only the probes measure; its time in the comparison is the unprobed twin's {op}.wall_ns"
            for (arm, op), n in sorted(seen.items())]


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
