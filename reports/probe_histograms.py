"""The probe histograms section: what the eBPF probes saw per arm (madvise or fallocate
lengths and kernel time, page allocations by order) and what the probes cost."""
from __future__ import annotations

from reports import charts as report_charts
from reports.data import ReportData
from fmt.numbers import esc, fmt_bytes, fmt_ns, sig
from reports.section_parts import Section, chip, figure, hist_totals, nodata, note, table


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


def _overhead_table(d: ReportData) -> str:
    """The probes' own cost per arm, from the run's twin pairs (lab/trials/twins.py); "" without twins."""
    rows = []
    for o in d.probe_overheads():
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


def _cost_tables(d: ReportData) -> str:
    """Per arm, what each probe program cost per inflate, measured in the probed trials: the
    OVERHEAD section of a BCC tool's man page, measured (d.probe_costs(): lab/trials/probe_costs.py);
    "" without costs."""
    out = []
    for c in d.probe_costs():
        rows = []
        for name in sorted(c.rows, key=d.probe_row_order):
            r = c.rows[name]
            share = f"{100 * r['ms'] / c.inflate_ms:.2f} %" if c.inflate_ms else "–"
            probed = sig(r["probed_events"]) if "probed_events" in r else ""
            rows.append([f"<code>{esc(name)}</code>", esc(d.PROBE_ROW_DOCS.get(name, "")), sig(r["events"]), probed,
                         f"{r['ns_per_event']:.0f} ns", f"{r['ms']:.2f} ms", share])
        share = f"{100 * c.total_ms / c.inflate_ms:.2f} %" if c.inflate_ms else "–"
        rows.append(["<b>total</b>", "median of the trials' sums", "", "", "", f"<b>{c.total_ms:.2f} ms</b>", share])
        out.append(f'<h3 id="probe-cost-{esc(c.arm)}">Probe cost: {chip(c.arm, d.colors)} '
                   f'<span class="muted">({c.trials} probed trials)</span></h3>')
        out.append(table(["program", "hooks", "events per inflate", "of them the trial's", "per event",
                          "per inflate", "of the inflate"], rows, "probes small"))
        v = d.probe_cost_verdict(c)
        if v:
            out.append(note(esc(v) + "."))
    if not out:
        return ""
    return "".join(out) + note(
        "Like the OVERHEAD section of a BCC tool's man page, but measured in this run: each program's own run time "
        "from the kernel's bpf_stats (run_cnt, run_time_ns: every process's runs, so for the trial an upper bound; "
        "the programs count the trial's own runs); the syscall hook and the uprobe trap of the stage markers, which "
        "no program's run time holds, calibrated when the probes loaded. Medians per inflate over the probed "
        "trials; the share is of the inflate's median total.")


def probes_section(d: ReportData) -> Section:
    body, charts, missing = [], [], []
    phase = "migration" if d.kind == "migrate" else "inflate"
    syscall = "madvise"
    if not d.has_hist("probes.hists.madvise_len_log2") and d.has_hist("probes.hists.fallocate_len_log2"):
        syscall = "fallocate"
    specs = [
        (f"probes.hists.{syscall}_len_log2", "plot-madvise-len", f"{syscall} length per call (log2 buckets)",
         f"{syscall} calls", report_charts.bytes_tick, f"{syscall} length during {phase}",
         f"How many bytes each {syscall} call discarded. The PFN path makes one 4 KiB call per page (as QEMU "
         "does: see the qemu-pfn arm); range protocols make one call per run of "
         "contiguous pages, so their calls are few and long.", False),
        (f"probes.hists.{syscall}_ns_log2", "plot-madvise-ns", f"kernel time per {syscall} call (log2 buckets)",
         f"{syscall} calls", report_charts.ns_tick, f"{syscall} latency during {phase}",
         "Time in the kernel per call, from syscall entry to exit (the opt-in syscall-time probe on the VMM: raw "
         "syscall tracepoints). Many short calls "
         "(pfn) against few long ones (ranges): the total is in the comparison table as probes.madvise_kernel_ns.",
         False),
        ("probes.hists.page_alloc_order", "plot-page-alloc-order", "allocation order n (blocks of 2ⁿ pages of 4 KiB)",
         "page allocations", lambda o: f"{o:g}", f"host page allocations by order during {phase}",
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
        real = any(d.is_qemu_arm(a) for a in d.arms)
        body.append(note(f"Medians per {phase}, as the eBPF probes saw them (not the lab's own counters). "
                         + ("The qemu arms are a real QEMU + Linux guest traced the same way in this run: the pfn "
                            "arm must make the same number of calls per MiB." if real else
                            "Add the arm <code>qemu-pfn</code> to measure a real QEMU + Linux guest the same way "
                            "beside them.")))
    body.append(_overhead_table(d))
    body.append(_cost_tables(d))
    untimed = "syscall-time" not in (d.run.spec.get("extra_probes") or [])
    for name, cid, xlabel, what, tick, title, caption, linear in specs:
        hists, trials = hist_totals(d, name)
        if not hists:
            why = reason
            if name.endswith("_ns_log2") and untimed and d.run.spec.get("probes") is not False:
                why = ("kernel time per call is the opt-in probe syscall-time (<code>--extra-probes "
                       "syscall-time</code>: a program at every syscall's entry), off in this run")
            body.append(f'<div class="plot-missing" id="{cid}-missing">' + nodata(f"{esc(title)}: no probe data: "
                                                                                   f"{why}.") + "</div>")
            missing.append(f"{cid}: {_plain(why)}")
            continue
        ch = report_charts.render(report_charts.log2_histogram(hists, d.arms, d.colors, trials=trials, what=what,
                                                               xlabel=xlabel, tick=tick, title=title,
                                                               linear_buckets=linear), cid, title)
        charts.append(ch)
        body.append(figure(ch, caption + " One row per arm: each bucket's share of the arm's total, labelled "
                                         "with its count over the arm's measured trials."))
    return Section("probes", "Probe histograms", "".join(body), charts, missing)
