"""`balloon-lab doctor [--json]`: check that the eBPF lab is fully usable here."""
from __future__ import annotations

import json

import click


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help='One JSON object: {"ok", "checks": [{name, ok, detail, fix}]}.')
def command(as_json: bool) -> None:
    """Check root, BCC, kernel headers, tracefs, a real tracepoint program, USDT markers and the
    memory syscalls; on failure print the exact fix. Exit 0 only when everything passes."""
    from lab.testbed.doctor import format_text, report, run_checks

    checks = run_checks()
    rep = report(checks)
    if as_json:
        click.echo(json.dumps(rep, indent=1))
    else:
        click.echo(format_text(checks))
    raise SystemExit(0 if rep["ok"] else 1)
