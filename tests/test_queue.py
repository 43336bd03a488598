"""Trials dispatched to hosts through the PostgreSQL task queue, with real trials (a
256-512 MiB guest): two worker processes as two hosts, a worker killed with SIGKILL in
the middle of a trial, and bounded, recorded retries of failing trials."""
from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import time
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner

from lab.testbed import task_queue as Qu
from lab.cli.group import main as cli
from lab.trials.spec import load_spec
from lab.store.store import Store

ROOT = Path(__file__).resolve().parents[1]
LAB = str(ROOT / ".venv" / "bin" / "balloon-lab")
TINY = """name = "{name}"
guest_mib = {guest}
inflate_mib = 32
arms = {arms}
workload = "idle"
trials = {trials}
warmups = 0
probes = false
"""


def spec_file(tmp_path: Path, name: str, arms: str = '["pfn", "chunks"]', trials: int = 1, guest: int = 256) -> Path:
    p = tmp_path / f"{name}.toml"
    p.write_text(TINY.format(name=name, arms=arms, trials=trials, guest=guest))
    return p


def worker(url: str, host: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([LAB, "worker", "--db", url, "--host-id", host, "--heartbeat", "0.3",
                             "--stall-timeout", "2", *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _t(iso: str) -> float:
    return dt.datetime.fromisoformat(iso).timestamp()


@pytest.mark.slow
def test_two_workers_as_two_hosts_run_a_submitted_experiment(pg_db, tmp_path):
    sub = CliRunner().invoke(cli, ["submit", str(spec_file(tmp_path, "two-hosts")), "--hosts", "a,b", "--db", pg_db,
                                   "--json"])
    assert sub.exit_code == 0, sub.output
    run_id = __import__("json").loads(sub.output)["run_id"]
    procs = [worker(pg_db, h, "--until-done") for h in ("a", "b")]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all("stored 2 trial(s)" in o for o in outs), outs
    with Store(pg_db) as store:
        run = store.get_run(run_id)
        assert run.status == "complete" and run.hosts == ["a", "b"] and run.trials_ok == 4
        for h in ("a", "b"):
            trials = store.trials(run_id, host=h)
            assert [t.arm for t in trials] == ["pfn", "chunks"]          # arms interleaved per host, in order
            assert all(t.host["host_id"] == h and t.host["machine_id"] for t in trials)
            first, second = trials
            assert _t(first.started_at) + first.duration_s <= _t(second.started_at) + 0.01  # one at a time
    rep = CliRunner().invoke(cli, ["report", run_id, "--db", pg_db, "-o", str(tmp_path / "r.html")])
    assert rep.exit_code == 0, rep.output
    html = (tmp_path / "r.html").read_text()
    assert "Hosts side by side" in html and "host a median" in html and "host b median" in html


def _doing(url: str, queue: str) -> list[dict]:
    with psycopg.connect(url) as c:
        rows = c.execute("SELECT id, args FROM procrastinate_jobs WHERE queue_name=%s AND status='doing'",
                         (queue,)).fetchall()
    return [{"id": r[0], **r[1]} for r in rows]


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(x) for x in (task / "children").read_text().split()]
    return out


@pytest.mark.slow
def test_worker_killed_mid_trial_leaves_no_half_trial_and_the_trial_is_rerun(pg_db, tmp_path):
    spec = load_spec(spec_file(tmp_path, "kill", arms='["pfn"]', trials=2, guest=512))
    sub = Qu.submit(pg_db, spec, ["k"])
    first = worker(pg_db, "k")
    deadline = time.monotonic() + 60
    while not (doing := _doing(pg_db, Qu.queue_name("k"))):
        assert time.monotonic() < deadline and first.poll() is None, first.stdout.read() if first.poll() else ""
        time.sleep(0.05)
    while not _children(first.pid):          # the trial's VMM is up: the trial is under way
        assert time.monotonic() < deadline
        time.sleep(0.05)
    vmm = _children(first.pid)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    killed_idx = doing[0]["idx"]
    with Store(pg_db) as store:
        assert not store.trial_exists(sub.run_id, killed_idx)          # nothing half written
        assert store.db.execute("SELECT count(*) FROM metrics m JOIN trials t ON t.id = m.trial_id WHERE "
                                "t.run_id=? AND t.idx=?", (sub.run_id, killed_idx)).fetchone()[0] == 0
    for pid in vmm:                            # the killed worker's VMM died with it
        for _ in range(100):
            if not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"VMM {pid} of the killed worker is still running")
    second = worker(pg_db, "k", "--until-done")
    out = second.communicate(timeout=180)[0]
    assert second.returncode == 0 and "its worker was lost mid-trial" in out, out
    with Store(pg_db) as store:
        run = store.get_run(sub.run_id)
        assert run.status == "complete" and run.trials_ok == 2 and run.trials_failed == 0
        assert sorted(t.idx for t in store.trials(sub.run_id)) == [0, 1]   # each trial once
        lost = store.attempts(sub.run_id)
        assert [(a["idx"], a["outcome"], a["attempt"]) for a in lost] == [(killed_idx, "lost", 1)]


@pytest.mark.slow
def test_failed_trials_are_retried_a_bounded_number_of_times_and_recorded(pg_db, tmp_path):
    spec = load_spec(spec_file(tmp_path, "flaky", arms='["pfn"]', trials=2))
    sub = Qu.submit(pg_db, spec, ["f"], max_attempts=3)
    calls: list[int] = []

    def flaky(spec, arm, rnd, session):
        """Round 0 always fails; round 1 fails once, then runs the real trial."""
        calls.append(rnd)
        if rnd == 0 or calls.count(1) == 1:
            raise RuntimeError(f"injected fault in round {rnd}")
        return Qu.default_trial_fn(spec, arm, rnd, session)

    st = Qu.run_worker(pg_db, "f", until_done=True, heartbeat_s=0.3, stall_timeout_s=2, trial_fn=flaky)
    assert sorted(calls) == [0, 0, 0, 1, 1]            # 3 attempts for round 0, 2 for round 1
    with Store(pg_db) as store:
        run = store.get_run(sub.run_id)
        assert run.status == "complete" and (run.trials_ok, run.trials_failed) == (1, 1)
        failed = [t for t in store.trials(sub.run_id) if t.status == "failed"][0]
        assert failed.round == 0 and "failed in all 3 attempts" in failed.error and "injected fault" in failed.error
        assert [(a["idx"], a["attempt"], a["outcome"]) for a in store.attempts(sub.run_id)] == \
               [(0, 1, "failed"), (0, 2, "failed"), (1, 1, "failed")]
    assert sorted(st.ran) == [(sub.run_id, 0, "failed"), (sub.run_id, 1, "ok")]
