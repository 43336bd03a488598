"""`balloon-lab run`: one trial of one protocol, printed as text or one JSON object."""
from __future__ import annotations

import json
import sys

import click

from lab.trials.backends import is_qemu_arm
from lab.cli.checks import checked
from lab.trials.model.balloon_trial import BalloonTrial, TrialFailed
from lab.trials.model.runner import run_balloon
from lab.trials.spec import ARMS_BY_KIND, spec_from_cli, spec_options
from lab.cli.trial_text import format_result
from lab.trials.probing import open_probes

# The spec fields `run` takes (with compare's names, aliases and defaults).
RUN_FIELDS = ("guest_mib", "inflate_mib", "workload", "workload_params", "seed", "batch_pages", "discard", "probes",
              "backing", "partial_tracking", "alloc_policy", "guest_init_on_alloc")


@click.command("run", epilog="""\b
examples:
    balloon-lab run                                   # pfn, 1 GiB guest, inflate 512 MiB
    balloon-lab run --protocol chunks --workload fragment --param share=0.6
    balloon-lab run --protocol bitmap --guest-mib 4096 --inflate-mib 3072 --json
""")
@click.option("--protocol", default="pfn", show_default=True, metavar="[" + "|".join(ARMS_BY_KIND["balloon"]) + "]",
              help="The one protocol (arm) to run: a lab protocol, or a real-stack arm (QEMU + Linux guest); "
                   "checked, like every option, by the spec.")
@spec_options(only=RUN_FIELDS, spec_file=False)
@click.option("--no-deflate", is_flag=True, help="inflate only")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def command(protocol, no_deflate, as_json, **kwargs) -> None:
    """Start a VMM and its guest, inflate, verify, deflate, verify, and print the result.
    Parameters are checked (as `compare` checks them) before any process starts."""
    spec = checked("run", lambda: spec_from_cli(kwargs, {"kind": "balloon", "arms": [protocol], "trials": 1,
                                                        "warmups": 0}), flags={"arms": "--protocol"})
    arm, = spec.arms
    if is_qemu_arm(arm):
        run_qemu(arm, spec, no_deflate, as_json)
    run_and_print(run_balloon, BalloonTrial.from_spec(spec, arm, deflate=not no_deflate), TrialFailed, spec.probes,
                  as_json)


def run_and_print(run_fn, trial, failure: type[Exception], probes: bool, as_json: bool) -> None:
    """Run one trial with the probes, print it (text or JSON) and exit 0 only if verified."""
    session = open_probes(probes)
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
    run_and_print(run_qemu_balloon, QemuBalloonTrial.from_spec(spec, arm, deflate=not no_deflate), QemuTrialFailed,
                  spec.probes, as_json)
