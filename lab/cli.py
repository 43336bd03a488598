"""balloon-lab command line: one click group; each command lives in lab/commands/."""
from __future__ import annotations

import errno
import importlib
import sys

import click

from lab.store_guard import StoreError

# Each module in lab/commands/ defines one click command (or group) named `command`.
COMMAND_MODULES: tuple[str, ...] = (
    "doctor",
    "probe",
    "run",
    "compare",
    "bench",
    "runs", "show", "export", "history", "gate",
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
    StoreError, lab/store_guard.py) and a full or read-only disk, wherever they surface."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else ctx.command_path
            click.echo(f"{where}: {e.format_message()} (see --help)", err=True)
            sys.exit(e.exit_code)
        except StoreError as e:
            click.echo(f"{ctx.command_path} {ctx.invoked_subcommand or ''}: {e}".replace(" :", ":"), err=True)
            sys.exit(2)
        except OSError as e:
            if e.errno not in DISK_ERRNOS:
                raise
            where = f" {e.filename}" if e.filename else ""
            click.echo(f"{ctx.command_path} {ctx.invoked_subcommand or ''}:{where} {e.strerror}"
                       .replace(" :", ":"), err=True)
            sys.exit(2)


@click.group(cls=OneLineUsageErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="balloon-lab")
def main() -> None:
    """An eBPF performance lab for virtio-balloon protocols."""


for _name in COMMAND_MODULES:
    main.add_command(importlib.import_module(f"lab.commands.{_name}").command)
