"""The CI regression gate: a candidate run against a baseline run, per arm and metric.

Decision rules (docs/STATISTICS.md explains them for users):
- timings and gauges regress when the candidate's median is worse (higher) by more
  than the metric's relative threshold AND Mann-Whitney says the difference is real
  (Holm-adjusted p < alpha, Holm over the metrics gated in that arm). Both are needed:
  significance alone flags 0.5 % shifts on quiet machines, a threshold alone flags noise.
- counters regress when the medians differ at all (or by more than an explicit tolerance).
- input that cannot give an answer (missing run or file, malformed JSON, different
  experiments, no common arms or metrics, too few trials for the test to ever reach
  significance) raises GateInputError: exit 2, distinct from a regression (exit 1).
"""
from __future__ import annotations

import fnmatch
import json
import math
import re
import tomllib
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from lab import environment as lab_env
from lab import metrics as lab_metrics
from lab import stats
from lab.store import BaselineError, Store, StoreError, load_baseline

DEFAULT_TIMING_THRESHOLD = 0.10
# Practical significance: a timing must also be worse by at least this much in absolute
# terms. A sub-millisecond stage that moves by a fraction of a millisecond between two
# runs minutes apart is scheduling drift on a shared machine, not a regression (seen:
# 15 % false alarms in A/A runs from 1 ms stages drifting by 0.3 ms; see
# benchmarks/gate_false_positive.py).
DEFAULT_TIMING_FLOOR_MS = 1.0
_MS_IN = {"ns": 1e6, "us": 1e3, "ms": 1.0, "s": 1e-3}
DEFAULT_COUNTER_TOLERANCE = 0.0
# Spec fields that define the experiment: if they differ, the runs measure different things.
COMPARABLE_SPEC_FIELDS = ("kind", "guest_mib", "inflate_mib", "workload", "workload_params", "seed",
                          "batch_pages", "bitmap_pages_per_request", "discard", "bandwidth", "probes", "twins")
EXIT_PASS, EXIT_REGRESSION, EXIT_UNUSABLE = 0, 1, 2


class GateInputError(Exception):
    """The gate cannot decide (exit 2); the message says what to fix."""


# --- thresholds -------------------------------------------------------------------
@dataclass(frozen=True)
class Limit:
    """How much change a metric may show: relative (fraction of the baseline median),
    absolute (counters only), or ignore (not gated)."""

    mode: str  # relative | absolute | ignore
    value: float = 0.0

    @classmethod
    def parse(cls, raw: Any, *, what: str) -> "Limit":
        if isinstance(raw, str):
            text = raw.strip().lower()
            if text in ("ignore", "off", "skip"):
                return cls("ignore")
            if text == "exact":
                return cls("absolute", 0.0)
            m = re.fullmatch(r"\+?(\d+(?:\.\d+)?)\s*%", text)
            if m:
                return cls("relative", float(m.group(1)) / 100.0)
            try:
                raw = float(text)
            except ValueError:
                raise GateInputError(f"threshold for {what}: cannot read {raw!r} (use e.g. 10%, 0.1, 2, "
                                     "exact or ignore)") from None
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw) or raw < 0:
            raise GateInputError(f"threshold for {what}: {raw!r} is not a non-negative number, a percentage, "
                                 "exact or ignore")
        return cls("number", float(raw))

    def for_kind(self, kind: str) -> "Limit":
        """A bare number is a fraction for timings and gauges, an absolute tolerance for counters."""
        if self.mode != "number":
            return self
        return Limit("relative" if lab_metrics.is_statistical(kind) else "absolute", self.value)

    def describe(self, kind: str) -> str:
        lim = self.for_kind(kind)
        if lim.mode == "ignore":
            return "ignored"
        if lab_metrics.is_statistical(kind):
            return f"+{lim.value:.0%}" if lim.mode == "relative" else f"+{lim.value:g}"
        if lim.value == 0:
            return "exact"
        return f"±{lim.value:.0%}" if lim.mode == "relative" else f"±{lim.value:g}"


@dataclass
class Thresholds:
    """Defaults plus per-metric rules; for a metric the LAST matching rule wins
    (file rules first, then --threshold flags), so put general patterns first."""

    alpha: float = stats.ALPHA
    timing: Limit = Limit("relative", DEFAULT_TIMING_THRESHOLD)
    counter: Limit = Limit("absolute", DEFAULT_COUNTER_TOLERANCE)
    rules: list[tuple[str, Limit]] = field(default_factory=list)
    timing_floor_ms: float = DEFAULT_TIMING_FLOOR_MS
    min_trials: int | None = None  # ok measured trials each baseline arm needs in the candidate (None: all)

    def floor(self, metric: str) -> float:
        """The smallest absolute worsening of a timing that counts, in the metric's unit."""
        return self.timing_floor_ms * _MS_IN.get(lab_metrics.unit(metric), 0.0)

    def limit(self, metric: str, kind: str) -> Limit:
        lim = self.timing if lab_metrics.is_statistical(kind) else self.counter
        for pattern, rule in self.rules:
            if fnmatch.fnmatchcase(metric, pattern):
                lim = rule
        return lim.for_kind(kind)

    def add_cli(self, items: Sequence[str]) -> "Thresholds":
        """Rules from --threshold METRIC=VALUE (METRIC may be a glob pattern)."""
        for item in items:
            pattern, sep, value = item.partition("=")
            if not sep or not pattern.strip():
                raise GateInputError(f"--threshold {item!r}: expected METRIC=VALUE, e.g. inflate.stages_ns.total=15%")
            self.rules.append((pattern.strip(), Limit.parse(value, what=pattern.strip())))
        return self

    @classmethod
    def from_file(cls, path: str | Path) -> "Thresholds":
        """TOML (or JSON, by extension): alpha, timing, counter, and a [metrics] table of
        pattern = threshold."""
        p = Path(path)
        try:
            text = p.read_text()
            doc = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
        except FileNotFoundError:
            raise GateInputError(f"thresholds file {p} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise GateInputError(f"cannot read thresholds file {p}: {e}") from None
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
            raise GateInputError(f"thresholds file {p} is malformed: {e}") from None
        if not isinstance(doc, dict):
            raise GateInputError(f"thresholds file {p} must hold a table")
        unknown = set(doc) - {"alpha", "timing", "counter", "metrics", "timing_floor_ms", "min_trials"}
        if unknown:
            raise GateInputError(f"thresholds file {p}: unknown key(s) {', '.join(sorted(unknown))} "
                                 "(allowed: alpha, timing, counter, metrics, timing_floor_ms, min_trials)")
        th = cls()
        if "min_trials" in doc:
            n = doc["min_trials"]
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise GateInputError(f"thresholds file {p}: min_trials must be an integer >= 1, got {n!r}")
            th.min_trials = n
        if "alpha" in doc:
            a = doc["alpha"]
            if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 < a < 1:
                raise GateInputError(f"thresholds file {p}: alpha must be a number in (0, 1), got {a!r}")
            th.alpha = float(a)
        if "timing_floor_ms" in doc:
            f = doc["timing_floor_ms"]
            if isinstance(f, bool) or not isinstance(f, (int, float)) or f < 0:
                raise GateInputError(f"thresholds file {p}: timing_floor_ms must be a number >= 0, got {f!r}")
            th.timing_floor_ms = float(f)
        if "timing" in doc:
            th.timing = Limit.parse(doc["timing"], what="timing (default)").for_kind(lab_metrics.TIMING)
        if "counter" in doc:
            th.counter = Limit.parse(doc["counter"], what="counter (default)").for_kind(lab_metrics.COUNTER)
        rules = doc.get("metrics", {})
        if not isinstance(rules, dict):
            raise GateInputError(f"thresholds file {p}: [metrics] must be a table of pattern = threshold")
        th.rules += [(k, Limit.parse(v, what=k)) for k, v in rules.items()]
        return th

    def describe(self) -> str:
        return (f"timings/gauges worse by more than {self.timing.describe(lab_metrics.TIMING)} with Holm p < {self.alpha:g}"
                f" (timings also by >= {self.timing_floor_ms:g} ms); "
                f"counters {self.counter.describe(lab_metrics.COUNTER)}; every baseline arm needs "
                + (f">= {self.min_trials}" if self.min_trials else "all its")
                + " ok measured trials in the candidate"
                + (f"; {len(self.rules)} per-metric rule(s)" if self.rules else ""))

    def to_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "timing": asdict(self.timing), "counter": asdict(self.counter),
                "timing_floor_ms": self.timing_floor_ms, "min_trials": self.min_trials,
                "rules": [{"pattern": p, **asdict(l)} for p, l in self.rules]}


# --- inputs -----------------------------------------------------------------------
@dataclass
class GateInput:
    """One side of the gate: a stored run or a baseline file."""

    ref: str
    source: str  # run | file
    run_id: str | None
    name: str
    spec: dict[str, Any]
    environment: dict[str, Any]
    table: dict[str, dict[str, np.ndarray]]
    rounds: dict[str, dict[str, np.ndarray]] | None = None  # round of each sample, aligned with table
    # per scheduled arm: (ok measured trials, failed measured trials, first error); None for
    # baseline files, whose ok trials are the samples they carry
    outcomes: dict[str, tuple[int, int, str | None]] | None = None

    def ok_trials(self, arm: str) -> int:
        """Measured trials of `arm` that succeeded (the most samples any metric has)."""
        if self.outcomes is not None and arm in self.outcomes:
            return self.outcomes[arm][0]
        return max((len(v) for v in self.table.get(arm, {}).values()), default=0)

    @property
    def arms(self) -> list[str]:
        """Every arm this side scheduled or measured, in schedule order."""
        labels = list(self.spec.get("_arm_labels") or self.spec.get("arms") or [])
        return labels + [a for a in self.table if a not in labels]

    @property
    def reference_arm(self) -> str | None:
        """The spec's first arm (every other arm is compared with it), if it has data."""
        labels = self.spec.get("_arm_labels") or self.spec.get("arms") or []
        return next((a for a in labels if a in self.table), next(iter(self.table), None))

    def describe(self) -> str:
        where = f"run {self.run_id}" if self.source == "run" else f"file {self.ref}"
        if self.source == "file" and self.run_id:
            where += f" (run {self.run_id})"
        n = {arm: max((len(v) for v in ms.values()), default=0) for arm, ms in self.table.items()}
        return f"{where} {self.name!r}, trials per arm: " + ", ".join(f"{a}={k}" for a, k in n.items())

    def to_dict(self) -> dict[str, Any]:
        return {"ref": self.ref, "source": self.source, "run_id": self.run_id, "name": self.name}


def load_input(ref: str, db_path: str | Path, side: str = "input", host: str | None = None) -> GateInput:
    """A run id (or prefix, or "latest") in the store at db_path, or a baseline JSON file.
    `side` ("baseline"/"candidate") names it in error messages; `host` keeps only that
    host's trials of a run (lab/gate_hosts.py pairs the hosts)."""
    p = Path(ref)
    if p.is_file():
        try:
            b = load_baseline(p)
        except BaselineError as e:
            raise GateInputError(f"{side}: {e}") from None
        return GateInput(ref, "file", b.run.get("id"), b.run.get("name") or b.spec.get("name", ""),
                         b.spec, b.environment, b.table, b.rounds)
    if "/" in ref or ref.endswith(".json") or p.exists():
        raise GateInputError(f"{side}: file {ref} does not exist (or is not a file)")
    try:
        store = Store(db_path, create=False)
    except StoreError as e:
        raise GateInputError(f"{side}: {ref!r} is neither a file nor a run: {e}") from None
    try:
        run = store.get_run(ref)
        # A candidate whose every trial failed is an answer (its arms regressed), not unusable input.
        finished = ("complete", "failed") if side == "candidate" else ("complete",)
        if run.status not in finished:
            raise GateInputError(f"{side}: run {run.id} is {run.status}, not complete: gate only finished runs")
        table, rounds = store.metric_table(run.id, host), store.round_table(run.id, host)
        outcomes: dict[str, tuple[int, int, str | None]] = {a: (0, 0, None) for a in run.arms}
        for t in store.trials(run.id, include_warmups=False, host=host):
            ok, bad, err = outcomes.get(t.arm, (0, 0, None))
            if t.status == "ok":
                ok += 1
            else:
                bad, err = bad + 1, err or (t.error or "?").splitlines()[0]
            outcomes[t.arm] = (ok, bad, err)
    except StoreError as e:
        raise GateInputError(f"{side}: {e}") from None
    finally:
        store.close()
    return GateInput(ref, "run", run.id, run.name, run.spec, run.environment, table, rounds, outcomes)


# --- checks -----------------------------------------------------------------------
@dataclass
class Check:
    arm: str
    metric: str
    kind: str
    status: str  # pass | regression | improvement | ignored | missing
    limit: str
    n_baseline: int = 0
    n_candidate: int = 0
    baseline_median: float | None = None
    candidate_median: float | None = None
    ratio: float | None = None
    ratio_ci_low: float | None = None
    ratio_ci_high: float | None = None
    difference: float | None = None
    p_value: float | None = None
    p_holm: float | None = None
    cliffs_delta: float | None = None
    message: str = ""


@dataclass
class GateResult:
    baseline: GateInput
    candidate: GateInput
    thresholds: Thresholds
    checks: list[Check]
    notes: list[str]

    @property
    def regressions(self) -> list[Check]:
        return [c for c in self.checks if c.status == "regression"]

    @property
    def exit_code(self) -> int:
        return EXIT_REGRESSION if self.regressions else EXIT_PASS

    @property
    def verdict(self) -> str:
        return "regression" if self.regressions else "pass"

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in ("pass", "regression", "improvement", "ignored", "missing")}
        for c in self.checks:
            out[c.status] += 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "baseline": self.baseline.to_dict(),
            "candidate": self.candidate.to_dict(),
            "thresholds": self.thresholds.to_dict(),
            "counts": self.counts(),
            "regressions": [asdict(c) for c in self.regressions],
            "checks": [asdict(c) for c in self.checks],
            "notes": self.notes,
        }

    def render_text(self, *, verbose: bool = False) -> str:
        counts = self.counts()
        gated = len(self.checks) - counts["ignored"] - counts["missing"]
        head = (f"gate: REGRESSION in {counts['regression']} of {gated} checks" if self.regressions
                else f"gate: PASS ({gated} checks, {counts['improvement']} improved)")
        lines = [head,
                 f"  baseline:  {self.baseline.describe()}",
                 f"  candidate: {self.candidate.describe()}",
                 f"  rule: {self.thresholds.describe()}"]
        shown = [c for c in self.checks if verbose or c.status in ("regression", "improvement")]
        for c in shown:
            lines.append(f"  {c.status.upper() if c.status == 'regression' else c.status:<11} {c.arm}  {c.metric}: "
                         f"{c.message}")
        missing = [c for c in self.checks if c.status == "missing"]
        if missing and not verbose:
            lines.append(f"  missing: {len(missing)} metric(s) present on one side only "
                         f"(e.g. {missing[0].arm} {missing[0].metric}); --json lists them")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_junit(self) -> str:
        """JUnit XML: one testcase per arm x metric, <failure> for regressions,
        <skipped> for ignored or missing metrics."""
        counts = self.counts()
        suites = ET.Element("testsuites", name="balloon-lab gate", tests=str(len(self.checks)),
                            failures=str(counts["regression"]), errors="0")
        suite = ET.SubElement(suites, "testsuite", name=f"balloon-lab gate: {self.candidate.name}",
                              tests=str(len(self.checks)), failures=str(counts["regression"]), errors="0",
                              skipped=str(counts["ignored"] + counts["missing"]), time="0")
        props = ET.SubElement(suite, "properties")
        for k, v in (("baseline", self.baseline.describe()), ("candidate", self.candidate.describe()),
                     ("rule", self.thresholds.describe()), *((f"note{i}", n) for i, n in enumerate(self.notes))):
            ET.SubElement(props, "property", name=k, value=v)
        for c in self.checks:
            tc = ET.SubElement(suite, "testcase", classname=f"balloon-lab.gate.{c.arm}", name=c.metric, time="0")
            if c.status == "regression":
                f = ET.SubElement(tc, "failure", message=f"{c.metric} regressed in {c.arm}: {c.message}",
                                  type="regression")
                f.text = json.dumps(asdict(c), indent=1)
            elif c.status in ("ignored", "missing"):
                ET.SubElement(tc, "skipped", message=c.message or c.status)
            else:
                ET.SubElement(tc, "system-out").text = f"{c.status}: {c.message}"
        ET.indent(suites)
        return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def spec_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in COMPARABLE_SPEC_FIELDS
            if k in a and k in b and a.get(k) != b.get(k)]


def run_gate(baseline: GateInput, candidate: GateInput, thresholds: Thresholds | None = None, *,
             allow_spec_change: bool = False, relative: bool = False) -> GateResult:
    """Compare every arm and metric the two sides share; GateInputError if they cannot be compared.

    relative=True gates each arm's timings as ratios to the same run's reference arm
    (the spec's first arm). Machine-wide drift between the two runs (a busier host,
    another CPU frequency) scales both arms of a run alike and cancels; the reference
    arm's own timings are then not gated (its counters and gauges still are).
    """
    th = thresholds or Thresholds()
    notes: list[str] = []
    diffs = spec_differences(baseline.spec, candidate.spec)
    if diffs:
        msg = "baseline and candidate ran different experiments: " + "; ".join(diffs)
        if not allow_spec_change:
            raise GateInputError(msg + " (pass --allow-spec-change to gate them anyway)")
        notes.append(msg)
    env_diffs = lab_env.differences(baseline.environment, candidate.environment)
    if env_diffs:
        notes.append("environments differ, timings may not be comparable: " + "; ".join(env_diffs))
    if not baseline.table:
        raise GateInputError("the baseline has no arm with a successful measured trial")
    arm_checks = [_check_arm_trials(arm, baseline, candidate, th) for arm in baseline.table]
    arms = [a for a in baseline.table if a in candidate.table]
    only = [a for a in candidate.arms if a not in baseline.table]
    if only:
        notes.append(f"arm(s) only in the candidate, not gated: {', '.join(only)}")
    ref = None
    if relative:
        ref = baseline.reference_arm
        if candidate.reference_arm != ref and any(c.status == "regression" and c.arm == ref for c in arm_checks):
            notes.append(f"relative mode impossible: the reference arm {ref} failed in the candidate")
            return GateResult(baseline, candidate, th, arm_checks, notes)
        if candidate.reference_arm != ref:
            raise GateInputError(f"--relative needs the same reference arm on both sides: baseline "
                                 f"{ref}, candidate {candidate.reference_arm}")
        notes.append(f"relative mode: timings are ratios to the {ref} arm of the same run")
    checks: list[Check] = list(arm_checks)
    for arm in arms:
        base, cand = baseline.table[arm], candidate.table[arm]
        if ref is not None:
            base, cand = _relative(baseline.table, arm, ref), _relative(candidate.table, arm, ref)
        rounds = None
        if baseline.rounds is not None and candidate.rounds is not None:
            rounds = (baseline.rounds.get(arm, {}), candidate.rounds.get(arm, {}))
        try:
            checks += _check_arm(arm, base, cand, th, reference=ref, rounds=rounds)
        except GateInputError as e:
            if not any(c.status == "regression" for c in arm_checks):
                raise
            # another arm already failed the candidate: say why this one could not be judged
            notes.append(f"arm {arm} not gated: {e}")
    failed_arm = any(c.status == "regression" for c in arm_checks)
    if arms and not failed_arm and not any(c.status not in ("missing", "ignored") for c in checks
                                           if c.metric != TRIALS_METRIC):
        raise GateInputError("no common metrics to gate (all missing on one side or ignored)")
    return GateResult(baseline, candidate, th, checks, notes)


TRIALS_METRIC = "ok_trials"


def _check_arm_trials(arm: str, baseline: GateInput, candidate: GateInput, th: Thresholds) -> Check:
    """Every arm of the baseline must be in the candidate with at least the minimum of ok
    measured trials (th.min_trials, else every measured trial the candidate's spec asked
    for): a missing, failed or partly failed arm is a regression, never a note."""
    n_b, n_c = baseline.ok_trials(arm), candidate.ok_trials(arm)
    need = th.min_trials if th.min_trials is not None else int(candidate.spec.get("trials") or 1)
    c = Check(arm, TRIALS_METRIC, lab_metrics.COUNTER, "pass", f">= {need}", n_baseline=n_b, n_candidate=n_c,
              baseline_median=float(n_b), candidate_median=float(n_c))
    failed, err = 0, None
    if candidate.outcomes is not None and arm in candidate.outcomes:
        _, failed, err = candidate.outcomes[arm]
    why = f"; {failed} failed, first error: {err}" if failed else ""
    if arm not in candidate.arms:
        c.status, c.message = "regression", f"arm {arm} is missing from the candidate (baseline: {n_b} ok trials)"
    elif n_c < need:
        c.status = "regression"
        c.message = (f"arm {arm}: {n_c} ok measured trial(s) in the candidate, minimum {need}"
                     f" (baseline: {n_b}){why}")
    else:
        c.message = f"arm {arm}: {n_c} ok measured trials (minimum {need})"
    return c


def _relative(table: Mapping[str, Mapping[str, np.ndarray]], arm: str, ref: str) -> dict[str, np.ndarray]:
    """The arm's samples with timings divided by the reference arm's median (kept as they
    are where the reference has no positive median for that metric). Gauges are left
    alone: machine speed does not change page faults or RSS, and dividing by another
    arm's small, noisy count would only add noise."""
    if arm == ref:
        return dict(table[arm])
    out = {}
    for m, v in table[arm].items():
        r = table[ref].get(m)
        med = float(np.median(r)) if r is not None and len(r) else 0.0
        out[m] = v / med if lab_metrics.classify(m) == lab_metrics.TIMING and med > 0 else v
    return out


def _check_arm(arm: str, base: Mapping[str, np.ndarray], cand: Mapping[str, np.ndarray], th: Thresholds, *,
               reference: str | None = None,
               rounds: tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]] | None = None) -> list[Check]:
    checks: list[Check] = []
    limits: dict[str, Limit] = {}
    for m in sorted(set(base) | set(cand)):
        kind = lab_metrics.classify(m)
        lim = th.limit(m, kind)
        if m not in base or m not in cand:
            side = "candidate" if m in base else "baseline"
            checks.append(Check(arm, m, kind, "missing", lim.describe(kind), message=f"absent in the {side}"))
        elif lim.mode == "ignore":
            checks.append(Check(arm, m, kind, "ignored", "ignored", message="ignored by threshold rule"))
        elif arm == reference and kind == lab_metrics.TIMING:
            checks.append(Check(arm, m, kind, "ignored", "ignored",
                                message="reference arm in relative mode: other arms are measured against it"))
        else:
            limits[m] = lim
    dups = stats.duplicates([{m: base[m] for m in limits}, {m: cand[m] for m in limits}], all_kinds=True)
    for dup, kept in dups.items():
        if limits[dup] == limits[kept]:  # same samples, same limit: the same verdict, so say it once
            del limits[dup]
            checks.append(Check(arm, dup, lab_metrics.classify(dup), "ignored", "ignored",
                                message=f"samples identical to {kept}, gated there"))
    family = [m for m in limits if lab_metrics.is_statistical(lab_metrics.classify(m))
              and not (np.ptp(base[m]) == 0 and np.ptp(cand[m]) == 0 and base[m][0] == cand[m][0])]
    if family:
        # the arm's trial count (a metric a probe missed in some trial has fewer samples, and less power)
        n_b = max(len(base[m]) for m in family)
        n_c = max(len(cand[m]) for m in family)
        floor = stats.min_mann_whitney_p(n_b, n_c)
        need = th.alpha / len(family)
        if floor >= need:
            k = next(k for k in range(2, 1000) if stats.min_mann_whitney_p(k, k) < need)
            raise GateInputError(
                f"too few trials in arm {arm}: baseline {n_b}, candidate {n_c}. With {len(family)} timing/gauge "
                f"metrics under Holm, a regression needs p < {th.alpha:g}/{len(family)} = {need:.2g}, and "
                f"Mann-Whitney cannot go below {floor:.2g} with these sizes: run at least {k} trials per arm "
                "(or gate fewer metrics with --threshold PATTERN=ignore)")
    for r in stats.compare_samples(base, cand, baseline_label=arm, label=arm, metrics=list(limits), alpha=th.alpha):
        if lab_metrics.is_statistical(r.kind):
            floor = th.floor(r.metric) if r.kind == lab_metrics.TIMING and reference is None else 0.0
            checks.append(_decide_statistical(r, limits[r.metric], th.alpha,
                                              reference if r.kind == lab_metrics.TIMING else None, floor))
        else:
            paired = None
            if rounds is not None and r.metric in rounds[0] and r.metric in rounds[1]:
                paired = _by_round(base[r.metric], rounds[0][r.metric], cand[r.metric], rounds[1][r.metric])
            checks.append(_decide_counter(r, limits[r.metric], paired))
    checks.sort(key=lambda c: c.metric)
    return checks


def _check_from(r: stats.PairResult, lim: Limit) -> Check:
    return Check(arm=r.arm, metric=r.metric, kind=r.kind, status="pass", limit=lim.describe(r.kind),
                 n_baseline=r.n_baseline, n_candidate=r.n, baseline_median=r.baseline_median,
                 candidate_median=r.median, ratio=r.ratio, ratio_ci_low=r.ratio_ci_low,
                 ratio_ci_high=r.ratio_ci_high, difference=r.difference, p_value=r.p_value, p_holm=r.p_holm,
                 cliffs_delta=r.cliffs_delta)


def _decide_statistical(r: stats.PairResult, lim: Limit, alpha: float, reference: str | None,
                        floor: float = 0.0) -> Check:
    if reference is not None:
        fmt = lambda v: f"{v:.4g} x {reference}"  # noqa: E731 - values are ratios to the reference arm
    else:
        fmt = stats.value_formatter(r.metric, r.baseline_median)
    c = _check_from(r, lim)
    significant = r.p_holm is not None and r.p_holm < alpha
    ci = f" [{r.ratio_ci_low:.3f}, {r.ratio_ci_high:.3f}]" if r.ratio_ci_low is not None else ""
    p = "-" if r.p_holm is None else f"{r.p_holm:.2g}"
    c.message = f"{fmt(r.baseline_median)} -> {fmt(r.median)} (x{r.ratio:.3f}{ci}, Holm p={p}, limit {c.limit})"
    if significant and r.ratio > 1 + lim.value and r.difference >= floor:
        c.status = "regression"
    elif significant and r.ratio > 1 + lim.value:
        c.message += f"; below the {fmt(floor)} floor of practical significance"
    elif significant and r.ratio < 1 - lim.value:
        c.status = "improvement"
    return c


def _by_round(bv: np.ndarray, br: np.ndarray, cv: np.ndarray, cr: np.ndarray) -> list[tuple[int, float, float]]:
    """(round, baseline value, candidate value) for every round both sides measured."""
    b = dict(zip(br.astype(int).tolist(), bv.tolist()))
    c = dict(zip(cr.astype(int).tolist(), cv.tolist()))
    return [(rnd, b[rnd], c[rnd]) for rnd in sorted(set(b) & set(c))]


def _decide_counter(r: stats.PairResult, lim: Limit, paired: list[tuple[int, float, float]] | None) -> Check:
    """Counters are exact. When both sides recorded rounds they are compared round by
    round (a round's trials saw the same seed, so a seed-dependent counter such as the
    number of runs matches exactly); one failed trial then does not shift a median."""
    fmt = stats.value_formatter(r.metric, r.baseline_median)
    c = _check_from(r, lim)

    def allowed(base_value: float) -> float:
        return lim.value * abs(base_value) if lim.mode == "relative" else lim.value

    if paired:
        bad = [(rnd, b, v) for rnd, b, v in paired if abs(v - b) > allowed(b)]
        if not bad:
            c.message = f"{fmt(r.baseline_median)} -> {fmt(r.median)} (equal in all {len(paired)} common rounds)"
            return c
        rnd, b, v = bad[0]
        c.status = "regression"
        c.message = (f"{fmt(r.baseline_median)} -> {fmt(r.median)}: differs in {len(bad)} of {len(paired)} "
                     f"common rounds (round {rnd}: {fmt(b)} -> {fmt(v)}, {'+' if v > b else ''}{fmt(v - b)}), "
                     f"limit {c.limit}")
    else:
        c.message = f"{fmt(r.baseline_median)} -> {fmt(r.median)} ({'+' if r.difference > 0 else ''}" \
                    f"{fmt(r.difference)}, limit {c.limit})"
        if abs(r.difference) <= allowed(r.baseline_median):
            return c
        c.status = "regression"
    if r.varies:
        c.message += f"; it varies between trials, if that is expected allow it with --threshold {r.metric}=N"
    return c
