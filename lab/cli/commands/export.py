"""`balloon-lab export RUN... [--format csv|jsonl|parquet] [-o FILE]`: stored runs as
tidy data, one row per trial x metric (lab/store/export.py has the columns)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from lab.results import metrics
from lab.cli.checks import refuse, writable_file
from lab.store.export import FORMATS
from lab.store.db_path import db_option, default_db_path
from lab.store.store import Store, StoreError

EXAMPLES = """\b
examples:
    balloon-lab export latest > latest.csv
    balloon-lab export 3f2a 9c1d --format parquet -o runs.parquet
    balloon-lab export latest --format jsonl | jq -c 'select(.metric == "stages_ns.inflate.total")'
    balloon-lab export latest --metrics 'stages_ns.inflate.*' --metrics kicks

\b
In pandas (docs/EXPORT.md has more):
    import pandas as pd
    df = pd.read_csv("latest.csv")
    ok = df[(df.status == "ok") & ~df.warmup]
    ok.pivot_table(index="metric", columns="arm", values="value", aggfunc="median")
"""


@click.command("export", epilog=EXAMPLES)
@click.argument("run_refs", metavar="RUN...", nargs=-1, required=True)
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="csv", show_default=True,
              help="csv and jsonl go to stdout unless -o is given; parquet needs -o.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File to write (default: stdout).")
@click.option("--metrics", "patterns", multiple=True, metavar="PATTERN",
              help="Only metrics matching this glob (repeatable), e.g. 'stages_ns.inflate.*' (failed trials' "
                   "rows are kept).  [default: every metric]")
@db_option
def command(run_refs: tuple[str, ...], fmt: str, output: Path | None, patterns: tuple[str, ...],
            db_path: Path | None) -> None:
    """Write runs (ids, unique id prefixes, or "latest") as one tidy row per trial x metric:
    run_id, run_name, trial, arm, round, warmup, status, metric, kind, unit, value."""
    from lab.store.export import export_rows, write_csv, write_jsonl, write_parquet
    if output is not None:
        writable_file("export", "-o", output)
    elif fmt == "parquet":
        refuse("export", "--format parquet: give -o FILE (parquet is binary, not for a terminal)")
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            refuse("export", "--format parquet needs pyarrow: pip install pyarrow (or use csv/jsonl)")
    path = db_path or default_db_path()
    try:
        with Store(path, create=False) as store:
            ids = list(dict.fromkeys(store.resolve_run_id(r) for r in run_refs))  # every RUN checked first
            known = store.metric_names(ids)
            unknown = [p for p in patterns if not metrics.matching(known, [p])]
            if unknown:
                where = f"run {ids[0]}" if len(ids) == 1 else f"runs {', '.join(ids)}"
                refuse("export", "--metrics " + metrics.unknown_names_message(unknown, known, where))
            rows = export_rows(store, ids, patterns)
            if fmt == "parquet":
                n = write_parquet(rows, output)
            else:
                writer = write_csv if fmt == "csv" else write_jsonl
                if output is None:
                    n = writer(rows, sys.stdout)
                else:
                    with open(output, "w", newline="") as f:
                        n = writer(rows, f)
    except StoreError as e:
        refuse("export", str(e))
    except BrokenPipeError:              # `export ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    click.echo(f"exported {n} rows of {len(ids)} run{'s' if len(ids) != 1 else ''}"
               + (f" to {output}" if output else ""), err=True)
