"""A candidate whose arm fails must fail the gate, naming the arm: real VMM + guest
trials through `balloon-lab compare`, a real fault injected into one arm (bytes written
into the ballooned memory before verification), and `balloon-lab gate` on the store."""
from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

import lab.trials.model.runner as model_runner
from lab.cli.commands import compare as compare_cmd
from lab.cli.commands import gate as gate_cmd
from lab.store.store import Store

pytestmark = pytest.mark.slow
SMALL = ["--arms", "pfn,chunks", "--guest-mib", "128", "--inflate-mib", "64", "--workload", "idle",
         "--trials", "2", "--warmups", "0", "--no-probes", "--quiet"]


def _memfd_of(pid: int) -> str:
    for fd in os.listdir(f"/proc/{pid}/fd"):
        if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:"):
            return f"/proc/{pid}/fd/{fd}"
    raise AssertionError(f"VMM {pid} has no memfd")


def corrupt_chunks_balloon(monkeypatch) -> list[int]:
    """Before the chunks arm's first verification, write a byte into every page of guest RAM
    (ballooned pages included) through the VMM's own memfd: the real checks must fail."""
    real_verify, hits = model_runner.verify, []

    def verify(lp, target_pages):
        if lp.t.protocol == "chunks" and target_pages:
            fd = os.open(_memfd_of(lp.vmm.pid), os.O_RDWR)
            try:
                for off in range(0, os.fstat(fd).st_size, 4096):
                    os.pwrite(fd, b"\xa5", off)
            finally:
                os.close(fd)
            hits.append(lp.vmm.pid)
        return real_verify(lp, target_pages)

    monkeypatch.setattr(model_runner, "verify", verify)
    return hits


def latest(db) -> str:
    with Store(db, create=False) as s:
        return s.list_runs()[0].id


def test_failed_arm_fails_compare_and_the_gate_naming_it(tmp_path, monkeypatch):
    db = tmp_path / "lab.db"
    runner = CliRunner()
    res = runner.invoke(compare_cmd.command, ["--db", str(db), *SMALL])
    assert res.exit_code == 0, res.output
    base = latest(db)
    hits = corrupt_chunks_balloon(monkeypatch)
    res = runner.invoke(compare_cmd.command, ["--db", str(db), *SMALL])
    assert len(hits) == 2, hits
    assert res.exit_code == 1, res.output
    assert "no successful measured trial in arm(s) chunks" in res.output
    cand = latest(db)
    assert cand != base
    res = runner.invoke(gate_cmd.command, ["--db", str(db), "--baseline", base, "--candidate", cand])
    assert res.exit_code == 1, res.output
    line = next(ln for ln in res.output.splitlines() if ln.strip().startswith("REGRESSION"))
    assert "chunks  ok_trials: arm chunks: 0 ok measured trial(s) in the candidate, minimum 2" in line
    assert "result not verified" in line
