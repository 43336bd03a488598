"""The paired decision of `balloon-lab ab`: per metric, on per-round ratios candidate/base.

Round r ran the base and the candidate back to back (order alternating), so the ratio
of the two is free of the drift that makes separate runs incomparable here. For one
metric of one arm, with n rounds:

- the estimate is the median of the per-round ratios, with a 95 % bootstrap CI;
- p is the two-sided Wilcoxon signed-rank test of the log ratios against 0 (exact
  for small n): is the candidate consistently above or below the base?
- the minimum detectable effect (MDE) is the smallest change this test would find
  with 80 % power at this n and the spread seen (normal approximation of the signed-
  rank test, efficiency 3/pi), infinite when n rounds can never reach p < alpha.

The verdict needs both a significant p and an effect of at least `min_effect` in the
metric's worse direction (Firecracker's ab_test does the same: p alone flags 0.5 %
shifts, an effect alone flags noise):

  regression   p < alpha and worse by more than min_effect
  improvement  p < alpha and better by more than min_effect
  same         p < alpha but the change is smaller than min_effect, or p >= alpha and
               the estimate is not worse than min_effect (the MDE says what such a
               "same" could have missed)
  unclear      p >= alpha and the estimate worse than min_effect: it looks like a
               regression without proof (Chromium Pinpoint's "unknown": more rounds
               before a verdict)

docs/STATISTICS.md explains it for users.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats as sst

from lab.stats import median_ci

ALPHA = 0.01
MIN_EFFECT = 0.05
POWER = 0.80
LOWER, HIGHER = "lower", "higher"     # which way is better (the catalogue's direction)
VERDICTS = ("regression", "unclear", "improvement", "same")


@dataclass
class PairedResult:
    """One metric of one arm, decided on its per-round ratios."""

    arm: str
    metric: str
    unit: str
    better: str                  # lower | higher
    n: int                       # rounds (pairs)
    base_median: float
    candidate_median: float
    ratio: float                 # median of candidate/base per round
    ci_low: float | None
    ci_high: float | None
    p: float | None
    mde: float                   # relative, e.g. 0.07; inf when n cannot reach alpha
    min_effect: float
    verdict: str
    why: str
    base_values: list[float] = field(default_factory=list, repr=False)        # per pair, in pair order
    candidate_values: list[float] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mde"] = None if math.isinf(self.mde) else self.mde
        return d


def min_signed_rank_p(n: int) -> float:
    """Smallest two-sided p the exact signed-rank test can give on n pairs: 2 / 2**n."""
    return 1.0 if n < 1 else min(1.0, 2.0 / 2.0 ** n)


def signed_rank_p(log_ratios: np.ndarray) -> float | None:
    """Two-sided Wilcoxon signed-rank p of the log ratios against 0 (None below 2 pairs;
    1 when every pair is equal: no evidence of a change)."""
    d = np.asarray(log_ratios, dtype=float)
    if d.size < 2:
        return None
    if not np.any(d):
        return 1.0
    res = sst.wilcoxon(d, zero_method="zsplit", alternative="two-sided",
                       method="exact" if d.size <= 50 and np.all(d) else "approx")
    return float(res.pvalue)


def minimum_detectable_effect(log_ratios: np.ndarray, alpha: float = ALPHA, power: float = POWER) -> float:
    """The relative change the signed-rank test finds with `power` at this n and spread
    (robust spread: 1.4826 x MAD of the log ratios, so one outlier does not hide it)."""
    d = np.asarray(log_ratios, dtype=float)
    n = d.size
    if n < 2 or min_signed_rank_p(n) >= alpha:
        return math.inf
    spread = 1.4826 * float(np.median(np.abs(d - np.median(d))))
    spread = max(spread, float(np.std(d, ddof=1)) * 0.5)   # a MAD of 0 with real spread is luck
    z = sst.norm.ppf(1 - alpha / 2) + sst.norm.ppf(power)
    return math.expm1(z * spread * math.sqrt(math.pi / 3) / math.sqrt(n))


def decide(arm: str, metric: str, unit: str, better: str, base: np.ndarray, candidate: np.ndarray, *,
           alpha: float = ALPHA, min_effect: float = MIN_EFFECT) -> PairedResult:
    """The verdict of one metric from its per-round values (base[i] and candidate[i] from round i)."""
    b, c = np.asarray(base, dtype=float), np.asarray(candidate, dtype=float)
    if b.shape != c.shape or b.size == 0:
        raise ValueError(f"{arm} {metric}: {b.size} base and {c.size} candidate rounds do not pair")
    if np.any(b <= 0) or np.any(c <= 0):
        raise ValueError(f"{arm} {metric}: a ratio needs positive values (got a value <= 0)")
    ratios = c / b
    logs = np.log(ratios)
    ratio, lo, hi = median_ci(ratios)
    p = signed_rank_p(logs)
    mde = minimum_detectable_effect(logs, alpha)
    # worse > 0 means the candidate is worse by that fraction, whichever way is better
    worse = ratio - 1.0 if better == LOWER else 1.0 / ratio - 1.0
    significant = p is not None and p < alpha
    if significant and worse > min_effect:
        verdict, why = "regression", f"worse by {worse:.1%} (> {min_effect:.0%}), p = {p:.2g} < {alpha:g}"
    elif significant and -worse > min_effect:
        verdict, why = "improvement", f"better by {-worse:.1%} (> {min_effect:.0%}), p = {p:.2g} < {alpha:g}"
    elif significant:
        verdict, why = "same", f"changed by {abs(worse):.1%}, less than the {min_effect:.0%} minimum effect"
    elif worse > min_effect:
        verdict, why = "unclear", f"looks {worse:.1%} worse but p = {_p(p)} >= {alpha:g}"
    else:
        seen = "no change could reach p < alpha" if math.isinf(mde) else f"it would have seen {mde:.1%}"
        verdict, why = "same", f"no significant change (p = {_p(p)}); {seen} at n = {b.size}"
    return PairedResult(arm=arm, metric=metric, unit=unit, better=better, n=int(b.size),
                        base_median=float(np.median(b)), candidate_median=float(np.median(c)),
                        ratio=ratio, ci_low=lo, ci_high=hi, p=p, mde=mde, min_effect=min_effect,
                        verdict=verdict, why=why, base_values=b.tolist(), candidate_values=c.tolist())


def _p(p: float | None) -> str:
    return "-" if p is None else f"{p:.2g}"
