"""`balloon-lab report RUN -o FILE.html`: one self-contained HTML report of a run."""
from __future__ import annotations

from pathlib import Path

import click

from lab.cli import report_data
from lab.cli.checks import refuse, writable_file
from lab.store.db_path import db_option, default_db_path
from lab.paths import out_dir
from lab.store.store import Store, StoreError


@click.command("report")
@click.argument("run_ref", metavar="RUN")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="HTML file to write (default: out/report-<run id>.html).")
@db_option
@click.option("--host", default=None, metavar="ID",
              help="For a run on several hosts: the host the detailed sections show (default: the first).")
def command(run_ref: str, output: Path | None, db_path: Path | None, host: str | None) -> None:
    """Write the HTML report of one run (id, unique id prefix, or "latest"): verdict,
    comparison table, stage breakdown beside the published figures, probe histograms,
    run lengths, kicks per MiB, hosts side by side, environment and the command that
    reproduces it. One file, charts inlined, nothing fetched from the network."""
    path = db_path or default_db_path()
    if output is not None:
        writable_file("report", "-o", output)
    try:
        with Store(path, create=False) as store:
            run_id = store.resolve_run_id(run_ref)
            target = output or out_dir() / f"report-{run_id}.html"
            from reports.html import write_report  # matplotlib loads only once there is a run to draw
            data = report_data.load(store, run_id, host)
            try:
                report = write_report(data, target)
            except OSError as e:
                refuse("report", f"cannot write the report to {target}: {e.strerror or e}")
    except StoreError as e:
        refuse("report", str(e))
    click.echo(f"wrote {target} ({report.size / 1024:.0f} KiB, {len(report.charts)} charts) for run {report.run_id}",
               err=True)
    for m in report.missing:
        click.echo(f"  not shown: {m}", err=True)
