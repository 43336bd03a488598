"""`balloon-lab reclaim`: how fast each design hands a guest's freed memory back to the host.

Arms run interleaved trial by trial (A B C A B C ...). Prints per arm the median
(and range) of the time until 90 % of the freed memory left the memfd, the host
memory still held at the end, and guest and VMM CPU seconds; `--json FILE` keeps
every trial with its memfd timeline.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import click

from device.virtio.backing import BACKINGS
from device.guest.page_reporting_driver import ReportingParams
from lab.trials.model.reclaim import RECLAIM_ARMS, ReclaimTrial, run_reclaim
from lab.trials.model.balloon_trial import TrialFailed


def _med(values: list[float]) -> str:
    vals = [v for v in values if v is not None and v == v]
    if not vals:
        return "never"
    if len(vals) < len(values):
        return f"{statistics.median(vals):.2f} ({len(values) - len(vals)} never)"
    return f"{statistics.median(vals):.2f} [{min(vals):.2f}, {max(vals):.2f}]"


def summary_table(results: dict[str, list[dict]]) -> str:
    head = (f"{'arm':<20}{'time to 90 % s':>28}{'host left MiB':>30}{'returned %':>12}"
            f"{'guest CPU s':>13}{'VMM CPU s':>11}{'verified':>10}")
    lines = ["medians [min, max] over trials:", head]
    for arm, rs in results.items():
        if not rs:
            continue
        left = _med([r["host_left_bytes"] / 2**20 for r in rs])
        share = statistics.median(100 * r["returned_share"] for r in rs)
        lines.append(f"{arm:<20}{_med([r['time_to_90_s'] for r in rs]):>28}{left:>30}{share:>12.1f}"
                     f"{statistics.median(r['cpu_s']['guest'] for r in rs):>13.2f}"
                     f"{statistics.median(r['cpu_s']['vmm'] for r in rs):>11.2f}"
                     f"{'yes' if all(r['verified'] for r in rs) else 'NO':>10}")
    return "\n".join(lines)


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
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write every trial (with its memfd timeline) to this file")
def command(arms, guest_mib, free_mib, backing, trials, reporting_order, reporting_capacity, reporting_delay_ms,
            timeout_s, seed, json_path) -> None:
    """A guest that allocated then freed memory: time until the host gets it back, per arm."""
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
                click.echo(f"balloon-lab reclaim: {spec.arm} trial {i + 1} failed: {e}", err=True)
                sys.exit(1)
            results[spec.arm].append(r)
            t90 = "never" if r["time_to_90_s"] is None else f"{r['time_to_90_s']:.2f} s"
            click.echo(f"  trial {i + 1} {spec.arm:<20} 90 % back: {t90:>8}  host left "
                       f"{r['host_left_bytes'] / 2**20:8.1f} MiB  verified {'yes' if r['verified'] else 'NO'}",
                       err=True)
    click.echo(summary_table(results))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"when": time.time(), "trials": results}, indent=1))
        click.echo(f"trials written to {json_path}")
    sys.exit(0 if all(r["verified"] for rs in results.values() for r in rs) else 1)
