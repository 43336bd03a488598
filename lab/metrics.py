"""Turn a trial's result object into named metrics, and say how each is compared.

A result is nested JSON. Every number at any depth becomes a metric named by its
dotted path ("inflate.stages_ns.total", "probes.madvise_calls"); booleans, strings
and lists are not metrics; histograms are kept apart. Two histogram shapes are
recognised: {bucket: count} under a key ending in "hist" or inside "hists", and the
probes' {"unit": ..., "buckets": [{"lo", "hi", "count"}, ...]} (bucket named by lo).
Maps keyed by process id ("per_pid") are skipped: pids change every trial, so those
entries never line up across trials (their totals exist one level up).

The classification lives here and only here, because the store, the statistics, the
gate and the reports must all agree on it:
- "timing": durations (a unit token ns/us/ms/s/seconds in the leaf name, as in
  "total_ns", "ns" or "cpu_s_source", or "stages_ns"/"time" anywhere in the path).
  Noisy: compared statistically, lower is better.
- "gauge": quantities the kernel counts for whole processes or that depend on
  scheduling (RSS, page allocations and faults, interrupts and eventfd wake-ups, what
  a background workload managed to do before it was stopped). They vary from trial to trial:
  compared statistically like timings, lower is better.
- "counter": everything else numeric (pages, requests, kicks, madvise calls, bytes on
  the ring). Determined by the protocol and the seed: compared exactly.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Mapping

TIMING = "timing"
GAUGE = "gauge"
COUNTER = "counter"
KINDS = (TIMING, GAUGE, COUNTER)
STATISTICAL_KINDS = frozenset({TIMING, GAUGE})

_TIME_UNITS = {"ns": "ns", "us": "us", "ms": "ms", "s": "s", "seconds": "s", "secs": "s"}
_TIMING_WORDS = ("stages_ns", "time")
# THE list of scheduling-dependent counts (gauges): path components counted by the kernel
# for whole processes or set by how the VMM's and the guest's threads happened to
# interleave. The store, the statistics, the gate and the reports all classify through
# classify() below, so a name listed here is a gauge everywhere (docs/STATISTICS.md
# prints this list). Why each is scheduling-dependent:
# - interrupts: with VIRTIO_RING_F_EVENT_IDX the device skips a call while the driver is
#   still busy with the previous one (seen: 125 to 128 interrupts for 128 requests);
# - kicks: a kick is skipped while the device is still polling the ring (seen: 9 to 297
#   kicks for the same 128 requests);
# - eventfd reads: an eventfd read returns the sum of all writes since the last read, and a
#   non-blocking read that finds nothing fails (`*_read_empty`, seen: 255 vs 257 in A/A runs);
# - device re-kicks and budget yields: how much work one wake-up finds on the ring depends on
#   how far the driver got meanwhile, so how often the work budget runs out varies;
# - page allocator events, faults and RSS: whole-process kernel counts (other threads,
#   the interpreter's own allocations, RCU-deferred frees).
SCHEDULING_GAUGES = frozenset({
    "rss_bytes", "rss_peak_bytes",
    "page_allocs", "page_alloc_pages", "page_frees", "page_free_pages", "page_frees_batched", "page_faults",
    "device_wakeups", "interrupt_reads", "empty_reads", "kick_read", "kick_reads", "call_read", "call_reads",
    "config_read", "config_reads", "other_read", "other_reads",
    "interrupts", "call_write", "call_writes", "eventfd_writes",
    "kicks", "kick_write", "kick_writes", "device_calls", "config_notifications",
    "device_rekicks", "budget_yields",
})
_GAUGE_SUFFIXES = ("_read_empty",)  # per-queue failed reads of any eventfd kind: kick_read_empty, call_read_empty, ...
_GAUGE_PARTS = SCHEDULING_GAUGES
_GAUGE_PREFIXES = ("workload.stop.",)  # background workloads report how much they did before stop()
_HISTOGRAM_PARENTS = frozenset({"hists", "histograms"})
# Not measurements: process ids, and the experiment's own parameters (the gate compares
# specs separately and says when they differ).
# "twin" holds the probed twin's timings (lab.twins; the overhead table reads it) and
# "host_load" the load average and CPU governor around the trial (lab.environment).
_SKIPPED_KEYS = frozenset({"per_pid", "pids", "params", "batch_pages", "guest_mib", "inflate_mib", "target_pages",
                           "twin", "host_load"})


def classify(name: str) -> str:
    """Kind of a flattened metric name: "timing", "gauge" or "counter"."""
    parts = name.split(".")
    if _time_unit(parts[-1]) or any(w in p for p in parts for w in _TIMING_WORDS):
        return TIMING
    if name.startswith(_GAUGE_PREFIXES) or any(p in _GAUGE_PARTS or p.endswith(_GAUGE_SUFFIXES) for p in parts):
        return GAUGE
    return COUNTER


def is_statistical(kind: str) -> bool:
    """True for kinds compared with bootstrap CIs and Mann-Whitney rather than exactly."""
    return kind in STATISTICAL_KINDS


def _time_unit(leaf: str) -> str:
    """The time unit named by a leaf's "_"-separated tokens ("cpu_s_source" -> "s")."""
    for t in reversed(leaf.split("_")):
        if t in _TIME_UNITS:
            return _TIME_UNITS[t]
    return ""


def unit(name: str) -> str:
    """Unit of a metric: "ns", "us", "ms", "s", "bytes", or "" for a count. This is the
    one place units are declared (from the metric's name, where the metric is defined):
    show, the report, the gate and `export` all read it."""
    parts = name.split(".")
    u = _time_unit(parts[-1])
    if u:
        return u
    if "stages_ns" in parts:
        return "ns"
    if any("bytes" in p.split("_") for p in parts):     # bytes, memfd_bytes_after, bytes_on_ring
        return "bytes"
    return ""


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
        if key in _SKIPPED_KEYS:
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
