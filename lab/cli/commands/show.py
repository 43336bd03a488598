"""`balloon-lab show RUN`: one run's spec, environment, trials and statistics."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from lab.trials import probe_costs
from lab.cli.checks import refuse
from lab.results import metrics as lab_metrics
from lab.trials import twins
from lab.trials.qemu.side_by_side import side_by_side
from lab.gate.baseline_file import export_baseline as write_baseline
from lab.cli.commands.runs import local_time
from lab.machine.environment import load_warnings
from lab.trials.experiment import load_comparison
from lab.store.db_path import db_option, default_db_path, next_command
from lab.results.ring_cost import lab_cost_table
from lab.analysis.stats import Comparison, differs, render_summaries, render_table
from lab.analysis.host_views import describe_hosts, host_comparisons, host_summaries
from lab.store.store import RunInfo, Store, StoreError, dumps
from fmt.text_width import fold, fold_command
from fmt.numbers import plural


def _gib(b: int | None) -> str:
    return "?" if b is None else f"{b / (1 << 30):.1f} GiB"


def describe_environment(env: dict[str, Any]) -> list[str]:
    git = env.get("git_commit")
    git_s = "not a git checkout" if not git else git[:12] + (" (dirty)" if env.get("git_dirty") else "")
    load = env.get("loadavg")
    return [
        f"host {env.get('hostname')}, kernel {env.get('kernel')} ({env.get('machine')})",
        f"CPU {env.get('cpu_model')}, {env.get('cores')} cores ({env.get('cores_usable')} usable), "
        f"memory {_gib(env.get('memory_bytes'))} ({_gib(env.get('memory_available_bytes'))} available)",
        f"Python {env.get('python_version')} ({env.get('python_executable')}), numpy {env.get('numpy')}, "
        f"scipy {env.get('scipy')}",
        f"git {git_s}, probe backend {env.get('probe_backend') or '?'}, "
        f"load at start {' '.join(map(str, load)) if load else '?'}, "
        f"CPU governor {env.get('cpu_governor') or 'not exposed'}",
    ] + ([f"real stack: QEMU {env.get('qemu_version')} under {env.get('qemu_accel')} "
          f"({env.get('qemu_accel_reason')}), guest kernel {env.get('guest_kernel')}"] if env.get("qemu_accel") else [])


def describe_run(run: RunInfo, store: Store, comp: Comparison | None, computed_now: bool,
                 metrics: tuple[str, ...], show_all: bool) -> str:
    measured = _measured(store, run)
    out = describe_header(run, store, measured)
    out += describe_stats(comp, computed_now, metrics, show_all, run, measured)
    return "\n".join(out)


def _measured(store: Store, run: RunInfo, host: str | None = None) -> list:
    """The run's ok measured trials (of one host if given): read once per `show`."""
    return [t for t in store.trials(run.id, include_warmups=False, host=host) if t.status == "ok" and t.result]


def describe_header(run: RunInfo, store: Store, measured: list | None = None) -> list[str]:
    """Everything about a run but its statistics."""
    s = run.spec
    out = [f"run {run.id}  {run.name}  ({run.status})",
           f"  created {local_time(run.created_at)}, finished {local_time(run.finished_at)}",
           "  command: " + fold_command(run.command_line or "-", indent="      ", first=len("  command: ")),
           f"  spec: {s.get('kind')}, guest {s.get('guest_mib')} MiB, inflate {s.get('inflate_mib')} MiB, "
           f"arms {', '.join(run.arms)}, workload {s.get('workload')}"
           + (f" {s['workload_params']}" if s.get("workload_params") else "") + ", "
           f"{plural(s.get('trials'), 'trial')} + {plural(s.get('warmups'), 'warm-up')} per arm, seed {s.get('seed')}, "
           f"probes {'on' if s.get('probes') else 'off'} (backend {run.probe_backend or '?'})",
           "  environment" + (" (where it was submitted; the hosts that ran it are below):" if s.get("_hosts")
                              else ":")]
    out += ["    " + line for line in describe_environment(run.environment)]
    out.append(f"  trials: {run.trials_ok} ok, {run.trials_failed} failed, {plural(run.warmups, 'warm-up')}")
    if measured is None:
        measured = _measured(store, run)
    if measured and s.get("kind") == "balloon":
        out.append(f"  timings: {twins.DESIGN_TEXT[twins.timing_design([t.result for t in measured])]}")
    loads = [(t.result.get("host_load") or {}).get("start") for t in measured if t.result.get("host_load")]
    for w in load_warnings(loads, "measured trials") if loads else load_warnings([run.environment], "runs"):
        out.append(f"  WARNING: {w}")
    failed = [t for t in store.trials(run.id, include_warmups=True) if t.status == "failed"]
    for t in failed[:5]:
        out.append(f"    failed #{t.idx} {t.arm} (round {t.round}): {(t.error or '').splitlines()[0]}")
    if len(failed) > 5:
        out.append(f"    ... and {len(failed) - 5} more failed trials "
                   f"(`{next_command('show', run.id, '--json', db=store.path)}` has them all)")
    if run.notes:
        out += ["  notes:"] + ["    " + n for n in run.notes.splitlines()]
    out += describe_hosts(store, run)
    return out


def describe_stats(comp: Comparison | None, computed_now: bool, metrics: tuple[str, ...],
                   show_all: bool, run: RunInfo | None = None, measured: list | None = None) -> list[str]:
    """The comparison with the baseline arm: by default (no --all, no --metrics) only the
    metrics on which an arm differs; with --all also the per-arm medians of every metric
    (a one-arm run has nothing to compare: its medians). For a run with real-stack arms,
    their counters beside the lab's."""
    out: list[str] = []
    if comp is None:
        out.append("\nno statistics: the baseline arm has no successful measured trial")
        return out
    real = side_by_side(comp, run.environment) if run is not None and run.kind == "balloon" else ""
    if real:
        out.append("\n" + real)
    own = lab_cost_table(comp, "inflate") if run is None or run.kind == "balloon" else ""
    if own:
        out.append("\n" + own)
    if show_all or len(comp.arms) == 1:
        out.append(f"\nper-arm medians [{comp.confidence:.0%} bootstrap CI]:")
        out.append(render_summaries(comp, metrics or None))
    if len(comp.arms) > 1:
        differing = not show_all and not metrics
        when = " (computed now: the run did not finish)" if computed_now else ""
        hidden = sum(not differs(comp, m) for m in comp.metrics) if differing else 0
        out.append(f"\ncomparison with {comp.baseline_arm}{when}: ratio = arm / {comp.baseline_arm}, "
                   f"Mann-Whitney p with Holm correction, d = Cliff's delta, alpha {comp.alpha:g}"
                   + (f"; {hidden} of {len(comp.metrics)} metrics on which no arm differs are not shown (--all)"
                      if hidden else ""))
        out.append(render_table(comp, metrics or None, differing_only=differing))
    out += [f"note: {n}" for n in comp.notes]
    if measured:
        for table in (twins.overhead_table(measured), probe_costs.cost_table(measured)):
            if table:
                out.append("\n" + table)
        out += [f"note: {n}" for n in twins.stage_notes(measured) + twins.mismatch_notes(measured)[:5]]
    return out


@click.command("show")
@click.argument("run_ref", metavar="RUN")
@db_option
@click.option("--json", "as_json", is_flag=True, help="Print the run, its trials and statistics as JSON.")
@click.option("--metrics", "metrics", multiple=True, metavar="PATTERN",
              help="Only metrics matching this glob (repeatable), e.g. 'stages_ns.inflate.*'.")
@click.option("--all", "--all-counters", "show_all", is_flag=True,
              help="Every metric, with each arm's medians (default: only the metrics on which an arm differs "
                   "from the baseline). --all-counters: its earlier name.")
@click.option("--export-baseline", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the run as a baseline JSON file for `balloon-lab gate` (and CI).")
@click.option("--allow-incomplete", is_flag=True, help="With --export-baseline: export a run that did not complete.")
@click.option("--host", "host", default=None, metavar="ID",
              help="Only this host's trials (statistics, --export-baseline) of a run that ran on several.")
def command(run_ref: str, db_path, as_json: bool, metrics: tuple[str, ...], show_all: bool,
            export_baseline: Path | None, allow_incomplete: bool, host: str | None) -> None:
    """Show one run (id, unique id prefix, or "latest"). A run that ran on several hosts
    gets one block of statistics per host: timings are compared only within a host."""
    path = db_path or default_db_path()
    try:
        with Store(path, create=False) as store:
            run = store.get_run(run_ref)
            known = store.metric_names([run.id])
            unknown = [p for p in metrics if not lab_metrics.matching(known, [p])]
            if unknown:
                refuse("show", "--metrics " + lab_metrics.unknown_names_message(unknown, known, f"run {run.id}"))
            if export_baseline:
                write_baseline(store, run.id, export_baseline, allow_incomplete=allow_incomplete, host=host)
                click.echo(f"wrote baseline of run {run.id} to {export_baseline}", err=True)
                return
            if host is not None and host not in run.hosts:
                raise StoreError(f"run {run.id} has no trials on host {host!r} (hosts: {', '.join(run.hosts)})")
            if host is not None or len(run.hosts) > 1:
                comps = host_comparisons(store, run, [host] if host else run.hosts)
                if as_json:
                    click.echo(dumps({"run": run.to_dict(), "hosts": host_summaries(store, run),
                                      "trials": [t.__dict__ for t in store.trials(run.id, include_warmups=True,
                                                                                  host=host)],
                                      "attempts": store.attempts(run.id),
                                      "comparisons_by_host": {h: c.to_dict() if c else None
                                                              for h, c in comps.items()}}, indent=1))
                    return
                out = describe_header(run, store)
                for h, c in comps.items():
                    out += [f"\n=== host {h} ==="] + describe_stats(c, run.status != "complete", metrics,
                                                                     show_all, run, _measured(store, run, h))
                click.echo(fold("\n".join(out)))
                return
            computed_now = store.get_comparison(run.id) is None
            comp = load_comparison(store, run.id)
            if as_json:
                click.echo(dumps({"run": run.to_dict(), "hosts": host_summaries(store, run),
                                  "trials": [t.__dict__ for t in store.trials(run.id, include_warmups=True)],
                                  "attempts": store.attempts(run.id),
                                  "comparison": comp.to_dict() if comp else None,
                                  "comparison_computed_now": computed_now}, indent=1))
            else:
                click.echo(fold(describe_run(run, store, comp, computed_now, metrics, show_all)))
    except StoreError as e:
        refuse("show", str(e))
