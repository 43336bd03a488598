"""Statistics that turn repeated trials into defensible comparisons (scipy).

Per arm and metric: the median with a bootstrap 95 % CI. Per pair (baseline arm vs
another arm): ratio of medians with a two-sample bootstrap CI, the Mann-Whitney U
two-sided p-value, Cliff's delta and the common-language effect size, and Holm's
correction across the metrics of the pair (many metrics are tested at once; without
the correction some would look "significant" by chance). Medians and rank tests
because timing distributions are skewed by interrupts and page-cache state; nothing
here assumes normality.

Exact counters (kind "counter", see lab/results/metrics.py) are compared exactly: equal or
not, difference, ratio; no p-value, since a protocol that makes one more syscall
per page is a fact, not a probability.

Bootstraps use a fixed seed, so the same data always give the same CIs.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from fmt.numbers import sig
from fmt.columns import format_columns
from lab.results import metrics as lab_metrics


def scipy_stats() -> Any:
    """scipy.stats, imported on first use: it takes ~0.5 s, and most commands that import
    this module (`run`, every `ab` trial) print a table and compute no statistic."""
    from scipy import stats
    return stats


ALPHA = 0.05
CONFIDENCE = 0.95
N_RESAMPLES = 9999
SEED = 20160527  # fixed: CIs are reproducible from the stored samples
MIN_BOOTSTRAP_N = 3  # below this a bootstrap CI says nothing; it is reported as absent

Table = Mapping[str, Mapping[str, np.ndarray]]  # {arm: {metric: samples}}


# --- building blocks --------------------------------------------------------------
def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def median_ci(x: Sequence[float], *, confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES,
              seed: int = SEED) -> tuple[float, float | None, float | None]:
    """(median, CI low, CI high) by percentile bootstrap. With fewer than 3 samples
    the CI is None; with zero spread it is the value itself."""
    x = np.asarray(x, dtype=float)
    if x.size == 0:
        return math.nan, None, None
    med = float(np.median(x))
    if x.size < MIN_BOOTSTRAP_N:
        return med, None, None
    if np.ptp(x) == 0:
        return med, med, med
    res = scipy_stats().bootstrap((x,), np.median, vectorized=True, axis=-1, method="percentile",
                        n_resamples=n_resamples, confidence_level=confidence, rng=_rng(seed))
    return med, float(res.confidence_interval.low), float(res.confidence_interval.high)


def ratio_of_medians(base: np.ndarray, other: np.ndarray) -> float:
    """median(other) / median(base); inf when only the baseline median is 0, 1 when both are."""
    mb, mo = float(np.median(base)), float(np.median(other))
    if mb == 0:
        return 1.0 if mo == 0 else math.copysign(math.inf, mo)
    return mo / mb


def ratio_ci(base: Sequence[float], other: Sequence[float], *, confidence: float = CONFIDENCE,
             n_resamples: int = N_RESAMPLES, seed: int = SEED) -> tuple[float, float | None, float | None]:
    """(ratio of medians, CI low, CI high): both samples resampled independently."""
    b, o = np.asarray(base, dtype=float), np.asarray(other, dtype=float)
    ratio = ratio_of_medians(b, o)
    if b.size < MIN_BOOTSTRAP_N or o.size < MIN_BOOTSTRAP_N or not math.isfinite(ratio):
        return ratio, None, None
    if np.ptp(b) == 0 and np.ptp(o) == 0:
        return ratio, ratio, ratio
    if np.any(b == 0):
        # resamples with a zero baseline median have no ratio; say so rather than guess
        return ratio, None, None

    def stat(bb: np.ndarray, oo: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.median(oo, axis=axis) / np.median(bb, axis=axis)

    res = scipy_stats().bootstrap((b, o), stat, vectorized=True, axis=-1, paired=False, method="percentile",
                        n_resamples=n_resamples, confidence_level=confidence, rng=_rng(seed))
    return ratio, float(res.confidence_interval.low), float(res.confidence_interval.high)


def mann_whitney(base: Sequence[float], other: Sequence[float]) -> tuple[float | None, float | None, float | None]:
    """(two-sided p, Cliff's delta, common-language effect size) of `other` against `base`.

    Cliff's delta = P(other > base) - P(other < base), in [-1, 1]: +1 means every trial
    of `other` is above every baseline trial (slower, for a timing).
    CLES = P(other < base) + P(tie)/2: the chance that a random trial of `other` beats
    (is lower than) a random baseline trial; 0.5 means no tendency either way.
    """
    b, o = np.asarray(base, dtype=float), np.asarray(other, dtype=float)
    if b.size == 0 or o.size == 0:
        return None, None, None
    res = scipy_stats().mannwhitneyu(o, b, alternative="two-sided", method="auto")
    u_other = float(res.statistic)  # pairs with other > base, ties counting one half
    frac_above = u_other / (b.size * o.size)
    delta = 2.0 * frac_above - 1.0
    cles = 1.0 - frac_above
    p = float(res.pvalue)
    if math.isnan(p):  # every value tied across both samples: no evidence of a difference
        p = 1.0
    if b.size < 2 or o.size < 2:
        p = None  # a rank test on a single trial is meaningless
    return p, delta, cles


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values (None entries skipped and kept as None).

    Sorted ascending, p_(i) becomes max over j <= i of min(1, (m - j + 1) * p_(j)),
    which controls the family-wise error rate at alpha without assuming independence.
    """
    idx = [i for i, p in enumerate(pvalues) if p is not None]
    m = len(idx)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * float(pvalues[i])))
        out[i] = running
    return out


def min_mann_whitney_p(n1: int, n2: int) -> float:
    """Smallest two-sided p the exact Mann-Whitney test can give for these sizes
    (complete separation): 2 / C(n1+n2, n1). The gate uses it to refuse runs too
    small to ever show a regression."""
    if n1 < 1 or n2 < 1:
        return 1.0
    return min(1.0, 2.0 / math.comb(n1 + n2, n1))


def trials_needed(alpha: float = ALPHA, family: int = 1) -> int:
    """Trials per arm Mann-Whitney needs before any difference can reach p < alpha after
    Holm over `family` tests (complete separation): what "too few trials" asks for."""
    return next(k for k in range(2, 10_000) if min_mann_whitney_p(k, k) < alpha / max(1, family))


# --- results ----------------------------------------------------------------------
@dataclass
class Summary:
    """One metric of one arm."""

    metric: str
    kind: str
    arm: str
    n: int
    median: float
    ci_low: float | None
    ci_high: float | None
    min: float
    max: float


@dataclass
class PairResult:
    """One metric, one arm against the baseline arm (or a candidate run against a baseline run)."""

    metric: str
    kind: str
    baseline_arm: str
    arm: str
    n_baseline: int
    n: int
    baseline_median: float
    median: float
    ratio: float
    ratio_ci_low: float | None
    ratio_ci_high: float | None
    difference: float
    p_value: float | None = None  # statistical kinds only
    p_holm: float | None = None
    cliffs_delta: float | None = None
    cles: float | None = None
    varies: bool = False  # a counter whose value differs between trials of one arm
    verdict: str = ""
    trials_needed: int | None = None  # with verdict "too few trials": per arm, for any p < alpha after Holm

    @property
    def exact(self) -> bool:
        return not lab_metrics.is_statistical(self.kind)


@dataclass
class Comparison:
    baseline_arm: str
    arms: list[str]
    metrics: list[str]
    alpha: float
    confidence: float
    n_resamples: int
    seed: int
    summaries: list[Summary]
    pairs: list[PairResult]
    notes: list[str] = field(default_factory=list)
    folded: dict[str, str] = field(default_factory=dict)  # duplicate metric -> the metric kept

    @cached_property
    def _index(self) -> dict[tuple[str, str, str], Any]:
        idx: dict[tuple[str, str, str], Any] = {("s", s.arm, s.metric): s for s in self.summaries}
        idx.update({("p", p.arm, p.metric): p for p in self.pairs})
        return idx

    def summary(self, arm: str, metric: str) -> Summary | None:
        """One arm's summary of a metric (a folded duplicate resolves to the metric kept)."""
        return self._index.get(("s", arm, self.folded.get(metric, metric)))

    def pair(self, arm: str, metric: str) -> PairResult | None:
        """An arm's comparison with the baseline on a metric (folded names resolve too)."""
        return self._index.get(("p", arm, self.folded.get(metric, metric)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, **kw: Any) -> str:
        from lab.store.store import dumps
        return dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Comparison":
        d = dict(d)
        d["summaries"] = [Summary(**_nan_for_none(s, ("median", "min", "max"))) for s in d["summaries"]]
        d["pairs"] = [PairResult(**_nan_for_none(p, ("baseline_median", "median", "ratio", "difference")))
                      for p in d["pairs"]]
        return cls(**d)


def _nan_for_none(d: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """JSON stores non-finite floats as null; read them back as NaN."""
    d = dict(d)
    for k in keys:
        if d.get(k) is None:
            d[k] = math.nan
    return d


# --- comparisons ------------------------------------------------------------------
def verdict(kind: str, ratio: float, significant: bool | None, *, identical: bool = False,
            underpowered: bool = False) -> str:
    """The word for one comparison. For timings and gauges "too few trials" means no
    difference could have been significant with these sample sizes after Holm
    (so "no difference" would be a claim the data cannot support)."""
    if not lab_metrics.is_statistical(kind):
        if ratio == 1.0:
            return "equal"
        return "more" if ratio > 1.0 else "fewer"
    if identical:
        return "equal"
    if significant is None or (not significant and underpowered):
        return "too few trials"
    if not significant:
        return "no difference"
    if kind == lab_metrics.TIMING:
        return "slower" if ratio > 1.0 else "faster"
    return "higher" if ratio > 1.0 else "lower"


def duplicates(groups: Sequence[Mapping[str, np.ndarray]], *, all_kinds: bool = False) -> dict[str, str]:
    """{metric: the metric it duplicates}: metrics with the same leaf name whose samples
    are identical, value for value, in every group (arm).

    Result objects carry some measurements twice (inflate.stages_ns.total and
    stages_ns.inflate.total); testing both would inflate Holm's family and weaken it
    for nothing. The shallowest (then alphabetically first) name is kept. By default only
    timings and gauges that vary are folded: two different counters are often equal
    (inflate.kicks and deflate.kicks), and folding them would hide one from a table.
    all_kinds=True folds counters and constants too (the gate, where identical samples
    give identical verdicts and listing both only repeats a finding).
    """
    if not groups:
        return {}
    common = set.intersection(*(set(g) for g in groups))
    seen: dict[tuple, str] = {}
    out: dict[str, str] = {}
    for name in sorted(common, key=lambda n: (n.count("."), n)):
        if not all_kinds and not lab_metrics.is_statistical(lab_metrics.classify(name)):
            continue
        arrays = [np.asarray(g[name], dtype=float) for g in groups]
        if not all_kinds and all(a.size == 0 or np.ptp(a) == 0 for a in arrays):
            continue
        key = (name.rsplit(".", 1)[-1], lab_metrics.classify(name), *(a.tobytes() for a in arrays))
        if key in seen:
            out[name] = seen[key]
        else:
            seen[key] = name
    return out


def compare_samples(base: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray], *,
                    baseline_label: str, label: str, metrics: Iterable[str] | None = None,
                    alpha: float = ALPHA, confidence: float = CONFIDENCE,
                    n_resamples: int = N_RESAMPLES, seed: int = SEED) -> list[PairResult]:
    """Compare `other` to `base` on every metric both have (or on `metrics`). Holm's
    correction runs over the timings and gauges of this one comparison that can be
    tested at all (samples that are all one identical value are "equal", untested)."""
    names = sorted(set(base) & set(other)) if metrics is None else [m for m in metrics if m in base and m in other]
    out: list[PairResult] = []
    identical: set[str] = set()
    for name in names:
        kind = lab_metrics.classify(name)
        b, o = np.asarray(base[name], dtype=float), np.asarray(other[name], dtype=float)
        if b.size == 0 or o.size == 0:
            continue
        mb, mo = float(np.median(b)), float(np.median(o))
        r = PairResult(metric=name, kind=kind, baseline_arm=baseline_label, arm=label,
                       n_baseline=int(b.size), n=int(o.size), baseline_median=mb, median=mo,
                       ratio=ratio_of_medians(b, o), ratio_ci_low=None, ratio_ci_high=None,
                       difference=mo - mb)
        if not lab_metrics.is_statistical(kind):
            r.varies = bool(np.ptp(b) > 0 or np.ptp(o) > 0)
        elif np.ptp(b) == 0 and np.ptp(o) == 0 and mb == mo:
            identical.add(name)
            r.ratio_ci_low = r.ratio_ci_high = r.ratio
        else:
            _, r.ratio_ci_low, r.ratio_ci_high = ratio_ci(b, o, confidence=confidence,
                                                          n_resamples=n_resamples, seed=seed)
            r.p_value, r.cliffs_delta, r.cles = mann_whitney(b, o)
        out.append(r)
    family = sum(r.p_value is not None for r in out)
    # the family Holm would correct over once every arm has 2 trials or more
    testable = sum(lab_metrics.is_statistical(r.kind) and r.metric not in identical for r in out)
    for r, ph in zip(out, holm([r.p_value for r in out])):
        r.p_holm = ph
        underpowered = family > 0 and min_mann_whitney_p(r.n_baseline, r.n) >= alpha / family
        r.verdict = verdict(r.kind, r.ratio, None if ph is None else ph < alpha,
                            identical=r.metric in identical, underpowered=underpowered)
        if r.verdict == "too few trials":
            r.trials_needed = trials_needed(alpha, max(family, testable))
    return out


def compare_arms(table: Table, baseline_arm: str, *, alpha: float = ALPHA, confidence: float = CONFIDENCE,
                 n_resamples: int = N_RESAMPLES, seed: int = SEED) -> Comparison:
    """Summaries of every arm and every arm's comparison with `baseline_arm`."""
    if baseline_arm not in table or not table[baseline_arm]:
        raise ValueError(f"baseline arm {baseline_arm!r} has no measured trials "
                         f"(arms with data: {', '.join(a for a in table if table[a]) or 'none'})")
    arms = [a for a in table if table[a]]
    metrics = sorted({m for a in arms for m in table[a]})
    folded = duplicates([table[a] for a in arms])
    summaries = []
    notes = []
    for arm in arms:
        for m in metrics:
            if m in folded or m not in table[arm] or len(table[arm][m]) == 0:
                continue
            x = np.asarray(table[arm][m], dtype=float)
            med, lo, hi = median_ci(x, confidence=confidence, n_resamples=n_resamples, seed=seed)
            summaries.append(Summary(metric=m, kind=lab_metrics.classify(m), arm=arm, n=int(x.size), median=med,
                                     ci_low=lo, ci_high=hi, min=float(x.min()), max=float(x.max())))
    kept = [m for m in metrics if m not in folded]
    pairs: list[PairResult] = []
    for arm in arms:
        if arm == baseline_arm:
            continue
        pairs += compare_samples(table[baseline_arm], table[arm], baseline_label=baseline_arm, label=arm,
                                 metrics=kept, alpha=alpha, confidence=confidence, n_resamples=n_resamples,
                                 seed=seed)
    small = sorted({s.arm for s in summaries if s.n < MIN_BOOTSTRAP_N})
    if small:
        notes.append(f"fewer than {MIN_BOOTSTRAP_N} measured trials in {', '.join(small)}: no CIs there")
    if folded:
        example = next(iter(folded.items()))
        notes.append(f"{len(folded)} metric(s) had samples identical to another and were folded into it "
                     f"(e.g. {example[0]} = {example[1]})")
    weak = [p for p in pairs if p.verdict == "too few trials"]
    if weak:
        need = max(p.trials_needed or 2 for p in weak)
        notes.append(f"too few trials for {', '.join(dict.fromkeys(p.arm for p in weak))}: with Holm over the run's "
                     f"timings and gauges, Mann-Whitney needs at least {need} trials per arm to reach "
                     f"p < {alpha:g}")
    return Comparison(baseline_arm=baseline_arm, arms=arms, metrics=kept, alpha=alpha, confidence=confidence,
                      n_resamples=n_resamples, seed=seed, summaries=summaries, pairs=pairs, notes=notes,
                      folded=folded)


# --- terminal rendering -------------------------------------------------------------
def value_formatter(metric: str, reference: float | Sequence[float | None]):
    """A formatter for one metric's values, with one unit for the whole row group
    (chosen from `reference`, one value or all the row's values) so arms can be
    compared by eye. The lab's one number formatter (fmt/numbers.py) does the work."""
    from fmt.numbers import row_formatter
    refs = list(reference) if isinstance(reference, (list, tuple)) else [reference]
    return row_formatter(lab_metrics.unit(metric), refs)


def verdict_text(pr: PairResult) -> str:
    """A pair's verdict as printed: "too few trials" says how many are needed."""
    if pr.verdict == "too few trials" and pr.trials_needed:
        return f"too few trials (need {pr.trials_needed})"
    return pr.verdict


TINY_RATIO = 0.01   # below it a ratio reads as "N x fewer" (32768 -> 6: "5 461x fewer", not 0.000)


def _fmt_ratio(r: float | None, kind: str | None = None) -> str:
    """A ratio to the baseline: three decimals; a tiny one inverted, in words, when its
    metric's kind is given (CI bounds keep three significant digits instead)."""
    if r is None or math.isnan(r):
        return "-"
    if math.isinf(r):
        return "inf"
    if r == 0:
        return "0"
    if 0 < r < TINY_RATIO:
        if kind is None:
            return sig(r)
        return f"{sig(1 / r)}x {'less' if lab_metrics.is_statistical(kind) else 'fewer'}"
    if r >= 1 / TINY_RATIO:      # a huge one: three decimals say nothing ("580", not "580.000")
        return sig(r)
    return f"{r:.3f}"


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "-"
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"


def _matches(metric: str, patterns: Sequence[str] | None) -> bool:
    return bool(lab_metrics.matching([metric], patterns))


_DIFFERENT = frozenset({"faster", "slower", "higher", "lower"})
UNJUDGED_SHOWN_RATIO = 1.1   # too few trials to judge: shown as differing from 10 % apart (and no overlap)


def differs(comp: Comparison, metric: str) -> bool:
    """Whether an arm differs from the baseline on `metric` (what `show` prints by default):
    an exact counter with another median, a timing or gauge judged different, or, with too
    few trials to judge, one whose trials all lie on one side of the baseline's and whose
    median is at least 10 % away."""
    base = comp.summary(comp.baseline_arm, metric)
    for p in (p for p in comp.pairs if p.metric == metric):
        if p.exact:
            if p.verdict != "equal":
                return True
        elif p.verdict in _DIFFERENT:
            return True
        elif p.verdict == "too few trials" and base is not None:
            s = comp.summary(p.arm, metric)
            apart = not 1 / UNJUDGED_SHOWN_RATIO < p.ratio < UNJUDGED_SHOWN_RATIO
            if s is not None and apart and (s.max < base.min or s.min > base.max):
                return True
    return False


def render_table(comp: Comparison, metrics: Sequence[str] | None = None, *, differing_only: bool = False,
                 shared_units: bool = False) -> str:
    """Aligned plain-text table: metric, arm, n, median [CI], ratio [CI], p (Holm), effect, verdict.

    `metrics` are glob patterns ("stages_ns.inflate.*"); with differing_only, only the
    metrics on which some arm differs from the baseline (`differs`). Each metric's rows get one unit;
    with shared_units every metric of one declared unit shares it (migrate: one CPU
    time unit for the table).
    """
    header = ("metric", "arm", "n", f"median [{comp.confidence:.0%} CI]", "ratio [CI]", "p (Holm)", "effect", "verdict")
    rows: list[tuple[str, ...]] = []
    for m in comp.metrics:
        if not _matches(m, metrics):
            continue
        kind = lab_metrics.classify(m)
        if differing_only and not differs(comp, m):
            continue
        same = (lambda x: lab_metrics.unit(x) == lab_metrics.unit(m) and _matches(x, metrics)) if shared_units \
            else (lambda x: x == m)
        fmt = value_formatter(m, [s.median for s in comp.summaries if same(s.metric)])
        first = True
        for arm in comp.arms:
            s = comp.summary(arm, m)
            if s is None:
                continue
            med = fmt(s.median)
            if s.ci_low is not None and lab_metrics.is_statistical(kind):
                med += f" [{fmt(s.ci_low)}, {fmt(s.ci_high)}]"
            elif s.min != s.max:
                med += f" (range {fmt(s.min)}..{fmt(s.max)})"
            if arm == comp.baseline_arm:
                ratio, p, effect, verdict_ = "1 (baseline)", "", "", "baseline"
            else:
                pr = comp.pair(arm, m)
                if pr is None:
                    ratio, p, effect, verdict_ = "-", "-", "-", "no baseline"
                elif pr.exact:
                    ratio = _fmt_ratio(pr.ratio, pr.kind)
                    p = "exact"
                    effect = "=" if pr.difference == 0 else f"{'+' if pr.difference > 0 else ''}{fmt(pr.difference)}"
                    verdict_ = pr.verdict + (" (varies)" if pr.varies else "")
                else:
                    ratio = _fmt_ratio(pr.ratio, pr.kind)
                    if pr.ratio_ci_low is not None:
                        ratio += f" [{_fmt_ratio(pr.ratio_ci_low)}, {_fmt_ratio(pr.ratio_ci_high)}]"
                    p = _fmt_p(pr.p_holm)
                    effect = "-" if pr.cliffs_delta is None else f"d={pr.cliffs_delta:+.2f}"
                    verdict_ = verdict_text(pr)
            rows.append((m if first else "", arm, str(s.n), med, ratio, p, effect, verdict_))
            first = False
    return format_columns(header, rows, right={2})


def render_summaries(comp: Comparison, metrics: Sequence[str] | None = None) -> str:
    """Per-arm medians with CIs, one row per metric, one column per arm."""
    header = ("metric", "kind", *comp.arms)
    rows = []
    for m in comp.metrics:
        if not _matches(m, metrics):
            continue
        fmt = value_formatter(m, [s.median for s in comp.summaries if s.metric == m])
        cells = []
        for arm in comp.arms:
            s = comp.summary(arm, m)
            if s is None:
                cells.append("-")
            elif s.ci_low is not None and lab_metrics.is_statistical(s.kind):
                cells.append(f"{fmt(s.median)} [{fmt(s.ci_low)}, {fmt(s.ci_high)}]")
            else:
                cells.append(fmt(s.median))
        rows.append((m, lab_metrics.classify(m), *cells))
    return format_columns(header, rows)
