"""The report's sections, each a function ReportData -> Section.

A section that has nothing to show still appears, with one sentence saying why
(probes were off, the run has no deflate, the result carries no round log): a
reviewer must be able to tell "not measured" from "forgotten".
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from lab import environment
from lab import metrics as lab_metrics
from lab import stats
from lab import twins
from reports import charts as report_charts
from lab.backends import is_qemu_arm
from lab.backends.qemu.side_by_side import arm_title
from reports import published as published_figures
from reports.data import MiB, OPS, STAGES, ReportData, finite
from reports.fmt import (esc, fmt_bytes, fmt_ns, fmt_p, fmt_ratio, fmt_value, pct, sig, speed_phrase)
from reports.palette import PUBLISHED_COLOR


@dataclass
class Section:
    id: str
    title: str
    body: str
    charts: list[report_charts.Chart] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # what this section could not show, and why


# --- small HTML helpers ----------------------------------------------------------
def chip(arm: str, colors: Mapping[str, str]) -> str:
    return (f'<span class="arm"><span class="sw" style="background:{colors.get(arm, "#777")}"></span>'
            f'{esc(arm)}</span>')


def note(text: str, cls: str = "note") -> str:
    return f'<p class="{cls}">{text}</p>'


def nodata(text: str) -> str:
    return f'<p class="nodata">{text}</p>'


def figure(chart: report_charts.Chart, caption: str) -> str:
    return (f'<figure class="plot" id="{chart.id}" data-format="{chart.fmt}">{chart.html}'
            f'<figcaption>{caption}</figcaption></figure>')


def scrolling(table_html: str) -> str:
    """A wide table scrolls inside its own box instead of widening the page."""
    return f'<div class="tablewrap">{table_html}</div>'


def table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "", row_cls: Sequence[str] | None = None
          ) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = []
    for i, r in enumerate(rows):
        rc = f' class="{row_cls[i]}"' if row_cls and row_cls[i] else ""
        body.append(f"<tr{rc}>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>")
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'



def vfmt(metric: str) -> Callable[[float | None], str]:
    """A formatter for one metric's values, each value in its own readable unit
    (75.5 ms next to 1.05 s reads better than 0.0755 s next to 1.05 s)."""
    u = lab_metrics.unit(metric)
    return lambda v: fmt_value(v, u)


def _ci(d: ReportData, arm: str, metric: str) -> tuple[float | None, float | None]:
    comp = d.comparison
    s = comp.summary(arm, metric) if comp else None
    if s is not None and s.ci_low is not None:
        return s.ci_low, s.ci_high
    x = d.samples(arm, metric)
    if x is not None and x.size >= stats.MIN_BOOTSTRAP_N:
        _, lo, hi = stats.median_ci(x)
        return lo, hi
    return None, None


def _plain(html_text: str) -> str:
    """Text of an HTML fragment, for terminals (`balloon-lab report` lists what is missing)."""
    import html as _html
    import re as _re
    return _html.unescape(_re.sub(r"<[^>]+>", "", html_text))


def _probes_missing_reason(d: ReportData) -> str:
    if d.run.spec.get("probes") is False:
        return "probes were off for this run (<code>--no-probes</code>)"
    backends = d.probe_backends()
    reasons = d.probe_reasons()
    why = ("; ".join(esc(r) for r in reasons[:3])) if reasons else "no reason recorded"
    if backends and set(backends) == {"none"}:
        return f"probe backend was <code>none</code> in every trial ({why}); <code>balloon-lab doctor</code> says what to fix"
    if not d.arms:
        return "the run has no measured trial"
    return f"no trial recorded this histogram (backends: {esc(backends)}; {why})"


# --- verdict -------------------------------------------------------------------------
def _sureness(pr: stats.PairResult | None, n_a: int, n_b: int, alpha: float) -> tuple[str, str]:
    """(class, sentence) saying how sure the comparison is."""
    if pr is None:
        return "unsure", "no comparison available"
    if pr.verdict == "equal":
        return "unsure", "identical in every trial"
    if pr.p_holm is None:
        return "unsure", f"too few trials to test (n = {n_a} and {n_b})"
    if pr.verdict == "too few trials":
        return "unsure", (f"too few trials to be sure: p(Holm) = {fmt_p(pr.p_holm)} with n = {n_a} and {n_b} "
                          "cannot reach significance")
    if pr.p_holm < alpha:
        d = pr.cliffs_delta
        if d is not None and abs(d) >= 0.999:
            how = (f"every {pr.arm} trial {'beat' if d < 0 else 'lost to'} every {pr.baseline_arm} trial"
                   if pr.kind == lab_metrics.TIMING else "no overlap between the arms' trials")
        elif d is not None:
            how = f"Cliff's δ = {d:+.2f}"
        else:
            how = ""
        return "sure", f"significant: p(Holm) = {fmt_p(pr.p_holm)}" + (f", {how}" if how else "")
    return "unsure", f"not distinguishable: p(Holm) = {fmt_p(pr.p_holm)} ≥ α = {alpha:g}"


def _ratio_ci_text(pr: stats.PairResult | None) -> str:
    if pr is None or pr.ratio_ci_low is None or pr.ratio_ci_high is None:
        return ""
    lo, hi = pr.ratio_ci_low, pr.ratio_ci_high
    if pr.ratio < 1 and lo > 0 and hi > 0:
        return f" (95 % CI {sig(1 / hi)}×–{sig(1 / lo)}×)"
    return f" (ratio 95 % CI {sig(lo)}–{sig(hi)})"


def _told_apart(d: ReportData, a: str, b: str, metric: str, alpha: float) -> tuple[bool, str]:
    """(can a and b be told apart on metric, the evidence). Against the baseline: the
    stored Holm-corrected comparison; between two other arms: one Mann-Whitney test."""
    comp = d.comparison
    if comp is not None and comp.baseline_arm in (a, b):
        pr = comp.pair(b if a == comp.baseline_arm else a, metric)
        if pr is not None:
            if pr.verdict == "equal":
                return False, "identical in every trial"
            if pr.p_holm is None:
                return False, "too few trials to test"
            if pr.verdict == "too few trials":
                return False, f"too few trials to tell, p(Holm) = {fmt_p(pr.p_holm)}"
            return pr.p_holm < alpha, f"p(Holm) = {fmt_p(pr.p_holm)}"
    xa, xb = d.samples(a, metric), d.samples(b, metric)
    p, _delta, _ = stats.mann_whitney(xa, xb)
    if p is None:
        return False, "too few trials to test"
    if p >= alpha and stats.min_mann_whitney_p(len(xa), len(xb)) >= alpha:
        return False, f"too few trials to tell, p = {fmt_p(p)}"
    return p < alpha, f"p = {fmt_p(p)}"


def _headline(d: ReportData, metric: str, what: str, best: str = "is fastest") -> str | None:
    """One verdict paragraph: which arm is best on `metric`, by how much, how sure; a
    tie when the best arms cannot be told apart (never "fastest" on a coin flip)."""
    arms = [a for a in d.arms if d.samples(a, metric) is not None]
    if not arms:
        return None
    comp = d.comparison
    alpha = comp.alpha if comp else stats.ALPHA
    base = d.baseline if d.baseline in arms else arms[0]
    meds = {a: float(np.median(d.samples(a, metric))) for a in arms}
    order = sorted(arms, key=lambda a: meds[a])
    win = order[0]
    fmt = vfmt(metric)
    lo, hi = _ci(d, win, metric)
    ci = f" (95 % CI {fmt(lo)}–{fmt(hi)})" if lo is not None else ""
    if len(arms) == 1:
        return f'<p class="headline">{what}: {chip(win, d.colors)}, median <b>{fmt(meds[win])}</b>{ci} (the only arm with data).</p>'
    apart = {a: _told_apart(d, win, a, metric, alpha) for a in order[1:]}
    tied = [a for a in order[1:] if not apart[a][0]]
    if tied and all(apart[a][1].startswith("too few trials") for a in tied) and len(tied) == len(order) - 1:
        n = ", ".join(sorted({str(d.n_trials(a)) for a in arms}))
        names = ", ".join(f"{chip(a, d.colors)} {fmt(meds[a])}" for a in order)
        out = [f'<p class="headline">{what}: <b>no verdict</b>, too few trials to tell the arms apart '
               f'(n = {n} per arm). <span class="unsure">Medians: {names}.</span></p>']
        return "".join(out)
    if tied:
        group = [win] + tied
        names = ", ".join(f"{chip(a, d.colors)} {fmt(meds[a])}" for a in group)
        why = "; ".join(f"{a} vs {win}: {speed_phrase(meds[a] / meds[win]) if meds[win] else '–'}, {apart[a][1]}"
                        for a in tied)
        out = [f'<p class="headline">{what}: <b>a tie</b> between {names} (medians). '
               f'<span class="unsure">Not distinguishable at α = {alpha:g}: {why}.</span></p>']
        shown = set(group)
    else:
        out = [f'<p class="headline">{what}: {chip(win, d.colors)} {best}, median <b>{fmt(meds[win])}</b>{ci}']
        if win != base:
            pr = comp.pair(win, metric) if comp else None
            cls, sure = _sureness(pr, d.n_trials(base), d.n_trials(win), alpha)
            ratio = meds[win] / meds[base] if meds[base] else None
            out[0] += (f", <b>{speed_phrase(ratio)}</b> than {chip(base, d.colors)} "
                       f"({fmt(meds[base])}){_ratio_ci_text(pr)}. <span class=\"{cls}\">{sure}.</span></p>")
            shown = {win, base}
        else:
            out[0] += " — the baseline itself.</p>"
            shown = {win}
    # every other arm against the winner: how far behind, and can it be told apart?
    rest = []
    for a in order[1:]:
        if a in shown:
            continue
        xa, xw = d.samples(a, metric), d.samples(win, metric)
        ratio, rlo, rhi = stats.ratio_ci(xa, xw)
        ok, evidence = apart[a]
        rest.append(f"{chip(a, d.colors)} {fmt(meds[a])}: {chip(win, d.colors)} is {speed_phrase(ratio)}"
                    + (f" (CI {sig(1 / rhi)}×–{sig(1 / rlo)}×)" if rlo and rhi and ratio < 1 else "")
                    + f", {evidence}")
    if rest:
        out.append('<p class="sub">Against the others: ' + "; ".join(rest)
                   + ' <span class="muted">(against the baseline Holm-corrected, else one Mann-Whitney test '
                     'each)</span>.</p>')
    return "".join(out)


def _counters_line(d: ReportData, items: Sequence[tuple[str, str]]) -> str:
    parts = []
    for metric, label in items:
        if not d.has_metric(metric):
            continue
        vals = []
        for a in d.arms:
            x = d.samples(a, metric)
            if x is None:
                continue
            f = vfmt(metric)
            v = f(float(np.median(x)))
            if np.ptp(x) > 0:
                v += f" ({f(float(x.min()))}–{f(float(x.max()))})"
            vals.append(f"{chip(a, d.colors)} {v}")
        parts.append(f"<li><b>{label}</b>: " + ", ".join(vals) + "</li>")
    return "<ul class=\"why\">" + "".join(parts) + "</ul>" if parts else ""


def run_warnings(d: ReportData) -> list[str]:
    """Load-average and governor warnings from the trials' own snapshots (else the run's start)."""
    loads = [(t.result.get("host_load") or {}).get("start") for t in d.measured() if t.result.get("host_load")]
    return environment.load_warnings(loads, "measured trials") if loads else environment.load_warnings([d.run.environment], "runs")


def verdict_section(d: ReportData) -> Section:
    body, charts, missing = [], [], []
    mib = d.inflate_mib
    size = f"{sig(mib)} MiB" if mib else "the balloon"
    if not d.arms:
        reason = "no measured trial succeeded" if d.trials else "the run has no trials yet"
        body.append(nodata(f"No verdict: {reason}."))
        failed = d.failed()
        if failed:
            body.append(note(f"{len(failed)} trial(s) failed; first error: <code>{esc((failed[0].error or '').splitlines()[0] if failed[0].error else '?')}</code>"))
        return Section("verdict", "Verdict", "".join(body), missing=["verdict: no data"])
    if d.kind == "migrate":
        g = f"{sig(d.guest_mib)} MiB guest" if d.guest_mib else "the guest"
        metrics = [("total_ms", f"Migrating a {g}"), ("downtime_ms", "Downtime")]
        best = {"total_ms": "is fastest", "downtime_ms": "has the shortest downtime"}
    else:
        metrics = [(d.stage_metric("inflate", "total"), f"Inflating {size}"),
                   (d.stage_metric("deflate", "total"), f"Deflating {size}")]
        best = {}
    body.append('<div class="box">')
    for m, what in metrics:
        h = _headline(d, m, what, best.get(m, "is fastest")) if m else None
        if h:
            body.append(h)
        else:
            body.append(nodata(f"{what}: no data (no trial measured its total time)."))
    body.append("</div>")
    if d.kind == "migrate":
        body.append('<p class="sub">Why, per migration (median, range if it varied):</p>')
        body.append(_counters_line(d, [("bytes_sent", "bytes on the wire"), ("pages_sent", "pages sent"),
                                       ("pages_hinted", "pages skipped as hinted"), ("pages_zero", "zero pages"),
                                       ("rounds", "pre-copy rounds")]))
    else:
        body.append('<p class="sub">Why, in exact counts per inflate (median, range if it varied):</p>')
        body.append(_counters_line(d, [("discard_calls", "discard system calls"), ("requests", "requests on the ring"),
                                       ("kicks", "kicks"), ("runs", "runs of contiguous pages"),
                                       (d.op_metric("inflate", "bytes_on_ring") or "bytes_on_ring",
                                        "bytes on the ring")]))
    body += [note("Warning: " + esc(w), "nodata") for w in run_warnings(d)]
    if d.kind != "migrate" and d.measured():
        body.append(note("Timings " + esc(twins.DESIGN_TEXT[twins.timing_design([t.result for t in d.measured()])]) + "."))
    if d.comparison is not None:
        c = d.comparison
        body.append(note(f"Baseline {chip(c.baseline_arm, d.colors)}; {c.confidence:.0%} bootstrap CIs of medians; "
                         f"Mann-Whitney U with Holm correction over the run's timings and gauges, α = {c.alpha:g}."
                         + (" Computed now: the run never stored its comparison." if d.comparison_computed_now else "")))
    panels = []
    for m, what in metrics:
        if not d.has_metric(m):
            continue
        samples = {a: d.samples(a, m) for a in d.arms if d.samples(a, m) is not None}
        unit = "ns" if lab_metrics.unit(m) == "ns" else (lab_metrics.unit(m) or "")
        scale = {"ms": 1e6, "us": 1e3, "s": 1e9}.get(lab_metrics.unit(m))
        cis = {a: _ci(d, a, m) for a in samples}
        if scale:  # show every time in ns internally so the chart picks one readable unit
            samples = {a: x * scale for a, x in samples.items()}
            cis = {a: (lo * scale if lo is not None else None, hi * scale if hi is not None else None)
                   for a, (lo, hi) in cis.items()}
            unit = "ns"
        panels.append(report_charts.Series(what, unit, samples, cis))
    if panels:
        ch = report_charts.render(report_charts.trials_strip(panels, d.arms, d.colors), "plot-totals",
                      "total time per trial and arm")
        charts.append(ch)
        body.append(figure(ch, "Each dot is one measured trial; the thick bar is the arm's median, the shaded band "
                               "its 95 % bootstrap confidence interval. Bands that do not overlap mean a clear "
                               "difference. Log scale when the arms differ by more than 10×."))
    else:
        missing.append("plot-totals: no total-time metric")
    return Section("verdict", "Verdict", "".join(body), charts, missing)


# --- comparison table ------------------------------------------------------------------
KEY_BALLOON = (
    [f"{form}" for op in OPS for s in ("total",) + STAGES
     for form in (f"stages_ns.{op}.{s}", f"{op}.stages_ns.{s}")]
    + ["wall_ns", "pages", "requests", "kicks", "interrupts", "discard_calls", "runs", "translations",
       "bytes_on_ring", "inflate.bytes_on_ring", "descriptors", "inflate.descriptors", "memfd_freed_bytes",
       "deflate.requests", "deflate.kicks", "deflate.interrupts", "probes.madvise_calls", "probes.madvise_kernel_ns",
       "probes.madvise_bytes", "probes.kicks", "probes.page_allocs", "probes.page_faults",
       "rss_bytes.vmm", "rss_bytes.guest", "rss_peak_bytes.vmm", "rss_peak_bytes.guest"]
)
KEY_MIGRATE = ("total_ms", "downtime_ms", "bytes_sent", "pages_sent", "pages_zero", "pages_hinted", "rounds",
               "cpu_s_source", "cpu_s_dest", "cpu_s_destination")
_GOOD = {"faster", "fewer", "lower"}
_BAD = {"slower", "more", "higher"}


def _cell(d: ReportData, arm: str, metric: str, fmt: Callable[[float | None], str]) -> str:
    comp = d.comparison
    s = comp.summary(arm, metric)
    if s is None:
        return '<span class="muted">–</span>'
    kind = lab_metrics.classify(metric)
    top = f"<b>{fmt(s.median)}</b>"
    if lab_metrics.is_statistical(kind) and s.ci_low is not None:
        top += f'<br><span class="ci">[{fmt(s.ci_low)}, {fmt(s.ci_high)}]</span>'
    elif s.min != s.max:
        top += f'<br><span class="ci">range {fmt(s.min)}..{fmt(s.max)}</span>'
    if arm == comp.baseline_arm:
        return top + '<br><span class="v base">baseline</span>'
    pr = comp.pair(arm, metric)
    if pr is None:
        return top
    # colour says better/worse only where the lab defines it (timings and gauges: lower is better);
    # a counter's "more" can be good (more pages hinted) or bad (more syscalls)
    stat = lab_metrics.is_statistical(kind)
    vcls = "good" if stat and pr.verdict in _GOOD else "bad" if stat and pr.verdict in _BAD else "neutral"
    if pr.exact:
        diff = "=" if pr.difference == 0 else f"{'+' if pr.difference > 0 else ''}{fmt(pr.difference)}"
        line = f"{fmt_ratio(pr.ratio)} · {diff} · exact"
    else:
        ci = f" [{sig(pr.ratio_ci_low)}, {sig(pr.ratio_ci_high)}]" if pr.ratio_ci_low is not None else ""
        delta = f" · δ {pr.cliffs_delta:+.2f}" if pr.cliffs_delta is not None else ""
        line = f"{fmt_ratio(pr.ratio)}{ci} · p {fmt_p(pr.p_holm)}{delta}"
    varies = " (varies)" if pr.varies else ""
    return top + f'<br><span class="ci">{line}</span><br><span class="v {vcls}">{esc(pr.verdict)}{varies}</span>'


def _comparison_rows(d: ReportData, metrics: Sequence[str]) -> list[list[str]]:
    comp = d.comparison
    rows = []
    for m in metrics:
        kept = comp.folded.get(m, m)
        fmt = vfmt(kept)
        name = f"<code>{esc(m)}</code>" + (f'<br><span class="muted">= {esc(kept)}</span>' if kept != m else "")
        rows.append([name, lab_metrics.classify(kept)] + [_cell(d, a, kept, fmt) for a in comp.arms])
    return rows


def _equal_everywhere(d: ReportData, metric: str) -> bool:
    """One value in every trial of every arm (always zero, the same page count...):
    such a row says nothing about the protocols, so the tables leave it out."""
    comp = d.comparison
    sums = [comp.summary(a, metric) for a in comp.arms]
    if any(s is None for s in sums):
        return False
    return all(s.min == s.max == sums[0].min for s in sums)


_MARK = {"good": "−", "bad": "+", "neutral": ""}


def _compact_row(d: ReportData, metric: str) -> list[str]:
    """One line per metric, as `asv compare` prints: each arm's median and, for the
    other arms, the ratio to the baseline marked − (significantly lower) or + (higher)."""
    comp = d.comparison
    fmt = vfmt(metric)
    kind = lab_metrics.classify(metric)
    cells = [f"<code>{esc(metric)}</code>"]
    for a in comp.arms:
        s = comp.summary(a, metric)
        cells.append(fmt(s.median) if s else '<span class="muted">–</span>')
        if a == comp.baseline_arm:
            continue
        pr = comp.pair(a, metric)
        if pr is None or s is None:
            cells.append("")
            continue
        stat = lab_metrics.is_statistical(kind)
        cls = "good" if stat and pr.verdict in _GOOD else "bad" if stat and pr.verdict in _BAD else "neutral"
        mark = _MARK[cls] or ("≠" if pr.exact and pr.difference else "")
        why = ("exact" if pr.exact else f"p(Holm) {fmt_p(pr.p_holm)}") + f": {pr.verdict}"
        cells.append(f'<span class="v {cls}" title="{esc(why)}">{fmt_ratio(pr.ratio)} {mark}</span>')
    return cells


def comparison_section(d: ReportData) -> Section:
    comp = d.comparison
    if comp is None:
        why = ("the baseline arm has no measured ok trial" if d.trials else "the run has no trials")
        return Section("comparison", "Comparison table", nodata(f"No comparison: {why}."),
                       missing=["comparison: no statistics"])
    known = set(comp.metrics) | set(comp.folded)
    keys = [m for m in (KEY_MIGRATE if d.kind == "migrate" else KEY_BALLOON) if m in known]
    seen = {comp.folded.get(m, m) for m in keys}
    rest = [m for m in comp.metrics if m not in seen]
    equal = [m for m in list(keys) + rest if _equal_everywhere(d, comp.folded.get(m, m))]
    keys = [m for m in keys if m not in equal]
    rest = [m for m in rest if m not in equal]
    others = [a for a in comp.arms if a != comp.baseline_arm]
    head = ["metric", f"{chip(comp.baseline_arm, d.colors)}<br><span class=\"ci\">baseline</span>"]
    for a in others:
        head += [chip(a, d.colors), f'<span class="ci">÷ {esc(comp.baseline_arm)}</span>']
    body = [note(f"One line per metric: each arm's median and, beside each arm, the ratio of its median to "
                 f"{chip(comp.baseline_arm, d.colors)}'s, marked <span class=\"v good\">−</span> when a timing or "
                 f"gauge is significantly lower (Mann-Whitney, Holm-corrected, α = {comp.alpha:g}), "
                 "<span class=\"v bad\">+</span> when significantly higher, ≠ when an exact counter differs; "
                 "no mark: not distinguishable. Hover a ratio for its test.")]
    if keys:
        body.append(scrolling(table(head, [_compact_row(d, m) for m in keys], "cmp compact")))
    full = [m for m in keys + rest]
    if full:
        header = ["metric", "kind"] + [chip(a, d.colors) for a in comp.arms]
        body.append(f'<details><summary>Full table: medians with {comp.confidence:.0%} bootstrap CIs, ratios '
                    f'with CIs, p-values and Cliff\'s δ ({len(full)} metrics)</summary>'
                    + note(f"For non-baseline arms: ratio arm / {esc(comp.baseline_arm)} with its CI, the "
                           "Mann-Whitney p-value after Holm correction and Cliff's δ (−1: every trial of the arm "
                           "below every baseline trial). Counters are exact: ratio and difference, no p-value.")
                    + scrolling(table(header, _comparison_rows(d, full), "cmp small")) + "</details>")
    if equal:
        body.append(f'<details><summary>{len(equal)} metrics with one value in every trial of every arm '
                    "(not shown above)</summary><p class=\"note\">"
                    + ", ".join(f"<code>{esc(m)}</code> {vfmt(comp.folded.get(m, m))(comp.summary(comp.arms[0], comp.folded.get(m, m)).median)}"
                                for m in equal) + "</p></details>")
    for n in comp.notes:
        body.append(note("Note: " + esc(n)))
    return Section("comparison", "Comparison table", "".join(body))


# --- stage breakdown ---------------------------------------------------------------
def _median_other(d: ReportData, arm: str, op: str) -> float:
    """Median over trials of (total - the five stages): time the stages do not cover
    (config writes, waking up). Per trial, because medians of parts do not add up."""
    tot = d.samples(arm, d.stage_metric(op, "total"))
    parts = [d.samples(arm, d.stage_metric(op, s)) for s in STAGES]
    parts = [p for p in parts if p is not None]
    if tot is None or any(p.size != tot.size for p in parts):
        return 0.0
    return float(np.median(tot - sum(parts)))


def _published_speedup(pub: published_figures.PublishedInflate) -> str:
    """A published speed-up in the report's one wording ("N× faster": the ratio of
    total times), converted from the published times, with the published wording and
    source beside it ("85 % faster" meant 85 % less time)."""
    pfn = next((x for x in published_figures.INFLATE if x.arm == "pfn"), None)
    if pub.arm == "pfn" or pfn is None:
        return '<span class="muted">reference</span>'
    said = f"published as “{pct(pub.faster_than_pfn, 0)} faster”, " if pub.faster_than_pfn else ""
    return (f"<b>{speed_phrase(pub.ms_per_gib / pfn.ms_per_gib)}</b><br>"
            f'<span class="ci">{said}{esc(pub.source)}</span>')


def _stage_table(d: ReportData, op: str) -> tuple[str, dict[str, dict[str, float]]]:
    mib = d.inflate_mib or 0
    base = "pfn" if "pfn" in d.arms else d.baseline
    meds: dict[str, dict[str, float]] = {}
    rows, classes = [], []
    for a in d.arms:
        tot_m = d.stage_metric(op, "total")
        tot = d.median(a, tot_m)
        if tot is None:
            continue
        meds[a] = {s: d.median(a, d.stage_metric(op, s)) or 0.0 for s in STAGES}
        meds[a]["total"] = tot
        lo, hi = _ci(d, a, tot_m)
        label = chip(a, d.colors) + (f'<br><span class="ci">{esc(arm_title(a, d.run.environment))}</span>'
                                     if is_qemu_arm(a) else "")
        cells = [label, str(d.n_trials(a)),
                 f"<b>{fmt_ns(tot)}</b>" + (f'<br><span class="ci">[{fmt_ns(lo)}, {fmt_ns(hi)}]</span>' if lo else ""),
                 fmt_ns(tot / (mib / 1024)) if mib else "–"]
        for s in STAGES:
            v = meds[a][s]
            if d.median(a, d.stage_metric(op, s)) is None:      # not measured (the real stack's guest side)
                cells.append('<span class="muted">not measured</span>')
                continue
            cells.append(f"{fmt_ns(v)}<br><span class=\"ci\">{pct(v / tot if tot else None)}</span>")
        other = _median_other(d, a, op)
        cells.append(f"{fmt_ns(other)}<br><span class=\"ci\">{pct(other / tot if tot else None)}</span>")
        btot = d.median(base, tot_m) if base else None
        if a == base or not btot:
            cells.append('<span class="muted">baseline</span>' if a == base else "–")
        else:
            cells.append(f"<b>{speed_phrase(tot / btot)}</b>")
        rows.append(cells)
        classes.append("")
    if op == "inflate":
        for pub in published_figures.INFLATE:
            cells = [f'<span class="pub">{esc(pub.label)}</span><br><span class="ci">{esc(pub.source)}</span>',
                     "–", f"<b>{sig(pub.total_ms)} ms</b><br><span class=\"ci\">7 GiB of 8 GiB idle</span>",
                     f"{sig(pub.ms_per_gib)} ms"]
            for s in STAGES:
                cells.append(pct(pub.shares[s]) if s in pub.shares else '<span class="muted">–</span>')
            cells.append("–")
            cells.append(_published_speedup(pub))
            rows.append(cells)
            classes.append("published")
    header = ["arm", "trials", f"{op} total<br>median [CI]", "per GiB", "allocating pages<br>(alloc)",
              "building PFNs / bitmap / chain<br>(encode)", "sending to the host<br>(transmit)",
              "address translation<br>(translate)", "madvise / punch-hole<br>(discard)", "other",
              f"vs {esc(base or '–')}"]
    return scrolling(table(header, rows, "stages", classes)), meds


def stages_section(d: ReportData) -> Section:
    body, charts, missing = [], [], []
    stage_ops = [op for op in OPS if d.stage_metric(op, "total")]
    if not stage_ops:
        return Section("stages", "Stage breakdown", nodata("No stage timings in this run "
                                                            "(not a balloon run, or no measured trial)."),
                       missing=["stages: no data"])
    body.append(note("The SG series' breakdown of one inflate (and deflate): each stage's median, its share of "
                     "the median total, and the time per GiB ballooned so runs of different sizes compare. "
                     "<em>transmit</em> is the guest's wait for the device minus the device's own translate and "
                     "discard time (ring, kick, wake-up, interrupt). Published rows (grey) come from real 8 GiB "
                     "KVM guests in 2016–2017: compare shares and speed-ups, not milliseconds. The published "
                     "breakdown has no separate encode stage."))
    meds_by_op = {}
    for op in stage_ops:
        html, meds = _stage_table(d, op)
        meds_by_op[op] = meds
        body.append(f"<h3>{op}</h3>" + html)
    if "inflate" not in stage_ops:
        missing.append("no inflate stage timings")
    elif "deflate" not in stage_ops:
        body.append(nodata("No deflate in this run (inflate only)."))
    for op in stage_ops:
        meds = meds_by_op[op]
        arms = [a for a in d.arms if a in meds]
        # a stage that took no time in any arm (deflate's discard) gets no panel
        shown = [s for s in list(STAGES) + ["total"] if any(meds[a].get(s) for a in arms)]
        cis = {a: {s: (_ci(d, a, m) if (m := d.stage_metric(op, s)) else (None, None)) for s in ("total",) + STAGES}
               for a in arms}
        ch = report_charts.render(report_charts.stage_panels(op, shown, arms, d.colors, meds, cis),
                      f"plot-stages-{op}", f"{op} time per stage and arm")
        charts.append(ch)
        dropped = [s for s in STAGES if s not in shown]
        body.append(figure(ch, f"{op.capitalize()}: one panel per stage, each with its own unit and scale (log when "
                               "arms differ by more than 30×): read across arms within a panel. Whiskers are 95 % "
                               "bootstrap CIs of the median."
                           + (f" No panel for {', '.join(dropped)}: 0 in every arm." if dropped else "")))
    if "inflate" in meds_by_op:
        rows = []
        for a, m in meds_by_op["inflate"].items():
            tot = m["total"] or 1.0
            shares = {s: m[s] / tot for s in STAGES}
            shares["other"] = max(0.0, _median_other(d, a, "inflate") / tot)
            # medians of parts need not add up to the median total: scale so each bar is 100 %
            k = 1 / sum(shares.values()) if sum(shares.values()) > 0 else 0.0
            shares = {s: v * k for s, v in shares.items()}
            rows.append((a, shares, d.colors[a]))
        for pub in published_figures.INFLATE:
            if pub.shares:
                shares = dict(pub.shares)
                shares["other"] = max(0.0, 1 - sum(shares.values()))
                rows.append((f"{pub.label} (published)", shares, PUBLISHED_COLOR))
        ch = report_charts.render(report_charts.stage_shares(rows, STAGES), "plot-stage-shares", "share of inflate time per stage")
        charts.append(ch)
        body.append(figure(ch, "Where an inflate's time goes: each stage's median as a share of the sum of the "
                               "stage medians (and 'other'), so every bar is 100 %. The last row is the "
                               "SG series' published PFN-path breakdown (7 GiB of an 8 GiB guest): there, sending "
                               "PFNs to the host dominated; here, compare which stage dominates each protocol."))
    return Section("stages", "Stage breakdown per arm", "".join(body), charts, missing)


# --- probes --------------------------------------------------------------------------
def _per_trial(d: ReportData, name: str) -> dict[str, dict[float, float]]:
    out = {}
    for a in d.arms:
        h = d.hist(a, name)
        n = d.n_trials(a)
        if h and n:
            out[a] = {b: c / n for b, c in h.items()}
    return out


def _overhead_table(d: ReportData) -> str:
    """The probes' own cost per arm, from the run's twin pairs (lab/twins.py); "" without twins."""
    rows = []
    for o in twins.arm_overheads(d.measured()):
        ci = lambda m: sig(m[0]) + (f" [{sig(m[1])}, {sig(m[2])}]" if m[1] is not None else "")  # noqa: E731
        rows.append([chip(o.arm, d.colors), str(o.pairs), ci(o.unprobed_ms) + " ms", ci(o.probed_ms) + " ms",
                     ci(o.ratio), f"{o.overhead_pct:+.1f} %"])
    if not rows:
        return ""
    return (table(["arm", "twin pairs", "inflate, probes detached", "inflate, probes attached",
                   "attached / detached (per pair)", "overhead"], rows, "probes")
            + note("What the probes cost each arm, measured by this run's twin trials: every trial ran once with "
                   "every BPF program detached (the timings this report shows) and once probed (the counts and "
                   "histograms). Medians with 95 % bootstrap CIs."))


def probes_section(d: ReportData) -> Section:
    body, charts, missing = [], [], []
    phase = "migration" if d.kind == "migrate" else "inflate"
    syscall = "madvise"
    if not d.has_hist("probes.hists.madvise_len_log2") and d.has_hist("probes.hists.fallocate_len_log2"):
        syscall = "fallocate"
    specs = [
        (f"probes.hists.{syscall}_len_log2", "plot-madvise-len", f"{syscall} length per call (log2 buckets)",
         f"{syscall} calls per {phase}", report_charts.bytes_tick, f"{syscall} length during {phase}",
         f"How many bytes each {syscall} call discarded. The PFN path makes one 4 KiB call per page (as QEMU "
         "does: see the qemu-pfn arm); range protocols make one call per run of "
         "contiguous pages, so their calls are few and long.", False),
        (f"probes.hists.{syscall}_ns_log2", "plot-madvise-ns", f"kernel time per {syscall} call (log2 buckets)",
         f"{syscall} calls per {phase}", report_charts.ns_tick, f"{syscall} latency during {phase}",
         "Time in the kernel per call, from syscall entry to exit (BCC tracepoints on the VMM). Many short calls "
         "(pfn) against few long ones (ranges): the total is in the comparison table as probes.madvise_kernel_ns.",
         False),
        ("probes.hists.page_alloc_order", "plot-page-alloc-order", "allocation order n (blocks of 2ⁿ pages of 4 KiB)",
         f"page allocations per {phase}", lambda o: f"{o:g}", f"host page allocations by order during {phase}",
         "kmem:mm_page_alloc in the VMM and guest processes, by order: what the host kernel allocated while the "
         "balloon inflated (page tables, page-cache and memfd pages touched by the protocol's own buffers).",
         True),
    ]
    reason = _probes_missing_reason(d)
    summary_rows = []
    for a in d.arms:
        calls = d.median(a, "probes.madvise_calls")
        if calls is None:
            continue
        kns = d.median(a, "probes.madvise_kernel_ns")
        mib = d.inflate_mib
        summary_rows.append([chip(a, d.colors), sig(calls), sig(calls / mib) if mib else "–", fmt_ns(kns),
                             fmt_ns(kns / calls) if kns and calls else "–", fmt_bytes(d.median(a, "probes.madvise_bytes")),
                             sig(d.median(a, "probes.page_allocs")), sig(d.median(a, "probes.page_faults"))])
    if summary_rows and d.kind == "migrate":
        body.append(table(["arm", "madvise calls", "calls per MiB", "kernel time", "per call", "bytes discarded",
                           "page allocs", "page faults"], summary_rows, "probes"))
    elif summary_rows:
        body.append(table(["arm", "madvise calls", "calls per MiB", "kernel time", "per call", "bytes discarded",
                           "page allocs", "page faults"], summary_rows, "probes"))
        real = any(is_qemu_arm(a) for a in d.arms)
        body.append(note(f"Medians per {phase}, as the eBPF probes saw them (not the lab's own counters). "
                         + ("The qemu arms are a real QEMU + Linux guest traced the same way in this run: the pfn "
                            "arm must make the same number of calls per MiB." if real else
                            "Add the arm <code>qemu-pfn</code> to measure a real QEMU + Linux guest the same way "
                            "beside them.")))
    body.append(_overhead_table(d))
    for name, cid, xlabel, ylabel, tick, title, caption, linear in specs:
        hists = _per_trial(d, name)
        if not hists:
            body.append(f'<div class="plot-missing" id="{cid}-missing">' + nodata(f"{esc(title)}: no probe data: "
                                                                                   f"{reason}.") + "</div>")
            missing.append(f"{cid}: {_plain(reason)}")
            continue
        ch = report_charts.render(report_charts.log2_histogram(hists, d.arms, d.colors, xlabel=xlabel, ylabel=ylabel, tick=tick,
                                       title=title, linear_buckets=linear), cid, title)
        charts.append(ch)
        body.append(figure(ch, caption + " Counts are per trial (summed over the measured trials, divided by "
                                         "their number)."))
    return Section("probes", "Probe histograms", "".join(body), charts, missing)


# --- run lengths -----------------------------------------------------------------------
def runlength_section(d: ReportData) -> Section:
    body, charts, missing = [], [], []
    pages = _per_trial(d, "run_length_pages_hist")
    runs = _per_trial(d, "run_length_hist")
    if not runs and not pages:
        return Section("run-lengths", "Run lengths of the ballooned pages",
                       nodata("No run-length histogram in this run (a migration run, or no measured trial)."),
                       missing=["plot-run-length: no run_length_hist"])
    if pages:
        hists, ylabel = pages, "pages per inflate"
    else:
        hists, ylabel = runs, "runs per inflate"
    ch = report_charts.render(report_charts.log2_histogram(hists, d.arms, d.colors,
                                   xlabel="run length (pages of 4 KiB, log2 buckets)", ylabel=ylabel,
                                   tick=report_charts.pages_tick, title="runs of contiguous ballooned pages, as the device saw them"),
                  "plot-run-length", "run-length distribution of ballooned pages")
    charts.append(ch)
    body.append(figure(ch, "How contiguous the ballooned pages were, per the device: a run is a maximal stretch of "
                           "consecutive guest pages discarded together; bucket <i>n</i> holds runs of <i>n</i> to "
                           "2<i>n</i>−1 pages. The guest's fragmentation (the workload) decides this, and the "
                           "protocol decides how much of it the device can see: the pfn arm's requests carry at most "
                           "256 PFNs, so its runs never exceed one request, while bitmap and chunks see whole runs."))
    rows = []
    for a in d.arms:
        r = d.median(a, "runs")
        p = d.median(a, "pages")
        if r is None:
            continue
        rows.append([chip(a, d.colors), sig(r), sig(p), sig(p / r) if p and r else "–",
                     sig(d.median(a, "discard_calls")), sig(d.median(a, "translations"))])
    if rows:
        body.append(table(["arm", "runs", "pages", "mean pages per run", "discard calls", "translations"], rows))
    return Section("run-lengths", "Run lengths of the ballooned pages", "".join(body), charts, missing)


# --- kicks and interrupts ---------------------------------------------------------------
def notifications_section(d: ReportData) -> Section:
    mib = d.inflate_mib
    items = [(d.op_metric("inflate", "requests"), "requests\n(inflate)"),
             (d.op_metric("inflate", "kicks"), "kicks\n(inflate)"),
             (d.op_metric("inflate", "interrupts"), "interrupts\n(inflate)"),
             (d.op_metric("deflate", "kicks"), "kicks\n(deflate)"),
             (d.op_metric("deflate", "interrupts"), "interrupts\n(deflate)"),
             (d.op_metric("inflate", "discard_calls"), "discard calls\n(inflate)")]
    items = [(m, label) for m, label in items if m]
    if not items or not mib:
        return Section("notifications", "Kicks and interrupts per MiB",
                       nodata("No kick or interrupt counts in this run."), missing=["plot-kicks-per-mib: no data"])
    values = {label: {a: (d.median(a, m) / mib if d.median(a, m) is not None else None) for a in d.arms}
              for m, label in items}
    errors = {}
    for m, label in items:
        errors[label] = {}
        for a in d.arms:
            x = d.samples(a, m)
            errors[label][a] = (float(x.min()) / mib, float(x.max()) / mib) if x is not None and np.ptp(x) > 0 else None
    ch = report_charts.render(report_charts.grouped_bars([l for _, l in items], d.arms, d.colors, values,
                                 ylabel="per MiB ballooned", title=f"notifications per MiB ({sig(mib)} MiB per trial)",
                                 errors=errors),
                  "plot-kicks-per-mib", "kicks and interrupts per MiB")
    rows = []
    for a in d.arms:
        cells = [chip(a, d.colors)]
        for m, _l in items:
            v = d.median(a, m)
            cells.append("–" if v is None else f"{sig(v)}<br><span class=\"ci\">{sig(v / mib)} / MiB</span>")
        pk = d.median(a, "probes.kicks")
        cells.append("–" if pk is None else sig(pk))
        rows.append(cells)
    header = ["arm"] + [esc(l.replace("\n", " ")) for _, l in items] + ["kicks seen by eBPF<br>(inflate)"]
    body = figure(ch, "Requests on the ring, guest→device notifications (kicks: an eventfd write) and "
                      "device→guest interrupts (calls), per MiB ballooned: medians over trials, whiskers min–max "
                      "when they varied. The PFN path sends one request per 256 pages (1 MiB); bitmap and chunks "
                      "one for the whole balloon. A kick or an interrupt is needed only when the other side is not "
                      "already awake (VIRTIO_RING_F_EVENT_IDX suppression, adaptive polling), so both can be fewer "
                      "than requests and vary with timing. Log scale when arms differ by decades.")
    body += table(header, rows)
    body += note("Kicks and interrupts are the lab's own counts (driver side); the last column is the eBPF count of "
                 "writes to the kick eventfds, a cross-check that needs probes.")
    return Section("notifications", "Kicks and interrupts per MiB", body, [ch])


# --- migration -------------------------------------------------------------------------
def _first_key(r: Mapping[str, Any], keys: Sequence[str]) -> float | None:
    for k in keys:
        v = r.get(k)
        if finite(v):
            return float(v)
    return None


def _timeline_segments(result: Mapping[str, Any], log: list[dict[str, Any]]) -> list[tuple[float, float, str, bool]]:
    """(start ms, end ms, label, is_downtime) of one migration: setup, hint wait, the
    pre-copy rounds one after another, and the stop-and-copy placed where the result
    says the downtime was (the last downtime_ms of total_ms). Rounds without start
    times are laid end to end, which is how the source runs them."""
    segs: list[tuple[float, float, str, bool]] = []
    t = 0.0
    setup = _first_key(result, ("setup_ms",))
    if setup:
        segs.append((0.0, setup, "setup", False))
        t = setup
    hint = _first_key(result, ("hint_ms",))
    if hint:
        segs.append((t, t + hint, "hints", False))
        t += hint
    total = _first_key(result, ("total_ms",))
    down = _first_key(result, ("downtime_ms",))
    for i, r in enumerate(log):
        phase = str(r.get("phase") or r.get("kind") or "")
        is_stop = r.get("round") == 0 or bool(r.get("downtime") or r.get("stop_and_copy")) or phase in (
            "stop-and-copy", "stop", "downtime")
        start = _first_key(r, ("start_ms", "t_start_ms", "t_ms", "started_ms"))
        end = _first_key(r, ("end_ms", "t_end_ms", "finished_ms"))
        dur = _first_key(r, ("ms", "duration_ms", "time_ms")) or 0.0
        if is_stop and down is not None and total is not None and start is None:
            continue  # drawn below from the measured downtime
        start = t if start is None else start
        end = start + dur if end is None else end
        t = end
        pages = (_first_key(r, ("pages_sent",)) or 0) + (_first_key(r, ("pages_zero",)) or 0)
        segs.append((start, end, f"r{r.get('round', i + 1)}" + (f" · {sig(pages)} p" if pages else ""), is_stop))
    if down is not None and total is not None:
        segs.append((total - down, total, "stop", True))
    return segs


def migration_section(d: ReportData) -> Section | None:
    has = any(d.has_metric(m) for m in ("total_ms", "downtime_ms", "bytes_sent"))
    if d.kind != "migrate" and not has:
        return None
    body, charts, missing = [], [], []
    if not has:
        return Section("migration", "Live migration", nodata("No migration results in this run yet."),
                       missing=["migration: no data"])
    base = d.baseline
    body.append(note("Pre-copy migration to a second VMM over loopback TCP (rate-limited). Bars: medians with 95 % "
                     "bootstrap CIs. Black diamonds: the published ratios (hinted time / unhinted time, idle 8 GB "
                     "guests at 10 Gbit/s), which are what compares across machines and guest sizes."))
    panels = []
    if d.has_metric("total_ms") and base is not None and d.median(base, "total_ms"):
        b = d.median(base, "total_ms")
        panels.append((f"total time / {base}'s", "ratio", {a: (d.median(a, "total_ms") / b
                                                               if d.median(a, "total_ms") is not None else None)
                                                           for a in d.arms}, {}))
    for metric, title, xlabel, scale in (("total_ms", "total time", "ms", 1.0), ("downtime_ms", "downtime", "ms", 1.0),
                                         ("bytes_sent", "data on the wire", "MiB", 1 / MiB)):
        if not d.has_metric(metric):
            continue
        vals = {a: (d.median(a, metric) * scale if d.median(a, metric) is not None else None) for a in d.arms}
        cis = {}
        for a in d.arms:
            lo, hi = _ci(d, a, metric)
            cis[a] = (lo * scale, hi * scale) if lo is not None else None
        panels.append((title, xlabel, vals, cis))
    ratios: dict[str, float] = {}
    if base is not None:
        for p in published_figures.MIGRATION:
            if p.guest == "8 GB idle" and base in p.arm_times_ms:
                ratios.update({a: t / p.arm_times_ms[base] for a, t in p.arm_times_ms.items()})
    panels.append(panels.pop(0)) if panels and panels[0][1] == "ratio" else None  # ratio panel last
    pub = {f"total time / {base}'s": ratios}
    ch = report_charts.render(report_charts.migration_bars(panels, d.arms, d.colors, published=pub), "plot-migration-bars",
                  "migration time, downtime and bytes per arm")
    charts.append(ch)
    body.append(figure(ch, "Total migration time, downtime (stop-and-copy, the guest paused), bytes sent, and "
                           f"each arm's total time relative to {esc(base or 'the baseline')}'s beside the published "
                           "ratios (seed: 2 s → 0.5 s = 0.25; FREE_PAGE_HINT: 2970 → 620 ms = 0.21)."))
    # pages: sent / zero / hinted
    rows = []
    for a in d.arms:
        cells = [chip(a, d.colors)]
        for m in ("total_ms", "downtime_ms", "bytes_sent", "pages_sent", "pages_zero", "pages_hinted", "rounds",
                  "cpu_s_source", d.metric("cpu_s_destination", "cpu_s_dest"), "memory.host_peak_bytes"):
            v = d.median(a, m)
            cells.append("–" if v is None else vfmt(m)(v))
        rows.append(cells)
    body.append(table(["arm", "total", "downtime", "bytes sent", "pages sent", "zero pages", "hinted pages",
                       "rounds", "CPU source", "CPU destination", "host memory peak"], rows, "probes"))
    body.append(note("Medians per migration. Pages sent are data pages; zero pages travel as a flag; hinted pages "
                     "are skipped in round 1 because the guest said they were free. Host memory peak: both memfds "
                     "plus the anonymous memory of source VMM, guest and destination VMM."))
    timeline_rows = []
    for a in d.arms:
        logs = d.round_logs(a)
        if not logs:
            continue
        logs.sort(key=lambda tl: tl[0].result.get("total_ms") or 0)
        trial, log = logs[(len(logs) - 1) // 2]
        timeline_rows.append((a, _timeline_segments(trial.result, log)))
    if timeline_rows:
        ch = report_charts.render(report_charts.migration_timeline(timeline_rows, d.colors), "plot-migration-timeline",
                      "migration rounds over time")
        charts.append(ch)
        body.append(figure(ch, "The median trial of each arm (by total time), phase by phase: setup, waiting for the "
                               "guest's free-page hints, round 1 (all of RAM, minus hinted pages), later rounds "
                               "(pages dirtied meanwhile), and the hatched stop-and-copy while the guest is paused "
                               "(the downtime). Labels: round and pages sent (data + zero)."))
    else:
        body.append(nodata("No round-by-round timeline: the results carry no per-round log "
                           "(<code>per_round</code>), so only the totals above are shown."))
        missing.append("plot-migration-timeline: no per-round data")
    def hinted_speedup(p: published_figures.PublishedMigration) -> str:
        """The published times in the report's one wording: hinted vs unhinted, "N× faster"."""
        hinted = [t for a, t in p.arm_times_ms.items() if a != "none"]
        return speed_phrase(hinted[0] / p.arm_times_ms["none"]) if hinted and p.arm_times_ms.get("none") else "–"

    pub_rows = [[esc(p.label), *(f"{sig(p.arm_times_ms[a])} ms" if a in p.arm_times_ms else "–"
                                 for a in ("none", "upstream", "bitmap")),
                 f"<b>{hinted_speedup(p)}</b>", esc(p.source)] for p in published_figures.MIGRATION]
    body.append("<h3>Published migration times</h3>" + table(
        ["experiment", "no hints", "FREE_PAGE_HINT", "seed bitmap", "hinted vs no hints", "source"], pub_rows, "",
        ["published"] * len(pub_rows)))
    return Section("migration", "Live migration", "".join(body), charts, missing)


# --- environment and reproduction ---------------------------------------------------------
def _spec_text(v: Any, key: str = "") -> str:
    """A spec value as the TOML spec file would write it (bandwidth as 10gbit)."""
    from lab.spec import format_bandwidth, toml_value
    if v is None:
        return "default"
    if key == "bandwidth" and isinstance(v, int):
        return format_bandwidth(v)
    try:
        return toml_value(v)
    except TypeError:
        return str(v)


def _kv(rows: Sequence[tuple[str, Any]]) -> str:
    return '<table class="kv"><tbody>' + "".join(
        f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows) + "</tbody></table>"


def environment_section(d: ReportData) -> Section:
    r, env = d.run, d.run.environment
    git = env.get("git_commit")
    git_s = "not a git checkout" if not git else esc(git[:12]) + (" <b>(local changes)</b>" if env.get("git_dirty") else "")
    mem = env.get("memory_bytes")
    run_rows = [
        ("run id", f"<code>{esc(r.id)}</code>"), ("name", esc(r.name)), ("kind", esc(r.kind)),
        ("status", f'<span class="status {esc(r.status)}">{esc(r.status)}</span>'),
        ("created", esc(r.created_at)), ("finished", esc(r.finished_at or "–")),
        ("trials", f"{r.trials_ok} ok, {r.trials_failed} failed, {r.warmups} warm-up"),
        ("probe backend", esc(r.probe_backend or "?") + (f" ({esc('; '.join(d.probe_reasons()[:2]))})"
                                                         if d.probe_reasons() else "")),
        ("database", f"<code>{esc(d.db_path)}</code>"),
    ]
    env_rows = [
        ("host", esc(env.get("hostname", "?"))),
        ("kernel", esc(f"{env.get('kernel', '?')} ({env.get('machine', '?')})")),
        ("CPU", esc(f"{env.get('cpu_model', '?')}, {env.get('cores', '?')} cores ({env.get('cores_usable', '?')} usable)")),
        ("memory", esc(fmt_bytes(mem) if mem else "?") + (f" ({fmt_bytes(env['memory_available_bytes'])} available)"
                                                          if env.get("memory_available_bytes") else "")),
        ("load at start", esc(" ".join(map(str, env.get("loadavg") or [])) or "?")),
        ("CPU governor", esc(env.get("cpu_governor") or "not exposed (no cpufreq: a VM?)")),
        ("Python", esc(f"{env.get('python_version', '?')} ({env.get('python_executable', '?')})")),
        ("numpy / scipy", esc(f"{env.get('numpy', '?')} / {env.get('scipy', '?')}")),
        ("balloon-lab", esc(env.get("balloon_lab", "?")) + f", git {git_s}"),
    ]
    shown = {"hostname", "kernel", "machine", "cpu_model", "cores", "cores_usable", "memory_bytes",
             "memory_available_bytes", "loadavg", "cpu_governor", "python_version", "python_executable", "numpy", "scipy",
             "balloon_lab", "git_commit", "git_dirty", "probe_backend"}
    env_rows += [(k, f"<code>{esc(v)}</code>") for k, v in env.items() if k not in shown]
    spec_rows = [(k, f"<code>{esc(_spec_text(v, k))}</code>") for k, v in r.spec.items() if not k.startswith("_")]
    body = ['<div class="cols">', "<div><h3>Run</h3>", _kv(run_rows), "</div>",
            "<div><h3>Machine</h3>", _kv(env_rows), "</div>", "</div>",
            "<h3>Spec</h3>", _kv(spec_rows)]
    if r.notes:
        body.append("<h3>Notes</h3><pre>" + esc(r.notes) + "</pre>")
    failed = d.failed()
    if failed:
        rows = [[str(t.idx), chip(t.arm, d.colors), str(t.round), "warm-up" if t.warmup else "measured",
                 f"<code>{esc((t.error or '?').splitlines()[0][:300])}</code>"] for t in failed[:20]]
        body.append(f"<h3>Failed trials ({len(failed)})</h3>" + table(["#", "arm", "round", "", "error"], rows))
        if len(failed) > 20:
            body.append(note(f"… and {len(failed) - 20} more: <code>balloon-lab show {esc(r.id)} --json</code>"))
    body.append(note("Timings compare only on the same kernel, CPU, Python build and code; the gate warns when a "
                     "baseline's environment differs."))
    return Section("environment", "Environment", "".join(body))


def reproduce_command(d: ReportData) -> str:
    if d.run.command_line:
        return d.run.command_line
    try:
        from lab.spec import ExperimentSpec
        spec = {k: v for k, v in d.run.spec.items() if not k.startswith("_")}
        return ExperimentSpec.from_dict(spec).command_line()
    except Exception:
        return ""


def reproduce_section(d: ReportData, report_path: str | None) -> Section:
    cmd = reproduce_command(d)
    db = shlex.quote(d.db_path)
    body = []
    if cmd:
        body.append("<p>The exact command that ran this experiment (every spec field explicit):</p>")
        body.append(f'<pre class="cmd" id="reproduce-command">{esc(cmd)}</pre>')
    else:
        body.append(nodata("This run stored no command line and its spec cannot rebuild one."))
    out = shlex.quote(report_path) if report_path else "report.html"
    body.append("<p>This report, again from the stored trials:</p>")
    body.append(f'<pre class="cmd">balloon-lab report {esc(d.run.id)} -o {esc(out)} --db {esc(db)}</pre>')
    body.append(f'<p>The numbers as text or JSON: <code>balloon-lab show {esc(d.run.id)} --db {esc(db)} [--json]</code>.'
                " Run from the repository root as root after <code>scripts/setup.sh</code> "
                "(<code>balloon-lab doctor</code> checks the probes).</p>")
    return Section("reproduce", "Reproduce", "".join(body))
