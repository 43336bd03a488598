"""Turn a trial's result object into named metrics, and say how each is compared.

A result is nested JSON. Every number at any depth becomes a metric named by its
dotted path ("inflate.stages_ns.total", "probes.madvise_calls"); booleans and strings
are not metrics; histogram dicts ({bucket: count}) are kept apart as histograms.

The classification lives here and only here, because the store, the statistics, the
gate and the reports must all agree on it:
- "timing": durations (a unit token ns/us/ms/s in the leaf name, as in "total_ns" or
  "cpu_s_source", or "stages_ns"/"time" anywhere in the path). Noisy: compared
  statistically, lower is better.
- "gauge": quantities measured from the live kernel for whole processes (RSS, page
  faults, page allocations). They include the interpreter's own activity, so they
  vary run to run: compared statistically like timings, lower is better.
- "counter": everything else numeric (pages, requests, kicks, madvise calls, bytes on
  the ring). Determined by the protocol: compared exactly.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Mapping

TIMING = "timing"
GAUGE = "gauge"
COUNTER = "counter"
KINDS = (TIMING, GAUGE, COUNTER)
STATISTICAL_KINDS = frozenset({TIMING, GAUGE})

_TIME_UNITS = ("ns", "us", "ms", "s")
_TIMING_WORDS = ("stages_ns", "time")
# Leaf names counted by the kernel for the whole process (see module docstring).
_GAUGE_LEAVES = frozenset({"rss_peak_bytes", "page_allocs", "page_frees", "page_faults"})
# A dict under one of these keys, or whose own key ends in "hist", is a histogram.
_HISTOGRAM_PARENTS = frozenset({"hists", "histograms"})


def classify(name: str) -> str:
    """Kind of a flattened metric name: "timing", "gauge" or "counter"."""
    parts = name.split(".")
    leaf = parts[-1]
    if _time_unit(leaf) or any(w in p for p in parts for w in _TIMING_WORDS):
        return TIMING
    if leaf in _GAUGE_LEAVES:
        return GAUGE
    return COUNTER


def is_statistical(kind: str) -> bool:
    """True for kinds compared with bootstrap CIs and Mann-Whitney rather than exactly."""
    return kind in STATISTICAL_KINDS


def _time_unit(leaf: str) -> str:
    """The time unit named by a leaf's "_"-separated tokens ("cpu_s_source" -> "s")."""
    for t in reversed(leaf.split("_")):
        if t in _TIME_UNITS:
            return t
    return ""


def unit(name: str) -> str:
    """Unit of a metric, for display: "ns", "us", "ms", "s", "bytes" or ""."""
    leaf = name.rsplit(".", 1)[-1]
    u = _time_unit(leaf)
    if u:
        return u
    if "stages_ns" in name:
        return "ns"
    if leaf == "bytes" or leaf.endswith("_bytes") or leaf.startswith("bytes_"):
        return "bytes"
    return ""


def _is_histogram(key: str, parent: str | None, value: Mapping) -> bool:
    return (key.endswith("hist") or parent in _HISTOGRAM_PARENTS) and all(
        _is_number(v) for v in value.values()
    )


def _is_number(v: Any) -> bool:
    # bool is an int subclass but a flag, not a measurement
    if isinstance(v, bool):
        return False
    if isinstance(v, (int, float)):
        return math.isfinite(v)
    # numpy scalars without importing numpy here
    return hasattr(v, "dtype") and getattr(v, "shape", None) == () and v.dtype.kind in "iuf"


def flatten(result: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, dict[str, int]]]:
    """(metrics {dotted name: value}, histograms {dotted name: {bucket: count}})."""
    metrics: dict[str, float] = {}
    hists: dict[str, dict[str, int]] = {}
    for name, kind, value in _walk(result, "", None):
        if kind == "hist":
            hists[name] = value
        else:
            metrics[name] = value
    return metrics, hists


def _walk(node: Mapping[str, Any], prefix: str, parent: str | None) -> Iterator[tuple[str, str, Any]]:
    for key, value in node.items():
        key = str(key)
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            if value and _is_histogram(key, parent, value):
                yield name, "hist", {str(b): int(c) for b, c in value.items()}
            else:
                yield from _walk(value, name + ".", key)
        elif _is_number(value):
            v = value.item() if hasattr(value, "item") else value
            yield name, "metric", v
