"""`balloon-lab reclaim`: how fast each design hands a guest's freed memory back to the host.

Arms run interleaved trial by trial (A B C A B C ...). Prints per arm the median
(and range) of the time until 90 % of the freed memory left the memfd, the host
memory still held at the end, and guest and VMM CPU seconds. `--json` prints every
trial with its memfd timeline as one JSON object on stdout (as `--json` does in every
command); `--output FILE` writes that object to a file.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import click

from device.api import BACKINGS
from device.api import ReportingParams
from lab.cli.checks import refuse, writable_file
from lab.trials.model.reclaim import RECLAIM_ARMS, ReclaimTrial, run_reclaim
from lab.trials.model.balloon_trial import TrialFailed
from fmt.columns import format_columns
from fmt.numbers import fmt_fixed


def _med(values: list[float]) -> str:
    vals = [v for v in values if v is not None and v == v]
    if not vals:
        return "never"
    if len(vals) < len(values):
        return f"{statistics.median(vals):.2f} ({len(values) - len(vals)} never)"
    return f"{statistics.median(vals):.2f} [{min(vals):.2f}, {max(vals):.2f}]"


def summary_table(results: dict[str, list[dict]]) -> str:
    rows = [(arm, _med([r["time_to_90_s"] for r in rs]), _med([r["host_left_bytes"] / 2**20 for r in rs]),
             fmt_fixed(statistics.median(100 * r["returned_share"] for r in rs)),
             fmt_fixed(statistics.median(r["cpu_s"]["guest"] for r in rs), 2),
             fmt_fixed(statistics.median(r["cpu_s"]["vmm"] for r in rs), 2),
             "yes" if all(r["verified"] for r in rs) else "NO") for arm, rs in results.items() if rs]
    return "medians [min, max] over trials:\n" + format_columns(
        ("arm", "time to 90 % s", "host left MiB", "returned %", "guest CPU s", "VMM CPU s", "verified"), rows,
        right={3, 4, 5})


@click.command("reclaim")
@click.option("--arms", default=",".join(RECLAIM_ARMS), show_default=True,
              help="comma-separated: " + ", ".join(RECLAIM_ARMS))
@click.option("--guest-mib", type=int, default=4096, show_default=True)
@click.option("--free-mib", type=int, default=3072, show_default=True,
              help="MiB the guest allocates, writes and frees before the clock starts")
@click.option("--backing", type=click.Choice(BACKINGS), default="4k", show_default=True)
@click.option("--trials", type=int, default=3, show_default=True)
@click.option("--reporting-order", type=int, default=ReportingParams.order, show_default=True,
              help="smallest free block order reported (Linux: pageblock order, 9)")
@click.option("--reporting-capacity", type=int, default=ReportingParams.capacity, show_default=True,
              help="blocks per report request (Linux: PAGE_REPORTING_CAPACITY, 32)")
@click.option("--reporting-delay-ms", type=int, default=int(ReportingParams.delay_s * 1000), show_default=True,
              help="delay from a free to the reporting pass (Linux: 2 s)")
@click.option("--timeout-s", type=float, default=120.0, show_default=True, help="longest observation window")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--json", "as_json", is_flag=True,
              help="print every trial (with its memfd timeline) as one JSON object on stdout")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="also write that JSON object to this file")
@click.argument("stray", nargs=-1, required=False, metavar="")
def command(arms, guest_mib, free_mib, backing, trials, reporting_order, reporting_capacity, reporting_delay_ms,
            timeout_s, seed, as_json, output, stray) -> None:
    """A guest that allocated then freed memory: time until the host gets it back, per arm."""
    if stray:
        old = as_json and len(stray) == 1
        refuse("reclaim", f"--json {stray[0]}: --json prints to stdout now, as in every command; write a file with "
                          f"--output {stray[0]}" if old else f"unexpected argument {stray[0]!r} (see --help)")
    if output is not None:
        writable_file("reclaim", "--output", output)
    names = [a.strip() for a in arms.split(",") if a.strip()]
    try:
        params = ReportingParams(order=reporting_order, capacity=reporting_capacity,
                                 delay_s=reporting_delay_ms / 1000)
        if trials < 1:
            raise ValueError(f"--trials must be >= 1, got {trials}")
        specs = [ReclaimTrial(a, guest_mib=guest_mib, free_mib=free_mib, backing=backing, reporting=params,
                              timeout_s=timeout_s, seed=seed) for a in names]
    except ValueError as e:
        raise click.UsageError(str(e))
    click.echo(f"reclaim: guest {guest_mib} MiB frees {free_mib} MiB, backing {backing}; reporting: order "
               f"{params.order}, capacity {params.capacity}, delay {params.delay_s:g} s "
               f"(Linux defaults: 9, 32, 2 s); {trials} trial(s) per arm, interleaved", err=True)
    results: dict[str, list[dict]] = {a: [] for a in names}
    for i in range(trials):
        for spec in specs:
            try:
                r = run_reclaim(spec)
            except TrialFailed as e:
                refuse("reclaim", f"{spec.arm} trial {i + 1} failed: {e}", 1)
            results[spec.arm].append(r)
            t90 = "never" if r["time_to_90_s"] is None else f"{r['time_to_90_s']:.2f} s"
            click.echo(f"  trial {i + 1} {spec.arm:<20} 90 % back: {t90:>8}  host left "
                       f"{r['host_left_bytes'] / 2**20:8.1f} MiB  verified {'yes' if r['verified'] else 'NO'}",
                       err=True)
    doc = json.dumps({"when": time.time(), "trials": results}, indent=1)
    if as_json:
        click.echo(doc)
    else:
        click.echo(summary_table(results))
    if output is not None:
        output.write_text(doc + "\n")
        click.echo(f"trials written to {output}", err=True)
    sys.exit(0 if all(r["verified"] for rs in results.values() for r in rs) else 1)
