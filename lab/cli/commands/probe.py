"""`balloon-lab probe --pid PID [INTERVAL [COUNT]]`: the lab's probes on any process
(e.g. a real QEMU), in the manner of BCC's tools: without INTERVAL it counts until
Ctrl-C (or the process exits) and then prints its reading; with INTERVAL it prints a
summary every INTERVAL seconds, COUNT times (or until Ctrl-C), counters zeroed after each."""
from __future__ import annotations

import json
import sys
import time

import click

EXAMPLES = """\b
examples:
    balloon-lab probe --pid 1234            # count until Ctrl-C, then print the reading
    balloon-lab probe --pid 1234 1 10       # a summary every second, 10 times
    balloon-lab probe --pid 1234 5          # a summary every 5 s until Ctrl-C
    balloon-lab probe --pid 1234 --duration 3 --json   # one JSON reading after 3 s
    balloon-lab probe --pid $(pgrep -f qemu-system) --programs madvise,kicks
    balloon-lab probe --pid 1234 --programs madvise,syscall-time,pagefree   # with the opt-in programs
    balloon-lab probe --pid 1234 --eventfd 17:0:kick --eventfd 18:0:call 1

\b
Exit status: 0 with a reading (also after Ctrl-C), 1 when eBPF is unavailable,
2 for a bad pid or option. Annotated real output: docs/probe_example.txt.
"""


@click.command("probe", epilog=EXAMPLES)
@click.argument("interval", type=click.FloatRange(min=0, min_open=True), required=False)
@click.argument("count", type=click.IntRange(min=1), required=False)
@click.option("-p", "--pid", "pid", type=int, required=True, help="Process to watch (all its threads).")
@click.option("-d", "--duration", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Count for S seconds, print one reading and exit (instead of until Ctrl-C). "
                   "Not with INTERVAL.")
@click.option("--eventfd", "eventfds", multiple=True, metavar="FD[:QUEUE[:KIND]]",
              help="Count write/read on this eventfd as QUEUE's KIND (kick, call, config, other). Repeatable. "
                   "Default: every eventfd the process has open, as kind 'other'.")
@click.option("--programs", "concerns", default="madvise,kicks,pagealloc,stages", show_default=True,
              help="Comma-separated BCC programs to load (probes/: one per concern); add the opt-in pagefree "
                   "(kmem page frees) or syscall-time (madvise/fallocate kernel time), which cost more "
                   "(docs/PROBES.md).")
@click.option("--probes", "old_probes", default=None, hidden=True, expose_value=True)
@click.option("-T", "--timestamp", is_flag=True, help="Include a wall-clock time on each interval's header.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (the ProbeReading) per reading, "
                                                      "one per line with INTERVAL.")
def command(interval: float | None, count: int | None, pid: int, duration: float | None,
            eventfds: tuple[str, ...], concerns: str, old_probes: str | None, timestamp: bool, as_json: bool) -> None:
    """Count madvise/fallocate calls (advice, length histogram), eventfd writes and reads, page
    allocations and user faults of PID, and the lab's stages if PID is a lab process (opt-in: kernel
    time per call, page frees). Each reading ends with what every probe program cost, measured.
    Without INTERVAL: until Ctrl-C or the process exits, then one reading. With INTERVAL: a summary
    every INTERVAL seconds, COUNT times (default: until Ctrl-C)."""
    from probes.session import CONCERNS, check_concerns
    from probes.standalone import NoSuchProcess, format_summary, parse_eventfd, probe_intervals, process_name

    if old_probes is not None:       # `run`/`compare` use --probes/--no-probes for on/off: one meaning only
        raise click.UsageError(f"--probes {old_probes}: the programs to load are now --programs {old_probes} "
                               "(--probes/--no-probes turns the probes on or off in run and compare)")
    names = tuple(c.strip() for c in concerns.split(",") if c.strip())
    if not names:
        raise click.BadParameter(f"{concerns!r}: choose from {', '.join(CONCERNS)}", param_hint="--programs")
    try:
        check_concerns(names)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--programs") from None
    if duration is not None and interval is not None:
        raise click.UsageError("--duration and INTERVAL exclude each other (INTERVAL 1 COUNT 5 counts 5 s)")
    try:
        specs = [parse_eventfd(e) for e in eventfds]
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if pid <= 0:
        raise click.BadParameter(f"{pid}: not a process id", param_hint="--pid")
    try:
        comm = process_name(pid)
    except NoSuchProcess as e:
        raise click.BadParameter(str(e), param_hint="--pid") from None

    def attached() -> None:
        if not as_json:
            what = (f"every {interval:g} s" + (f", {count} times" if count else "") if interval
                    else f"for {duration:g} s" if duration else "until Ctrl-C")
            click.echo(f"Tracing pid {pid} ({comm}) {what}... Hit Ctrl-C to end.", err=True)

    every, times = (duration, 1) if duration is not None else (interval, count)
    backend = "none"
    n = 0
    try:
        for reading in probe_intervals(pid, every, times, names, specs or None, on_attached=attached):
            n += 1
            backend = reading.backend
            if as_json:
                click.echo(json.dumps(reading.to_json(), indent=None if interval else 1))
            else:
                stamp = time.strftime("%H:%M:%S ") if timestamp else ""
                title = (f"{stamp}balloon-lab probe: pid {pid} ({comm})"
                         + (f", interval {n}" + (f"/{count}" if count else "") if interval else ""))
                click.echo(format_summary(reading, title) + ("\n" if interval else ""))
            sys.stdout.flush()
    except KeyboardInterrupt:      # Ctrl-C while printing or while loading the probes
        if n == 0:
            click.echo("interrupted before the probes were attached: nothing counted", err=True)
            raise SystemExit(130)
    except NoSuchProcess as e:
        raise click.BadParameter(str(e), param_hint="--pid") from None
    raise SystemExit(0 if backend == "bcc" else 1)
