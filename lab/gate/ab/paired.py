"""The paired decision of `balloon-lab ab`: per metric, on per-round ratios candidate/base.

Round r ran the base and the candidate side by side (their cycles in turn, or their
trials back to back), so the ratio of the two is free of the drift that makes separate
runs incomparable here. One round gives one ratio: the median of its cycles' ratios.
The round, not the cycle, is the unit: the two processes of a round can differ by a
few per cent for the whole round (where their memory landed, which CPU they shared),
so cycles of one round are not independent samples; rounds are. For one metric of one
arm, with n rounds:

- the estimate is the median of the per-round ratios, with a 95 % bootstrap CI;
- p is the one-sided Wilcoxon signed-rank test of the log ratios (exact for small n),
  in the direction the estimate points: is the candidate consistently worse (or
  better) than the base? n rounds can reach p = 1/2**n, so a verdict needs n >= 7 alone,
  n >= 10 among nine timings (Holm, below);
- the minimum detectable effect (MDE) is the smallest change this test finds with
  80 % power at this n and the spread seen (normal approximation of the signed-rank
  test, efficiency 3/pi); infinite while n rounds cannot reach p < alpha.

A run gates several timings at once (3 arms x 3 metrics by default), and any one of
them fails it: the verdict therefore uses p after **Holm's correction over every timing
of the run** (`holm_decide`), which keeps the chance that identical code fails on any
timing below alpha. Without it each timing had its own 1 % chance and nine of them
about 5 %: 1 false alarm in 13 A/A runs at CI's size (chunks 1.070, p = 0.0065 at
16 rounds, identical code). The MDE is computed at alpha / checks (Holm's first step).

The verdict needs both a significant p and an effect of at least `min_effect` in the
metric's worse direction (Firecracker's ab_test does the same: p alone flags 0.5 %
shifts, an effect alone flags noise):

  regression   worse by more than min_effect, p < alpha
  improvement  better by more than min_effect, p < alpha
  same         a significant change smaller than min_effect, or no significant change
               and an estimate not worse than min_effect (the MDE says what such a
               "same" could have missed)
  unclear      worse by more than min_effect, p >= alpha: it looks like a regression
               without proof (Chromium Pinpoint's "unknown": more rounds, then a verdict);
               or too few rounds for any p < alpha

docs/STATISTICS.md explains it for users.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from lab.analysis.stats import holm, median_ci, scipy_stats

ALPHA = 0.01
MIN_EFFECT = 0.05
POWER = 0.80
LOWER, HIGHER = "lower", "higher"     # which way is better (the catalogue's direction)


@dataclass
class PairedResult:
    """One metric of one arm, decided on its per-round ratios."""

    arm: str
    metric: str
    unit: str
    better: str                  # lower | higher
    n: int                       # rounds
    pairs: int                   # cycle pairs in them
    base_median: float
    candidate_median: float
    ratio: float                 # median of the per-round ratios candidate/base
    ci_low: float | None
    ci_high: float | None
    p: float | None              # one-sided, in the direction of the estimate
    p_holm: float | None         # p after Holm over the run's `checks` timings: what the verdict uses
    checks: int                  # timings gated in the run (Holm's family)
    mde: float                   # relative, e.g. 0.07; inf while n cannot reach alpha
    min_effect: float
    verdict: str
    why: str
    round_ratios: list[float] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mde"] = None if math.isinf(self.mde) else self.mde
        return d


def min_signed_rank_p(n: int) -> float:
    """Smallest one-sided p the exact signed-rank test can give on n pairs: 1 / 2**n."""
    return 1.0 if n < 1 else 0.5 ** n


def signed_rank_p(log_ratios: np.ndarray, alternative: str) -> float | None:
    """One-sided Wilcoxon signed-rank p of the log ratios ("greater": above 0); None
    below 2 rounds, 1 when every ratio is 1 (no evidence of a change)."""
    d = np.asarray(log_ratios, dtype=float)
    if d.size < 2:
        return None
    if not np.any(d):
        return 1.0
    exact = d.size <= 50 and np.all(d) and np.unique(np.abs(d)).size == d.size
    res = scipy_stats().wilcoxon(d, zero_method="zsplit", alternative=alternative, method="exact" if exact else "approx")
    return float(res.pvalue)


def directional_p(round_ratios: np.ndarray) -> float | None:
    """The one-sided signed-rank p in the direction the estimate (median ratio) points."""
    ratios = np.asarray(round_ratios, dtype=float)
    return signed_rank_p(np.log(ratios), "greater" if float(np.median(ratios)) > 1.0 else "less")


def minimum_detectable_effect(log_ratios: np.ndarray, alpha: float = ALPHA, power: float = POWER) -> float:
    """The relative change the one-sided signed-rank test finds with `power` at this n
    and spread (robust spread: 1.4826 x MAD of the log ratios, not below half the
    standard deviation, so one outlier neither hides nor makes the spread)."""
    d = np.asarray(log_ratios, dtype=float)
    n = d.size
    if n < 2 or min_signed_rank_p(n) >= alpha:
        return math.inf
    spread = max(1.4826 * float(np.median(np.abs(d - np.median(d)))), 0.5 * float(np.std(d, ddof=1)))
    z = scipy_stats().norm.ppf(1 - alpha) + scipy_stats().norm.ppf(power)
    return math.expm1(z * spread * math.sqrt(math.pi / 3) / math.sqrt(n))


def decide(arm: str, metric: str, unit: str, better: str, round_ratios: np.ndarray, *, pairs: int,
           base_median: float, candidate_median: float, alpha: float = ALPHA,
           min_effect: float = MIN_EFFECT, p: float | None = None, p_holm: float | None = None,
           checks: int = 1) -> PairedResult:
    """The verdict of one metric from its per-round ratios candidate/base. `p` is its
    directional p when the caller has it already (holm_decide), `p_holm` that p after
    Holm over the run's `checks` timings; alone (checks = 1) it is the metric's own p."""
    ratios = np.asarray(round_ratios, dtype=float)
    if ratios.size == 0 or np.any(ratios <= 0) or not np.all(np.isfinite(ratios)):
        raise ValueError(f"{arm} {metric}: per-round ratios must be positive numbers")
    logs = np.log(ratios)
    ratio, lo, hi = median_ci(ratios)
    worse = ratio - 1.0 if better == LOWER else 1.0 / ratio - 1.0     # > 0: the candidate is worse
    if p is None:
        p = directional_p(ratios)
    if checks == 1:
        p_holm = p
    mde = minimum_detectable_effect(logs, alpha / checks)
    significant = p_holm is not None and p_holm < alpha
    n = ratios.size
    shown = f"p = {_p(p)}" if checks == 1 else f"Holm p = {_p(p_holm)}"
    if significant and worse > min_effect:
        verdict, why = "regression", f"worse by {worse:.1%} (> {min_effect:.0%}), {shown} < {alpha:g}"
    elif significant and -worse > min_effect:
        verdict, why = "improvement", f"better by {-worse:.1%} (> {min_effect:.0%}), {shown} < {alpha:g}"
    elif significant:
        verdict, why = "same", f"changed by {abs(worse):.1%}, less than the {min_effect:.0%} minimum effect"
    elif math.isinf(mde):
        need = _rounds_needed(alpha / checks)
        verdict, why = "unclear", (f"{n} round(s) cannot reach p < {alpha:g}"
                                   + (f" over {checks} timings" if checks > 1 else "") + f" (it takes {need})")
    elif worse > min_effect:
        verdict, why = "unclear", f"looks {worse:.1%} worse but {shown} >= {alpha:g} at n = {n}"
    else:
        verdict, why = "same", (f"no significant change ({shown}); a change of {mde:.1%} would have been "
                                f"seen (80 %) at n = {n}")
    return PairedResult(arm=arm, metric=metric, unit=unit, better=better, n=int(n), pairs=pairs,
                        base_median=base_median, candidate_median=candidate_median, ratio=ratio, ci_low=lo,
                        ci_high=hi, p=p, p_holm=p_holm, checks=checks, mde=mde, min_effect=min_effect,
                        verdict=verdict, why=why, round_ratios=ratios.tolist())


@dataclass(frozen=True)
class Timing:
    """One gated timing of one arm, ready to decide: its per-round ratios and medians."""

    arm: str
    metric: str
    unit: str
    better: str
    round_ratios: np.ndarray
    pairs: int
    base_median: float
    candidate_median: float
    min_effect: float


def holm_decide(timings: list[Timing], alpha: float = ALPHA) -> list[PairedResult]:
    """Every timing of a run decided together: each p Holm-adjusted over all of them, so
    the run's chance of failing identical code on any timing stays below alpha."""
    ps = [directional_p(t.round_ratios) for t in timings]
    return [decide(t.arm, t.metric, t.unit, t.better, t.round_ratios, pairs=t.pairs, base_median=t.base_median,
                   candidate_median=t.candidate_median, alpha=alpha, min_effect=t.min_effect, p=p, p_holm=ph,
                   checks=len(timings))
            for t, p, ph in zip(timings, ps, holm(ps))]


def round_ratio(base: np.ndarray, candidate: np.ndarray) -> float:
    """One round's ratio: the median of its cycles' ratios candidate/base (cycle k of
    one side against cycle k of the other, which ran seconds apart)."""
    return float(np.median(np.asarray(candidate, dtype=float) / np.asarray(base, dtype=float)))


def _rounds_needed(alpha: float) -> int:
    return next(n for n in range(1, 64) if min_signed_rank_p(n) < alpha)


def _p(p: float | None) -> str:
    return "-" if p is None else f"{p:.2g}"
