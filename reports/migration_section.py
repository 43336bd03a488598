"""The live-migration section: total time, downtime and bytes per arm beside the
published ratios, and the median trial's rounds on a timeline."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from reports import charts as report_charts
from reports import published as published_figures
from reports.data import MiB, ReportData, finite
from fmt.numbers import esc, sig, speed_phrase
from reports.section_parts import Section, arm_ci, chip, figure, nodata, note, table, vfmt


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
            lo, hi = arm_ci(d, a, metric)
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
            cells.append("–" if v is None else vfmt(d.metric_unit(m))(v))
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
