"""`balloon-lab db`: the results store itself: push runs from one store to another."""
from __future__ import annotations


import click

from fmt.numbers import plural
from fmt.text_width import fold
from lab.cli.checks import refuse
from lab.store.db_path import as_db_target
from lab.store.store import Store, StoreError
from lab.store.sql import is_postgres, redact


@click.group("db")
def command() -> None:
    """Manage results stores (SQLite files and PostgreSQL databases)."""


@command.command("push")
@click.option("--from", "src", required=True, metavar="PATH|URL", help="Store to copy runs from.")
@click.option("--to", "dst", required=True, metavar="PATH|URL", help="Store to copy them into (created if new).")
@click.option("--run", "runs", multiple=True, metavar="RUN", help="Only this run (id or prefix; repeatable).")
def push_command(src: str, dst: str, runs: tuple[str, ...]) -> None:
    """Copy finished runs into another store, each in one transaction; runs the
    destination already holds are skipped, so pushing again copies nothing twice."""
    from lab.store.push import push

    if src == dst:
        refuse("db push", "--from and --to name the same store")
    try:
        with Store(as_db_target(src), create=False) as s, Store(as_db_target(dst)) as d:
            res = push(s, d, list(runs) or None)
    except StoreError as e:
        refuse("db push", str(e))
    where = redact(dst) if is_postgres(dst) else dst
    click.echo(fold(f"pushed {plural(len(res.copied), 'run')} to {where}"
                    + (f": {', '.join(res.copied)}" if res.copied else "")))
    if res.already:
        click.echo(fold(f"already there, skipped: {len(res.already)} ({', '.join(res.already)})"))
    if res.running:
        click.echo(f"still running, not pushed: {', '.join(res.running)}", err=True)
