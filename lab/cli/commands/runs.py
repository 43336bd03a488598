"""`balloon-lab runs`: list the runs in the results database."""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import click

from lab.cli.checks import refuse
from lab.store.db_path import db_option, default_db_path
from fmt.columns import format_columns
from lab.store.store import Store, StoreError


def local_time(iso: str | None) -> str:
    """'2024-05-01 14:03:04' in the local zone, from a stored UTC timestamp."""
    if not iso:
        return "-"
    return _dt.datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S")


@click.command("runs")
@db_option
@click.option("--json", "as_json", is_flag=True, help="Print the runs as JSON.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the newest N runs.")
@click.option("--host", "hosts", multiple=True, metavar="ID", help="Only runs with trials on this host (repeatable).")
def command(db_path, as_json: bool, limit: int | None, hosts: tuple[str, ...]) -> None:
    """List runs: id, created, kind, name, arms, hosts, trials ok/failed, status."""
    path = db_path or default_db_path()
    try:
        store = Store(path, create=False)
    except StoreError as e:
        if not isinstance(path, Path) or path.exists():  # a server or file that is there but unusable
            refuse("runs", str(e))
        click.echo("[]" if as_json else f"no runs yet (no database at {path})")
        return
    with store:
        runs = [r for r in store.list_runs() if not hosts or set(hosts) & set(r.hosts)][:limit]
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in runs], indent=1))
        return
    if not runs:
        click.echo(f"no runs yet in {path}" + (f" on host {', '.join(hosts)}" if hosts else ""))
        return
    rows = [(r.id, local_time(r.created_at), r.kind, r.name, ",".join(r.arms), ",".join(r.hosts) or "-",
             f"{r.trials_ok}/{r.trials_failed}", r.status) for r in runs]
    click.echo(format_columns(("id", "created", "kind", "name", "arms", "hosts", "ok/failed", "status"), rows))
