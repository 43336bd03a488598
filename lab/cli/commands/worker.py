"""`balloon-lab worker`: run queued trials for one host, one at a time."""
from __future__ import annotations

import sys

import click

from lab.cli.checks import refuse
from lab.store.db_path import db_option, default_db_path
from lab.store.store import StoreError
from lab.store.sql import is_postgres


@click.command("worker")
@db_option
@click.option("--host-id", default=None, metavar="ID",
              help="Host this worker stands for (default: $BALLOON_LAB_HOST_ID or the host name).")
@click.option("--until-done", is_flag=True, help="Exit once this host's queue has nothing left to run.")
@click.option("--heartbeat", "heartbeat_s", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              help="Seconds between this worker's heartbeats.")
@click.option("--stall-timeout", "stall_timeout_s", type=click.FloatRange(min=0.5), default=30.0,
              show_default=True, help="A worker silent this long is lost: its trial is re-queued.")
def command(db_path, host_id: str | None, until_done: bool, heartbeat_s: float, stall_timeout_s: float) -> None:
    """Serve one host's queue of a PostgreSQL store: each trial runs alone on this host
    and is stored in one transaction with the host's identity. Ctrl-C or SIGTERM
    finishes the running trial and stops; a killed worker's trial is re-queued."""
    from lab.testbed.task_queue import QueueError, run_worker

    path = db_path or default_db_path()
    if not is_postgres(str(path)):
        click.echo(f"balloon-lab worker: a worker needs the postgresql:// store the trials were submitted to, not {path}",
                   err=True)
        sys.exit(2)
    try:
        st = run_worker(str(path), host_id, until_done=until_done, heartbeat_s=heartbeat_s,
                        stall_timeout_s=stall_timeout_s)
    except (QueueError, StoreError, ValueError) as e:
        refuse("worker", str(e))
    click.echo(f"worker {st.name}: stored {len(st.ran)} trial(s)", err=True)
