"""What a report section is made of: the Section record and the HTML pieces every
section builds its body from (arm chips, notes, tables, figures), with each metric's
value formatter and an arm's confidence interval.

The sections themselves live one group to a module (verdict.py, comparison_table.py,
stage_breakdown.py, probe_histograms.py, ring_counts.py, migration_section.py,
provenance.py, hosts.py, real_stack.py, history_section.py); reports/html.py puts them
in order. A section that has nothing to show still appears, with one sentence saying
why (probes were off, the run has no deflate, the result carries no round log): a
reviewer must be able to tell "not measured" from "forgotten".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from reports import charts as report_charts
from reports.data import ReportData
from fmt.numbers import esc, fmt_value


@dataclass
class Section:
    id: str
    title: str
    body: str
    charts: list[report_charts.Chart] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # what this section could not show, and why


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



def vfmt(unit: str) -> Callable[[float | None], str]:
    """A formatter for the values of one metric of this unit (ReportData.metric_unit),
    each value in its own readable unit (75.5 ms next to 1.05 s reads better than
    0.0755 s next to 1.05 s)."""
    return lambda v: fmt_value(v, unit)


def arm_ci(d: ReportData, arm: str, metric: str) -> tuple[float | None, float | None]:
    """The 95 % CI of an arm's median: the stored comparison's, else bootstrapped now."""
    comp = d.comparison
    s = comp.summary(arm, metric) if comp else None
    if s is not None and s.ci_low is not None:
        return s.ci_low, s.ci_high
    x = d.samples(arm, metric)
    if x is not None and x.size >= d.MIN_BOOTSTRAP_N:
        _, lo, hi = d.median_ci(x)
        return lo, hi
    return None, None


def hist_totals(d: ReportData, name: str) -> tuple[dict[str, dict[float, float]], dict[str, int]]:
    """Each arm's histogram `name` summed over its measured trials (whole counts), and the
    number of those trials."""
    hists, trials = {}, {}
    for a in d.arms:
        h = d.hist(a, name)
        n = d.n_trials(a)
        if h and n:
            hists[a], trials[a] = dict(h), n
    return hists, trials
