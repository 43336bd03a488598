"""`balloon-lab runs`: list the runs in the results database."""
from __future__ import annotations

import datetime as _dt
import json

import click

from lab.paths import db_option, default_db_path
from lab.stats import format_columns
from lab.store import Store, StoreError


def local_time(iso: str | None) -> str:
    """'2024-05-01 14:03:04' in the local zone, from a stored UTC timestamp."""
    if not iso:
        return "-"
    return _dt.datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S")


@click.command("runs")
@db_option
@click.option("--json", "as_json", is_flag=True, help="Print the runs as JSON.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the newest N runs.")
def command(db_path, as_json: bool, limit: int | None) -> None:
    """List runs: id, created, kind, name, arms, trials ok/failed, status."""
    path = db_path or default_db_path()
    try:
        store = Store(path, create=False)
    except StoreError:
        click.echo("[]" if as_json else f"no runs yet (no database at {path})")
        return
    with store:
        runs = store.list_runs()[:limit]
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in runs], indent=1))
        return
    if not runs:
        click.echo(f"no runs yet in {path}")
        return
    rows = [(r.id, local_time(r.created_at), r.kind, r.name, ",".join(r.arms),
             f"{r.trials_ok}/{r.trials_failed}", r.status) for r in runs]
    click.echo(format_columns(("id", "created", "kind", "name", "arms", "ok/failed", "status"), rows))
