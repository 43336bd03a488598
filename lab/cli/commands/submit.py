"""`balloon-lab submit SPEC.toml --hosts a,b`: queue an experiment's trials for workers."""
from __future__ import annotations

import json
from pathlib import Path

import click

from lab.cli.checks import refuse
from lab.store.db_path import db_option, default_db_path, next_command
from lab.trials.spec import SpecError, load_spec
from lab.store.store import StoreError
from lab.store.sql import is_postgres, redact


@click.command("submit")
@click.argument("spec_path", metavar="SPEC.toml", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--hosts", required=True, metavar="A,B,...", help="Host ids to run every trial of the spec on.")
@db_option
@click.option("--max-attempts", type=click.IntRange(min=1), default=3, show_default=True,
              help="Attempts per trial before it is stored as failed (failed or lost attempts are recorded).")
@click.option("--json", "as_json", is_flag=True, help="Print run id, hosts and job count as JSON.")
def command(spec_path: Path, hosts: str, db_path, max_attempts: int, as_json: bool) -> None:
    """Record a run in a PostgreSQL store and enqueue its trials: every host gets the
    whole spec (arms interleaved, warm-ups first), run by `balloon-lab worker --host-id
    HOST` one trial at a time. Timings are then compared within each host."""
    from lab.testbed.task_queue import QueueError, submit

    path = db_path or default_db_path()
    if not is_postgres(str(path)):
        refuse("submit", f"needs a postgresql:// store that every worker reaches (--db or $BALLOON_LAB_DB), "
                         f"not {path}")
    try:
        spec = load_spec(spec_path)
        sub = submit(str(path), spec, [h for h in hosts.split(",") if h.strip()], max_attempts=max_attempts)
    except SpecError as e:
        refuse("submit", f"bad spec: {e.for_cli()}")
    except (QueueError, StoreError, ValueError) as e:
        refuse("submit", str(e))
    if as_json:
        click.echo(json.dumps({"run_id": sub.run_id, "hosts": sub.hosts, "jobs": sub.jobs}))
    else:
        click.echo(f"run {sub.run_id}: {sub.jobs} trials queued for {', '.join(sub.hosts)}; on each host "
                   f"({', '.join(sub.hosts)}) start:\n  {next_command('worker', host_id='HOST', db=redact(str(path)))}")
