"""Turn a trial's result object into named metrics, and say how each is compared.

A result is nested JSON. Every number at any depth becomes a metric named by its
dotted path ("inflate.stages_ns.total", "probes.madvise_calls"); booleans, strings
and lists are not metrics; histograms are kept apart. Two histogram shapes are
recognised: {bucket: count} under a key ending in "hist" or inside "hists", and the
probes' {"unit": ..., "buckets": [{"lo", "hi", "count"}, ...]} (bucket named by lo).
Maps keyed by process id ("per_pid") are skipped: pids change every trial, so those
entries never line up across trials (their totals exist one level up).

A metric's kind and unit are DECLARED beside the counter it names (Metric: name, kind,
unit, doc; device/virtio/metric_decl.py) and looked up here through
lab/results/metric_catalog.py; nothing is guessed from the name, and a name nobody declared
is an UndeclaredMetric error. The store, the statistics, the gate and the reports all
classify through this module, so they agree:
- "timing": durations. Noisy: compared statistically.
- "gauge": quantities the kernel counts for whole processes or that depend on
  scheduling (RSS, page allocations and faults, interrupts and eventfd wake-ups, what
  a background workload managed to do before it was stopped). They vary from trial to
  trial: compared statistically like timings.
Which way is better is declared too (`better`): lower for most timings and gauges,
higher for throughputs, exact for counters, zero for correctness figures.
- "counter": determined by the protocol and the seed (pages, requests, madvise calls,
  bytes on the ring): compared exactly.
"""
from __future__ import annotations

import difflib
import fnmatch
import math
from typing import Any, Iterable, Iterator, Mapping, Sequence

from device.api import COUNTER, EXACT, GAUGE, HIGHER, LOWER, TIMING, ZERO, UndeclaredMetric
from lab.results.metric_catalog import declaration

__all__ = ["COUNTER", "EXACT", "GAUGE", "HIGHER", "KINDS", "LOWER", "SKIPPED_KEYS", "STATISTICAL_KINDS", "TIMING",
           "UndeclaredMetric", "ZERO", "better", "change_is_good", "check_declared", "classify", "closest_names",
           "flatten", "is_statistical", "matching", "unit", "unknown_names_message"]

KINDS = (TIMING, GAUGE, COUNTER)
STATISTICAL_KINDS = frozenset({TIMING, GAUGE})
_HISTOGRAM_PARENTS = frozenset({"hists", "histograms"})
# Not measurements: process ids, and the experiment's own parameters (the gate compares
# specs separately and says when they differ).
# "twin" holds the probed twin's timings (lab.trials.twins; the overhead table reads it),
# "host_load" the load average and CPU governor around the trial (lab.machine.environment) and
# "result_version" the version of the trial result's layout (lab/results/trial_result.py).
SKIPPED_KEYS = frozenset({"per_pid", "pids", "params", "batch_pages", "guest_mib", "inflate_mib", "target_pages",
                           "twin", "host_load", "result_version"})


def classify(name: str) -> str:
    """Kind of a flattened metric name, as declared: "timing", "gauge" or "counter"."""
    return declaration(name).kind


def is_statistical(kind: str) -> bool:
    """True for kinds compared with bootstrap CIs and Mann-Whitney rather than exactly."""
    return kind in STATISTICAL_KINDS


def better(name: str) -> str:
    """Which way is better for a metric, as declared: "lower", "higher", "exact" or
    "zero" (must be 0). The gate, `ab` and the report read it."""
    return declaration(name).better


def change_is_good(name: str, ratio: float) -> bool | None:
    """Whether a candidate/baseline ratio above or below 1 is an improvement for this
    metric (None when the metric has no better side: exact counters, or no change)."""
    b = better(name)
    if ratio == 1.0 or b not in (LOWER, HIGHER):
        return None
    return (ratio < 1.0) == (b == LOWER)


def unit(name: str) -> str:
    """Unit of a metric as declared: "ns", "us", "ms", "s", "bytes", or "" for a count.
    show, the report, the gate and `export` all read it."""
    return declaration(name).unit


def check_declared(result: Mapping[str, Any]) -> None:
    """UndeclaredMetric (naming it) if any metric of `result` is not declared."""
    for name in flatten(result)[0]:
        declaration(name)


def _is_number(v: Any) -> bool:
    if isinstance(v, bool):  # an int subclass, but a flag, not a measurement
        return False
    if isinstance(v, (int, float)):
        return math.isfinite(v)
    # numpy scalars, without importing numpy here
    return hasattr(v, "dtype") and getattr(v, "shape", None) == () and v.dtype.kind in "iuf"


def _as_histogram(key: str, parent: str | None, value: Mapping) -> dict[str, int] | None:
    """The histogram a mapping holds, or None if it is not one."""
    buckets = value.get("buckets")
    if isinstance(buckets, list) and all(isinstance(b, Mapping) and "count" in b and "lo" in b for b in buckets):
        return {str(b["lo"]): int(b["count"]) for b in buckets}
    if (key.endswith("hist") or parent in _HISTOGRAM_PARENTS) and value and all(
            _is_number(v) for v in value.values()):
        return {str(b): int(c) for b, c in value.items()}
    return None


def flatten(result: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, dict[str, int]]]:
    """(metrics {dotted name: value}, histograms {dotted name: {bucket: count}})."""
    metrics: dict[str, float] = {}
    hists: dict[str, dict[str, int]] = {}
    for name, is_hist, value in _walk(result, "", None):
        (hists if is_hist else metrics)[name] = value
    return metrics, hists


def _walk(node: Mapping[str, Any], prefix: str, parent: str | None) -> Iterator[tuple[str, bool, Any]]:
    for key, value in node.items():
        key = str(key)
        if key in SKIPPED_KEYS:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            hist = _as_histogram(key, parent, value)
            if hist is None:
                yield from _walk(value, name + ".", key)
            elif hist:
                yield name, True, hist
        elif _is_number(value):
            yield name, False, value.item() if hasattr(value, "item") else value


# --- metric names the user types (show/export --metrics, history METRIC) -------------------
def matching(names: Iterable[str], patterns: Sequence[str] | None) -> list[str]:
    """The names matching any of the glob patterns (all of them when there is none)."""
    return [n for n in names if not patterns or any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def closest_names(query: str, known: Iterable[str], n: int = 3) -> list[str]:
    """Real metric names (or `prefix.*` patterns, for a glob) closest to `query`, best first:
    the same dotted parts in another order (inflate.stages_ns.* -> stages_ns.inflate.*),
    then the query less one part or ending a longer name (inflate.kicks -> kicks,
    madvise_calls -> probes.madvise_calls), then difflib's closest spellings."""
    names = sorted(set(known))
    candidates = set(names)
    if any(c in query for c in "*?["):
        candidates |= {".".join(n.split(".")[:i]) + ".*" for n in names for i in range(1, n.count(".") + 1)}
    parts = query.split(".")
    shorter = {".".join(parts[:i] + parts[i + 1:]) for i in range(len(parts))} if len(parts) > 1 else set()
    ranked = sorted(c for c in candidates if sorted(c.split(".")) == sorted(parts) and c != query)
    ranked += sorted((c for c in candidates if c in shorter), key=len)
    ranked += sorted((c for c in candidates if c.endswith("." + query)), key=len)
    ranked += difflib.get_close_matches(query, sorted(candidates), n=n, cutoff=0.5)
    return list(dict.fromkeys(ranked))[:n]


def unknown_names_message(queries: Sequence[str], known: Iterable[str], where: str) -> str:
    """"no metric 'x' in WHERE; did you mean 'a', 'b' or 'c'?" for the first query that
    names nothing; a sentence naming a few real names when nothing is close."""
    known = sorted(set(known))
    query = queries[0]
    what = "matches no metric" if any(c in query for c in "*?[") else "is not a metric"
    close = closest_names(query, known)
    if close:
        quoted = [f"'{c}'" for c in close]
        hint = "did you mean " + (", ".join(quoted[:-1]) + " or " + quoted[-1] if len(quoted) > 1 else quoted[0]) + "?"
    else:
        hint = f"its metrics are named like {', '.join(repr(k) for k in known[:3])}" if known else "it has no metrics"
    return f"'{query}' {what} of {where}; {hint}"
