"""Everything a report shows about one run, read once from the results store by the
commands that write a report (`report`, `compare --report`), and handed to the report
(reports/), which imports nothing of the lab: what the sections
need of the lab (a metric's kind and unit, the statistics they quote, the twin design,
the arms' titles, the spec's text, the run's history) they ask this object for.

The report never re-runs anything: it reads the measured (non-warm-up, ok) trials,
their flattened metrics and summed histograms, and the run's stored comparison
(computed now, and said so, for a run that never finished). Sections then ask this
object for what they need and get None/empty when the run has no such data, which
they turn into a visible "no data because ..." note rather than a missing chart.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import numpy as np

from lab.analysis import stats
from lab.trials.probe_costs import arm_costs, verdict as cost_verdict
from lab.analysis.host_views import host_comparisons, host_summaries
from lab.analysis.stats import Comparison
from lab.gate.history import history
from lab.machine import environment
from lab.results import metrics as lab_metrics
from lab.store.db_path import next_command
from lab.store.store import RunInfo, Store, StoreError, TrialRecord
from lab.trials import twins
from lab.trials.backends import is_qemu_arm
from lab.trials.experiment import load_comparison
from lab.trials.qemu import side_by_side
from lab.trials.spec import NO_PROBES_SUFFIX, ExperimentSpec, format_bandwidth, toml_value
from probes.costs import ROW_DOCS, row_order


@dataclass
class ReportData:
    run: RunInfo
    arms: list[str]                                  # arms with measured ok trials, schedule order
    scheduled_arms: list[str]                        # every arm the spec scheduled
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
    colors: dict[str, str] = field(default_factory=dict)   # {arm: colour}: the report's palette fills it
    # the run's experiment across the stored runs: metric -> lab.gate.history.history's points
    history_of: Callable[[str], list] = field(default=lambda metric: [])

    # What the report needs of the lab, handed in with the data.
    COUNTER: ClassVar[str] = lab_metrics.COUNTER
    TIMING: ClassVar[str] = lab_metrics.TIMING
    MIN_BOOTSTRAP_N: ClassVar[int] = stats.MIN_BOOTSTRAP_N
    NO_PROBES_SUFFIX: ClassVar[str] = NO_PROBES_SUFFIX
    REAL_STACK_ROWS: ClassVar[tuple] = tuple(side_by_side.ROWS)
    EVENT_IDX_NOTE: ClassVar[str] = side_by_side.EVENT_IDX_NOTE
    metric_kind = staticmethod(lab_metrics.classify)
    metric_unit = staticmethod(lab_metrics.unit)
    is_statistical = staticmethod(lab_metrics.is_statistical)
    change_is_good = staticmethod(lab_metrics.change_is_good)
    median_ci = staticmethod(stats.median_ci)
    mann_whitney = staticmethod(stats.mann_whitney)
    min_mann_whitney_p = staticmethod(stats.min_mann_whitney_p)
    ratio_ci = staticmethod(stats.ratio_ci)
    trials_needed = staticmethod(stats.trials_needed)
    verdict_text = staticmethod(stats.verdict_text)
    next_command = staticmethod(next_command)
    load_warnings = staticmethod(environment.load_warnings)
    is_qemu_arm = staticmethod(is_qemu_arm)
    arm_title = staticmethod(side_by_side.arm_title)

    # --- basic facts ---------------------------------------------------------------
    @property
    def alpha(self) -> float:
        """The significance level the run's comparison used (the lab's default without one)."""
        return self.comparison.alpha if self.comparison else stats.ALPHA

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
    def probe_overheads(self) -> list:
        """The probes' own cost per arm, from the run's twin pairs (lab/trials/twins.py)."""
        return twins.arm_overheads(self.measured())

    def probe_costs(self) -> list:
        """What each probe program cost per inflate, per arm, measured in the probed trials
        (lab/trials/probe_costs.py)."""
        return arm_costs(self.measured())

    PROBE_ROW_DOCS: ClassVar[dict] = ROW_DOCS
    probe_row_order = staticmethod(row_order)
    probe_cost_verdict = staticmethod(cost_verdict)

    def timing_design_text(self) -> str:
        """How this run's timings were taken (twins or not), in words."""
        return twins.DESIGN_TEXT[twins.timing_design([t.result for t in self.measured()])]

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

    # --- where the run came from ---------------------------------------------------
    @staticmethod
    def spec_text(v: Any, key: str = "") -> str:
        """A spec value as the TOML spec file would write it (bandwidth as 10gbit)."""
        if v is None:
            return "default"
        if key == "bandwidth" and isinstance(v, int):
            return format_bandwidth(v)
        try:
            return toml_value(v)
        except TypeError:
            return str(v)

    def reproduce_command(self) -> str:
        """The command that ran this experiment: the stored one, else rebuilt from the spec."""
        if self.run.command_line:
            return self.run.command_line
        try:
            spec = {k: v for k, v in self.run.spec.items() if not k.startswith("_")}
            return ExperimentSpec.from_dict(spec).command_line()
        except Exception:
            return ""

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
        other = next(h for h in run.hosts if h != host)
        notes.append(f"this run ran on hosts {', '.join(run.hosts)}: the sections show host {host} "
                     f"(`{next_command('report', run.id, host=other, db=store.path)}` for {others}); "
                     "\"Hosts\" puts them side by side")
    return ReportData(run=run, arms=arms, scheduled_arms=scheduled or arms, table=table, hists=hists,
                      trials=trials, comparison=comp, comparison_computed_now=computed_now and comp is not None,
                      db_path=str(store.path), notes=notes, host=host, hosts=host_summaries(store, run),
                      host_comparisons=by_host, history_of=lambda metric: history(store, metric, run.id))
