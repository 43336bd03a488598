"""Load average and CPU governor are recorded with every trial, and `show` and the report
warn about a run taken under load; warm-up trials stay out of every table."""
from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from lab.machine import environment
from lab.cli.commands import show as show_cmd
from lab.cli.commands.compare import run_length_table
from lab.trials.experiment import run_experiment
from lab.trials.spec import ExperimentSpec
from lab.store.store import Store, TrialRecord, now_iso

SPEC = ExperimentSpec(name="load-test", arms=["pfn", "bitmap"], trials=3, warmups=1, probes=False)


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "lab.db")
    yield s
    s.close()


def test_every_trial_records_the_load_and_governor_around_it(store):
    def trial(spec, arm, rnd):
        return {"verified": True, "pages": 1, "wall_ns": 10 + len(os.urandom(4096))}

    run_id = run_experiment(spec=SPEC, trial_fn=trial, store=store, progress=False)
    trials = store.trials(run_id, include_warmups=True)
    assert len(trials) == 8
    with open("/proc/loadavg") as f:
        now = float(f.read().split()[0])
    for t in trials:
        hl = t.result["host_load"]
        assert set(hl) == {"start", "end"}
        assert len(hl["start"]["loadavg"]) == 3 and abs(hl["start"]["loadavg"][0] - now) < 5
        assert hl["start"]["cpu_governor"] == environment.cpu_governor()
        assert hl["start"]["cores_usable"] == len(os.sched_getaffinity(0))
    assert "host_load.start.cores_usable" not in store.metric_table(run_id)["pfn"]     # not a metric
    assert "cpu_governor" in store.get_run(run_id).environment


def _run_with_load(store, loads: list[float], governor: str | None) -> str:
    rid = store.create_run(SPEC, SPEC.kind, {"kernel": "6.1", "loadavg": [0.1, 0.1, 0.1], "cores_usable": 2})
    for i, load in enumerate(loads):
        snap = {"loadavg": [load, 1.0, 1.0], "cpu_governor": governor, "cores_usable": 2}
        res = {"verified": True, "pages": 1, "wall_ns": 100 + i, "run_length_hist": {"1": 1 + i},
               "host_load": {"start": snap, "end": snap}}
        store.add_trial(rid, TrialRecord(arm="pfn", idx=i, round=i, warmup=i == 0, status="ok", started_at=now_iso(),
                                         duration_s=0.1, result=res))
    store.finish_run(rid, "complete")
    return rid


def test_show_warns_when_trials_ran_under_load_or_without_performance_governor(store):
    quiet = _run_with_load(store, [0.3, 0.5, 0.4, 0.2], "performance")
    busy = _run_with_load(store, [9.0, 0.5, 3.5, 2.5], "powersave")   # the warm-up's 9.0 is not counted
    show = lambda rid: CliRunner().invoke(show_cmd.command, ["--db", str(store.path), rid])  # noqa: E731
    out = show(quiet).output
    assert "WARNING" not in out
    out = show(busy).output.replace("\n      ", " ")          # lines folded at 120 columns, unfolded
    assert "WARNING: taken under load: 2 of 3 measured trials" in out and "(peak 3.50)" in out
    assert "CPU frequency governor powersave (not performance)" in out
    assert environment.load_warnings([{"loadavg": [1.9, 1, 1], "cores_usable": 2}]) == []


def test_report_warns_about_load(store, tmp_path):
    from reports.html import write_report

    busy = _run_with_load(store, [9.0, 2.5, 3.5, 2.5], None)
    html = (tmp_path / "r.html")
    from lab.cli.report_data import load
    write_report(load(store, busy), html)
    assert "Warning: taken under load: 3 of 3 measured trials" in html.read_text()


def test_run_length_table_skips_warmups(store):
    rid = _run_with_load(store, [0.1, 0.1, 0.1, 0.1], None)      # warm-up: 1 run, measured: 2, 3, 4
    table = run_length_table(store, rid)
    assert table.splitlines()[-1].split() == [">=", "1", "2"]          # pages in a run >= 1: pfn's 2 runs
