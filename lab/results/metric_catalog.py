"""Every metric a stored trial result may hold, by its dotted name, from the declarations.

lab.results.metrics asks `declaration(name)` for a metric's kind and unit; nothing is guessed
from the name. The catalog is assembled from the declarations beside the counters
(device/virtio/metric_decl.py's Metric): the balloon trial's (lab/results/trial_result.py,
which takes the device's, the driver's and the transport's), the probes'
(probes/session.py, under "probes" and "probes.deflate"), the workloads'
(workloads/metrics.py) and the live migration trial's (below). A trial function
defined elsewhere (a benchmark's, a test's) declares its own with `declare()`.

A name no declaration covers is an UndeclaredMetric error that says where to
declare it; lab.trials.experiment turns it into a failed trial with that message.
"""
from __future__ import annotations

from typing import Iterable

from device.api import COUNTER, GAUGE, HIGHER, TIMING, ZERO, Metric, MetricSet, UndeclaredMetric
from lab.results.trial_result import TRIAL_METRICS
from probes.session import PROBE_METRICS
from workloads.metrics import PREPARE_METRICS, STOP_METRICS

__all__ = ["UndeclaredMetric", "declaration", "declare", "declared"]

WORKLOAD_METRICS = [
    Metric("workload.seed", COUNTER, "", "the workload's seed (the experiment's seed + round)"),
    *PREPARE_METRICS.under("workload.prepare"),
    *STOP_METRICS.under("workload.stop"),
]

# The live migration trial (lab/migrate_runner.run_migration: the source VMM's
# migration report, device/vmm/migration/, and the destination's). Kinds and units
# as the lab has always compared them; the parameters stored as metrics are marked.
MIGRATE_METRICS = MetricSet("lab/results/metric_catalog.py MIGRATE_METRICS", [
    Metric("bandwidth_bits", COUNTER, "", "the migration's rate limit, bit/s (a parameter)"),
    Metric("total_ms", TIMING, "ms", "migration start to the destination running"),
    Metric("downtime_ms", TIMING, "ms", "guest paused: stop-and-copy to switchover"),
    Metric("setup_ms", TIMING, "ms", "before the first round (dirty log, hint request)"),
    Metric("hint_ms", TIMING, "ms", "waiting for free page hints"),
    Metric("expected_downtime_ms", TIMING, "ms", "the downtime the source predicted when it stopped iterating"),
    Metric("downtime_parts_ms.*", TIMING, "", "downtime by part (pause, send_pages, device_state, ...), ms"),
    Metric("rounds", COUNTER, "", "pre-copy rounds"),
    Metric("bytes_sent", COUNTER, "bytes", "bytes on the migration stream"),
    Metric("pages_sent", COUNTER, "", "pages sent with their data"),
    Metric("pages_zero", COUNTER, "", "pages sent as the zero flag"),
    # QEMU's own migration (lab/trials/qemu/migrate.py: query-migrate's "ram" fields)
    Metric("pages_skipped", COUNTER, "", "pages QEMU skipped (ram.skipped: e.g. hinted free)"),
    Metric("ram_total_bytes", COUNTER, "bytes", "guest RAM QEMU migrates (ram.total)"),
    Metric("page_size", COUNTER, "", "QEMU's target page size, bytes (a parameter)"),
    Metric("wire_gbit_s", GAUGE, "Gbit/s", "stream rate on the migration's wire", better=HIGHER),
    Metric("pages_hinted", COUNTER, "", "pages skipped because the guest hinted them free"),
    Metric("pages_examined", COUNTER, "", "pages the source looked at"),
    Metric("bytes_read", COUNTER, "bytes", "guest RAM bytes the source read (pread)"),
    Metric("pages_hinted_then_dirtied", COUNTER, "", "hinted pages the guest wrote again (sent after all)"),
    Metric("stop_copy_pages", COUNTER, "", "pages sent while the guest was paused"),
    Metric("pause_attempts", COUNTER, "", "tries to stop the guest (SIGSTOP) before it held"),
    Metric("cpu_s_source", TIMING, "s", "CPU seconds of the source VMM"),
    Metric("cpu_s_destination", TIMING, "s", "CPU seconds of the destination VMM"),
    Metric("cpu_s_guest", TIMING, "s", "CPU seconds of the guest process"),
    Metric("rate_limit_slept_s", TIMING, "s", "time the source slept to keep to the rate limit"),
    Metric("destination.pages_data", COUNTER, "", "pages the destination wrote with data"),
    Metric("destination.pages_zero", COUNTER, "", "zero pages the destination received"),
    Metric("destination.pages_punched", COUNTER, "", "zero pages the destination punched out of its memfd"),
    Metric("destination.pwrite_calls", COUNTER, "", "pwrite(2) calls of the destination"),
    Metric("destination.bytes", COUNTER, "bytes", "bytes the destination received"),
    Metric("destination.receive_ms", TIMING, "ms", "the destination's receiving time"),
    Metric("hints.bitmap_bytes", COUNTER, "bytes", "free page bitmaps received (bitmap hinting)"),
    Metric("hints.bitmap_requests", COUNTER, "", "free page bitmap requests sent"),
    Metric("hints.bitmap_responses", COUNTER, "", "free page bitmap responses received"),
    Metric("hints.blocks", COUNTER, "", "free blocks hinted (upstream hinting)"),
    Metric("hints.cmd_id", COUNTER, "", "the hinting command id used"),
    Metric("hints.first_hint_ms", TIMING, "ms", "request to the first hint"),
    Metric("hints.hinted_pages", COUNTER, "", "pages hinted free"),
    Metric("hints.hinted_pages_now", COUNTER, "", "pages still marked hinted at switchover"),
    Metric("hints.report_ms", TIMING, "ms", "request to the end of the guest's report"),
    Metric("hints.stale_hints", COUNTER, "", "hints for an old command id"),
    Metric("memory.guest_touched_bytes", COUNTER, "bytes", "guest RAM the guest had written"),
    Metric("memory.source_memfd_bytes_before", COUNTER, "bytes", "source memfd before migrating"),
    Metric("memory.source_memfd_bytes_after", COUNTER, "bytes", "source memfd after migrating"),
    Metric("memory.source_memfd_peak_bytes", COUNTER, "bytes", "source memfd at its largest"),
    Metric("memory.destination_memfd_peak_bytes", COUNTER, "bytes", "destination memfd at its largest"),
    Metric("memory.destination_memfd_bytes", COUNTER, "bytes", "destination memfd at the end"),
    Metric("memory.source_vmm.rss_peak_bytes", GAUGE, "bytes", "source VMM peak RSS"),
    Metric("memory.source_vmm.anon_peak_bytes", COUNTER, "bytes", "source VMM peak anonymous memory"),
    Metric("memory.destination_vmm.rss_peak_bytes", GAUGE, "bytes", "destination VMM peak RSS"),
    Metric("memory.destination_vmm.anon_peak_bytes", COUNTER, "bytes", "destination VMM peak anonymous memory"),
    Metric("memory.guest.anon_peak_bytes", COUNTER, "bytes", "guest process peak anonymous memory"),
    Metric("memory.host_peak_bytes", COUNTER, "bytes", "host memory in use at its largest"),
    Metric("memory.samples", COUNTER, "", "memory samples taken"),
    Metric("verification.vmm.source_data_pages", COUNTER, "", "source pages holding data"),
    Metric("verification.vmm.destination_data_pages", COUNTER, "", "destination pages holding data"),
    Metric("verification.vmm.differing_pages", COUNTER, "", "pages that differ between source and destination",
           better=ZERO),
    Metric("verification.vmm.pages_compared", COUNTER, "", "pages compared by hash"),
    Metric("verification.vmm.pages_not_compared_hinted_free", COUNTER, "", "hinted free pages not compared"),
    Metric("verification.vmm.ms", TIMING, "ms", "time the comparison took"),
    Metric("verification.guest.pages_checked", COUNTER, "", "held pages the guest checked at the destination"),
    Metric("verification.guest.bad_at_destination", COUNTER, "", "held pages wrong at the destination", better=ZERO),
    Metric("verification.guest.bad_at_source", COUNTER, "", "held pages wrong at the source", better=ZERO),
    Metric("verification.guest.destination_zero_pages", COUNTER, "", "held pages that read as zero at the destination"),
    Metric("verification.guest.skipped_rewritten_after_switchover", COUNTER, "", "pages rewritten after switchover"),
    Metric("migration_params.downtime-limit", TIMING, "", "the downtime limit, ms (a parameter)"),
    Metric("migration_params.max-bandwidth", COUNTER, "", "the rate limit, bytes/s (a parameter)"),
    Metric("migration_params.x-hint-wait-ms", COUNTER, "", "how long to wait for hints, ms (a parameter)"),
    Metric("migration_params.x-max-rounds", COUNTER, "", "the most pre-copy rounds (a parameter)"),
])


class Catalog:
    """Declarations by full dotted name: exact names first, then "*" patterns, the
    most specific first. Answers are cached (the statistics ask per metric per arm)."""

    def __init__(self) -> None:
        self.exact: dict[str, Metric] = {}
        self.patterns: list[Metric] = []
        self._cache: dict[str, Metric] = {}

    def add(self, metrics: Iterable[Metric]) -> None:
        for m in metrics:
            have = self.exact.get(m.name) or next((p for p in self.patterns if p.name == m.name), None)
            if have is not None:
                if (have.kind, have.unit, have.better) != (m.kind, m.unit, m.better):
                    raise ValueError(f"metric {m.name!r} declared twice: {have.kind}/{have.unit or 'count'}/"
                                     f"{have.better} and {m.kind}/{m.unit or 'count'}/{m.better}")
                continue
            if "*" in m.name.split("."):
                self.patterns.append(m)
            else:
                self.exact[m.name] = m
        self.patterns.sort(key=lambda p: p.name.split(".").count("*"))
        self._cache.clear()

    def __len__(self) -> int:
        return len(self.exact) + len(self.patterns)

    def __iter__(self):
        yield from self.exact.values()
        yield from self.patterns

    def lookup(self, name: str) -> Metric:
        m = self._cache.get(name)
        if m is not None:
            return m
        m = self.exact.get(name) or next((p for p in self.patterns if p.matches(name)), None)
        if m is None:
            raise UndeclaredMetric(
                f"metric {name!r} is not declared: declare it beside the counter it names "
                f"(device/virtio/metric_decl.Metric with kind, unit and doc; lab/results/metric_catalog.py lists "
                f"where each part of a trial result is declared, declare() adds a trial function's own)")
        self._cache[name] = m
        return m


# Names only the runner's first versions stored (version-1 results, lab/results/trial_result.py):
# each operation's probe reading inside it or under probes.<op>, and the processes'
# RSS as rss_peak_bytes. Declared so a store holding such runs still reads.
EARLIER_METRICS = [
    *(m for op in ("inflate", "deflate") for m in PROBE_METRICS.under(f"{op}.probes")),
    *PROBE_METRICS.under("probes.inflate"),
    Metric("rss_peak_bytes.*", GAUGE, "bytes", "resident set of the VMM and of the guest process (first versions)"),
]

_CATALOG = Catalog()
_CATALOG.add(TRIAL_METRICS)
_CATALOG.add(PROBE_METRICS.under("probes"))
_CATALOG.add(PROBE_METRICS.under("probes.deflate"))
_CATALOG.add(WORKLOAD_METRICS)
_CATALOG.add(MIGRATE_METRICS)
_CATALOG.add(EARLIER_METRICS)


def declaration(name: str) -> Metric:
    """The declaration of a flattened metric name (UndeclaredMetric if there is none)."""
    return _CATALOG.lookup(name)


def declare(*metrics: Metric) -> None:
    """Declare the metrics of a trial function defined outside lab (a benchmark's, a
    test's), with full dotted names as they appear in its results."""
    _CATALOG.add(metrics)


def declared() -> list[Metric]:
    """Every declaration, exact names first."""
    return list(_CATALOG)
