"""balloon-lab command line: one click group; each command lives in lab/commands/."""
from __future__ import annotations

import importlib

import click

# Each module in lab/commands/ defines one click command (or group) named `command`.
COMMAND_MODULES: tuple[str, ...] = (
    "doctor",
    "probe",
    "run",
    "compare",
    "bench",
    "runs", "show", "gate",
    "report",
    "migrate",
    "fuzz",
    "db", "submit", "worker",
    "reclaim",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="balloon-lab")
def main() -> None:
    """An eBPF performance lab for virtio-balloon protocols."""


for _name in COMMAND_MODULES:
    main.add_command(importlib.import_module(f"lab.commands.{_name}").command)
