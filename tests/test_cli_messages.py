"""What a command says when it cannot go on: one prefix, `balloon-lab CMD:`, in every
command; option names as the user types them (--allow-incomplete), never the Python
parameter behind them (allow_incomplete); ranges that say what is really accepted."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from lab.cli import main
from lab.trials.spec import ExperimentSpec
from lab.store.store import Store
from conftest import BALLOON_LAB
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
    ("gate", "--baseline", "nope", "--candidate", "nope"),
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


# --- unknown metric names: the closest real ones -------------------------------------------
@pytest.mark.parametrize("args, suggested", [
    (("show", "latest", "--metrics", "inflate.stages_ns.*"), "'stages_ns.inflate.*'"),
    (("history", "inflate.stages_ns.total"), "'stages_ns.inflate.total'"),
    (("history", "inflate.kicks"), "'kicks'"),
    (("export", "latest", "--metrics", "madvise_calls"), "'probes.madvise_calls'"),
])
def test_unknown_metric_names_get_the_closest_real_ones(lab_store, args, suggested):
    line = assert_refusal(cli(*args, "--db", str(lab_store.db)), (args[0],))
    assert f"did you mean {suggested}" in line, line


# --- next steps repeat the options the user gave ----------------------------------------------
def run_hint(text: str) -> subprocess.CompletedProcess:
    """The last `balloon-lab ...` command a message suggests, run as printed."""
    hint = re.findall(r"`(balloon-lab [^`]+)`", text)[-1]
    argv = shlex.split(hint)
    return subprocess.run([BALLOON_LAB, *argv[1:]], capture_output=True, text=True, timeout=120, cwd="/")


def test_compare_suggests_show_with_its_own_store(lab_store):
    out = run_hint(lab_store.stderr)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"run {lab_store.run_id}")


def test_run_with_db_stores_the_trial_for_show(tmp_path):
    db = tmp_path / "one.db"
    out = subprocess.run([BALLOON_LAB, "run", "--protocol", "bitmap", "--guest-mib", "128", "--inflate-mib", "64",
                          "--no-probes", "--db", str(db)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("protocol bitmap")             # the trial as `run` prints it
    shown = run_hint(out.stderr)
    assert shown.returncode == 0, shown.stderr
    assert "command: balloon-lab run --protocol bitmap --guest-mib 128 --inflate-mib 64" in shown.stdout
    assert "trials: 1 ok, 0 failed" in shown.stdout
    with Store(db, create=False) as s:
        (t,) = s.trials(s.get_run("latest").id)
    assert t.status == "ok" and t.result["protocol"] == "bitmap" and t.result["verified"]


# --- --json is stdout, a file is --output; one meaning per option name -------------------------
def test_reclaim_json_goes_to_stdout_and_a_file_is_output(tmp_path):
    line = assert_refusal(cli("reclaim", "--json", str(tmp_path / "old.json")), ("reclaim",))
    assert f"--output {tmp_path / 'old.json'}" in line and not (tmp_path / "old.json").exists()
    out = subprocess.run([BALLOON_LAB, "reclaim", "--arms", "inflate-bitmap", "--guest-mib", "256", "--free-mib", "64",
                          "--trials", "1", "--json", "--output", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)                                   # stdout holds the JSON and nothing else
    assert doc["trials"]["inflate-bitmap"][0]["verified"] is True
    assert json.loads((tmp_path / "r.json").read_text()) == doc


def test_probe_names_its_programs_apart_from_runs_probes_switch():
    line = assert_refusal(cli("probe", "--pid", "1", "--duration", "0.1", "--probes", "madvise"), ("probe",))
    assert "--programs madvise" in line
    flat = " ".join(cli("probe", "--help").stdout.split())
    assert "--programs TEXT" in flat and "--probes" not in flat.split("examples:")[0]
    assert_refusal(cli("probe", "--pid", "1", "--programs", "nope"), ("probe",))
