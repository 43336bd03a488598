"""The numbers workloads report, declared once (device/virtio/metric_decl.py).

prepare() returns a summary of how it shaped guest memory: fixed by the seed, so
counters. stop() returns what a background workload managed to do before it was
stopped: that depends on how its thread was scheduled, so gauges; the work it got
done is higher-better, and `corruptions` must be 0 (a trial with any is not verified).
The lab stores them under workload.prepare.* and workload.stop.* (lab/results/metric_catalog.py).
"""
from __future__ import annotations

from device.virtio.metric_decl import COUNTER, GAUGE, HIGHER, TIMING, ZERO, Metric, MetricSet

PREPARE_METRICS = MetricSet("workloads/metrics.py PREPARE_METRICS", [
    Metric("used_pages", COUNTER, "", "pages the workload holds with data (idle, aged)"),
    Metric("stale_pages", COUNTER, "", "free pages that hold old data (a freed page cache)"),
    Metric("untouched_free_pages", COUNTER, "", "free pages never written"),
    Metric("free_pages", COUNTER, "", "free pages in the guest allocator after prepare"),
    Metric("ram_pages", COUNTER, "", "guest RAM pages"),
    Metric("free_in_order10_share", COUNTER, "", "share of free pages that sit in order-10 (4 MiB) blocks"),
    Metric("pinned_blocks", COUNTER, "", "aged: order-9 blocks pinned by one held page"),
    Metric("run_pages", COUNTER, "", "fragment: pages per run of the pattern"),
    Metric("shaped_pages", COUNTER, "", "fragment: pages the pattern covered"),
    Metric("held_pages", COUNTER, "", "pages the workload kept allocated"),
    Metric("freed_pages", COUNTER, "", "fragment: pages freed again to leave holes"),
    Metric("free_blocks_by_order.*", COUNTER, "", "free blocks of this order in the buddy allocator"),
    Metric("requested_pages", COUNTER, "", "hog: pages asked for"),
    Metric("shortfall_pages", COUNTER, "", "hog: pages asked for but not given"),
])

STOP_METRICS = MetricSet("workloads/metrics.py STOP_METRICS", [
    Metric("seconds", TIMING, "s", "how long the background thread ran"),
    Metric("cycles", GAUGE, "", "churn: allocate/free cycles done", better=HIGHER),
    Metric("pages_churned", GAUGE, "", "churn: pages allocated", better=HIGHER),
    Metric("pages_freed", GAUGE, "", "churn: pages freed", better=HIGHER),
    Metric("pages_checked", GAUGE, "", "churn: pages whose contents were checked", better=HIGHER),
    Metric("corruptions", GAUGE, "", "churn: checked pages whose contents were wrong", better=ZERO),
    Metric("short_allocs", GAUGE, "", "churn: allocations the allocator could not fill"),
    Metric("ticks", GAUGE, "", "dirty: write steps done", better=HIGHER),
    Metric("held_pages_written", GAUGE, "", "dirty: writes to held pages", better=HIGHER),
    Metric("free_pages_written", GAUGE, "", "dirty: writes to free pages", better=HIGHER),
    Metric("bytes_written", GAUGE, "bytes", "dirty: bytes written", better=HIGHER),
    Metric("achieved_mib_s", GAUGE, "MiB/s", "dirty: the write rate reached", better=HIGHER),
    Metric("ticks_short", GAUGE, "", "dirty: steps that ran behind the clock"),
])


def must_be_zero_failures(stop: dict) -> list[str]:
    """What a workload's stop() report holds above 0 of the figures that must be 0
    ("corruptions=3"): a trial with any is not verified."""
    out = []
    for name, value in stop.items():
        if name in STOP_METRICS and STOP_METRICS[name].better == ZERO and isinstance(value, (int, float)) and value:
            out.append(f"{name}={value:g}")
    return out
