"""`balloon-lab compare`: interleaved trials of several protocols, stored and compared.

Prints the SG series' stage breakdown per arm (medians), the counters that explain
it (discard calls, runs, run lengths), and the statistical comparison with the
first arm as baseline; `--report FILE` also writes the HTML report.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from lab.trials import probe_costs
from lab.trials import twins
from lab.trials.qemu.side_by_side import side_by_side
from lab.cli.checks import checked, fits_in_memory, memory_option, refuse, writable_file
from lab.machine.environment import load_warnings
from lab.trials.experiment import load_comparison, run_experiment
from lab.store.db_path import db_option, default_db_path, next_command
from lab.results.ring_cost import lab_cost_table
from lab.trials.arm_trial import trial_fn
from lab.trials.spec import spec_from_cli, spec_options
from fmt.columns import format_columns
from lab.analysis.stats import Comparison, render_table
from lab.store.store import Store
from fmt.text_width import fold, fold_command
from fmt.numbers import fmt_count, fmt_fixed, sig

STAGES = ("alloc", "encode", "transmit", "translate", "discard")
COUNTERS = ("pages", "alloc_calls", "config_writes", "requests", "kicks", "interrupts", "discard_calls", "runs",
            "translations", "bytes_on_ring", "descriptors")


def stage_table(comp: Comparison, op: str = "inflate") -> str:
    """Medians per arm in the form of the SG series' table: each stage's share of total."""
    head = f"{'arm':<14}{'total ms':>10}" + "".join(f"{s:>16}" for s in STAGES)
    lines = [f"{op} stage breakdown (medians; ms and share of total):", head]
    for arm in comp.arms:
        tot = comp.summary(arm, f"stages_ns.{op}.total")
        if tot is None:
            continue
        cells = []
        for s in STAGES:
            m = comp.summary(arm, f"stages_ns.{op}.{s}")
            if m is None:                   # not measured (the real stack's guest side)
                cells.append("-")
                continue
            cells.append(f"{fmt_fixed(m.median / 1e6):>8} {100 * m.median / tot.median:5.1f}%")
        lines.append(f"{arm:<14}{fmt_fixed(tot.median / 1e6):>10}" + "".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)


def counter_table(comp: Comparison, inflate_mib: int) -> str:
    """The counters that explain the stages, one row each, one column per arm (fits any
    number of arms in the line width)."""
    vals = {a: {c: (comp.summary(a, c).median if comp.summary(a, c) else None) for c in COUNTERS} for a in comp.arms}
    rows = [(c, *(fmt_count(vals[a][c]) for a in comp.arms)) for c in COUNTERS]
    rows.append(("runs per MiB", *(sig(vals[a]["runs"] / inflate_mib) if inflate_mib and vals[a]["runs"] is not None
                                   else "-" for a in comp.arms)))
    rows.append(("pages per run", *(sig(vals[a]["pages"] / vals[a]["runs"]) if vals[a]["runs"] else "-"
                                    for a in comp.arms)))
    return "inflate counters (medians):\n" + format_columns(("", *comp.arms), rows,
                                                              right=set(range(1, len(comp.arms) + 1)))


def run_length_table(store: Store, run_id: str) -> str:
    """Run-length distribution of the ballooned pages (first measured trial per arm)."""
    seen: dict[str, dict] = {}
    for t in store.trials(run_id, include_warmups=False):
        if t.status == "ok" and not t.warmup and t.arm not in seen and t.result:
            seen[t.arm] = t.result.get("run_length_hist") or {}
    if not seen:
        return ""
    buckets = sorted({int(b) for h in seen.values() for b in h})
    rows = [(f">= {fmt_count(b)}", *(fmt_count(h.get(str(b), 0)) for h in seen.values())) for b in buckets]
    return ("run lengths of ballooned pages (runs per log2 bucket of pages, first trial per arm):\n"
            + format_columns(("pages in a run", *seen), rows, right=set(range(1, len(seen) + 1))))


def kernel_share_table(comp: Comparison) -> str:
    """From the probes: how much of the discard stage the kernel spent inside madvise."""
    lines = ["discard stage, seen by the probes in the probed twins (both columns from the same twin; medians):",
             f"{'arm':<14}{'stage ms':>10}{'madvise calls':>15}{'kernel ms':>11}{'kernel share':>14}"]
    any_row = False
    for arm in comp.arms:
        ns = comp.summary(arm, "probes.stages.discard.ns")
        kn = comp.summary(arm, "probes.stages.discard.madvise_kernel_ns")
        calls = comp.summary(arm, "probes.stages.discard.madvise_calls")
        if ns is None or kn is None:
            continue
        any_row = True
        lines.append(f"{arm:<14}{fmt_fixed(ns.median / 1e6):>10}{fmt_count(calls.median if calls else 0):>15}"
                     f"{fmt_fixed(kn.median / 1e6):>11}{100 * kn.median / ns.median if ns.median else 0:13.1f}%")
    return "\n".join(lines) if any_row else "discard stage, seen by the probes: no probe data (probes off or no eBPF)"


def arms_without_ok_trial(store: Store, run_id: str) -> list[str]:
    """Scheduled arms with no ok measured trial: a comparison missing them is no answer."""
    ok = {t.arm for t in store.trials(run_id, include_warmups=False) if t.status == "ok"}
    return [a for a in store.get_run(run_id).arms if a not in ok]


def comparison_json(run_id: str, comp: Comparison) -> dict:
    arms: dict = {}
    for s in comp.summaries:
        arms.setdefault(s.arm, {})[s.metric] = {"median": s.median, "ci_low": s.ci_low, "ci_high": s.ci_high,
                                                "n": s.n}
    return {"run_id": run_id, "baseline_arm": comp.baseline_arm, "arms": arms,
            "pairs": [p.__dict__ for p in comp.pairs]}


EXAMPLES = """\b
examples:
    balloon-lab compare                                   # the default experiment: 4 arms, 10 trials each
    balloon-lab compare --arms pfn,chunks --trials 20 --report out/r.html
    balloon-lab compare --spec experiment.toml --db out/x.db   # the options' names as TOML keys
    balloon-lab compare --workload fragment --param share=0.6 --guest-mib 4096 --inflate-mib 2048
"""


@click.command("compare", epilog=EXAMPLES)
@spec_options
@db_option
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the HTML report of this run to FILE.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (run_id, per-arm medians and CIs).")
@click.option("--quiet", is_flag=True, help="No progress lines.")
@memory_option
def command(db_path, report_path: Path | None, as_json: bool, quiet: bool, **kwargs) -> None:
    """Run interleaved trials of the protocol arms and compare them (first arm = baseline)."""
    spec = checked("compare", lambda: spec_from_cli(kwargs))
    if spec.kind != "balloon":
        refuse("compare", "--kind: must be balloon (use `balloon-lab migrate` for migrations)")
    fits_in_memory("compare", spec)
    if report_path is not None:
        writable_file("compare", "--report", report_path)
    from lab.trials.probing import open_probes
    session = open_probes(spec.probes, spec.extra_probes)
    path = db_path or default_db_path()
    try:
        with Store(path) as store:
            # Ctrl-C or SIGTERM: the run is marked interrupted, lab/cli/group.py says so in one line
            run_id = run_experiment(spec, trial_fn(session), store, progress=not quiet, probe_session=session)
            comp = load_comparison(store, run_id)
            if comp is None:
                refuse("compare", f"run {run_id}: no successful trial of the baseline arm; "
                                  f"`{next_command('show', run_id, db=store.path)}` lists the errors", 1)
            trials = store.trials(run_id, include_warmups=False)
            design = twins.timing_design([t.result for t in trials if t.status == "ok" and t.result])
            empty = arms_without_ok_trial(store, run_id)
            warnings = load_warnings([(t.result or {}).get("host_load", {}).get("start") for t in trials
                                      if t.result], "measured trials")
            if as_json:
                out = comparison_json(run_id, comp)
                out.update(timing_design=design, arms_without_ok_trial=empty, warnings=warnings,
                           probe_overhead=[{"arm": o.arm, "pairs": o.pairs, "unprobed_ms": o.unprobed_ms,
                                            "probed_ms": o.probed_ms, "ratio": o.ratio}
                                           for o in twins.arm_overheads(trials)],
                           probe_cost=probe_costs.costs_json(trials))
                click.echo(json.dumps(out, default=float))
            else:
                click.echo(f"run {run_id}: " + fold_command(spec.command_line(), first=len(f"run {run_id}: ")))
                click.echo(fold(f"timings: {twins.DESIGN_TEXT[design]}") + "\n")
                for w in warnings:
                    click.echo(fold(f"WARNING: {w}") + "\n")
                click.echo(stage_table(comp, "inflate") + "\n")
                click.echo(stage_table(comp, "deflate") + "\n")
                own = lab_cost_table(comp, "inflate")
                if own:
                    click.echo(own + "\n")
                click.echo(counter_table(comp, spec.inflate_mib) + "\n")
                click.echo(run_length_table(store, run_id) + "\n")
                click.echo(kernel_share_table(comp) + "\n")
                real = side_by_side(comp, store.get_run(run_id).environment)
                if real:
                    click.echo(real + "\n")
                keep = ["stages_ns.inflate.*", "stages_ns.deflate.total", "discard_calls", "runs", "kicks",
                        "probes.madvise_calls", "probes.madvise_kernel_ns"]
                click.echo(render_table(comp, keep))
                for n in comp.notes:
                    click.echo(fold(f"note: {n}"))
                for table in (twins.overhead_table(trials), probe_costs.cost_table(trials)):
                    if table:
                        click.echo("\n" + table)
                for n in twins.stage_notes(trials) + twins.mismatch_notes(trials)[:5]:
                    click.echo(fold(f"note: {n}"))
            if report_path is not None:
                from lab.cli.report_data import load
                from reports.html import write_report
                write_report(load(store, run_id), report_path)
                click.echo(f"report: {report_path}", err=True)
            if empty:
                refuse("compare", f"run {run_id}: no successful measured trial in arm(s) {', '.join(empty)}; "
                                  f"`{next_command('show', run_id, db=store.path)}` lists the errors", 1)
    finally:
        if session is not None:
            session.detach()
