"""The comparison table: every metric of every arm against the baseline arm, compact
(one line per metric, as `asv compare` prints) and in full (CIs, p-values, Cliff's δ)."""
from __future__ import annotations

from typing import Callable, Sequence

from reports.data import OPS, STAGES, ReportData
from fmt.numbers import esc, fmt_p, fmt_ratio, sig
from reports.section_parts import Section, chip, nodata, note, scrolling, table, vfmt


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
_CHANGED = {"faster", "slower", "lower", "higher"}   # a significant change of a timing or gauge


def _goodness(d: ReportData, metric: str, verdict: str, ratio: float) -> str:
    """good / bad / neutral for a comparison's colour, by the metric's declared direction
    (lower-better timings, higher-better throughputs; counters have no better side)."""
    if verdict not in _CHANGED:
        return "neutral"
    good = d.change_is_good(metric, ratio)
    return "neutral" if good is None else "good" if good else "bad"


def _cell(d: ReportData, arm: str, metric: str, fmt: Callable[[float | None], str]) -> str:
    comp = d.comparison
    s = comp.summary(arm, metric)
    if s is None:
        return '<span class="muted">–</span>'
    kind = d.metric_kind(metric)
    top = f"<b>{fmt(s.median)}</b>"
    if d.is_statistical(kind) and s.ci_low is not None:
        top += f'<br><span class="ci">[{fmt(s.ci_low)}, {fmt(s.ci_high)}]</span>'
    elif s.min != s.max:
        top += f'<br><span class="ci">range {fmt(s.min)}..{fmt(s.max)}</span>'
    if arm == comp.baseline_arm:
        return top + '<br><span class="v base">baseline</span>'
    pr = comp.pair(arm, metric)
    if pr is None:
        return top
    # colour says better/worse only where the metric declares a better side (lower for
    # most timings, higher for throughputs); a counter's "more" can be good or bad
    vcls = _goodness(d, metric, pr.verdict, pr.ratio)
    if pr.exact:
        diff = "=" if pr.difference == 0 else f"{'+' if pr.difference > 0 else ''}{fmt(pr.difference)}"
        line = f"{fmt_ratio(pr.ratio)} · {diff} · exact"
    else:
        ci = f" [{sig(pr.ratio_ci_low)}, {sig(pr.ratio_ci_high)}]" if pr.ratio_ci_low is not None else ""
        delta = f" · δ {pr.cliffs_delta:+.2f}" if pr.cliffs_delta is not None else ""
        line = f"{fmt_ratio(pr.ratio)}{ci} · p {fmt_p(pr.p_holm)}{delta}"
    varies = " (varies)" if pr.varies else ""
    return top + f'<br><span class="ci">{line}</span><br><span class="v {vcls}">{esc(d.verdict_text(pr))}{varies}</span>'


def _comparison_rows(d: ReportData, metrics: Sequence[str]) -> list[list[str]]:
    comp = d.comparison
    rows = []
    for m in metrics:
        kept = comp.folded.get(m, m)
        fmt = vfmt(d.metric_unit(kept))
        name = f"<code>{esc(m)}</code>" + (f'<br><span class="muted">= {esc(kept)}</span>' if kept != m else "")
        rows.append([name, d.metric_kind(kept)] + [_cell(d, a, kept, fmt) for a in comp.arms])
    return rows


def _equal_everywhere(d: ReportData, metric: str) -> bool:
    """One value in every trial of every arm (always zero, the same page count...):
    such a row says nothing about the protocols, so the tables leave it out."""
    comp = d.comparison
    sums = [comp.summary(a, metric) for a in comp.arms]
    if any(s is None for s in sums):
        return False
    return all(s.min == s.max == sums[0].min for s in sums)


def _compact_row(d: ReportData, metric: str) -> list[str]:
    """One line per metric, as `asv compare` prints: each arm's median and, for the
    other arms, the ratio to the baseline marked − (significantly lower) or + (higher),
    coloured by whether that is better or worse for the metric."""
    comp = d.comparison
    fmt = vfmt(d.metric_unit(metric))
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
        cls = _goodness(d, metric, pr.verdict, pr.ratio)
        mark = ("−" if pr.ratio < 1 else "+") if cls != "neutral" else ("≠" if pr.exact and pr.difference else "")
        why = ("exact" if pr.exact else f"p(Holm) {fmt_p(pr.p_holm)}") + f": {d.verdict_text(pr)}"
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
                    + ", ".join(f"<code>{esc(m)}</code> {vfmt(d.metric_unit(comp.folded.get(m, m)))(comp.summary(comp.arms[0], comp.folded.get(m, m)).median)}"
                                for m in equal) + "</p></details>")
    for n in comp.notes:
        body.append(note("Note: " + esc(n)))
    return Section("comparison", "Comparison table", "".join(body))
