"""`balloon-lab run`: one trial of one protocol, printed as text or one JSON object."""
from __future__ import annotations

import json
import sys

import click

from device.virtio.protocols import PROTOCOL_NAMES
from lab.backends import QEMU_BALLOON_ARMS, is_qemu_arm
from lab.cli_checks import checked
from lab.runner import BalloonTrial, TrialFailed, run_balloon
from lab.spec import spec_from_cli, spec_options
from lab.trial_text import format_result

# The spec fields `run` takes (with compare's names, aliases and defaults).
RUN_FIELDS = ("guest_mib", "inflate_mib", "workload", "workload_params", "seed", "batch_pages", "discard", "probes",
              "extra_probes", "backing", "partial_tracking", "alloc_policy", "guest_init_on_alloc")


def open_probes(enabled: bool, extra: list[str] | tuple[str, ...] = ()):
    """A probe session (the default probes and the opt-in `extra` ones), or None when
    probes are off. Degrades (backend none) without eBPF."""
    if not enabled:
        return None
    from probes.session import DEFAULT_CONCERNS, ProbeSession
    return ProbeSession(enabled=True, concerns=DEFAULT_CONCERNS + tuple(extra))


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
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def command(protocol, no_deflate, as_json, **kwargs) -> None:
    """Start a VMM and its guest, inflate, verify, deflate, verify, and print the result.
    Parameters are checked (as `compare` checks them) before any process starts."""
    spec = checked("run", lambda: spec_from_cli(kwargs, {"kind": "balloon", "arms": [protocol], "trials": 1,
                                                        "warmups": 0}))
    if is_qemu_arm(protocol):
        run_qemu(protocol, spec, no_deflate, as_json)
    trial = BalloonTrial(protocol=protocol, guest_mib=spec.guest_mib, inflate_mib=spec.inflate_mib,
                         workload=spec.workload, workload_params=dict(spec.workload_params), seed=spec.seed,
                         batch_pages=spec.batch_pages, discard=spec.discard, deflate=not no_deflate,
                         backing=spec.backing, partial_tracking=spec.partial_tracking,
                         alloc_policy=spec.alloc_policy, init_on_alloc=spec.guest_init_on_alloc)
    run_and_print(run_balloon, trial, TrialFailed, spec, as_json)


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
    from lab.backends.qemu.trial import QemuBalloonTrial, QemuTrialFailed, run_qemu_balloon
    try:
        trial = QemuBalloonTrial(arm=arm, guest_mib=spec.guest_mib, inflate_mib=spec.inflate_mib,
                                 workload=spec.workload, workload_params=dict(spec.workload_params),
                                 seed=spec.seed, deflate=not no_deflate)
    except ValueError as e:
        raise click.UsageError(str(e))
    run_and_print(run_qemu_balloon, trial, QemuTrialFailed, spec, as_json)
