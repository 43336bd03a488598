"""What crossed the ring, per arm: the run lengths of the ballooned pages as the device
saw them, and the requests, kicks and interrupts per MiB ballooned."""
from __future__ import annotations

import numpy as np

from reports import charts as report_charts
from reports.data import ReportData
from fmt.numbers import esc, sig
from reports.section_parts import Section, chip, figure, hist_totals, nodata, note, table


def runlength_section(d: ReportData) -> Section:
    body, charts, missing = [], [], []
    pages = hist_totals(d, "run_length_pages_hist")
    runs = hist_totals(d, "run_length_hist")
    if not runs[0] and not pages[0]:
        return Section("run-lengths", "Run lengths of the ballooned pages",
                       nodata("No run-length histogram in this run (a migration run, or no measured trial)."),
                       missing=["plot-run-length: no run_length_hist"])
    (hists, trials), what = (pages, "ballooned pages") if pages[0] else (runs, "runs")
    ch = report_charts.render(report_charts.log2_histogram(hists, d.arms, d.colors, trials=trials, what=what,
                                   xlabel="run length (pages of 4 KiB, log2 buckets)", tick=report_charts.pages_tick,
                                   title="runs of contiguous ballooned pages, as the device saw them"),
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
