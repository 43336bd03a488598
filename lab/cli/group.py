"""balloon-lab command line: one click group; each command lives in lab/cli/commands/."""
from __future__ import annotations

import importlib
import sys

import click

# Each module in lab/cli/commands/ defines one click command (or group) named `command`.
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


class OneLineUsageErrors(click.Group):
    """Usage errors of every command as one line naming the option, exit 2 (click's
    default is a usage block and a blank line; scripts and humans both want one line)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else ctx.command_path
            click.echo(f"{where}: {e.format_message()} (see --help)", err=True)
            sys.exit(e.exit_code)


@click.group(cls=OneLineUsageErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="balloon-lab")
def main() -> None:
    """An eBPF performance lab for virtio-balloon protocols."""


for _name in COMMAND_MODULES:
    main.add_command(importlib.import_module(f"lab.cli.commands.{_name}").command)
