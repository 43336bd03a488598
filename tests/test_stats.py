"""Statistics on real numbers drawn from known distributions with fixed seeds."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lab.analysis import stats


def lognormal(rng, median, n, sigma=0.15):
    return rng.lognormal(math.log(median), sigma, n)


def test_two_times_slower_arm_is_detected():
    rng = np.random.default_rng(1)
    table = {"pfn": {"inflate.stages_ns.total": lognormal(rng, 1e9, 12)},
             "bitmap": {"inflate.stages_ns.total": lognormal(rng, 2e9, 12)}}
    comp = stats.compare_arms(table, "pfn")
    (pr,) = comp.pairs
    assert pr.p_value < 0.01 and pr.p_holm < 0.01
    assert pr.verdict == "slower"
    assert 1.7 < pr.ratio < 2.3
    assert pr.ratio_ci_low < pr.ratio < pr.ratio_ci_high and pr.ratio_ci_low > 1.5
    assert pr.cliffs_delta > 0.9 and pr.cles < 0.05  # other arm almost never beats the baseline


def test_identical_distributions_show_no_difference():
    rng = np.random.default_rng(2)
    table = {a: {"wall_ns": lognormal(rng, 5e8, 15), "inflate.stages_ns.discard": lognormal(rng, 1e8, 15)}
             for a in ("pfn", "chunks")}
    comp = stats.compare_arms(table, "pfn")
    assert all(p.verdict == "no difference" for p in comp.pairs)
    assert all(p.ratio_ci_low < 1 < p.ratio_ci_high for p in comp.pairs)


def test_holm_matches_hand_computation():
    p = [0.01, 0.04, 0.03, 0.005, None]
    # sorted: 0.005 (x4) = 0.02, 0.01 (x3) = 0.03, 0.03 (x2) = 0.06, 0.04 (x1) = 0.04 -> max(0.06, 0.04) = 0.06
    assert stats.holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02, None])
    assert stats.holm([0.4, 0.3]) == pytest.approx([0.6, 0.6])  # 0.3 x 2 = 0.6; 0.4 x 1 kept monotone
    assert stats.holm([0.9, 0.8]) == [1.0, 1.0]  # capped at 1
    assert stats.holm([0.6, 0.7, 0.8]) == [1.0, 1.0, 1.0]


def test_holm_is_applied_across_the_metrics_of_a_pair():
    rng = np.random.default_rng(3)
    names = [f"stages_ns.inflate.{s}" for s in ("alloc", "encode", "transmit", "translate", "discard")]
    base = {m: lognormal(rng, 100, 10) for m in names}
    other = {m: lognormal(rng, 100 * (1.5 if i == 0 else 1.0), 10) for i, m in enumerate(names)}
    pairs = stats.compare_samples(base, other, baseline_label="a", label="b")
    raw = [p.p_value for p in pairs]
    assert [p.p_holm for p in pairs] == pytest.approx(stats.holm(raw))


def test_bootstrap_ci_covers_the_true_median():
    # lognormal(mu, sigma) has median exp(mu); the 95 % CI should cover it in ~95 % of samples
    rng = np.random.default_rng(4)
    true_median = 250.0
    covered = 0
    for _ in range(60):
        x = lognormal(rng, true_median, 25, sigma=0.3)
        med, lo, hi = stats.median_ci(x, n_resamples=2000)
        assert lo <= med <= hi
        covered += lo <= true_median <= hi
    assert covered >= 52  # 60 * 0.95 = 57 expected; binomial lower tail well above 52


def test_bootstrap_is_reproducible():
    x = np.random.default_rng(5).normal(10, 2, 20)
    assert stats.median_ci(x) == stats.median_ci(x)


def test_small_samples_and_zero_variance_are_graceful():
    assert stats.median_ci([]) == (pytest.approx(math.nan, nan_ok=True), None, None)
    assert stats.median_ci([7.0]) == (7.0, None, None)
    assert stats.median_ci([7.0, 9.0]) == (8.0, None, None)
    assert stats.median_ci([5.0] * 10) == (5.0, 5.0, 5.0)
    assert stats.ratio_ci([5.0] * 4, [10.0] * 4) == (2.0, 2.0, 2.0)
    p, d, cles = stats.mann_whitney([5.0] * 5, [5.0] * 5)
    assert p == 1.0 and d == 0.0 and cles == 0.5
    p, d, _ = stats.mann_whitney([1.0], [2.0])
    assert p is None and d == 1.0
    comp = stats.compare_arms({"a": {"wall_ns": np.array([1.0, 2.0])}, "b": {"wall_ns": np.array([3.0, 4.0])}}, "a")
    (pr,) = comp.pairs
    assert pr.ratio_ci_low is None and pr.ratio == pytest.approx(3.5 / 1.5)
    assert comp.notes and "fewer than 3" in comp.notes[0]


def test_zero_baseline_median_gives_infinite_ratio_not_a_crash():
    r, lo, hi = stats.ratio_ci([0.0, 0.0, 0.0], [1.0, 2.0, 3.0])
    assert r == math.inf and lo is None and hi is None


def test_counters_are_compared_exactly():
    table = {"pfn": {"probes.madvise_calls": np.full(5, 131072.0), "inflate.discard_calls": np.full(5, 512.0)},
             "bitmap": {"probes.madvise_calls": np.full(5, 37.0), "inflate.discard_calls": np.full(5, 512.0)}}
    comp = stats.compare_arms(table, "pfn")
    calls = comp.pair("bitmap", "probes.madvise_calls")
    assert calls.exact and calls.p_value is None and calls.verdict == "fewer"
    assert calls.difference == 37 - 131072 and calls.ratio == pytest.approx(37 / 131072)
    assert comp.pair("bitmap", "inflate.discard_calls").verdict == "equal"


def test_cliffs_delta_and_cles_by_hand():
    base, other = [1.0, 2.0, 3.0], [2.0, 4.0, 5.0]
    # pairs (o, b): o > b in 7 of 9, one tie (2, 2), one below (2 vs 3)
    _, d, cles = stats.mann_whitney(base, other)
    assert d == pytest.approx((7 - 1) / 9)
    assert cles == pytest.approx((1 + 0.5) / 9)


def test_min_mann_whitney_p_is_the_exact_floor():
    from scipy.stats import mannwhitneyu
    for n in (3, 4, 6):
        x, y = np.arange(n, dtype=float), np.arange(n, dtype=float) + 100
        assert mannwhitneyu(x, y, method="exact").pvalue == pytest.approx(stats.min_mann_whitney_p(n, n))


def test_comparison_json_round_trip_and_rendering():
    rng = np.random.default_rng(6)
    table = {"pfn": {"inflate.stages_ns.total": lognormal(rng, 4e9, 8), "pages": np.full(8, 1835008.0),
                     "rss_bytes.vmm": lognormal(rng, 2 << 30, 8)},
             "bitmap": {"inflate.stages_ns.total": lognormal(rng, 6e8, 8), "pages": np.full(8, 1835008.0),
                        "rss_bytes.vmm": lognormal(rng, 2 << 30, 8)}}
    comp = stats.compare_arms(table, "pfn")
    back = stats.Comparison.from_dict(json.loads(comp.to_json()))
    assert back.to_dict() == json.loads(comp.to_json())
    text = stats.render_table(comp)
    lines = text.splitlines()
    # wider than 120 columns: the metric goes on a line of its own above its arms' rows
    assert lines[0] == "metric" and max(map(len, lines)) <= 120
    head, rule = lines[1][2:], lines[2][2:]
    # every column of dashes starts exactly where its header starts (headers may hold single
    # spaces, "p (Holm)"; columns are two spaces apart)
    starts = [i for i, ch in enumerate(rule) if ch == "-" and (i == 0 or rule[i - 1] == " ")]
    heads = [i for i, ch in enumerate(head) if ch != " " and (i == 0 or head[max(0, i - 2):i] == "  ")]
    assert starts == heads and len(starts) == 7, (starts, heads)
    assert [head[i:].split("  ")[0].strip() for i in heads][:2] == ["arm", "n"]
    row = next(line for line in lines if "bitmap" in line and "faster" in line)
    assert " s " in row or " ms " in row
    assert "faster" in text and "equal" in text and "GiB" in text
    hidden = stats.render_table(comp, differing_only=True)
    assert "pages" not in hidden
    assert "pages" not in stats.render_table(comp, metrics=["inflate.*"])


def test_scipy_floor_in_pyproject_has_the_bootstrap_api_the_code_calls():
    """pyproject's scipy floor must be a version whose bootstrap takes rng= (1.15): an
    older floor installs a scipy on which every CI crashes with a TypeError."""
    import inspect
    import re
    import tomllib
    from pathlib import Path

    import scipy.stats

    deps = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    floor = next(re.fullmatch(r"scipy>=(\d+)\.(\d+).*", d.replace(" ", "")) for d in deps if d.startswith("scipy"))
    assert floor is not None and (int(floor[1]), int(floor[2])) >= (1, 15), deps
    assert "rng" in inspect.signature(scipy.stats.bootstrap).parameters
    assert "rng=_rng(seed)" in inspect.getsource(stats.median_ci)     # what the floor is for


def test_a_huge_ratio_prints_without_meaningless_decimals():
    """CI on 6323aad: a probe figure 580x its baseline printed '580.000' (read as a tiny ratio's '0.000')."""
    from lab.analysis.stats import _fmt_ratio
    assert _fmt_ratio(580.0) == "580" and _fmt_ratio(123456.0) == "123 456"
    assert _fmt_ratio(99.5) == "99.500" and _fmt_ratio(1.2345) == "1.234"
