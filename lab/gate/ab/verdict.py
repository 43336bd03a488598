"""The answer of `balloon-lab ab`: every check of every arm, and the verdict with its exit code.

Three kinds of check per arm:
- trials: every candidate trial must run and verify (a failed one is a regression);
- counters: every exact counter (pages, requests, discard calls, runs...) and every
  must-be-zero figure the base reports must be in the candidate's result and equal in
  every pair, unless ignored by name; a counter only the candidate has is noted;
- timings: each gated metric decided on its paired ratios, all of the run's timings
  together (Holm: lab/gate/ab/paired.py).

Verdict: "regression" (exit 1) if any check regressed; else "inconclusive" (exit 3)
if any timing is still unclear after the extra rounds, or an arm had no timing both
sides measure; else "pass" (exit 0).
Unusable input (a side that cannot be prepared, a base that fails) is exit 2 and never
reaches this module.
"""
from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from lab.results import metrics as lab_metrics
from lab.gate.ab.paired import ALPHA, PairedResult, Timing, holm_decide, round_ratio
from lab.gate.ab.rounds import Rounds

EXIT_PASS, EXIT_REGRESSION, EXIT_UNUSABLE, EXIT_INCONCLUSIVE = 0, 1, 2, 3
# CPU times, not wall-clock: on a shared 2-core machine a cycle's wall time can triple
# when a neighbour runs, its CPU time moves by ~10 % (docs/STATISTICS.md). The discard
# stage's own CPU time sees a slower discard path best; the VMM's and the guest's CPU
# time of the whole inflate see the other stages.
DEFAULT_METRICS = ("discard_cpu_ns", "cpu_ns.vmm", "cpu_ns.guest")
# What a default metric falls back to against a side that does not measure it (a base
# older than the CPU times, e.g. 59e0f30): the wall-clock time of the same work.
FALLBACKS = {"discard_cpu_ns": "stages_ns.inflate.discard", "cpu_ns.vmm": "stages_ns.inflate.total",
             "cpu_ns.guest": "stages_ns.inflate.total"}
# Every counter of a trial result was equal across identical code here (A/A, 3 arms x
# 3 rounds x 4 cycles): none is ignored unless the user names it.
DEFAULT_IGNORED: tuple[str, ...] = ()


@dataclass(frozen=True)
class MetricRule:
    """A timing gated by ab, with its minimum effect (a fraction)."""

    name: str
    min_effect: float


@dataclass
class CounterCheck:
    """One exact counter (or must-be-zero figure) of one arm over every pair."""

    arm: str
    metric: str
    status: str          # pass | regression | ignored
    pairs: int
    message: str


@dataclass
class ArmTrials:
    """Did every candidate trial of the arm run and verify?"""

    arm: str
    status: str          # pass | regression
    rounds: int
    pairs: int
    failed: int
    message: str


@dataclass
class ABResult:
    base: Any                        # Side
    candidate: Any                   # Side
    mode: str                        # paced | trials
    cycles: dict[str, int]           # cycles per trial, per arm
    alpha: float
    timings: list[PairedResult]
    counters: list[CounterCheck]
    trials: list[ArmTrials]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    pin_cpu: int | None = None       # both sides' paced cycles ran on this CPU
    raw: Rounds | None = None        # every trial, for --trials-out

    @property
    def regressions(self) -> list[str]:
        out = [f"{t.arm}: {t.message}" for t in self.trials if t.status == "regression"]
        out += [f"{c.arm} {c.metric}: {c.message}" for c in self.counters if c.status == "regression"]
        out += [f"{r.arm} {r.metric}: {r.why}" for r in self.timings if r.verdict == "regression"]
        return out

    @property
    def unclear(self) -> list[PairedResult]:
        return [r for r in self.timings if r.verdict == "unclear"]

    @property
    def ungated(self) -> list[str]:
        """Arms measured in both sides with no timing either side could give."""
        gated = {r.arm for r in self.timings}
        return [t.arm for t in self.trials if t.pairs and t.arm not in gated]

    @property
    def verdict(self) -> str:
        return ("regression" if self.regressions else "inconclusive" if self.unclear or self.ungated
                else "pass")

    @property
    def exit_code(self) -> int:
        return {"regression": EXIT_REGRESSION, "inconclusive": EXIT_INCONCLUSIVE, "pass": EXIT_PASS}[self.verdict]

    def confirmed_arms(self, flagged: Mapping[tuple[str, str], int]) -> set[str]:
        """Arms with a confirmed regression: a timing that is a regression now and was one
        already with fewer of its rounds (`flagged`: the rounds at which each regression
        was first seen, in its current streak). More rounds for such an arm's other
        timings cannot change that it regressed."""
        return {r.arm for r in self.timings if r.verdict == "regression" and flagged.get((r.arm, r.metric), r.n) < r.n}

    def open_arms(self, flagged: Mapping[tuple[str, str], int] | None = None) -> tuple[list[str], list[str]]:
        """Arms whose answer is not final, in two lists: undecided (a timing unclear, no
        regression) and unconfirmed (a regression not yet seen again after more rounds)."""
        confirmed = self.confirmed_arms(flagged or {})
        regressed = {r.arm for r in self.timings if r.verdict == "regression"}
        undecided = {r.arm for r in self.timings if r.verdict == "unclear" and r.arm not in regressed}
        return sorted(undecided), sorted(regressed - confirmed)


def track_flags(result: ABResult, flagged: dict[tuple[str, str], int]) -> None:
    """Keep, per timing, the rounds at which its current streak of regression verdicts began."""
    for r in result.timings:
        if r.verdict == "regression":
            flagged.setdefault((r.arm, r.metric), r.n)
        else:
            flagged.pop((r.arm, r.metric), None)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _round_values(rounds: Rounds, arm: str, metric: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per round with both trials ok: the metric's values per cycle, base and candidate."""
    out = []
    for rnd in rounds.rounds_of(arm):
        b, c = rounds.pair(arm, rnd)
        if b.error or c.error:
            continue
        vals = [(bm[metric], cm[metric]) for bm, cm in zip(b.cycles, c.cycles) if metric in bm and metric in cm]
        if vals:
            out.append(tuple(np.array(vals, dtype=float).T))
    return out


def _pairs(rounds: Rounds, arm: str) -> list[tuple[int, int, dict, dict]]:
    """(round, cycle, base metrics, candidate metrics) of every pair both sides measured."""
    out = []
    for rnd in rounds.rounds_of(arm):
        b, c = rounds.pair(arm, rnd)
        if b.error or c.error:
            continue
        out += [(rnd, k + 1, bm, cm) for k, (bm, cm) in enumerate(zip(b.cycles, c.cycles))]
    return out


def _exact_kind(name: str) -> str | None:
    """"exact" or "zero" for a counter the candidate's catalogue declares, else None."""
    try:
        better = lab_metrics.better(name)
    except lab_metrics.UndeclaredMetric:
        return None
    return better if better in (lab_metrics.EXACT, lab_metrics.ZERO) else None


def check_counters(arm: str, pairs: list[tuple[int, int, dict, dict]], ignored: Sequence[str]) -> list[CounterCheck]:
    """Exact counters equal in every pair, must-be-zero figures 0 in the candidate, and
    nothing the base reports missing from the candidate (unless ignored by name)."""
    checks: dict[str, CounterCheck] = {}
    names = sorted({n for _r, _c, bm, _cm in pairs for n in bm} | {n for *_x, cm in pairs for n in cm})
    for name in names:
        if _matches(name, ignored):
            checks[name] = CounterCheck(arm, name, "ignored", len(pairs), "ignored by name")
            continue
        in_base = [(r, c, bm, cm) for r, c, bm, cm in pairs if name in bm]
        kind = _exact_kind(name)
        if not in_base:
            if kind is not None:
                checks[name] = CounterCheck(arm, name, "ignored", len(pairs), "new in the candidate: not compared")
            continue
        gone = [(r, c) for r, c, _bm, cm in in_base if name not in cm]
        if gone:
            r, c = gone[0]
            checks[name] = CounterCheck(arm, name, "regression", len(in_base),
                                        f"in the base's result, missing from the candidate's ({len(gone)} of "
                                        f"{len(in_base)} pairs, first round {r} cycle {c}); ignore it by name "
                                        "if it was removed on purpose")
            continue
        if kind is None:
            continue
        if kind == lab_metrics.ZERO:
            bad = [(r, c, cm[name]) for r, c, _bm, cm in in_base if cm[name] != 0]
            checks[name] = (CounterCheck(arm, name, "regression", len(in_base),
                                         f"must be 0: {bad[0][2]:g} in round {bad[0][0]} cycle {bad[0][1]} "
                                         f"({len(bad)} of {len(in_base)} pairs)") if bad else
                            CounterCheck(arm, name, "pass", len(in_base), f"0 in all {len(in_base)} pairs"))
            continue
        bad = [(r, c, bm[name], cm[name]) for r, c, bm, cm in in_base if bm[name] != cm[name]]
        if bad:
            r, c, b, v = bad[0]
            checks[name] = CounterCheck(arm, name, "regression", len(in_base),
                                        f"differs in {len(bad)} of {len(in_base)} pairs (round {r} cycle {c}: "
                                        f"{b:g} -> {v:g})")
        else:
            checks[name] = CounterCheck(arm, name, "pass", len(in_base), f"equal in all {len(in_base)} pairs")
    return list(checks.values())


def check_trials(arm: str, rounds: Rounds) -> ArmTrials:
    rs = rounds.rounds_of(arm)
    bad = [rounds.pair(arm, r)[1] for r in rs if rounds.pair(arm, r)[1].error]
    pairs = len(_pairs(rounds, arm))
    if bad:
        return ArmTrials(arm, "regression", len(rs), pairs, len(bad),
                         f"{len(bad)} of {len(rs)} candidate trials failed (round {bad[0].round}: {bad[0].error})")
    return ArmTrials(arm, "pass", len(rs), pairs, 0, f"all {len(rs)} candidate trials ran and verified")


def judge(rounds: Rounds, arms: Sequence[str], rules: Sequence[MetricRule], *, base, candidate, mode: str,
          cycles: dict[str, int], ignored: Sequence[str] = DEFAULT_IGNORED, alpha: float = ALPHA) -> ABResult:
    """Every check of every arm from the trials so far."""
    timings: list[Timing] = []
    counters: list[CounterCheck] = []
    trials: list[ArmTrials] = []
    notes: list[str] = []
    for arm in arms:
        pairs = _pairs(rounds, arm)
        trials.append(check_trials(arm, rounds))
        counters += check_counters(arm, pairs, ignored)
        done: set[str] = set()
        for rule in rules:
            if not pairs:
                continue
            name = rule.name
            per_round = _round_values(rounds, arm, name)
            if not per_round and FALLBACKS.get(name):
                where = "either side" if not any(name in cm for *_x, cm in pairs) else "the base"
                name = FALLBACKS[name]
                per_round = _round_values(rounds, arm, name)
                if per_round and name not in done:
                    notes.append(f"{arm} {rule.name}: not in {where}'s results; gated on {name} (wall-clock) "
                                 "instead")
            if name in done:
                continue
            done.add(name)
            if not per_round:
                where = "either side" if not any(name in cm for *_x, cm in pairs) else "the base"
                notes.append(f"{arm} {name}: not in {where}'s results, not gated")
                continue
            if any(np.any(b <= 0) or np.any(c <= 0) for b, c in per_round):
                notes.append(f"{arm} {name}: a value <= 0, no ratio to gate")
                continue
            b_all = np.concatenate([b for b, _c in per_round])
            c_all = np.concatenate([c for _b, c in per_round])
            timings.append(Timing(arm, name, lab_metrics.unit(name), lab_metrics.better(name),
                                  np.array([round_ratio(b, c) for b, c in per_round]), pairs=int(b_all.size),
                                  base_median=float(np.median(b_all)), candidate_median=float(np.median(c_all)),
                                  min_effect=rule.min_effect))
    return ABResult(base=base, candidate=candidate, mode=mode, cycles=cycles, alpha=alpha,
                    timings=holm_decide(timings, alpha), counters=counters, trials=trials, notes=notes)


def to_dict(result: ABResult) -> dict[str, Any]:
    """The result as JSON-able data; every value with its unit."""
    def timing(r: PairedResult) -> dict[str, Any]:
        d = r.to_dict()
        for k in ("base_median", "candidate_median"):
            d[k] = {"value": d[k], "unit": r.unit or "count"}
        for k in ("ratio", "ci_low", "ci_high"):
            d[k] = {"value": d[k], "unit": "candidate/base"}
        for k in ("mde", "min_effect"):
            d[k] = {"value": d[k], "unit": "fraction"}
        d["round_ratios"] = {"value": d["round_ratios"], "unit": "candidate/base"}
        return d
    return {
        "verdict": result.verdict,
        "exit_code": result.exit_code,
        "base": result.base.to_dict(),
        "candidate": result.candidate.to_dict(),
        "mode": result.mode,
        "cycles_per_trial": result.cycles,
        "pin_cpu": result.pin_cpu,
        "alpha": result.alpha,
        "seconds": {"value": round(result.seconds, 1), "unit": "s"},
        "regressions": result.regressions,
        "trials": [asdict(t) for t in result.trials],
        "timings": [timing(r) for r in result.timings],
        "counters": [asdict(c) for c in result.counters if c.status != "pass"],
        "counters_equal": sum(c.status == "pass" for c in result.counters),
        "notes": result.notes,
    }
