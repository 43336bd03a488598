"""The stage breakdown: where an inflate's (and a deflate's) time goes, stage by stage
and per arm, beside the SG series' published breakdowns."""
from __future__ import annotations

import numpy as np

from reports import charts as report_charts
from reports import published as published_figures
from reports.data import OPS, STAGES, ReportData
from fmt.numbers import esc, fmt_ns, pct, ratio_phrase, sig, speed_phrase
from reports.palette import PUBLISHED_COLOR
from reports.section_parts import Section, arm_ci, chip, figure, nodata, note, scrolling, table
from reports.verdict import told_apart


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
    # not bold: a published claim, not this run's verdict (the table's bold is the verdict's)
    return (f"{speed_phrase(pub.ms_per_gib / pfn.ms_per_gib)} (published)<br>"
            f'<span class="ci">{said}{esc(pub.source)}</span>')


def _versus(d: ReportData, arm: str, base: str, metric: str, ratio: float) -> str:
    """The "vs baseline" cell: "N× faster" in bold only where the verdict found the arms
    apart; else the ratio of medians, muted, with why there is no verdict."""
    apart = told_apart(d, arm, base, metric, d.alpha)
    if apart.ok:
        return f"<b>{speed_phrase(ratio)}</b>"
    return (f'<span class="muted">median {ratio_phrase(ratio)}</span><br>'
            f'<span class="ci">no verdict: {esc(apart.evidence)}</span>')


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
        lo, hi = arm_ci(d, a, tot_m)
        label = chip(a, d.colors) + (f'<br><span class="ci">{esc(d.arm_title(a, d.run.environment))}</span>'
                                     if d.is_qemu_arm(a) else "")
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
            cells.append(_versus(d, a, base, tot_m, tot / btot))
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


def _lab_cost_table(d: ReportData) -> str:
    """The inflate's transmit and translate per request against the ring's floor measured
    with each trial (lab/results/ring_cost.py), and the lab's own share: what a device in C would
    mostly not pay. Empty when no trial measured a floor (older runs, the real stack)."""
    rows = []
    for a in d.arms:
        m = {k: d.median(a, f"lab_cost.inflate.{k}") for k in ("transmit_per_request_ns", "transmit_over_floor",
                                                               "translate_per_request_ns", "translate_over_floor",
                                                               "own_ns", "own_share")}
        # the held floor, or for trials stored before it was measured, the hot one (the
        # rule of lab/results/ring_cost.py's round_trip_floor; the report imports no lab code)
        rt = d.median(a, "floors.held_round_trip_ns") or d.median(a, "floors.round_trip_ns")
        tr, req = d.median(a, "floors.translate_ns"), d.median(a, "requests")
        if any(v is None for v in (*m.values(), rt, tr, req)):
            continue
        rows.append([chip(a, d.colors), f"{req:.0f}", fmt_ns(m["transmit_per_request_ns"]), fmt_ns(rt),
                     f"{m['transmit_over_floor']:.2f}×", fmt_ns(m["translate_per_request_ns"]), fmt_ns(tr),
                     f"{m['translate_over_floor']:.2f}×", fmt_ns(m["own_ns"]), pct(m["own_share"])])
    if not rows:
        return ""
    header = ["arm", "requests", "transmit<br>per request", "held round-trip<br>floor", "in floors",
              "translate<br>per request", "translate<br>floor", "in floors", "the lab's own<br>cost", "of the inflate"]
    return ("<h3>The lab's own cost against the ring's floor</h3>"
            + note("Each trial first measures the floor on this machine: an eventfd round trip between a "
                   "VMM-kind and a guest-kind process (epoll, read, write on each side) with the device side "
                   "holding each request as long as a PFN request's 256 discards take, so the guest's CPU idles "
                   "meanwhile as in a real request (the held round trip, hold excluded), and one numpy pass of "
                   "the region table over a request's 256 PFNs. What an arm spends above requests × floor in "
                   "transmit and translate is the lab's own Python around the ring, which a device in C would "
                   "mostly not pay: it weighs on the arms that send many requests (pfn). Medians over trials.")
            + scrolling(table(header, rows, "lab-cost")))


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
    own = _lab_cost_table(d)
    if own:
        body.append(own)
    if "inflate" not in stage_ops:
        missing.append("no inflate stage timings")
    elif "deflate" not in stage_ops:
        body.append(nodata("No deflate in this run (inflate only)."))
    for op in stage_ops:
        meds = meds_by_op[op]
        arms = [a for a in d.arms if a in meds]
        # a stage that took no time in any arm (deflate's discard) gets no panel
        shown = [s for s in list(STAGES) + ["total"] if any(meds[a].get(s) for a in arms)]
        cis = {a: {s: (arm_ci(d, a, m) if (m := d.stage_metric(op, s)) else (None, None)) for s in ("total",) + STAGES}
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
