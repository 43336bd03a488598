"""The report's charts: matplotlib (Agg, no pyplot global state) to inline SVG.

SVG text stays text (svg.fonttype "none", with a font list every system has), so
charts are small, searchable and crisp at any zoom; no font is ever fetched. Element
ids are prefixed per chart because many SVGs share one HTML document's id space.
A chart whose SVG would be too big falls back to a PNG data URI, so a report stays
one small file whatever the run's size.

Every chart follows the same rules: bars only on linear axes starting at zero (a bar's
length is its value); where values span decades, a log axis with dots instead of bars;
labelled axes with units, log scales where the
data spans decades (decided from the data, and said in the axis label), and each
arm in its colour from reports.palette.
"""
from __future__ import annotations

import base64
import io
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import matplotlib

matplotlib.use("Agg")  # before anything imports pyplot: never a GUI, never a display
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from fmt.numbers import esc, fmt_bytes, fmt_count, fmt_ns, fmt_ns_short, sig, time_unit
from reports.palette import PUBLISHED_COLOR, STAGE_COLORS

MAX_SVG_BYTES = 300_000
PNG_DPI = 110
LOG_SPAN = 30.0  # a positive axis whose max/min exceeds this is drawn log-scaled
WIDTH = 10.5     # inches: every chart is drawn at one width, so text has one size across the report

RC = {
    "svg.fonttype": "none",
    "svg.hashsalt": "balloon-lab",  # deterministic ids: the same data give the same file
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Liberation Sans", "Arial", "Helvetica"],
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "axes.labelsize": 9,
    "axes.edgecolor": "#555555",
    "axes.labelcolor": "#222222",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.color": "#E4E4E4",
    "grid.linewidth": 0.6,
    "xtick.color": "#333333",
    "ytick.color": "#333333",
    "legend.frameon": False,
    "legend.fontsize": 8.5,
    "path.simplify": True,
    "figure.dpi": 100,
}


@dataclass
class Chart:
    """One rendered chart: `html` is the <svg> (or <img>) element."""

    id: str
    html: str
    fmt: str  # svg | png
    bytes: int


# --- rendering -------------------------------------------------------------------
def new_figure(width: float, height: float, **kw: Any) -> Figure:
    with matplotlib.rc_context(RC):
        return Figure(figsize=(width, height), layout="constrained", **kw)


def styled(fn: Callable[..., Figure]) -> Callable[..., Figure]:
    """Run a chart builder under the report's rcParams."""
    def wrapper(*a: Any, **kw: Any) -> Figure:
        with matplotlib.rc_context(RC):
            return fn(*a, **kw)
    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


_ID_RE = re.compile(r'\bid="([^"]+)"')


def _prefix_ids(svg: str, prefix: str) -> str:
    ids = set(_ID_RE.findall(svg))
    if not ids:
        return svg

    def ref(m: re.Match) -> str:
        name = m.group(2)
        return f'{m.group(1)}#{prefix}-{name}' if name in ids else m.group(0)

    svg = _ID_RE.sub(lambda m: f'id="{prefix}-{m.group(1)}"', svg)
    svg = re.sub(r'(href=")#([^"]+)', ref, svg)
    return re.sub(r'(url\()#([^)]+)', ref, svg)


def render(fig: Figure, chart_id: str, alt: str, *, max_svg_bytes: int = MAX_SVG_BYTES) -> Chart:
    """The figure as an inline element: SVG unless that exceeds max_svg_bytes, then PNG."""
    with matplotlib.rc_context(RC):
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
        svg = buf.getvalue()
        if len(svg.encode()) <= max_svg_bytes:
            svg = svg[svg.index("<svg"):]
            svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.S)
            # matplotlib's <style>*{...}</style> would apply to the whole page; the page CSS has it scoped
            svg = re.sub(r'<style type="text/css">.*?</style>\s*', "", svg, flags=re.S)
            svg = _prefix_ids(svg, chart_id)
            svg = svg.replace("<svg ", f'<svg class="chart" role="img" aria-label="{esc(alt)}" ', 1)
            return Chart(chart_id, svg, "svg", len(svg.encode()))
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=PNG_DPI, metadata={"Software": None})
        data = base64.b64encode(png.getvalue()).decode()
        w, h = fig.get_size_inches()
        tag = (f'<img class="chart" alt="{esc(alt)}" width="{round(w * 96)}" height="{round(h * 96)}" '
               f'src="data:image/png;base64,{data}">')
        return Chart(chart_id, tag, "png", len(tag))


# --- helpers ---------------------------------------------------------------------
def spans_decades(values: Sequence[float], span: float = LOG_SPAN) -> bool:
    v = [x for x in values if x is not None and math.isfinite(x) and x > 0]
    return len(v) >= 2 and max(v) / min(v) > span


def _log_ticks(ax, axis: str) -> None:
    """Log-axis ticks that label at least three values: decades when the axis spans
    several, else 1-2-5 steps (a 30-400 ms axis with one "100" label reads as nothing)."""
    target = ax.xaxis if axis == "x" else ax.yaxis
    ax.autoscale_view()
    lo, hi = ax.get_xlim() if axis == "x" else ax.get_ylim()
    few = lo > 0 and hi / lo < 40
    target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if few else (1.0,)))
    target.set_minor_locator(LogLocator(base=10, subs=np.arange(2, 10) * 1.0))
    target.set_minor_formatter(NullFormatter())
    target.set_major_formatter(FuncFormatter(lambda v, _p: sig(v) if v >= 1 else f"{v:g}"))


def _time_axis(ax, axis: str, unit: str, scale: float, log: bool) -> None:
    """Ticks of a time axis in `unit` (values already divided by scale)."""
    if log:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
        _log_ticks(ax, axis)
    else:
        target = ax.xaxis if axis == "x" else ax.yaxis
        target.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))


def color_ticklabels(labels, colors: dict[str, str]) -> None:
    for t in labels:
        c = colors.get(t.get_text())
        if c:
            t.set_color(c)
            t.set_fontweight("bold")


# --- per-trial distributions -------------------------------------------------------
@dataclass
class Series:
    """One panel of a per-trial chart: samples per arm plus optional median CIs."""

    title: str
    unit: str                     # "ns" (converted to a readable unit) or a label like "MiB"
    samples: dict[str, np.ndarray]
    ci: dict[str, tuple[float | None, float | None]]


@styled
def trials_strip(panels: Sequence[Series], arms: Sequence[str], colors: dict[str, str]) -> Figure:
    """Every trial as a dot per arm, the median as a bar, its bootstrap CI as a band:
    the reader sees spread and overlap, not only two medians."""
    fig = new_figure(WIDTH if len(panels) > 1 else WIDTH * 0.6, 0.55 * len(arms) + 1.4)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    rng = np.random.default_rng(0)
    for ax, p in zip(axes, panels):
        present = [a for a in arms if a in p.samples and p.samples[a].size]
        allv = np.concatenate([p.samples[a] for a in present]) if present else np.array([])
        if p.unit == "ns":
            uname, scale = time_unit(list(allv))
        else:
            uname, scale = p.unit, 1.0
        log = spans_decades(list(allv), 10.0)
        for i, arm in enumerate(present):
            y = len(present) - 1 - i
            x = p.samples[arm] / scale
            med = float(np.median(x))
            lo, hi = p.ci.get(arm, (None, None))
            if lo is not None and hi is not None:
                ax.fill_betweenx([y - 0.28, y + 0.28], lo / scale, hi / scale, color=colors[arm], alpha=0.18,
                                 linewidth=0)
            ax.plot([med, med], [y - 0.32, y + 0.32], color=colors[arm], linewidth=2.4, solid_capstyle="butt")
            jitter = rng.uniform(-0.18, 0.18, x.size)
            ax.scatter(x, y + jitter, s=16, color=colors[arm], alpha=0.85, edgecolors="white", linewidths=0.4,
                       zorder=3)
            label = fmt_ns(med * scale) if p.unit == "ns" else f"{sig(med)} {uname}"
            ax.annotate(label, (med, y + 0.34), ha="center", va="bottom", fontsize=7.5, color="#333333")
        ax.set_yticks(range(len(present)), list(reversed(present)))
        color_ticklabels(ax.get_yticklabels(), colors)
        ax.set_ylim(-0.6, len(present) - 0.3)
        ax.grid(axis="y", visible=False)
        _time_axis(ax, "x", uname, scale, log)
        ax.set_xlabel(f"{p.title} ({uname}{', log scale' if log else ''})")
        ax.set_title(p.title, loc="left")
    return fig


# --- stage breakdown ----------------------------------------------------------------
@styled
def stage_panels(op: str, stages: Sequence[str], arms: Sequence[str], colors: dict[str, str],
                 medians: dict[str, dict[str, float]], cis: dict[str, dict[str, tuple[float | None, float | None]]]
                 ) -> Figure:
    """One small panel per stage, arms as bars (median, with CI whiskers): each stage's
    cost compared across protocols on its own scale."""
    fig = new_figure(WIDTH, 0.42 * len(arms) + 1.5)
    axes = fig.subplots(1, len(stages), squeeze=False)[0]
    for ax, st in zip(axes, stages):
        vals = [medians.get(a, {}).get(st) for a in arms]
        uname, scale = time_unit([v for v in vals if v])
        ys = np.arange(len(arms))[::-1]
        log = spans_decades([v for v in vals if v])
        for y, a, v in zip(ys, arms, vals):
            if v is None:
                continue
            lo, hi = cis.get(a, {}).get(st, (None, None))
            err = None
            if lo is not None and hi is not None:
                err = [[max(v - lo, 0) / scale], [max(hi - v, 0) / scale]]
            if log:   # a bar's length must be its value: on a log axis, a dot with its CI instead
                ax.errorbar(max(v, 1) / scale, y, xerr=err, fmt="o", color=colors[a], markersize=6,
                            ecolor="#333333", elinewidth=0.8, capsize=2)
            else:
                ax.barh(y, max(v, 0) / scale, color=colors[a], height=0.7,
                        xerr=err, error_kw={"ecolor": "#333333", "elinewidth": 0.8, "capsize": 2})
        ax.set_yticks(ys, arms if ax is axes[0] else [""] * len(arms))
        if ax is axes[0]:
            color_ticklabels(ax.get_yticklabels(), colors)
        ax.grid(axis="y", visible=False)
        ax.tick_params(axis="y", length=0)
        _time_axis(ax, "x", uname, scale, log)
        ax.set_title(st, loc="left")
        ax.set_xlabel(f"{uname}{', log scale (dots)' if log else ''}")
        if not log:
            ax.set_xlim(left=0)
    fig.suptitle(f"{op}: median time per stage (whiskers: 95 % bootstrap CI)", x=0.01, ha="left",
                 fontsize=10, fontweight="bold")
    return fig


@styled
def stage_shares(rows: Sequence[tuple[str, dict[str, float], str]], stages: Sequence[str]) -> Figure:
    """100 % bars: which stage dominates each protocol's time, with the published PFN
    breakdown as a reference row. rows: (label, {stage: share of total}, label colour)."""
    fig = new_figure(WIDTH, 0.46 * len(rows) + 1.35)
    ax = fig.subplots()
    ys = np.arange(len(rows))[::-1]
    for y, (label, shares, _c) in zip(ys, rows):
        left = 0.0
        for st in list(stages) + ["other"]:
            w = shares.get(st)
            if not w or w <= 0:
                continue
            color = STAGE_COLORS.get(st, "#FFFFFF")
            ax.barh(y, 100 * w, left=100 * left, color=color, height=0.68, edgecolor="white", linewidth=0.8,
                    hatch="//" if st == "other" else None)
            if w >= 0.06:
                dark = st in ("transmit", "discard")
                ax.text(100 * (left + w / 2), y, f"{100 * w:.0f} %", ha="center", va="center", fontsize=7.5,
                        color="white" if dark else "#222222")
            left += w
    ax.set_yticks(ys, [r[0] for r in rows])
    for t, r in zip(ax.get_yticklabels(), rows):
        t.set_color(r[2])
        t.set_fontweight("bold")
    ax.set_xlim(0, 100)
    ax.set_xlabel("share of the inflate's time (%)")
    ax.grid(axis="y", visible=False)
    ax.tick_params(axis="y", length=0)
    handles = [Patch(facecolor=STAGE_COLORS[s], label=s) for s in stages]
    handles.append(Patch(facecolor="white", edgecolor="#999999", hatch="//", label="other / not measured"))
    ax.legend(handles=handles, ncols=len(handles), loc="lower left", bbox_to_anchor=(0, 1.0), fontsize=8)
    return fig


# --- log2 histograms ----------------------------------------------------------------
@styled
def log2_histogram(hists: dict[str, dict[float, float]], arms: Sequence[str], colors: dict[str, str], *,
                   trials: dict[str, int], what: str, xlabel: str, tick: Callable[[float], str], title: str,
                   linear_buckets: bool = False) -> Figure:
    """One row per arm, all on one x axis of buckets (powers of two placed evenly, a log2
    axis; or small integers such as allocation orders): each bucket's share of the arm's
    total as a bar on a linear 0-100 % axis, labelled with its count over the arm's
    measured trials. Counts stay whole (no "0.33 calls per inflate") and neither the bulk
    of 32 768 short calls nor a lone long one vanishes, with no log axis to misread."""
    present = [a for a in arms if hists.get(a)]
    keys = sorted({b for a in present for b in hists[a]})
    if linear_buckets:  # e.g. allocation orders: show the buddy allocator's whole range 0..10
        lo, hi = min(0, int(min(keys))), max(10, int(max(keys)))
        buckets = [float(b) for b in range(lo, hi + 1)]
    else:
        exps = [int(round(math.log2(b))) if b > 0 else -1 for b in keys]
        lo, hi = min(exps), max(exps)
        buckets = [0.0 if e < 0 else float(2 ** e) for e in range(lo, hi + 1)]
        if any(b == 0 for b in keys) and 0.0 not in buckets:
            buckets = [0.0] + buckets
    fig = new_figure(WIDTH, 0.9 + 1.05 * len(present))
    axes = fig.subplots(len(present), 1, sharex=True, squeeze=False)[:, 0]
    xs = np.arange(len(buckets))
    for ax, arm in zip(axes, present):
        counts = np.array([hists[arm].get(b, 0.0) for b in buckets])
        share = 100 * counts / counts.sum()
        ax.bar(xs, share, width=0.8, color=colors[arm], linewidth=0)
        for x, c, sh in zip(xs, counts, share):
            if c > 0:
                ax.text(x, sh + 4, fmt_count(c), ha="center", va="bottom", fontsize=7, color="#333333")
        ax.set_ylim(0, 130)
        ax.set_yticks([0, 50, 100], ["0", "50 %", "100 %"])
        ax.grid(axis="x", visible=False)
        n = trials.get(arm, 0)
        ax.set_title(f"{arm}: {fmt_count(counts.sum())} {what} in {n} measured trial{'s' if n != 1 else ''}",
                     loc="left", fontsize=8.5, color=colors[arm])
    step = max(1, math.ceil(len(buckets) / 18))
    turn = len(buckets) > 8 and not linear_buckets
    axes[-1].set_xticks(xs[::step], [tick(b) for b in buckets][::step], rotation=45 if turn else 0,
                        ha="right" if turn else "center")
    axes[-1].set_xlim(-0.6, len(buckets) - 0.4)
    axes[-1].set_xlabel(xlabel)
    fig.supylabel(f"share of the arm's {what}", fontsize=9)
    fig.suptitle(title, x=0.01, ha="left", fontsize=10, fontweight="bold")
    return fig


def bytes_tick(b: float) -> str:
    """Axis ticks in the lab's units, as every table writes them: 4 KiB, 1 MiB."""
    return fmt_bytes(b)


def ns_tick(ns: float) -> str:
    return fmt_ns_short(ns)


def pages_tick(p: float) -> str:
    """A count of pages as every table writes counts: 8, 1 024, 8 192."""
    return fmt_count(p)


# --- grouped bars of medians ------------------------------------------------------
@styled
def grouped_bars(groups: Sequence[str], arms: Sequence[str], colors: dict[str, str],
                 values: dict[str, dict[str, float | None]], *, ylabel: str, title: str,
                 errors: dict[str, dict[str, tuple[float, float] | None]] | None = None,
                 force_log: bool | None = None, width_in: float | None = None) -> Figure:
    """Medians per group (x) and arm (colour), values printed on the bars; log y when
    they span decades (e.g. 1 kick per MiB for bitmap vs 2 for pfn vs 0.004 for chunks)."""
    present = [a for a in arms if any(values.get(g, {}).get(a) is not None for g in groups)]
    fig = new_figure(width_in or WIDTH, 3.3)
    ax = fig.subplots()
    width = 0.82 / max(1, len(present))
    allv = [v for g in groups for v in values.get(g, {}).values() if v is not None and v > 0]
    log = spans_decades(allv) if force_log is None else force_log
    for i, arm in enumerate(present):
        xs = np.arange(len(groups)) - 0.41 + width * (i + 0.5)
        ys = [values.get(g, {}).get(arm) for g in groups]
        err = None
        if errors:
            lo_e, hi_e = [], []
            for g, v in zip(groups, ys):
                e = (errors.get(g) or {}).get(arm)
                lo_e.append(max(v - e[0], 0) if e and v is not None else 0)
                hi_e.append(max(e[1] - v, 0) if e and v is not None else 0)
            err = [lo_e, hi_e]
        if log:   # bar lengths would lie on a log axis: dots (with their CI) instead
            keep = [i for i, v in enumerate(ys) if v is not None and v > 0]
            ax.errorbar([xs[i] for i in keep], [ys[i] for i in keep], color=colors[arm], label=arm, fmt="o",
                        markersize=6, yerr=None if err is None else [[err[0][i] for i in keep],
                                                                     [err[1][i] for i in keep]],
                        ecolor="#333333", elinewidth=0.8, capsize=2)
        else:
            ax.bar(xs, [v if v is not None else 0 for v in ys], width=width, color=colors[arm], label=arm,
                   yerr=err, error_kw={"ecolor": "#333333", "elinewidth": 0.8, "capsize": 2}, linewidth=0)
        for k, (x, v) in enumerate(zip(xs, ys)):
            if v is not None and (v > 0 or not log):
                # upright, above the mark and its whisker: neighbouring arms' labels never meet
                top = v if err is None else v + err[1][k]
                ax.text(x, top * 1.5 if log else top + 0.02 * max(allv), sig(v), ha="center", va="bottom",
                        rotation=90, fontsize=7.5, color="#333333")
    if log and allv:
        ax.set_yscale("log")
        ax.set_ylim(bottom=min(allv) * 0.4, top=max(allv) * 40)
        _log_ticks(ax, "y")
    elif allv:
        ax.set_ylim(0, max(allv) * 1.35)
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.grid(axis="x", visible=False)
    ax.set_ylabel(ylabel + (" (log scale, dots)" if log else ""))
    ax.set_title(title, loc="left")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


# --- migration ------------------------------------------------------------------------
@styled
def migration_bars(panels: Sequence[tuple[str, str, dict[str, float | None], dict[str, tuple[float, float] | None]]],
                   arms: Sequence[str], colors: dict[str, str],
                   published: dict[str, dict[str, float]] | None = None) -> Figure:
    """One panel per migration metric (title, axis label, {arm: median}, {arm: CI}),
    bars in arm colours; `published` {panel title: {arm: value}} adds black diamonds."""
    fig = new_figure(WIDTH, 0.45 * len(arms) + 1.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    ys = np.arange(len(arms))[::-1]
    for k, (ax, (title, xlabel, vals, cis)) in enumerate(zip(axes, panels)):
        for y, a in zip(ys, arms):
            v = vals.get(a)
            if v is None:
                continue
            ci = cis.get(a)
            err = [[max(v - ci[0], 0)], [max(ci[1] - v, 0)]] if ci else None
            ax.barh(y, v, color=colors[a], height=0.66, xerr=err,
                    error_kw={"ecolor": "#333333", "elinewidth": 0.8, "capsize": 2})
            pub = (published or {}).get(title, {}).get(a)
            ax.text(max(v, pub or 0), y, "  " + sig(v), va="center", ha="left", fontsize=7.5, color="#333333")
        if published and title in published:
            for y, a in zip(ys, arms):
                if a in published[title]:
                    ax.plot([published[title][a]], [y], marker="D", color=PUBLISHED_COLOR, markersize=5.5,
                            zorder=4, linestyle="none")
        ax.set_yticks(ys, arms if k == 0 else [""] * len(arms))
        if k == 0:
            color_ticklabels(ax.get_yticklabels(), colors)
        ax.grid(axis="y", visible=False)
        ax.tick_params(axis="y", length=0)
        ax.set_title(title, loc="left")
        ax.set_xlabel(xlabel)
        ax.margins(x=0.18)
    return fig


@styled
def migration_timeline(rows: Sequence[tuple[str, list[tuple[float, float, str, bool]]]],
                       colors: dict[str, str]) -> Figure:
    """A Gantt row per arm: setup and hint wait (light), each pre-copy round (solid),
    the stop-and-copy (downtime) hatched. rows: (arm, [(start, end, label, is_downtime)])."""
    fig = new_figure(WIDTH, 0.6 * len(rows) + 1.5)
    ax = fig.subplots()
    ys = np.arange(len(rows))[::-1]
    xmax = max((e for _a, segs in rows for _s, e, _l, _d in segs), default=1.0) or 1.0
    for y, (arm, segs) in zip(ys, rows):
        for start, end, label, down in segs:
            prep = label in ("setup", "hints")
            ax.barh(y, max(end - start, xmax * 0.002), left=start, height=0.62,
                    color="white" if down else colors[arm], alpha=0.35 if prep else 1.0,
                    edgecolor=colors[arm], linewidth=0.8, hatch="////" if down else None)
            if label and end - start > 0.06 * xmax:
                ax.text((start + end) / 2, y, label, ha="center", va="center", fontsize=7.5,
                        color="#222222" if prep or down else "white", clip_on=True)
    ax.set_yticks(ys, [r[0] for r in rows])
    color_ticklabels(ax.get_yticklabels(), colors)
    ax.set_xlim(0, xmax * 1.02)
    ax.grid(axis="y", visible=False)
    ax.tick_params(axis="y", length=0)
    ax.set_xlabel("time since the migration started (ms)")
    ax.set_title("phases of the median trial: setup and hints (light), pre-copy rounds, stop-and-copy (hatched)",
                 loc="left")
    return fig
