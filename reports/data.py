"""Everything a report shows about one run, read once from the results store.

The report never re-runs anything: it reads the measured (non-warm-up, ok) trials,
their flattened metrics and summed histograms, and the run's stored comparison
(computed now, and said so, for a run that never finished). Sections then ask this
object for what they need and get None/empty when the run has no such data, which
they turn into a visible "no data because ..." note rather than a missing chart.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from lab.trials.experiment import load_comparison
from lab.analysis.stats import Comparison
from lab.store.store import RunInfo, Store, StoreError, TrialRecord
from reports.palette import arm_colors

MiB = 1 << 20
STAGES = ("alloc", "encode", "transmit", "translate", "discard")
OPS = ("inflate", "deflate")


@dataclass
class ReportData:
    run: RunInfo
    arms: list[str]                                  # arms with measured ok trials, schedule order
    scheduled_arms: list[str]                        # every arm the spec scheduled
    colors: dict[str, str]
    table: dict[str, dict[str, np.ndarray]]          # {arm: {metric: samples}}
    hists: dict[str, dict[str, dict[str, int]]]      # {arm: {histogram: {bucket: summed count}}}
    trials: list[TrialRecord]                        # every trial, warm-ups and failed included
    comparison: Comparison | None
    comparison_computed_now: bool
    db_path: str
    notes: list[str] = field(default_factory=list)
    host: str | None = None                          # the host the sections above show (None: the only one)
    hosts: list[dict[str, Any]] = field(default_factory=list)  # lab.analysis.host_views.host_summaries
    host_comparisons: dict[str, Comparison | None] = field(default_factory=dict)  # every host's own

    # --- basic facts ---------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.run.kind

    @property
    def baseline(self) -> str | None:
        if self.comparison is not None:
            return self.comparison.baseline_arm
        return self.arms[0] if self.arms else None

    def measured(self, arm: str | None = None) -> list[TrialRecord]:
        """Measured ok trials (of one arm, or all), in trial order."""
        return [t for t in self.trials if not t.warmup and t.status == "ok" and t.result is not None
                and (arm is None or t.arm == arm)]

    def n_trials(self, arm: str) -> int:
        return len(self.measured(arm))

    def failed(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.status == "failed"]

    @property
    def inflate_mib(self) -> float | None:
        """MiB inflated per trial: from the results (what was run), else the spec."""
        vals = [t.result.get("inflate_mib") for t in self.measured()]
        vals = [v for v in vals if isinstance(v, (int, float))]
        if vals:
            return float(Counter(vals).most_common(1)[0][0])
        v = self.run.spec.get("inflate_mib")
        return float(v) if isinstance(v, (int, float)) else None

    @property
    def guest_mib(self) -> float | None:
        v = self.run.spec.get("guest_mib")
        return float(v) if isinstance(v, (int, float)) else None

    # --- metrics ------------------------------------------------------------------
    def samples(self, arm: str, metric: str | None) -> np.ndarray | None:
        x = self.table.get(arm, {}).get(metric) if metric else None
        return None if x is None or x.size == 0 else x

    def has_metric(self, metric: str | None) -> bool:
        return metric is not None and any(self.samples(a, metric) is not None for a in self.arms)

    def metric(self, *candidates: str) -> str | None:
        """The first of several names for one measurement that this run has: result
        shapes evolve (stages_ns.inflate.total vs inflate.stages_ns.total)."""
        return next((m for m in candidates if self.has_metric(m)), None)

    def stage_metric(self, op: str, stage: str) -> str | None:
        """The metric of one stage ("total" included) of one operation."""
        return self.metric(f"stages_ns.{op}.{stage}", f"{op}.stages_ns.{stage}")

    def op_metric(self, op: str, name: str) -> str | None:
        """A per-operation counter: inflate's live at the top level (and under
        "inflate." in older results), deflate's under "deflate."."""
        return self.metric(name, f"inflate.{name}") if op == "inflate" else self.metric(f"deflate.{name}")

    def median(self, arm: str, metric: str | None) -> float | None:
        if metric is None:
            return None
        x = self.samples(arm, metric)
        return None if x is None else float(np.median(x))

    def hist(self, arm: str, name: str) -> dict[float, float]:
        """One arm's histogram summed over its measured trials, as {bucket: count},
        buckets as numbers, sorted; empty when the arm has none."""
        h = self.hists.get(arm, {}).get(name) or {}
        out: dict[float, float] = {}
        for b, c in h.items():
            try:
                out[float(b)] = float(c)
            except ValueError:
                continue
        return dict(sorted(out.items()))

    def has_hist(self, name: str) -> bool:
        return any(sum(self.hist(a, name).values()) > 0 for a in self.arms)

    # --- probes -------------------------------------------------------------------
    def probe_backends(self) -> dict[str, int]:
        """How many measured trials reported each probe backend."""
        c: Counter[str] = Counter()
        for t in self.measured():
            p = t.result.get("probes")
            c[(p.get("backend") if isinstance(p, Mapping) else None) or "none"] += 1
        return dict(c)

    def probe_reasons(self) -> list[str]:
        """Distinct reasons trials gave for running without probes."""
        seen: list[str] = []
        for t in self.measured():
            p = t.result.get("probes")
            r = p.get("reason") if isinstance(p, Mapping) else "no probe section in the result"
            if r and r not in seen and (not isinstance(p, Mapping) or p.get("backend") != "bcc"):
                seen.append(str(r))
        return seen

    # --- migration ----------------------------------------------------------------
    def round_logs(self, arm: str) -> list[tuple[TrialRecord, list[dict[str, Any]]]]:
        """Per-round records of the arm's migration trials, for a timeline."""
        out = []
        for t in self.measured(arm):
            log = migration_rounds(t.result)
            if log:
                out.append((t, log))
        return out


def migration_rounds(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The round-by-round log of a migration result, if it carries one: a list of
    dicts under "per_round" (lab.trials.model.migrate_runner: {round, pages_sent, pages_zero,
    pages_hinted, bytes_sent, ms}, round 0 = stop-and-copy), or "round_log"/"timeline"
    (an int "rounds" is just a count)."""
    for key in ("per_round", "round_log", "timeline", "rounds"):
        v = result.get(key)
        if isinstance(v, list) and v and all(isinstance(r, Mapping) for r in v):
            return [dict(r) for r in v]
    return []


def load(store: Store, run_ref: str, host: str | None = None) -> ReportData:
    """Read one run (id, unique prefix or "latest") for a report; StoreError if unknown.
    A run that ran on several hosts is shown for one of them (`host`, default the
    first): timings of different hosts are never pooled; the hosts section puts every
    host side by side."""
    from lab.analysis.host_views import host_comparisons, host_summaries

    run = store.get_run(run_ref)
    if host is not None and host not in run.hosts:
        raise StoreError(f"run {run.id} has no trials on host {host!r} (hosts: {', '.join(run.hosts) or 'none'})")
    if host is None and len(run.hosts) > 1:
        host = run.hosts[0]
    by_host = host_comparisons(store, run, run.hosts) if len(run.hosts) > 1 else {}
    if host is not None:
        computed_now, comp = True, by_host.get(host) or host_comparisons(store, run, [host])[host]
    else:
        computed_now = store.get_comparison(run.id) is None
        comp = load_comparison(store, run.id)
    table = store.metric_table(run.id, host)
    hists = store.histogram_table(run.id, host)
    trials = store.trials(run.id, include_warmups=True, host=host)
    scheduled = list(run.arms)
    arms = [a for a in scheduled if a in table] + [a for a in table if a not in scheduled]
    notes = []
    if run.status != "complete":
        notes.append(f"this run is {run.status}: the report shows the trials recorded so far")
    if host is not None and len(run.hosts) > 1:
        others = ", ".join(h for h in run.hosts if h != host)
        notes.append(f"this run ran on hosts {', '.join(run.hosts)}: the sections show host {host} "
                     f"(`balloon-lab report --host` for {others}); \"Hosts\" puts them side by side")
    return ReportData(run=run, arms=arms, scheduled_arms=scheduled or arms,
                      colors=arm_colors(list(dict.fromkeys(scheduled + arms))), table=table, hists=hists,
                      trials=trials, comparison=comp, comparison_computed_now=computed_now and comp is not None,
                      db_path=str(store.path), notes=notes, host=host, hosts=host_summaries(store, run),
                      host_comparisons=by_host)


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
