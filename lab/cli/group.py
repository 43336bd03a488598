"""balloon-lab command line: one click group; each command lives in lab/cli/commands/."""
from __future__ import annotations

import errno
import importlib
import sys

import click

from system import knobs
from system.signals import signals_deferred
from lab.trials import interrupts
from lab.trials.orphans import remove_all_scratch, sweep_left_behind
from lab.store.guard import StoreError

# Each module in lab/cli/commands/ defines one click command (or group) named `command`.
COMMAND_MODULES: tuple[str, ...] = (
    "doctor",
    "probe",
    "run",
    "compare",
    "bench",
    "runs", "show", "export", "history", "gate", "ab",
    "report",
    "migrate",
    "fuzz",
    "db", "submit", "worker",
    "reclaim",
)


# what a full or read-only disk says: the user's to fix, not a bug to show a traceback for
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)


class OneLineUsageErrors(click.Group):
    """Usage errors of every command as one line naming the option, exit 2 (click's
    default is a usage block and a blank line; scripts and humans both want one line).
    So are a results database the command cannot use (damaged, foreign, full: a
    StoreError, lab/store/guard.py) and a full or read-only disk, wherever they surface.

    Every command also ends the same way on Ctrl-C and SIGTERM (lab/trials/interrupts.py):
    unwound through its own clean-up, then one line, exit 128 + the signal. Kernel
    knobs it raised are restored on every way out, and what a killed earlier command
    left behind (knobs, scratch directories) is put right first (docs/FAULTS.md)."""

    def invoke(self, ctx: click.Context):
        name = lambda: f"{ctx.command_path} {ctx.invoked_subcommand or ''}".strip()  # noqa: E731
        interrupts.install()
        _tidy_up_after_killed_commands()
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else ctx.command_path
            click.echo(f"{where}: {e.format_message()} (see --help)", err=True)
            sys.exit(e.exit_code)
        except StoreError as e:
            click.echo(f"{name()}: {e}", err=True)
            sys.exit(2)
        except OSError as e:
            if e.errno not in DISK_ERRNOS:
                raise
            click.echo(f"{name()}:{' ' + str(e.filename) if e.filename else ''} {e.strerror}", err=True)
            sys.exit(2)
        except KeyboardInterrupt as e:           # SIGINT or SIGTERM, unwound
            with signals_deferred():
                _restore_knobs()
                click.echo(f"{name()}: {str(e) or 'interrupted by SIGINT'}", err=True)
            sys.exit(interrupts.exit_status(e))
        finally:
            with signals_deferred():
                _restore_knobs()
                remove_all_scratch()


def _say(line: str) -> None:
    click.echo(f"balloon-lab: {line}", err=True)


def _restore_knobs() -> None:
    for line in knobs.restore_all():
        _say(line)


def _tidy_up_after_killed_commands() -> None:
    """Knobs and scratch directories a command killed with SIGKILL left behind."""
    for line in knobs.restore_left_behind():
        _say(line)
    for d in sweep_left_behind():
        _say(f"removed {d}, left behind by a balloon-lab process that was killed")


@click.group(cls=OneLineUsageErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="balloon-lab")
def main() -> None:
    """An eBPF performance lab for virtio-balloon protocols."""


for _name in COMMAND_MODULES:
    main.add_command(importlib.import_module(f"lab.cli.commands.{_name}").command)
