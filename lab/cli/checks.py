"""One way for every command to refuse bad input: one line on stderr naming the
option, exit status 2, before any process starts (no traceback, nothing to clean up).
Experiment parameters are checked by the spec validator (lab/trials/spec.py) for `run`,
`compare`, `bench` and `migrate` alike; this module only turns its SpecError into
that line."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Mapping, NoReturn, TypeVar

import click

from lab.machine import memory
from lab.trials.backends import is_qemu_arm
from lab.trials.spec import ExperimentSpec, SpecError

T = TypeVar("T")
USAGE_EXIT = 2


def refuse(command: str, message: str, status: int = USAGE_EXIT) -> NoReturn:
    """The one way a command says it cannot go on: `balloon-lab CMD: message` on stderr,
    then exit `status` (2, bad input, unless the command's contract says otherwise)."""
    click.echo(f"balloon-lab {command}: {message}", err=True)
    sys.exit(status)


def checked(command: str, build: Callable[[], T], flags: Mapping[str, str] | None = None) -> T:
    """build() (a spec, usually), or the one-line refusal naming the option; `flags`
    maps spec fields the command spells differently (run: arms -> --protocol)."""
    try:
        return build()
    except SpecError as e:
        refuse(command, e.for_cli(flags))


def writable_file(command: str, option: str, path: Path) -> Path:
    """An output file whose directory exists: never create directories behind the
    user's back (a typo in the path would scatter files)."""
    parent = path.expanduser().resolve().parent
    if not parent.is_dir():
        refuse(command, f"{option} {path}: directory {parent} does not exist")
    if path.is_dir():
        refuse(command, f"{option} {path}: is a directory")
    return path


def memory_option(fn: Callable) -> Callable:
    """--ignore-memory-check: run trials the memory check (lab/machine/memory.py) refuses."""
    def turn_off(_ctx, _param, value: bool) -> bool:
        memory.set_enabled(not value)
        return value
    return click.option(memory.IGNORE_OPTION, is_flag=True, expose_value=False, callback=turn_off,
                        help="Start trials even when what they will touch does not fit in the memory the host has "
                             "now (MemAvailable, or the memory cgroup's limit, less a margin).")(fn)


def fits_in_memory(command: str, spec: ExperimentSpec) -> None:
    """Refuse (one line with the figures, exit 2) a spec whose largest trial does not fit
    in the memory the host has now; each trial is checked again before it starts."""
    from workloads import make_workload
    from device.api import hugetlb_pool
    touched = make_workload(spec.workload, dict(spec.workload_params), seed=spec.seed).touched_share()
    if getattr(spec, "guest_init_on_alloc", False):
        touched = min(1.0, touched + spec.inflate_mib / spec.guest_mib)
    pool = hugetlb_pool() if spec.backing == "hugetlb" else None
    copies = 2 if spec.kind == "migrate" else 1          # source and destination hold guest RAM at once
    needs = [memory.balloon_trial_need(spec.guest_mib, touched, backing=spec.backing, real_guest=is_qemu_arm(arm),
                                       copies=copies,
                                       huge_pool_free_bytes=pool.available * pool.page_bytes if pool else 0)
             for arm in spec.arms]
    try:
        memory.check(max(needs, key=lambda n: n.total), f"a {spec.guest_mib} MiB guest with workload {spec.workload}"
                     + (" (source and destination at once)" if copies == 2 else ""))
    except memory.NotEnoughMemory as e:
        refuse(command, str(e))
