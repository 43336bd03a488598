"""Trials grouped by host: identity recorded with each trial, per-host statistics in
`show`, and the gate comparing timings only within a host (exact counters across)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lab.machine import identity as lab_host
from lab.cli.group import main as cli
from lab.trials.spec import ExperimentSpec
from lab.store.store import Store, TrialRecord, now_iso

SPEC = ExperimentSpec(name="hosts", arms=["pfn"], trials=8, warmups=0, probes=False)


def _result(total_ms: float, pages: int) -> dict:
    return {"verified": True, "pages": pages, "requests": pages // 256,
            "stages_ns": {"inflate": {"total": int(total_ms * 1e6)}}}


def _two_host_run(store: Store, slow_b: float = 1.0, pages_b: int = 4096) -> str:
    """Hosts a and b, 8 trials each; b's timings scaled by slow_b."""
    run = store.create_run(SPEC, "balloon", {})
    idx = 0
    for host, scale, pages in (("a", 1.0, 4096), ("b", slow_b, pages_b)):
        for rnd in range(8):
            store.add_trial(run, TrialRecord(arm="pfn", idx=idx, round=rnd, warmup=False, status="ok",
                                             started_at=now_iso(), duration_s=0.1, host_id=host,
                                             host=lab_host.identity(host).to_dict(),
                                             result=_result(scale * (50 + (rnd * 7) % 5), pages)))
            idx += 1
    store.finish_run(run, "complete")
    return run


def test_every_trial_records_its_host(tmp_path, monkeypatch):
    monkeypatch.setenv(lab_host.HOST_ID_ENV, "rack3-node7")
    with Store(tmp_path / "lab.db") as store:
        run = store.create_run(SPEC, "balloon", {})
        store.add_trial(run, TrialRecord(arm="pfn", idx=0, round=0, warmup=False, status="ok",
                                         started_at=now_iso(), duration_s=0.1, result=_result(50, 4096)))
        t = store.trials(run)[0]
    assert t.host_id == "rack3-node7" and t.host["host_id"] == "rack3-node7"
    for key in ("hostname", "machine_id", "kernel", "cpu_model", "memory_bytes", "backing", "load"):
        assert key in t.host
    assert t.host["machine_id"] == lab_host.machine_id() and len(t.host["load"]) == 3
    assert t.host["memory_bytes"] > 0 and "thp_shmem" in t.host["backing"]
    with pytest.raises(ValueError, match="host id"):
        lab_host.check_host_id("a b")


def test_runs_and_show_group_by_host(tmp_path):
    db = str(tmp_path / "lab.db")
    with Store(db) as store:
        run = _two_host_run(store, slow_b=3.0)
        other = store.create_run(SPEC, "balloon", {})
    r = CliRunner()
    out = r.invoke(cli, ["runs", "--db", db, "--host", "b"])
    assert run in out.output and other not in out.output
    show = r.invoke(cli, ["show", run, "--db", db]).output
    assert "=== host a ===" in show and "=== host b ===" in show
    a_part, b_part = show.split("=== host b ===")
    assert "timing   52 ms [50 ms, 54 ms]" in a_part                  # a's own median and CI
    assert "timing   156 ms [150 ms, 162 ms]" in b_part               # b's, not pooled with a's
    doc = json.loads(r.invoke(cli, ["show", run, "--db", db, "--json"]).output)
    assert [h["host_id"] for h in doc["hosts"]] == ["a", "b"] and set(doc["comparisons_by_host"]) == {"a", "b"}
    exp = r.invoke(cli, ["show", run, "--db", db, "--export-baseline", str(tmp_path / "b.json")])
    assert exp.exit_code == 2 and "--host" in exp.output
    exp = r.invoke(cli, ["show", run, "--db", db, "--host", "b", "--export-baseline", str(tmp_path / "b.json")])
    assert exp.exit_code == 0 and json.loads((tmp_path / "b.json").read_text())["run"]["host_id"] == "b"


def test_gate_compares_timings_only_within_a_host(tmp_path):
    db = str(tmp_path / "lab.db")
    with Store(db) as store:
        base = _two_host_run(store, slow_b=3.0)
        cand = _two_host_run(store, slow_b=3.0)
        wrong_pages = _two_host_run(store, slow_b=3.0, pages_b=4000)
    r = CliRunner()
    same = r.invoke(cli, ["gate", "--baseline", base, "--candidate", cand, "--db", db])
    assert same.exit_code == 0 and "PASS on all 2 hosts" in same.output, same.output
    # host b is 3x slower than host a: a cross-host timing comparison is refused ...
    cross = r.invoke(cli, ["gate", "--baseline", f"{base}@a", "--candidate", f"{cand}@b", "--db", db])
    assert cross.exit_code == 2 and "compared only within a host" in cross.output
    # ... unless asked: counters only (equal across hosts: pass) or timings anyway (a regression)
    counters = r.invoke(cli, ["gate", "--baseline", f"{base}@a", "--candidate", f"{cand}@b", "--db", db,
                              "--counters-only", "--json"])
    assert counters.exit_code == 0, counters.output
    checked = {c["metric"] for c in json.loads(counters.stdout)["checks"] if c["status"] == "pass"}
    assert checked == {"pages", "requests", "ok_trials"}   # ok_trials: every arm kept its trials
    anyway = r.invoke(cli, ["gate", "--baseline", f"{base}@a", "--candidate", f"{cand}@b", "--db", db,
                            "--cross-host"])
    assert anyway.exit_code == 1 and "stages_ns.inflate.total" in anyway.output
    # an exact counter that differs across hosts is caught
    diff = r.invoke(cli, ["gate", "--baseline", f"{base}@a", "--candidate", f"{wrong_pages}@b", "--db", db,
                          "--counters-only"])
    assert diff.exit_code == 1 and "pages" in diff.output
    # per host within two runs: host b's counters changed, host a did not
    per_host = r.invoke(cli, ["gate", "--baseline", base, "--candidate", wrong_pages, "--db", db])
    assert per_host.exit_code == 1 and "REGRESSION on host(s) b" in per_host.output
