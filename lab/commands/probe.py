"""`balloon-lab probe --pid PID`: the lab's probes on any process (e.g. a real QEMU)."""
from __future__ import annotations

import json

import click


@click.command("probe")
@click.option("--pid", "pid", type=int, required=True, help="Process to watch (all its threads).")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=5.0, show_default=True,
              help="Seconds to count for (stops early if the process exits).")
@click.option("--eventfd", "eventfds", multiple=True, metavar="FD[:QUEUE[:KIND]]",
              help="Count write/read on this eventfd as QUEUE's KIND (kick, call, config, other). Repeatable. "
                   "Default: every eventfd the process has open, as kind 'other'.")
@click.option("--probes", "concerns", default="madvise,kicks,pagealloc,stages", show_default=True,
              help="Comma-separated probes to load.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (the ProbeReading).")
def command(pid: int, duration: float, eventfds: tuple[str, ...], concerns: str, as_json: bool) -> None:
    """Count madvise/fallocate calls (advice, length and kernel-time histograms), eventfd writes and
    reads, page allocations, frees and user faults of PID, and the lab's stages if PID is a lab
    process. Exit 0 with a reading, 1 when eBPF is unavailable, 2 for a bad pid or option."""
    from probes.session import CONCERNS
    from probes.standalone import NoSuchProcess, format_summary, parse_eventfd, probe_pid, process_name

    names = tuple(c.strip() for c in concerns.split(",") if c.strip())
    unknown = [c for c in names if c not in CONCERNS]
    if unknown or not names:
        raise click.UsageError(f"--probes {concerns!r}: choose from {', '.join(CONCERNS)}")
    try:
        specs = [parse_eventfd(e) for e in eventfds]
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if pid <= 0:
        click.echo(f"error: --pid {pid}: not a process id", err=True)
        raise SystemExit(2)
    try:
        comm = process_name(pid)
        reading = probe_pid(pid, duration, names, specs or None)
    except NoSuchProcess as e:
        click.echo(f"error: {e}", err=True)
        raise SystemExit(2)
    if as_json:
        click.echo(json.dumps(reading.to_json(), indent=1))
    else:
        click.echo(format_summary(reading, f"balloon-lab probe: pid {pid} ({comm})"))
    raise SystemExit(0 if reading.backend == "bcc" else 1)
