"""The CI regression gate: a candidate run against a baseline run, per arm and metric.

Decision rules (docs/STATISTICS.md explains them for users):
- timings and gauges regress when the candidate's median is worse by more than the
  metric's relative threshold AND Mann-Whitney says the difference is real
  (Holm-adjusted p < alpha, Holm over the metrics gated in that arm). Both are needed:
  significance alone flags 0.5 % shifts on quiet machines, a threshold alone flags noise.
  "Worse" is the metric's declared direction: higher for most, lower for throughputs.
- counters regress when the medians differ at all (or by more than an explicit tolerance).
- a must-be-zero metric (corrupted pages, data left in the balloon) regresses when any
  candidate trial has it above 0.
- a metric the baseline has and the candidate lacks regresses (a candidate whose probes
  fell back to nothing, or that lost its stage times, is not a pass) unless a threshold
  rule ignores it by name; a metric only the candidate has is noted, not gated.
- input that cannot give an answer (missing run or file, malformed JSON, different
  experiments, no common arms or metrics, too few trials for the test to ever reach
  significance) raises GateInputError: exit 2, distinct from a regression (exit 1).

This module holds the decision; lab/gate/inputs.py reads the two sides,
lab/gate/thresholds.py the limits, lab/gate/result.py renders the answer.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from lab.machine import environment as lab_env
from lab.results import metrics as lab_metrics
from lab.analysis import stats
from lab.gate.inputs import GateInput, GateInputError, spec_differences
from lab.gate.result import Check, GateResult
from lab.gate.thresholds import Limit, Thresholds


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
    if arms and not failed_arm and not any(c.status not in ("missing", "ignored", "duplicate") for c in checks
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
        if lim.mode == "ignore":
            checks.append(Check(arm, m, kind, "ignored", "ignored", message="ignored by threshold rule",
                                unit=_unit(m)))
        elif m not in cand:
            checks.append(Check(arm, m, kind, "regression", lim.describe(kind), n_baseline=len(base[m]),
                                baseline_median=float(np.median(base[m])), unit=_unit(m),
                                message=f"in the baseline ({len(base[m])} trials), missing from the candidate; if it "
                                        f"was removed on purpose, ignore it: --threshold '{m}=ignore'"))
        elif m not in base:
            checks.append(Check(arm, m, kind, "missing", lim.describe(kind), n_candidate=len(cand[m]), unit=_unit(m),
                                message="new in the candidate (absent in the baseline): not gated"))
        elif lab_metrics.better(m) == lab_metrics.ZERO:
            checks.append(_decide_zero(arm, m, kind, base[m], cand[m]))
        elif arm == reference and kind == lab_metrics.TIMING:
            checks.append(Check(arm, m, kind, "ignored", "ignored",
                                message="reference arm in relative mode: other arms are measured against it"))
        else:
            limits[m] = lim
    dups = stats.duplicates([{m: base[m] for m in limits}, {m: cand[m] for m in limits}], all_kinds=True)
    for dup, kept in dups.items():
        if limits[dup] == limits[kept]:  # same samples, same limit: the same verdict, so say it once
            del limits[dup]
            checks.append(Check(arm, dup, lab_metrics.classify(dup), "duplicate", "as " + kept, unit=_unit(dup),
                                message=f"samples identical to {kept}: gated as that one check"))
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


def _unit(metric: str) -> str:
    """The metric's unit as the JSON and JUnit give it ("count" for a plain number)."""
    return lab_metrics.unit(metric) or "count"


def _decide_zero(arm: str, metric: str, kind: str, base: np.ndarray, cand: np.ndarray) -> Check:
    """A must-be-zero metric: any candidate trial above 0 is a regression, whatever the baseline did."""
    bad = int(np.count_nonzero(cand))
    c = Check(arm, metric, kind, "regression" if bad else "pass", "must be 0", n_baseline=len(base),
              n_candidate=len(cand), baseline_median=float(np.median(base)), candidate_median=float(np.median(cand)),
              unit=_unit(metric))
    c.message = (f"must be 0: above 0 in {bad} of {len(cand)} candidate trials (max {float(np.max(cand)):g})" if bad
                 else f"0 in all {len(cand)} candidate trials")
    return c


def _check_from(r: stats.PairResult, lim: Limit) -> Check:
    return Check(arm=r.arm, metric=r.metric, kind=r.kind, status="pass", limit=lim.describe(r.kind, r.metric),
                 n_baseline=r.n_baseline, n_candidate=r.n, baseline_median=r.baseline_median,
                 candidate_median=r.median, ratio=r.ratio, ratio_ci_low=r.ratio_ci_low,
                 ratio_ci_high=r.ratio_ci_high, difference=r.difference, p_value=r.p_value, p_holm=r.p_holm,
                 cliffs_delta=r.cliffs_delta, unit=_unit(r.metric))


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
    higher_better = lab_metrics.better(r.metric) == lab_metrics.HIGHER
    # how much worse the candidate is, as a fraction, in the metric's own direction
    worse = (1.0 / r.ratio - 1.0 if r.ratio > 0 else float("inf")) if higher_better else r.ratio - 1.0
    practical = higher_better or r.difference >= floor      # the floor is for timings, lower-better
    if significant and worse > lim.value and practical:
        c.status = "regression"
    elif significant and worse > lim.value:
        c.message += f"; below the {fmt(floor)} floor of practical significance"
    elif significant and -worse > lim.value:
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
