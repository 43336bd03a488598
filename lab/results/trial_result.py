"""The result of one balloon trial (lab/trials/model/runner.py), typed and versioned.

The runner fills a TrialResult once; lab.trials.twins and lab.trials.experiment add their parts
(`twin`, `host_load`); the store writes `to_json()`. The JSON layout is the one the
lab has always stored (the inflate's fields at the top level, `deflate` beside them,
stage times under `stages_ns`, the probes' reading under `probes`), plus the
`result_version` key, so every reader of stored results (show, report, gate, export)
reads old and new trials alike.

History of SCHEMA_VERSION (the `result_version` a stored result carries), like
pyperf's versioned result format:
  1  no `result_version` key: the nested dict lab/trials/model/runner.py built up and then popped
     (every result stored before this type existed). Loads unchanged: the layout is
     the same.
  2  this type: the same layout, written from TrialResult/OpResult, with
     `result_version`: 2. Keys a version does not know are kept in `extra` and
     written back, so loading and storing again loses nothing.

Each number's kind, unit and doc are declared here (OP_METRICS, TRIAL_METRICS) from
the declarations of the side that counts it: the device (device/vmm), the driver
(device/guest), the transport's refusals, the probes (probes/session.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from device.api import (COUNTER, DEVICE_METRICS, DEVICE_OP_METRICS, DEVICE_QUEUE_METRICS, DRIVER_OP_METRICS,
                        GAUGE, HOST_PAGE_METRICS, REFUSAL_METRICS, TIMING, ZERO, Metric, MetricSet)
from lab.results.ring_cost import FLOOR_METRICS

SCHEMA_VERSION = 2
VERSION_KEY = "result_version"
STAGES = ("alloc", "encode", "transmit", "translate", "discard", "total")


def _as(metric: Metric, name: str, doc: str | None = None) -> Metric:
    """A side's declaration under the name the trial result gives it."""
    return dataclasses.replace(metric, name=name, doc=doc or metric.doc)


# One inflate or deflate as lab/runner.balloon_op reports it: the driver's view, the
# device's view (device_* where both count the same thing), and the VMM's.
OP_METRICS = MetricSet("lab/results/trial_result.py OP_METRICS", [
    Metric("actual", COUNTER, "", "pages in the balloon when the operation ended (the driver's `actual`)"),
    Metric("wall_ns", TIMING, "ns", "from the monitor's balloon command to the guest reporting the target reached"),
    *(DRIVER_OP_METRICS[n] for n in ("pages", "requests", "kicks", "interrupts", "bytes_on_ring", "descriptors",
                                     "alloc_calls", "config_writes")),
    *(DEVICE_OP_METRICS[n] for n in ("discard_calls", "translations", "runs", "refused_pages", "discard_cpu_ns")),
    _as(DRIVER_OP_METRICS["cpu_ns"], "cpu_ns.guest"),
    _as(DEVICE_OP_METRICS["cpu_ns"], "cpu_ns.vmm", "CPU time of the VMM's thread serving the operation's requests: "
                                                  "ring, decode, translate, discard"),
    _as(DEVICE_OP_METRICS["requests"], "device_requests", "requests the device served (equals the driver's)"),
    _as(DEVICE_OP_METRICS["pages"], "device_pages", "pages the device accepted (equals the driver's)"),
    Metric("device_wakeups", GAUGE, "", "VMM reads of kick eventfds that returned data (device/vmm/process.py)"),
    _as(DEVICE_QUEUE_METRICS["calls"], "device_calls", "call eventfd writes by the device, all queues"),
    DEVICE_METRICS["budget_yields"],
    *REFUSAL_METRICS.under("device_errors"),
    _as(DEVICE_METRICS["memfd_allocated_bytes"], "memfd_bytes_before", "guest RAM the memfd held before"),
    _as(DEVICE_METRICS["memfd_allocated_bytes"], "memfd_bytes_after", "guest RAM the memfd held after"),
    *HOST_PAGE_METRICS.under("host_pages"),
    Metric("rss_bytes.*", GAUGE, "bytes", "resident set of the VMM and of the guest process after the operation"),
    # the real stack's (lab/trials/qemu/trial.py) view of one operation
    Metric("trace_unmapped_events", COUNTER, "", "qemu: virtqueue trace events of no known queue"),
    Metric("device_span_ns", TIMING, "ns", "qemu: first to last trace event of the operation"),
])

_STAGE_DOCS = {
    "alloc": "guest allocator: taking (or returning) the balloon's pages",
    "encode": "driver: PFN arrays, bitmaps or chunk chains",
    "transmit": "ring, kick and wait for used, minus the device's translate and discard",
    "translate": "device: validating pages and looking up regions",
    "discard": "device: the madvise/fallocate system calls",
    "total": "the whole operation as the guest timed it",
}

# The trial as a whole. The experiment's parameters (protocol, guest_mib, ...) are
# not measurements and not declared; lab.results.metrics skips them.
TRIAL_METRICS = MetricSet("lab/results/trial_result.py TRIAL_METRICS", [
    *OP_METRICS,
    *OP_METRICS.under("deflate"),
    *(Metric(f"stages_ns.*.{s}", TIMING, "ns", f"{s} stage of the inflate or deflate: {_STAGE_DOCS[s]}")
      for s in STAGES),
    # The per-operation layout: each operation's fields, stage times included, under its
    # own key (benchmarks/gate_false_positive.py's madvise loop; trial functions that
    # keep an operation whole).
    *OP_METRICS.under("inflate"),
    *(Metric(f"{op}.stages_ns.{s}", TIMING, "ns", f"{s} stage of the {op}: {_STAGE_DOCS[s]}")
      for op in ("inflate", "deflate") for s in STAGES),
    Metric("memfd_freed_bytes", COUNTER, "bytes", "guest RAM the inflate freed from the memfd (the kernel's count)"),
    Metric("verification.*.balloon_pages", COUNTER, "", "pages in the guest's balloon at the check"),
    Metric("verification.*.ballooned_with_data", COUNTER, "", "ballooned pages the memfd still holds", better=ZERO),
    Metric("verification.*.kept_pages_checked", COUNTER, "", "held pages whose contents were hashed"),
    *(_as(HOST_PAGE_METRICS[n], f"verification.*.{n}") for n in ("host_page_bytes", "whole_host_pages",
                                                                 "partial_host_pages")),
    Metric("verification.*.whole_with_data", COUNTER, "", "wholly ballooned host pages still holding data",
           better=ZERO),
    Metric("verification.*.guest_memtotal_kib", COUNTER, "", "qemu: the guest's MemTotal at the check, KiB"),
    *REFUSAL_METRICS.under("errors"),
    Metric("trial_wall_ns", TIMING, "ns", "the whole trial, processes started to processes gone"),
    *FLOOR_METRICS,
    Metric("boot_ns", TIMING, "ns", "qemu: starting QEMU and booting the guest"),
    Metric("workload_ns", TIMING, "ns", "qemu: the workload's run in the guest"),
])

# OpResult's fields in the order they are stored.
_OP_FIELDS = ("target_pages", "actual", "wall_ns", "pages", "requests", "kicks", "interrupts", "bytes_on_ring",
              "descriptors", "alloc_calls", "config_writes", "discard_calls", "translations", "runs",
              "device_requests", "device_pages", "refused_pages", "run_length_hist", "run_length_pages_hist",
              "device_wakeups", "device_calls", "budget_yields", "device_errors", "memfd_bytes_before",
              "memfd_bytes_after", "host_pages", "rss_bytes", "discard_cpu_ns", "cpu_ns")
_OPTIONAL_OP_FIELDS = frozenset({"discard_cpu_ns", "cpu_ns"})     # written only when measured


@dataclass
class OpResult:
    """One inflate or deflate: the driver's and the device's counts (OP_METRICS)."""

    target_pages: int = 0
    actual: int = 0
    wall_ns: int = 0
    pages: int = 0
    requests: int = 0
    kicks: int = 0
    interrupts: int = 0
    bytes_on_ring: int = 0
    descriptors: int = 0
    alloc_calls: int = 0
    config_writes: int = 0
    discard_calls: int = 0
    translations: int = 0
    runs: int = 0
    device_requests: int = 0
    device_pages: int = 0
    refused_pages: int = 0
    run_length_hist: dict[str, int] = field(default_factory=dict)
    run_length_pages_hist: dict[str, int] = field(default_factory=dict)
    device_wakeups: int = 0
    device_calls: int = 0
    budget_yields: int = 0
    device_errors: dict[str, int] = field(default_factory=dict)
    memfd_bytes_before: int = 0
    memfd_bytes_after: int = 0
    host_pages: dict[str, Any] | None = None
    rss_bytes: dict[str, int] = field(default_factory=dict)
    discard_cpu_ns: int | None = None      # newer than version 2's first results: absent there
    cpu_ns: dict[str, int] | None = None   # {"guest": driver thread, "vmm": device thread}, the same
    extra: dict[str, Any] = field(default_factory=dict)   # keys this version does not know

    def to_json(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in _OP_FIELDS
                   if not (k in _OPTIONAL_OP_FIELDS and getattr(self, k) is None)}, **self.extra}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "OpResult":
        return cls(**{k: d[k] for k in _OP_FIELDS if k in d},
                   extra={k: v for k, v in d.items() if k not in _OP_FIELDS})


@dataclass
class TrialResult:
    """One balloon trial (lab/runner.run_balloon); the stored JSON is to_json()."""

    protocol: str
    guest_mib: int
    inflate_mib: int | float
    inflate: OpResult
    deflate: OpResult | None = None
    stages_ns: dict[str, dict[str, int]] = field(default_factory=dict)   # op -> stage -> ns
    probes: dict[str, Any] = field(default_factory=dict)                 # ProbeReading.to_json() (+ "deflate")
    pids: dict[str, int] = field(default_factory=dict)
    workload: dict[str, Any] = field(default_factory=dict)               # name, params, seed, prepare, stop
    wire_format: str = ""
    batch_pages: int | None = None
    discard: str = "madvise"
    guest_init_on_alloc: bool = False
    backing: str = "4k"
    partial_tracking: str = "full"
    alloc_policy: str = "linux"
    memfd_freed_bytes: int = 0
    verification: dict[str, Any] = field(default_factory=dict)           # after_inflate, after_deflate
    verified: bool = False
    errors: dict[str, int] = field(default_factory=dict)                 # the device's refusals, by reason
    trial_wall_ns: int = 0
    floors: dict[str, Any] | None = None     # the ring's floor, measured with the trial (lab/results/ring_cost.py)
    lab_cost: dict[str, dict[str, float]] | None = None   # op -> the lab's own cost against the floor
    twin: dict[str, Any] | None = None        # lab.trials.twins: the probed twin's timings (not a metric)
    host_load: dict[str, Any] | None = None   # lab.trials.experiment: load around the trial (not a metric)
    # `run --cycles K`: cycles 2..K in the same processes, each with its ops' fields, stage
    # times and verdict, as the top level holds cycle 1's (a list: not flattened into metrics)
    cycles: list[dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)                  # keys this version does not know

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {VERSION_KEY: SCHEMA_VERSION}
        for name in _HEAD:
            out[name] = getattr(self, name)
        out.update(self.inflate.to_json())
        out["memfd_freed_bytes"] = self.memfd_freed_bytes
        out["stages_ns"] = self.stages_ns
        out["deflate"] = self.deflate.to_json() if self.deflate is not None else None
        for name in _TAIL:
            out[name] = getattr(self, name)
        for name in _OPTIONAL:
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "TrialResult":
        """A stored result of any version up to SCHEMA_VERSION (see the module doc)."""
        version = d.get(VERSION_KEY, 1)
        if not isinstance(version, int) or not 1 <= version <= SCHEMA_VERSION:
            raise ValueError(f"trial result version {version!r}: this lab reads versions 1 to {SCHEMA_VERSION}")
        known = {VERSION_KEY, "inflate", "deflate", "stages_ns", "memfd_freed_bytes", *_OPTIONAL,
                 *_HEAD, *_TAIL, *_OP_FIELDS}
        return cls(**{k: d[k] for k in (*_HEAD, *_TAIL, "stages_ns", "memfd_freed_bytes", *_OPTIONAL)
                      if k in d},
                   inflate=OpResult.from_json({k: d[k] for k in _OP_FIELDS if k in d}),
                   deflate=OpResult.from_json(d["deflate"]) if isinstance(d.get("deflate"), Mapping) else None,
                   extra={k: v for k, v in d.items() if k not in known})


_HEAD = ("protocol", "guest_mib", "inflate_mib", "pids", "workload", "wire_format", "batch_pages", "discard",
         "guest_init_on_alloc", "backing", "partial_tracking", "alloc_policy")
_TAIL = ("verification", "verified", "errors", "probes", "trial_wall_ns")
_OPTIONAL = ("twin", "host_load", "floors", "lab_cost", "cycles")      # written only when the trial has them


def to_json(result: Any) -> Any:
    """A trial function's result as stored: TrialResult.to_json(), a dict as it is."""
    return result.to_json() if isinstance(result, TrialResult) else result
