"""The report's history section: the run's headline metric across every stored run of
the same experiment (lab/gate/history.py), as asv plots a benchmark across commits, with
the runs the gate flagged marked and this run highlighted."""
from __future__ import annotations

from typing import Sequence

from matplotlib.figure import Figure

from reports import charts
from fmt.numbers import NS_PER, esc, time_unit
from reports.section_parts import Section, chip, figure, nodata, note, scrolling, table, vfmt

FLAG_COLOR = "#b3261e"


@charts.styled
def history_chart(points: Sequence, run_ids: Sequence[str], current: str, colors: dict[str, str],
                  metric: str, unit: str) -> Figure:
    """Median per run and arm (line + dots, 95 % CI whiskers) on a linear axis from
    zero; runs in storage order; flagged runs get a red ring and label, this run a band.
    `points` are lab/gate/history.py's HistoryPoints, `unit` the metric's unit."""
    fig = charts.new_figure(charts.WIDTH, 3.0)
    ax = fig.subplots()
    to_ns = NS_PER.get(unit)
    scale_in = to_ns or 1.0
    uname, scale = time_unit([p.median * scale_in for p in points]) if to_ns else (unit or "count", 1.0)
    xs = {r: i for i, r in enumerate(run_ids)}
    arms = list(dict.fromkeys(p.arm for p in points))
    top = 0.0
    for arm in arms:
        mine = [p for p in points if p.arm == arm]
        x = [xs[p.run_id] for p in mine]
        y = [p.median * scale_in / scale for p in mine]
        lo = [max(0.0, (p.median - p.ci_low) * scale_in / scale) if p.ci_low is not None else 0.0 for p in mine]
        hi = [max(0.0, (p.ci_high - p.median) * scale_in / scale) if p.ci_high is not None else 0.0 for p in mine]
        top = max([top] + [a + b for a, b in zip(y, hi)])
        ax.errorbar(x, y, yerr=[lo, hi], fmt="-o", color=colors.get(arm, "#777777"), label=arm, markersize=5,
                    linewidth=1.2, elinewidth=0.8, capsize=2)
        for p, xi, yi in zip(mine, x, y):
            if p.flagged:
                ax.plot([xi], [yi], "o", markersize=13, markerfacecolor="none", markeredgecolor=FLAG_COLOR,
                        markeredgewidth=1.6, zorder=5)
    for r in run_ids:
        if any(p.flagged for p in points if p.run_id == r):
            ax.annotate("gate: regression", (xs[r], top * 1.04), ha="center", va="bottom", fontsize=7.5,
                        color=FLAG_COLOR)
    if current in xs:
        ax.axvspan(xs[current] - 0.35, xs[current] + 0.35, color="#dbe4ef", zorder=0)
    ax.set_xticks(range(len(run_ids)), [f"{r[:8]}" + (" (this)" if r == current else "") for r in run_ids],
                  rotation=30 if len(run_ids) > 6 else 0, ha="right" if len(run_ids) > 6 else "center")
    ax.set_xlim(-0.6, len(run_ids) - 0.4)
    ax.set_ylim(0, top * 1.15 if top > 0 else 1)
    ax.set_ylabel(f"median ({uname})")
    ax.set_xlabel("stored runs of this experiment, oldest first")
    ax.set_title(f"{metric}: median per run (whiskers: 95 % bootstrap CI)", loc="left")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def history_section(points: Sequence, current: str, metric: str | None,
                    colors: dict[str, str], unit: str = "") -> Section:
    if not metric or not points:
        return Section("history", "History", nodata("No history: this run has no headline metric."),
                       missing=["history: no metric"])
    run_ids = list(dict.fromkeys(p.run_id for p in points))
    if len(run_ids) < 2:
        return Section("history", "History", note(
            "No other stored run has this experiment's spec yet: run the same command again (or in CI) and "
            f"this section plots <code>{esc(metric)}</code> across the runs, marking those the gate flagged. "
            f"<code>balloon-lab history {esc(metric)}</code> prints it."))
    ch = charts.render(history_chart(points, run_ids, current, colors, metric, unit), "plot-history",
                  f"{metric} across stored runs")
    body = [figure(ch, f"<code>{esc(metric)}</code> in each of the {len(run_ids)} stored runs with this run's spec "
                       "(the gate's definition: same kind, sizes, workload, seed, discard, probes), oldest first; "
                       "this run shaded. A red ring marks a run <code>balloon-lab gate</code> flagged as a "
                       "regression. Linear axis from zero. Compare timings only between runs made under a similar load "
                       "(the table below has each run's load average at start). The same as text: "
                       f"<code>balloon-lab history {esc(metric)} --run {esc(current)}</code>.")]
    fmt = vfmt(unit)
    arms = list(dict.fromkeys(p.arm for p in points))
    by = {(p.run_id, p.arm): p for p in points}
    rows = []
    for r in run_ids:
        any_p = next(p for p in points if p.run_id == r)
        cells = [f"<code>{esc(r)}</code>" + (" <b>(this run)</b>" if r == current else ""),
                 esc(any_p.created_at[:19].replace("T", " ")), esc((any_p.git_commit or "–")[:10]),
                 "–" if any_p.load is None else f"{any_p.load:.2f}"]
        cells += [fmt(by[(r, a)].median) if (r, a) in by else "–" for a in arms]
        cells.append(f'<span class="v bad">{esc(any_p.flagged)}</span>' if any_p.flagged else "")
        rows.append(cells)
    body.append(f"<details><summary>The {len(run_ids)} runs as a table</summary>"
                + scrolling(table(["run", "created (UTC)", "git", "load at start"] + [chip(a, colors) for a in arms]
                                  + ["gate"], rows, "small")) + "</details>")
    return Section("history", "History", "".join(body), [ch])


def headline_metric(kind: str, stage_metric: str | None) -> str | None:
    return "total_ms" if kind == "migrate" else stage_metric
