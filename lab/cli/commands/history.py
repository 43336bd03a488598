"""`balloon-lab history METRIC [--arm A] [--run RUN]`: one metric across the stored runs
of an experiment, oldest first, runs the gate flagged marked (asv's view of a benchmark
across commits)."""
from __future__ import annotations

import json

import click

from lab.results import metrics as lab_metrics
from lab.cli.checks import refuse
from lab.cli.commands.runs import local_time
from lab.store.db_path import db_option, default_db_path
from fmt.columns import format_columns
from lab.analysis.stats import value_formatter
from lab.store.store import Store, StoreError
from fmt.text_width import fold
from fmt.numbers import plural

EXAMPLES = """\b
examples:
    balloon-lab history stages_ns.inflate.total
    balloon-lab history stages_ns.inflate.total --arm chunks
    balloon-lab history probes.madvise_calls --run 3f2a --json
"""


@click.command("history", epilog=EXAMPLES)
@click.argument("metric")
@click.option("--arm", default=None, help="Only this arm.  [default: every arm]")
@click.option("--run", "run_ref", default="latest", show_default=True,
              help="A run of the experiment to follow: every stored run with the same spec is listed.")
@db_option
@click.option("--json", "as_json", is_flag=True, help="Print the points as JSON.")
def command(metric: str, arm: str | None, run_ref: str, db_path, as_json: bool) -> None:
    """METRIC (a name `balloon-lab show` lists) across the stored runs of one experiment:
    median [95 % CI] per run and arm, runs the gate flagged marked with !."""
    from lab.gate.history import history, same_experiment
    path = db_path or default_db_path()
    try:
        with Store(path, create=False) as store:
            anchor = store.get_run(run_ref)
            points = history(store, metric, anchor.id, arm)
            runs = same_experiment(store, anchor)
            known = store.metric_names([r.id for r in runs])
    except StoreError as e:
        refuse("history", str(e))
    where = f"the {plural(len(runs), 'run')} of run {anchor.id}'s experiment"
    if metric not in known:
        refuse("history", "METRIC " + lab_metrics.unknown_names_message([metric], known, where))
    if not points:
        refuse("history", f"--arm: no arm {arm!r} with metric {metric!r} in {where} "
                          f"(arms: {', '.join(anchor.arms)})")
    n_runs = len(runs)
    if as_json:
        click.echo(json.dumps([p.__dict__ for p in points], indent=1))
        return
    fmt = value_formatter(metric, [p.median for p in points])
    rows = [("!" if p.flagged else "", p.run_id, local_time(p.created_at), (p.git_commit or "-")[:10], p.arm,
             f"{fmt(p.median)}" + (f" [{fmt(p.ci_low)}, {fmt(p.ci_high)}]" if p.ci_low is not None else ""),
             str(p.n), "-" if p.load is None else f"{p.load:.2f}") for p in points]
    sp = anchor.spec
    click.echo(fold(f"{metric} across {plural(n_runs, 'run')} of the experiment of run {anchor.id} ({sp.get('kind')}, "
                    f"guest {sp.get('guest_mib')} MiB, inflate {sp.get('inflate_mib')} MiB, workload "
                    f"{sp.get('workload')}, seed {sp.get('seed')}), oldest first:"))
    click.echo(format_columns(("", "run", "created", "git", "arm", "median [95% CI]", "n", "load"), rows,
                              right={6, 7}))
    flagged = {p.run_id: p.flagged for p in points if p.flagged}
    for rid, why in flagged.items():
        click.echo(fold(f"! {rid}: {why}"))
