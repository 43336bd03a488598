"""`balloon-lab run`: one trial of one protocol, printed as text or one JSON object."""
from __future__ import annotations

import json
import shlex
import sys

import click

from device.virtio.protocols import PROTOCOL_NAMES
from lab.trials.backends import QEMU_BALLOON_ARMS, is_qemu_arm
from lab.cli.checks import checked, refuse
from lab.store.db_path import db_option, next_command
from lab.trials.model.balloon_trial import BalloonTrial, TrialFailed
from lab.trials.model.runner import run_balloon
from lab.trials.spec import FIELDS, ExperimentSpec, spec_from_cli, spec_options
from lab.cli.trial_text import format_result
from lab.trials.probing import open_probes

# The spec fields `run` takes (with compare's names, aliases and defaults).
RUN_FIELDS = ("guest_mib", "inflate_mib", "workload", "workload_params", "seed", "batch_pages", "discard", "probes",
              "backing", "partial_tracking", "alloc_policy", "guest_init_on_alloc")


class RunSpec(ExperimentSpec):
    """The spec of a `run` stored with --db (one arm, one trial, timed with the probes
    attached: no twins), whose stored command line is the `balloon-lab run ...` that
    reproduces it."""

    deflate: bool = True

    def command_line(self, command: str = "run") -> str:
        argv = ["balloon-lab", "run", "--protocol", self.arms[0]]
        for f in FIELDS:
            if f.name in RUN_FIELDS:
                argv += f.to_argv(getattr(self, f.name))
        return shlex.join(argv + ([] if self.deflate else ["--no-deflate"]))


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
@db_option
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def command(protocol, no_deflate, db_path, as_json, **kwargs) -> None:
    """Start a VMM and its guest, inflate, verify, deflate, verify, and print the result.
    Parameters are checked (as `compare` checks them) before any process starts. With
    --db the trial is also stored as a run of one trial, for `show`, `export` and `report`."""
    spec = checked("run", lambda: spec_from_cli(kwargs, {"kind": "balloon", "arms": [protocol], "trials": 1,
                                                        "warmups": 0, "twins": False}))
    if is_qemu_arm(protocol):
        run_qemu(protocol, spec, no_deflate, as_json, db_path)
    trial = BalloonTrial(protocol=protocol, guest_mib=spec.guest_mib, inflate_mib=spec.inflate_mib,
                         workload=spec.workload, workload_params=dict(spec.workload_params), seed=spec.seed,
                         batch_pages=spec.batch_pages, discard=spec.discard, deflate=not no_deflate,
                         backing=spec.backing, partial_tracking=spec.partial_tracking,
                         alloc_policy=spec.alloc_policy, init_on_alloc=spec.guest_init_on_alloc)
    run_and_print(run_balloon, trial, TrialFailed, spec, as_json, db_path, not no_deflate)


def run_and_print(run_fn, trial, failure: type[Exception], spec: ExperimentSpec, as_json: bool,
                  db_path=None, deflate: bool = True) -> None:
    """Run one trial with the probes, print it (text or JSON) and exit 0 only if verified;
    with a store, the trial is recorded there as a run (as `compare` records its trials)."""
    session = open_probes(spec.probes)
    try:
        if db_path is None:
            try:
                result = run_fn(trial, session)
            except failure as e:
                refuse("run", f"trial failed: {e}", 1)
        else:
            result = _run_stored(run_fn, trial, spec, session, db_path, deflate)
    finally:
        if session is not None:
            session.detach()
    click.echo(json.dumps(result) if as_json else format_result(result))
    sys.exit(0 if result["verified"] else 1)


def _run_stored(run_fn, trial, spec: ExperimentSpec, session, db_path, deflate: bool) -> dict:
    """The trial through the experiment loop (environment, load, checks, one stored
    record), then its result; a failed trial exits 1 after it is stored."""
    from lab.trials.experiment import ExperimentInterrupted, run_experiment
    from lab.store.store import Store
    stored = RunSpec(**spec.to_dict())
    stored.deflate = deflate
    with Store(db_path) as store:
        try:
            run_id = run_experiment(stored, lambda _s, _arm, _rnd: run_fn(trial, session), store, progress=False,
                                    probe_session=session)
        except ExperimentInterrupted as e:
            refuse("run", f"interrupted: run {e.run_id} is stored as interrupted", 130)
        rec = store.trials(run_id)[0]
        show = next_command("show", run_id, db=store.path)
    unverified = rec.result is not None and rec.result.get("verified") is False   # printed, then exit 1
    if rec.status != "ok" and not unverified:
        refuse("run", f"trial failed: {(rec.error or '?').splitlines()[0]} (stored as run {run_id}: `{show}`)", 1)
    click.echo(f"stored as run {run_id}: `{show}`", err=True)
    return rec.result


def run_qemu(arm: str, spec, no_deflate: bool, as_json: bool, db_path=None) -> None:
    """`run --protocol qemu-*`: one trial on the real stack (exits). The spec validator
    has already refused what the real stack cannot do (workloads, --batch-pages)."""
    from lab.trials.qemu.trial import QemuBalloonTrial, QemuTrialFailed, run_qemu_balloon
    try:
        trial = QemuBalloonTrial(arm=arm, guest_mib=spec.guest_mib, inflate_mib=spec.inflate_mib,
                                 workload=spec.workload, workload_params=dict(spec.workload_params),
                                 seed=spec.seed, deflate=not no_deflate)
    except ValueError as e:
        raise click.UsageError(str(e))
    run_and_print(run_qemu_balloon, trial, QemuTrialFailed, spec, as_json, db_path, not no_deflate)
