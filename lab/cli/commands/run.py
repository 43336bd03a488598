"""`balloon-lab run`: one trial of one protocol, printed as text or one JSON object."""
from __future__ import annotations

import functools
import json
import sys

import click

from device.virtio.protocols import PROTOCOL_NAMES
from lab.trials.backends import QEMU_BALLOON_ARMS, is_qemu_arm
from lab.cli.checks import checked, fits_in_memory, memory_option, refuse
from lab.trials.model.balloon_trial import BalloonTrial, TrialFailed
from lab.trials.model.runner import run_balloon
from lab.trials.spec import spec_from_cli, spec_options
from lab.cli.trial_text import format_result
from lab.trials.probing import open_probes

# The spec fields `run` takes (with compare's names, aliases and defaults).
RUN_FIELDS = ("guest_mib", "inflate_mib", "workload", "workload_params", "seed", "batch_pages", "discard", "probes",
              "extra_probes", "backing", "partial_tracking", "alloc_policy", "guest_init_on_alloc")


@click.command("run", epilog="""\b
examples:
    balloon-lab run                                   # pfn, 1 GiB guest, inflate 512 MiB
    balloon-lab run --protocol chunks --workload fragment --param share=0.6
    balloon-lab run --protocol bitmap --guest-mib 4096 --inflate-mib 3072 --json
""")
@click.option("--protocol", type=click.Choice(PROTOCOL_NAMES + QEMU_BALLOON_ARMS), default="pfn", show_default=True,
              help="The one protocol (arm) to run: a lab protocol, or a real-stack arm (QEMU + Linux guest).")
@spec_options(only=RUN_FIELDS, spec_file=False)
@click.option("--no-deflate", is_flag=True, help="inflate only")
@click.option("--cycles", type=click.IntRange(1, 100), default=1, show_default=True,
              help="Inflate/deflate cycles in the same processes (the workload gives deflated memory its "
                   "contents back between cycles; 'aged' can). Cycles 2..K go to the JSON's `cycles` list.")
@click.option("--paced", is_flag=True,
              help="Start each cycle when a line arrives on stdin and print its record as one JSON line when it "
                   "ends (`balloon-lab ab` runs two revisions' cycles in turn); the result follows as the last line.")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@memory_option
def command(protocol, no_deflate, cycles, paced, as_json, **kwargs) -> None:
    """Start a VMM and its guest, inflate, verify, deflate, verify, and print the result.
    Parameters are checked (as `compare` checks them) before any process starts."""
    spec = checked("run", lambda: spec_from_cli(kwargs, {"kind": "balloon", "arms": [protocol], "trials": 1,
                                                        "warmups": 0}))
    if cycles > 1:
        check_cycles("run", cycles, no_deflate, spec.workload, is_qemu_arm(protocol))
    if paced and (not as_json or is_qemu_arm(protocol)):
        refuse("run", "--paced needs --json and a lab arm (its cycles print JSON lines)")
    fits_in_memory("run", spec)
    if is_qemu_arm(protocol):
        run_qemu(protocol, spec, no_deflate, as_json)
    trial = BalloonTrial(protocol=protocol, guest_mib=spec.guest_mib, inflate_mib=spec.inflate_mib,
                         workload=spec.workload, workload_params=dict(spec.workload_params), seed=spec.seed,
                         batch_pages=spec.batch_pages, discard=spec.discard, deflate=not no_deflate,
                         backing=spec.backing, partial_tracking=spec.partial_tracking,
                         alloc_policy=spec.alloc_policy, init_on_alloc=spec.guest_init_on_alloc, cycles=cycles)
    run_fn = functools.partial(run_balloon, pace=StdioPace()) if paced else run_balloon
    run_and_print(run_fn, trial, TrialFailed, spec, as_json)


class StdioPace:
    """`--paced`: before each cycle a line {"waiting": c} on stdout (the processes are
    ready, nothing runs); the cycle starts when a line arrives on stdin; its record goes
    to stdout as one JSON line ({"cycle": c, ...}). Every line is flushed at once."""

    def before(self, cycle: int) -> None:
        sys.stdout.write(json.dumps({"waiting": cycle}) + "\n")
        sys.stdout.flush()
        if not sys.stdin.readline():
            raise TrialFailed(f"--paced: stdin closed before cycle {cycle}")

    def after(self, cycle: int, record: dict) -> None:
        sys.stdout.write(json.dumps({"cycle": cycle, **record}) + "\n")
        sys.stdout.flush()


def check_cycles(command: str, cycles: int, no_deflate: bool, workload: str, qemu: bool) -> None:
    """Refuse, before any process starts, --cycles that this trial cannot repeat."""
    from workloads import WORKLOADS
    if no_deflate:
        refuse(command, f"--cycles {cycles} needs the deflate (drop --no-deflate)")
    if qemu:
        refuse(command, f"--cycles {cycles}: the real-stack arms run one cycle per trial")
    if not WORKLOADS[workload].can_retouch():
        able = ", ".join(n for n, w in WORKLOADS.items() if w.can_retouch())
        refuse(command, f"--cycles {cycles} with --workload {workload}: it cannot give deflated memory its "
                        f"contents back between cycles (workloads that can: {able})")


def run_and_print(run_fn, trial, failure: type[Exception], spec, as_json: bool) -> None:
    """Run one trial with the spec's probes, print it (text or JSON) and exit 0 only if verified."""
    session = open_probes(spec.probes, spec.extra_probes)
    try:
        result = run_fn(trial, session)
    except failure as e:
        click.echo(f"balloon-lab run: trial failed: {e}", err=True)
        sys.exit(1)
    finally:
        if session is not None:
            session.detach()
    click.echo(json.dumps(result) if as_json else format_result(result))
    sys.exit(0 if result["verified"] else 1)


def run_qemu(arm: str, spec, no_deflate: bool, as_json: bool) -> None:
    """`run --protocol qemu-*`: one trial on the real stack (exits). The spec validator
    has already refused what the real stack cannot do (workloads, --batch-pages)."""
    from lab.trials.qemu.trial import QemuBalloonTrial, QemuTrialFailed, run_qemu_balloon
    try:
        trial = QemuBalloonTrial(arm=arm, guest_mib=spec.guest_mib, inflate_mib=spec.inflate_mib,
                                 workload=spec.workload, workload_params=dict(spec.workload_params),
                                 seed=spec.seed, deflate=not no_deflate)
    except ValueError as e:
        raise click.UsageError(str(e))
    run_and_print(run_qemu_balloon, trial, QemuTrialFailed, spec, as_json)
