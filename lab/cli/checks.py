"""One way for every command to refuse bad input: one line on stderr naming the
option, exit status 2, before any process starts (no traceback, nothing to clean up).
Experiment parameters are checked by the spec validator (lab/trials/spec.py) for `run`,
`compare`, `bench` and `migrate` alike; this module only turns its SpecError into
that line."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, NoReturn, TypeVar

import click

from lab.trials.spec import SpecError

T = TypeVar("T")
USAGE_EXIT = 2


def refuse(command: str, message: str, status: int = USAGE_EXIT) -> NoReturn:
    """The one way a command says it cannot go on: `balloon-lab CMD: message` on stderr,
    then exit `status` (2, bad input, unless the command's contract says otherwise)."""
    click.echo(f"balloon-lab {command}: {message}", err=True)
    sys.exit(status)


def checked(command: str, build: Callable[[], T]) -> T:
    """build() (a spec, usually), or the one-line refusal naming the option."""
    try:
        return build()
    except SpecError as e:
        refuse(command, e.for_cli())


def writable_file(command: str, option: str, path: Path) -> Path:
    """An output file whose directory exists: never create directories behind the
    user's back (a typo in the path would scatter files)."""
    parent = path.expanduser().resolve().parent
    if not parent.is_dir():
        refuse(command, f"{option} {path}: directory {parent} does not exist")
    if path.is_dir():
        refuse(command, f"{option} {path}: is a directory")
    return path
