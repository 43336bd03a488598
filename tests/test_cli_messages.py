"""What a command says when it cannot go on: one prefix, `balloon-lab CMD:`, in every
command; option names as the user types them (--allow-incomplete), never the Python
parameter behind them (allow_incomplete); ranges that say what is really accepted."""
from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from lab.cli import main
from lab.spec import ExperimentSpec
from lab.store import Store
from test_gate import make_run


def cli(*args: str):
    return CliRunner().invoke(main, list(args), prog_name="balloon-lab", catch_exceptions=False)


def python_names(command: click.Command) -> set[str]:
    """The Python names of a command's options that differ from what the user types."""
    return {p.name for p in command.params if p.name and "_" in p.name}


def command_of(path: tuple[str, ...]) -> click.Command:
    cmd: click.Command = main
    for name in path:
        cmd = cmd.commands[name]          # type: ignore[attr-defined]
    return cmd


def assert_refusal(out, path: tuple[str, ...], code: int = 2) -> str:
    """One line on stderr, `balloon-lab CMD: ...`, no Python names, exit `code`."""
    assert out.exit_code == code, (out.exit_code, out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert lines and lines[-1].startswith(f"balloon-lab {' '.join(path)}: "), out.stderr
    assert "Traceback" not in out.stderr and not out.stderr.startswith(("error:", "Error:"))
    for name in python_names(command_of(path)):
        assert not re.search(rf"(?<![-\w]){name}(?!\w)", out.stderr), (name, out.stderr)
    return lines[-1]


@pytest.fixture
def db(tmp_path) -> Path:
    db = tmp_path / "lab.db"
    with Store(db) as s:
        make_run(s, medians={"pfn": 4e9, "bitmap": 6e8}, seed=1, n=3)
    return db


@pytest.mark.parametrize("args", [
    ("show", "nope"), ("report", "nope"), ("export", "nope"), ("history", "kicks", "--run", "nope"),
    ("runs",), ("db", "push", "--from", "{db}", "--to", "{db}"),
    ("worker", "--host-id", "h1"), ("submit", "{spec}", "--hosts", "a"),
])
def test_every_command_refuses_with_its_own_prefix(args, db, tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text('arms = ["pfn"]\n')
    args = tuple(a.replace("{db}", str(db)).replace("{spec}", str(spec)) for a in args)
    if args[0] == "runs":                     # a store that is there but is not one
        bad = tmp_path / "not-a-db"
        bad.write_text("hello")
        args += ("--db", str(bad))
    elif args[0] != "db":
        args += ("--db", str(db))
    path = tuple(a for a in args[:2] if a in ("db", "push") or a == args[0])
    assert_refusal(cli(*args), path)


def test_export_baseline_of_an_unfinished_run_names_the_option(db, tmp_path):
    with Store(db) as s:
        run = s.create_run(ExperimentSpec(), "balloon", {})          # started, never finished
    line = assert_refusal(cli("show", run, "--db", str(db), "--export-baseline", str(tmp_path / "b.json")),
                          ("show",))
    assert "--allow-incomplete" in line


def test_inflate_range_says_fractions_are_allowed():
    out = cli("run", "--guest-mib", "256", "--inflate-mib", "512")
    line = assert_refusal(out, ("run",))
    assert "--inflate-mib" in line and "1..255" in line
    assert "integers" not in line and "100.5" in line


def test_usage_errors_have_the_prefix_too():
    assert_refusal(cli("bench", "idle-memory", "--protocol", "nope"), ("bench", "idle-memory"))
    assert_refusal(cli("probe", "--pid", "1", "--duration", "1", "2"), ("probe",))
