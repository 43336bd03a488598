"""`balloon-lab run`: one trial of one protocol, printed as text or one JSON object."""
from __future__ import annotations

import functools
import json
import shlex
import sys

import click

from lab.trials.backends import is_qemu_arm
from lab.cli.checks import checked, fits_in_memory, memory_option, refuse
from lab.store.db_path import db_option, next_command
from lab.trials.model.balloon_trial import BalloonTrial, TrialFailed
from lab.trials.model.runner import run_balloon
from lab.trials.spec import ARMS_BY_KIND, FIELDS, ExperimentSpec, spec_from_cli, spec_options
from lab.cli.trial_text import format_result
from lab.trials.probing import open_probes

# The spec fields `run` takes (with compare's names, aliases and defaults).
RUN_FIELDS = ("guest_mib", "inflate_mib", "workload", "workload_params", "seed", "batch_pages", "discard", "probes",
              "extra_probes", "backing", "partial_tracking", "alloc_policy", "guest_init_on_alloc")


class RunSpec(ExperimentSpec):
    """The spec of a `run` stored with --db (one arm, one trial, timed with the probes
    attached: no twins), whose stored command line is the `balloon-lab run ...` that
    reproduces it (`run_flags`: the options that are not spec fields, e.g. --no-deflate)."""

    run_flags: tuple[str, ...] = ()

    def command_line(self, command: str = "run") -> str:
        argv = ["balloon-lab", "run", "--protocol", self.arms[0]]
        for f in FIELDS:
            if f.name in RUN_FIELDS:
                argv += f.to_argv(getattr(self, f.name))
        return shlex.join(argv + list(self.run_flags))


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
@click.option("--cycles", type=click.IntRange(1, 100), default=1, show_default=True,
              help="Inflate/deflate cycles in the same processes (the workload gives deflated memory its "
                   "contents back between cycles; 'aged' can). Cycles 2..K go to the JSON's `cycles` list.")
@click.option("--paced", is_flag=True,
              help="Start each cycle when a line arrives on stdin and print its record as one JSON line when it "
                   "ends (`balloon-lab ab` runs two revisions' cycles in turn); the result follows as the last line.")
@click.option("--pace-retouch", is_flag=True,
              help="With --paced: before each cycle after the first, print {\"retouch\": c} and give deflated "
                   "memory its contents back when a line arrives, then wait for the cycle's own line (`ab` has "
                   "both sides do it at once, outside the measured turns).")
@db_option
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@memory_option
def command(protocol, no_deflate, cycles, paced, pace_retouch, db_path, as_json, **kwargs) -> None:
    """Start a VMM and its guest, inflate, verify, deflate, verify, and print the result.
    Parameters are checked (as `compare` checks them) before any process starts. With
    --db the trial is also stored as a run of one trial, for `show`, `export` and `report`."""
    spec = checked("run", lambda: spec_from_cli(kwargs, {"kind": "balloon", "arms": [protocol], "trials": 1,
                                                        "warmups": 0, "twins": False}), flags={"arms": "--protocol"})
    arm, = spec.arms
    if cycles > 1:
        check_cycles("run", cycles, no_deflate, spec.workload, is_qemu_arm(arm))
    if paced and (not as_json or is_qemu_arm(arm)):
        refuse("run", "--paced needs --json and a lab arm (its cycles print JSON lines)")
    if pace_retouch and not paced:
        refuse("run", "--pace-retouch paces the retouch of --paced cycles: add --paced")
    fits_in_memory("run", spec)
    flags = (("--no-deflate",) if no_deflate else ()) + (("--cycles", str(cycles)) if cycles > 1 else ())
    if is_qemu_arm(arm):
        run_qemu(arm, spec, no_deflate, as_json, db_path, flags)
    trial = BalloonTrial.from_spec(spec, arm, deflate=not no_deflate, cycles=cycles)
    run_fn = functools.partial(run_balloon, pace=StdioPace(pace_retouch)) if paced else run_balloon
    run_and_print(run_fn, trial, TrialFailed, spec, as_json, db_path, flags)


class StdioPace:
    """`--paced`: before each cycle a line {"waiting": c} on stdout (the processes are
    ready, nothing runs); the cycle starts when a line arrives on stdin; its record goes
    to stdout as one JSON line ({"cycle": c, ...}). Every line is flushed at once.
    With `retouch_apart` (--pace-retouch) the retouch before a cycle has its own step:
    {"retouch": c}, a line on stdin, the retouch, then {"waiting": c}; without it the
    retouch runs in the cycle's turn."""

    def __init__(self, retouch_apart: bool = False) -> None:
        self.retouch_apart = retouch_apart

    def before(self, cycle: int, retouch=None) -> None:
        if retouch is not None and self.retouch_apart:
            self._wait({"retouch": cycle}, f"the retouch before cycle {cycle}")
            retouch()
            retouch = None
        self._wait({"waiting": cycle}, f"cycle {cycle}")
        if retouch is not None:
            retouch()

    @staticmethod
    def _wait(line: dict, what: str) -> None:
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()
        if not sys.stdin.readline():
            raise TrialFailed(f"--paced: stdin closed before {what}")

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


def run_and_print(run_fn, trial, failure: type[Exception], spec: ExperimentSpec, as_json: bool,
                  db_path=None, flags: tuple[str, ...] = ()) -> None:
    """Run one trial with the probes, print it (text or JSON) and exit 0 only if verified;
    with a store, the trial is recorded there as a run (as `compare` records its trials)."""
    session = open_probes(spec.probes, spec.extra_probes)
    try:
        if db_path is None:
            try:
                result = run_fn(trial, session)
            except failure as e:
                refuse("run", f"trial failed: {e}", 1)
        else:
            result = _run_stored(run_fn, trial, spec, session, db_path, flags)
    finally:
        if session is not None:
            session.detach()
    click.echo(json.dumps(result) if as_json else format_result(result))
    sys.exit(0 if result["verified"] else 1)


def _run_stored(run_fn, trial, spec: ExperimentSpec, session, db_path, flags: tuple[str, ...]) -> dict:
    """The trial through the experiment loop (environment, load, checks, one stored
    record), then its result; a failed trial exits 1 after it is stored."""
    from lab.store.store import Store
    from lab.trials.experiment import run_experiment
    stored = RunSpec(**spec.to_dict())
    stored.run_flags = flags
    with Store(db_path) as store:
        # Ctrl-C or SIGTERM: the run is marked interrupted, lab/cli/group.py says so in one line
        run_id = run_experiment(stored, lambda _s, _arm, _rnd: run_fn(trial, session), store, progress=False,
                                probe_session=session)
        rec = store.trials(run_id)[0]
        show = next_command("show", run_id, db=store.path)
    unverified = rec.result is not None and rec.result.get("verified") is False   # printed, then exit 1
    if rec.status != "ok" and not unverified:
        refuse("run", f"trial failed: {(rec.error or '?').splitlines()[0]} (stored as run {run_id}: `{show}`)", 1)
    click.echo(f"stored as run {run_id}: `{show}`", err=True)
    return rec.result


def run_qemu(arm: str, spec, no_deflate: bool, as_json: bool, db_path=None, flags: tuple[str, ...] = ()) -> None:
    """`run --protocol qemu-*`: one trial on the real stack (exits). The spec validator
    has already refused what the real stack cannot do (workloads, --batch-pages)."""
    from lab.trials.qemu.trial import QemuBalloonTrial, QemuTrialFailed, run_qemu_balloon
    run_and_print(run_qemu_balloon, QemuBalloonTrial.from_spec(spec, arm, deflate=not no_deflate), QemuTrialFailed,
                  spec, as_json, db_path, flags)
