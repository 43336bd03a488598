"""Bad arguments: one line naming the option, exit 2, no traceback, and no process
started (nothing created in TMPDIR, where every trial makes its socket directory, nor
the database). One test per case of the list users reported."""
from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from lab.cli.group import main
from lab.store.store import Store
from test_gate import make_run


def cli(*args: str):
    """The real CLI, in-process (one interpreter start for the whole module)."""
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def refused(tmp_path: Path, *args: str, option: str) -> str:
    tmp = tmp_path / "tmpdir"
    tmp.mkdir(exist_ok=True)
    db = tmp_path / "never.db"
    args = tuple(a.replace("{db}", str(db)) for a in args)
    if args[0] in ("compare", "migrate"):
        args += ("--db", str(db))
    old = tempfile.tempdir
    tempfile.tempdir = str(tmp)              # where a trial would make its socket directory
    try:
        out = cli(*args)
    finally:
        tempfile.tempdir = old
    assert out.exit_code == 2, (out.exit_code, out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert re.search(rf"(^|\W){re.escape(option)}\W", lines[0]), lines[0]
    assert list(tmp.iterdir()) == [], "a process was started"
    assert not db.exists()
    return lines[0]


def test_run_negative_guest_names_guest_mib(tmp_path):
    line = refused(tmp_path, "run", "--guest-mib", "-5", option="--guest-mib")
    assert "inflate" not in line


def test_run_guest_not_multiple_of_4(tmp_path):
    refused(tmp_path, "run", "--guest-mib", "257", option="--guest-mib")


def test_run_batch_pages_zero(tmp_path):
    refused(tmp_path, "run", "--batch-pages", "0", option="--batch-pages")


def test_run_unknown_workload_param_before_any_process(tmp_path):
    line = refused(tmp_path, "run", "--workload-param", "foo=1", option="--workload-param")
    assert "foo" in line


def test_run_unknown_workload_names_workload(tmp_path):
    line = refused(tmp_path, "run", "--workload", "nope", option="--workload")
    assert "--param" not in line and "--workload-param" not in line


def test_compare_empty_arms_is_refused(tmp_path):
    refused(tmp_path, "compare", "--arms", "", option="--arms")


def test_compare_takes_param_alias(tmp_path):
    line = refused(tmp_path, "compare", "--param", "foo=1", option="--workload-param")
    assert "no parameter 'foo'" in line            # the alias reached the validator


def test_same_names_and_defaults_shown_in_help():
    seeds = {}
    for cmd in (["run"], ["compare"], ["migrate"], ["bench", "pfn-madvise"]):
        flat = " ".join(cli(*cmd, "--help").stdout.split())
        seeds[cmd[0]] = re.search(r"--seed INTEGER .*?\[default: (\d+)\]", flat).group(1)
        if cmd[0] != "bench":
            assert "--workload-param, --param KEY=VALUE" in flat, cmd
            assert "--guest-mib INTEGER" in flat and "[default: " in flat
    assert len(set(seeds.values())) == 1, seeds


def test_run_unknown_protocol_is_refused_once_by_the_spec(tmp_path):
    """run's --protocol has no click choice of its own: the spec refuses it, naming --protocol
    and listing the arms (the one check on the way to the device)."""
    line = refused(tmp_path, "run", "--protocol", "carrier-pigeon", option="--protocol")
    assert "unknown balloon arm 'carrier-pigeon'" in line and "pfn-ranges" in line


def test_bench_unknown_protocol(tmp_path):
    refused(tmp_path, "bench", "idle-memory", "--protocol", "nope", option="--protocol")


def test_report_into_missing_directory(tmp_path):
    missing = tmp_path / "missing" / "dir"
    refused(tmp_path, "report", "latest", "-o", str(missing / "x.html"), "--db", "{db}", option="-o")
    assert not missing.parent.exists()


def test_gate_of_a_run_against_itself(tmp_path):
    db = tmp_path / "lab.db"
    with Store(db) as s:
        run = make_run(s, medians={"pfn": 4e9, "bitmap": 6e8}, seed=1)
    out = cli("gate", "--baseline", run, "--candidate", run, "--db", str(db))
    assert out.exit_code == 2 and "Traceback" not in out.stderr
    assert f"same run {run}" in out.stderr and "--baseline" in out.stderr


@pytest.mark.slow
def test_a_guest_that_dies_at_start_is_reported_at_once_with_its_log():
    import sys
    import time
    from lab.trials.model.balloon_trial import BalloonTrial, TrialFailed
    from lab.trials.model.processes import LabProcesses
    die = f"{sys.executable} -c \"import sys; print('guest: cannot map RAM: boom', file=sys.stderr); sys.exit(3)\""
    t0 = time.monotonic()
    with pytest.raises(TrialFailed) as e:
        LabProcesses(BalloonTrial(guest_mib=256, inflate_mib=64), vmm={"guest_cmd": die})
    assert time.monotonic() - t0 < 10                        # not the agent socket's 60 s timeout
    assert "guest: cannot map RAM: boom" in str(e.value) and "exit status 3" in str(e.value)
