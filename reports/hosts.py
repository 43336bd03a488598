"""The report's Hosts section: who ran the trials, and every host side by side.

Each host's timings come from its own comparison (lab/analysis/host_views.py), never from a
pool of two machines; counters are exact, so the last column says whether every host
measured the same value.
"""
from __future__ import annotations

from reports.data import ReportData
from fmt.numbers import esc, sig
from reports.section_parts import Section, chip, note, table, vfmt

# What the side-by-side table shows, when the run has it (balloon, then migration metrics).
SIDE_BY_SIDE = ("stages_ns.inflate.total", "stages_ns.inflate.discard", "stages_ns.inflate.transmit",
                "stages_ns.deflate.total", "pages", "requests", "kicks", "discard_calls", "runs", "translations",
                "total_ms", "downtime_ms", "bytes_sent", "pages_sent")


def _identity_rows(d: ReportData) -> list[list[str]]:
    rows = []
    for s in d.hosts:
        i = s["identity"] or {}
        mem = i.get("memory_bytes")
        load = s["load_1min"]
        b = i.get("backing") or {}
        rows.append([f"<b>{esc(s['host_id'])}</b>" + (" (shown above)" if d.host == s["host_id"] else ""),
                     esc(i.get("hostname", "?")), f"<code>{esc((i.get('machine_id') or '?')[:12])}</code>",
                     esc(i.get("kernel", "?")), esc(i.get("cpu_model") or "?"), esc(str(i.get("cores", "?"))),
                     "?" if mem is None else f"{mem / (1 << 30):.1f} GiB",
                     esc(f"THP shmem {b.get('thp_shmem')}, hugetlb {b.get('hugepages_total')}"),
                     f"{s['ok']} ok, {s['failed']} failed",
                     "?" if not load else f"{load[0]:.2f}–{load[1]:.2f}",
                     str(s["retried_attempts"])])
    return rows


def _side_by_side(d: ReportData) -> str:
    hosts = list(d.host_comparisons)
    rows, classes = [], []
    for metric in SIDE_BY_SIDE:
        for arm in d.scheduled_arms:
            cells = []
            values = []
            for h in hosts:
                comp = d.host_comparisons[h]
                s = comp.summary(arm, metric) if comp is not None else None
                if s is None:
                    cells.append("–")
                    continue
                fmt = vfmt(d.metric_unit(metric))
                values.append(s.median)
                ci = "" if s.ci_low is None or s.ci_low == s.ci_high else f" [{fmt(s.ci_low)}, {fmt(s.ci_high)}]"
                cells.append(f"{fmt(s.median)}{ci} <small>n={s.n}</small>")
            if not values:
                continue
            kind = d.metric_kind(metric)
            if kind == d.COUNTER:
                same = len(set(values)) == 1 and len(values) == len(hosts)
                verdict = "equal on every host" if same else "<b>differs between hosts</b>"
                classes.append("" if same else "bad")
            else:
                lo, hi = min(values), max(values)
                verdict = f"not compared across hosts (max/min {sig(hi / lo) if lo else '–'}×)"
                classes.append("")
            rows.append([f"<code>{esc(metric)}</code>", chip(arm, d.colors), esc(kind)] + cells + [verdict])
    if not rows:
        return note("No metric of the side-by-side list was measured on these hosts.")
    header = ["metric", "arm", "kind"] + [f"host {esc(h)} median [95% CI]" for h in hosts] + ["across hosts"]
    return table(header, rows, row_cls=classes)


def hosts_section(d: ReportData) -> Section:
    """Identity of each host that ran the run; with several hosts, their medians side by side."""
    if not d.hosts:
        return Section("hosts", "Hosts", note("No trial of this run recorded its host."),
                       missing=["hosts: no trial recorded its host"])
    intro = ("<p>Which host ran the trials, as recorded with each trial. Timings are compared only within a "
             "host (the gate pairs hosts); exact counters must be equal on every host.</p>")
    ident = table(["host", "host name", "machine id", "kernel", "CPU", "cores", "memory", "guest RAM backing",
                   "measured trials", "1-min load over its trials", "retried attempts"], _identity_rows(d))
    body = intro + ident
    if len(d.host_comparisons) > 1:
        body += ("<h3>Hosts side by side</h3><p>Each host's medians from its own trials, with bootstrap 95 % "
                 "CIs.</p>" + _side_by_side(d))
    return Section("hosts", "Hosts", body)
