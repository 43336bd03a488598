"""One self-contained HTML file per run: what a reviewer attaches to a patch review.

Self-contained means: charts are inline SVG (or data-URI PNG), the CSS is inline,
there is no script, no font, no link to anything outside the file, and a
Content-Security-Policy that forbids loading anything from anywhere, so even a
stray reference could not make the browser reach the network.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from reports.data import ReportData
from reports.comparison_table import comparison_section
from fmt.numbers import esc, plural, sig
from reports.hosts import hosts_section
from reports.migration_section import migration_section
from reports.palette import arm_colors
from reports.probe_histograms import probes_section
from reports.provenance import environment_section, reproduce_section
from reports.real_stack import real_stack_section
from reports.ring_counts import notifications_section, runlength_section
from reports.section_parts import Section, chip
from reports.stage_breakdown import stages_section
from reports.verdict import verdict_section

CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; font-src 'none'; "
       "connect-src 'none'; script-src 'none'; form-action 'none'; base-uri 'none'")

CSS = """
:root { --fg:#1d1d1f; --muted:#6b6b70; --line:#e3e3e6; --bg:#ffffff; --panel:#f6f6f8; --good:#0a7d43; --bad:#b3261e; }
* { box-sizing: border-box; }
html { -webkit-text-size-adjust: 100%; }
body { margin: 0; color: var(--fg); background: var(--bg);
       font: 14px/1.5 "DejaVu Sans", "Liberation Sans", Arial, Helvetica, sans-serif; }
header.top { background: #1f2933; color: #fff; padding: 18px 32px 14px; }
header.top h1 { margin: 0 0 4px; font-size: 21px; font-weight: 600; }
header.top .meta { color: #c9d1d9; font-size: 13px; }
header.top .meta code { color: #fff; }
nav.toc { position: sticky; top: 0; z-index: 5; background: #fff; border-bottom: 1px solid var(--line);
          padding: 7px 32px; font-size: 13px; display: flex; flex-wrap: wrap; gap: 2px 16px; }
nav.toc a { color: #2457a6; text-decoration: none; white-space: nowrap; }
main { max-width: 1180px; margin: 0 auto; padding: 8px 32px 48px; }
section { margin: 26px 0 34px; }
h2 { font-size: 18px; margin: 0 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--fg); }
h3 { font-size: 15px; margin: 18px 0 6px; }
p { margin: 6px 0; }
code, pre { font-family: "DejaVu Sans Mono", "Liberation Mono", Menlo, Consolas, monospace; font-size: 12.5px; }
pre { background: var(--panel); border: 1px solid var(--line); padding: 10px 12px; overflow-x: auto;
      white-space: pre-wrap; word-break: break-all; }
pre.cmd { background: #10161c; color: #e6edf3; border: 0; word-break: normal; overflow-wrap: normal; }
/* a command wraps between its words only: a line broken inside --guest-mib cannot be read or copied */
.note { color: var(--muted); font-size: 13px; }
.nodata { background: #fff8e5; border-left: 4px solid #e0a800; padding: 7px 12px; margin: 8px 0; }
.muted { color: var(--muted); }
.sub { margin-left: 2px; }
section#verdict .headline { font-size: 16px; margin: 10px 0 4px; }
.sure { color: var(--good); font-weight: 600; }
.unsure { color: #8a5a00; font-weight: 600; }
ul.why { margin: 4px 0 8px; padding-left: 22px; }
.arm { white-space: nowrap; font-weight: 600; }
.sw { display: inline-block; width: 11px; height: 11px; border-radius: 2px; margin-right: 5px; vertical-align: -1px; }
.pub { font-weight: 600; color: #333; }
table { border-collapse: collapse; margin: 8px 0 10px; font-size: 13px; }
th, td { border-bottom: 1px solid var(--line); padding: 5px 10px; text-align: left; vertical-align: top; }
thead th { background: var(--panel); font-weight: 600; border-bottom: 1px solid #c8c8cc; }
table.cmp td:nth-child(n+3), table.stages td:nth-child(n+2), table.probes td:nth-child(n+2) { font-variant-numeric: tabular-nums; }
table.small { font-size: 12px; }
div.tablewrap { max-width: 100%; overflow-x: auto; }  /* many arms: the table scrolls, not the page */
table.stages td:last-child { white-space: normal; min-width: 150px; }
table.compact td { padding: 2px 10px; white-space: nowrap; font-variant-numeric: tabular-nums; }
table.compact td:nth-child(n+2) { text-align: right; }
table.stages td, table.probes td, table.cmp td { white-space: nowrap; }
table.stages td:first-child, table.probes td:first-child { white-space: normal; min-width: 150px; }
table.stages th { font-size: 12px; }
section#verdict .box { background: #f4f7fb; border: 1px solid #dbe4ef; border-radius: 6px; padding: 4px 16px 8px; }
tr.published td { background: #f3f3f3; color: #444; }
.ci { color: var(--muted); font-size: 11.5px; }
.v { font-size: 11.5px; font-weight: 600; }
.v.good { color: var(--good); } .v.bad { color: var(--bad); } .v.neutral { color: var(--muted); } .v.base { color: var(--muted); }
.status { font-weight: 600; } .status.complete { color: var(--good); } .status.failed, .status.interrupted { color: var(--bad); }
header .status { color: #fff; padding: 1px 7px; border-radius: 9px; background: #3d4a57; }
header .status.complete { background: #1a7f4b; color: #fff; } header .status.failed, header .status.interrupted { background: #b3261e; color: #fff; }
table.kv th { background: none; font-weight: 600; width: 170px; border-bottom: 1px solid var(--line); }
.cols { display: flex; gap: 32px; flex-wrap: wrap; } .cols > div { flex: 1 1 420px; min-width: 0; }
details { margin: 8px 0; } summary { cursor: pointer; color: #2457a6; }
figure.plot { margin: 14px 0 20px; }
figure.plot svg.chart, figure.plot img.chart { display: block; max-width: 100%; height: auto; }
figure.plot svg.chart * { stroke-linejoin: round; stroke-linecap: butt; }
figcaption { color: var(--muted); font-size: 12.5px; margin-top: 4px; max-width: 980px; }
.banner { background: #fdecea; border-left: 4px solid var(--bad); padding: 8px 12px; margin: 10px 0; }
footer { color: var(--muted); font-size: 12px; border-top: 1px solid var(--line); padding-top: 10px; }
@media print { nav.toc { display: none; } section { break-inside: avoid-page; } }
"""


@dataclass
class Report:
    """A rendered report: the HTML, and which charts and sections it holds."""

    html: str
    run_id: str
    sections: list[str]
    charts: list[str]                                   # element ids of every chart
    missing: list[str] = field(default_factory=list)    # what could not be shown, and why

    @property
    def size(self) -> int:
        return len(self.html.encode())


def build(d: ReportData, report_path: str | None = None, extra: list[Section] | None = None) -> Report:
    """Render a run's ReportData (lab/cli/report_data.py loads it) to a Report; `extra`
    sections go after the run's own and before the environment."""
    r = d.run
    if not d.colors:                     # display data: the palette is the report's
        d.colors = arm_colors(list(dict.fromkeys(d.scheduled_arms + d.arms)), d.NO_PROBES_SUFFIX)
    secs = [verdict_section(d), comparison_section(d)]
    mig = migration_section(d)
    if d.kind == "migrate":
        # a migration has no inflate stages, run lengths or balloon kicks: those sections would only say so
        secs += [mig, probes_section(d)]
    else:
        real = real_stack_section(d)
        secs += [stages_section(d)] + ([real] if real is not None else []) + [
            probes_section(d), runlength_section(d), notifications_section(d)] + (
            [mig] if mig is not None else [])
    secs += list(extra or []) + [hosts_section(d), environment_section(d), reproduce_section(d, report_path)]
    spec = r.spec
    mib = d.inflate_mib
    what = (f"{esc(spec.get('kind', r.kind))}, guest {sig(d.guest_mib)} MiB"
            + (f", inflate {sig(mib)} MiB" if mib and r.kind != "migrate" else "")
            + f", workload {esc(spec.get('workload', '?'))}, "
            + f"{plural(spec.get('trials'), 'trial')} + {plural(spec.get('warmups'), 'warm-up')} per arm, "
            + f"probes {'on' if spec.get('probes') else 'off'}")
    arms = " ".join(chip(a, d.colors) for a in d.scheduled_arms)
    banners = "".join(f'<p class="banner">{esc(n)}</p>' for n in d.notes)
    if d.probe_backends() and "bcc" not in d.probe_backends() and spec.get("probes"):
        banners += ('<p class="banner">The eBPF probes did not run for this run (backend none): kernel-side '
                    "numbers and probe histograms are missing. <code>balloon-lab doctor</code> says why.</p>")
    toc = "".join(f'<a href="#{s.id}">{esc(s.title)}</a>' for s in secs)
    body = "".join(f'<section id="{s.id}"><h2>{esc(s.title)}</h2>{s.body}</section>' for s in secs)
    title = f"balloon-lab report: {r.name} ({r.id})"
    html = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="balloon-lab">
<title>{esc(title)}</title>
<link rel="icon" href="data:,">
<style>{CSS}</style>
</head>
<body>
<header class="top">
<h1>balloon-lab · {esc(r.name)}</h1>
<div class="meta">run <code>{esc(r.id)}</code> · <span class="status {esc(r.status)}">{esc(r.status)}</span> ·
{esc(r.created_at)} · {what}</div>
</header>
<nav class="toc">{toc}</nav>
<main>
<p style="margin-top:14px">Arms: {arms}</p>
{banners}
{body}
<footer>Generated by balloon-lab from {esc(d.db_path)}. One self-contained file: no scripts, no fonts, nothing fetched.
docs/REPORT.md explains each section.</footer>
</main>
</body>
</html>
"""
    return Report(html=html, run_id=r.id, sections=[s.id for s in secs],
                  charts=[c.id for s in secs for c in s.charts], missing=[m for s in secs for m in s.missing])


def render_report(d: ReportData, report_path: str | None = None) -> Report:
    """The report of one run, with its history across the stored runs of its experiment."""
    if not d.colors:
        d.colors = arm_colors(list(dict.fromkeys(d.scheduled_arms + d.arms)), d.NO_PROBES_SUFFIX)
    return build(d, report_path, [_history(d)])


def _history(d: ReportData) -> Section:
    """The run's headline metric across the stored runs of its experiment."""
    from reports.history_section import headline_metric, history_section
    metric = headline_metric(d.kind, d.stage_metric("inflate", "total"))
    points = d.history_of(metric) if metric else []
    colors = dict(d.colors)
    for p in points:                       # arms only older runs had still need a colour
        colors.setdefault(p.arm, "#777777")
    return history_section(points, d.run.id, metric, colors, d.metric_unit(metric) if metric else "")


def write_report(d: ReportData, path: str | os.PathLike) -> Report:
    """Render and write atomically (a half-written report never replaces a good one)."""
    p = Path(path)
    report = render_report(d, str(p))
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(report.html, encoding="utf-8")
    os.replace(tmp, p)
    return report
