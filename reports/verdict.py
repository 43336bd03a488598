"""The verdict section: which arm is fastest at inflating and deflating (or migrating),
by how much and how sure, a tie when the arms cannot be told apart, and the exact
counts that explain it."""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from reports import charts as report_charts
from reports.data import ReportData
from fmt.numbers import esc, fmt_p, ratio_phrase, sig, speed_phrase
from reports.section_parts import Section, arm_ci, chip, figure, nodata, note, vfmt


def _sureness(pr, n_a: int, n_b: int, alpha: float, timing: str) -> tuple[str, str]:
    """(class, sentence) saying how sure the comparison `pr` (a stats PairResult, or
    None) is; `timing` is the kind name of timings."""
    if pr is None:
        return "unsure", "no comparison available"
    if pr.verdict == "equal":
        return "unsure", "identical in every trial"
    if pr.p_holm is None:
        return "unsure", f"too few trials to test (n = {n_a} and {n_b}){_needs(pr.trials_needed)}"
    if pr.verdict == "too few trials":
        return "unsure", (f"too few trials to be sure: p(Holm) = {fmt_p(pr.p_holm)} with n = {n_a} and {n_b} "
                          f"cannot reach significance{_needs(pr.trials_needed)}")
    if pr.p_holm < alpha:
        d = pr.cliffs_delta
        if d is not None and abs(d) >= 0.999:
            how = (f"every {pr.arm} trial {'beat' if d < 0 else 'lost to'} every {pr.baseline_arm} trial"
                   if pr.kind == timing else "no overlap between the arms' trials")
        elif d is not None:
            how = f"Cliff's δ = {d:+.2f}"
        else:
            how = ""
        return "sure", f"significant: p(Holm) = {fmt_p(pr.p_holm)}" + (f", {how}" if how else "")
    return "unsure", f"not distinguishable: p(Holm) = {fmt_p(pr.p_holm)} ≥ α = {alpha:g}"


def _ratio_ci_text(pr) -> str:
    if pr is None or pr.ratio_ci_low is None or pr.ratio_ci_high is None:
        return ""
    lo, hi = pr.ratio_ci_low, pr.ratio_ci_high
    if pr.ratio < 1 and lo > 0 and hi > 0:
        return f" (95 % CI {sig(1 / hi)}×–{sig(1 / lo)}×)"
    return f" (ratio 95 % CI {sig(lo)}–{sig(hi)})"


def _needs(k: int | None) -> str:
    return f" (needs at least {k} trials per arm)" if k else ""


class Apart(NamedTuple):
    """Whether two arms can be told apart on a metric, the evidence, and, when there were
    too few trials to tell, how many per arm would do."""

    ok: bool
    evidence: str
    needs: int | None = None


def told_apart(d: ReportData, a: str, b: str, metric: str, alpha: float) -> Apart:
    """Against the baseline: the stored Holm-corrected comparison; between two other arms:
    one Mann-Whitney test."""
    comp = d.comparison
    if comp is not None and comp.baseline_arm in (a, b):
        pr = comp.pair(b if a == comp.baseline_arm else a, metric)
        if pr is not None:
            if pr.verdict == "equal":
                return Apart(False, "identical in every trial")
            if pr.p_holm is None:
                return Apart(False, f"too few trials to test{_needs(pr.trials_needed)}", pr.trials_needed)
            if pr.verdict == "too few trials":
                return Apart(False, f"too few trials to tell, p(Holm) = {fmt_p(pr.p_holm)}"
                             f"{_needs(pr.trials_needed)}", pr.trials_needed)
            return Apart(pr.p_holm < alpha, f"p(Holm) = {fmt_p(pr.p_holm)}")
    xa, xb = d.samples(a, metric), d.samples(b, metric)
    p, _delta, _ = d.mann_whitney(xa, xb)
    need = d.trials_needed(alpha)
    if p is None:
        return Apart(False, f"too few trials to test{_needs(need)}", need)
    if p >= alpha and d.min_mann_whitney_p(len(xa), len(xb)) >= alpha:
        return Apart(False, f"too few trials to tell, p = {fmt_p(p)}{_needs(need)}", need)
    return Apart(p < alpha, f"p = {fmt_p(p)}")


def _headline(d: ReportData, metric: str, what: str, best: str = "is fastest") -> str | None:
    """One verdict paragraph: which arm is best on `metric`, by how much, how sure; a
    tie when the best arms cannot be told apart (never "fastest" on a coin flip)."""
    arms = [a for a in d.arms if d.samples(a, metric) is not None]
    if not arms:
        return None
    comp = d.comparison
    alpha = d.alpha
    base = d.baseline if d.baseline in arms else arms[0]
    meds = {a: float(np.median(d.samples(a, metric))) for a in arms}
    order = sorted(arms, key=lambda a: meds[a])
    win = order[0]
    fmt = vfmt(d.metric_unit(metric))
    lo, hi = arm_ci(d, win, metric)
    ci = f" (95 % CI {fmt(lo)}–{fmt(hi)})" if lo is not None else ""
    if len(arms) == 1:
        return f'<p class="headline">{what}: {chip(win, d.colors)}, median <b>{fmt(meds[win])}</b>{ci} (the only arm with data).</p>'
    apart = {a: told_apart(d, win, a, metric, alpha) for a in order[1:]}
    tied = [a for a in order[1:] if not apart[a].ok]
    if tied and all(apart[a].evidence.startswith("too few trials") for a in tied) and len(tied) == len(order) - 1:
        n = ", ".join(sorted({str(d.n_trials(a)) for a in arms}))
        names = ", ".join(f"{chip(a, d.colors)} {fmt(meds[a])}" for a in order)
        need = max((apart[a].needs for a in tied if apart[a].needs), default=None)
        out = [f'<p class="headline">{what}: <b>no verdict</b>, too few trials to tell the arms apart '
               f'(n = {n} per arm{f"; Mann-Whitney with Holm needs at least {need}" if need else ""}). '
               f'<span class="unsure">Medians: {names}.</span></p>']
        return "".join(out)
    if tied:
        group = [win] + tied
        names = ", ".join(f"{chip(a, d.colors)} {fmt(meds[a])}" for a in group)
        why = "; ".join(f"{a} vs {win}: median {ratio_phrase(meds[a] / meds[win]) if meds[win] else '–'}, "
                        f"{apart[a].evidence}" for a in tied)
        out = [f'<p class="headline">{what}: <b>a tie</b> between {names} (medians). '
               f'<span class="unsure">Not distinguishable at α = {alpha:g}: {why}.</span></p>']
        shown = set(group)
    else:
        out = [f'<p class="headline">{what}: {chip(win, d.colors)} {best}, median <b>{fmt(meds[win])}</b>{ci}']
        if win != base:
            pr = comp.pair(win, metric) if comp else None
            cls, sure = _sureness(pr, d.n_trials(base), d.n_trials(win), alpha, d.TIMING)
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
        ratio, rlo, rhi = d.ratio_ci(xa, xw)
        ok, evidence = apart[a].ok, apart[a].evidence
        said = (f"{chip(win, d.colors)} is {speed_phrase(ratio)}" if ok
                else f"{chip(win, d.colors)}'s median is {ratio_phrase(ratio)}")
        rest.append(f"{chip(a, d.colors)} {fmt(meds[a])}: {said}"
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
            f = vfmt(d.metric_unit(metric))
            v = f(float(np.median(x)))
            if np.ptp(x) > 0:
                v += f" ({f(float(x.min()))}–{f(float(x.max()))})"
            vals.append(f"{chip(a, d.colors)} {v}")
        parts.append(f"<li><b>{label}</b>: " + ", ".join(vals) + "</li>")
    return "<ul class=\"why\">" + "".join(parts) + "</ul>" if parts else ""


def run_warnings(d: ReportData) -> list[str]:
    """Load-average and governor warnings from the trials' own snapshots (else the run's start)."""
    loads = [(t.result.get("host_load") or {}).get("start") for t in d.measured() if t.result.get("host_load")]
    return d.load_warnings(loads, "measured trials") if loads else d.load_warnings([d.run.environment], "runs")


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
        body.append(note("Timings " + esc(d.timing_design_text()) + "."))
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
        unit = "ns" if d.metric_unit(m) == "ns" else (d.metric_unit(m) or "")
        scale = {"ms": 1e6, "us": 1e3, "s": 1e9}.get(d.metric_unit(m))
        cis = {a: arm_ci(d, a, m) for a in samples}
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
