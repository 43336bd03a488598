"""The SQLite results store, on real database files."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

from lab.results import metrics as lab_metrics
from lab.trials.spec import ExperimentSpec
from lab.gate.baseline_file import BaselineError, export_baseline, load_baseline
from lab.store.store import Store, StoreError, TrialRecord, now_iso


def stage_block(total: int) -> dict:
    return {"stages_ns": {"alloc": total // 10, "encode": total // 5, "transmit": total // 2,
                          "translate": total // 20, "discard": total // 10, "total": total},
            "requests": 512, "kicks": 512, "discard_calls": 131072, "runs": 40, "translations": 131072,
            "run_length_hist": {"1": 3, "8": 20, "512": 17}, "bytes_on_ring": 524288, "descriptors": 512}


def result(total: int, *, verified: bool = True, madvise: int = 131072) -> dict:
    """A result object shaped like lab.trials.model.runner's."""
    return {"protocol": "pfn", "guest_mib": 1024, "inflate_mib": 512, "pages": 131072, "requests": 512,
            "kicks": 512, "interrupts": 512, "discard_calls": madvise, "runs": 40, "translations": 131072,
            "memfd_freed_bytes": 512 << 20, "verified": verified,
            "inflate": stage_block(total), "deflate": stage_block(total // 2),
            "stages_ns": {"inflate": stage_block(total)["stages_ns"], "deflate": stage_block(total // 2)["stages_ns"]},
            "probes": {"backend": "bcc", "madvise_calls": madvise, "madvise_kernel_ns": total // 5,
                       "fallocate_calls": 0, "kicks": 512, "interrupts": 512, "page_allocs": 1000 + total % 7,
                       "page_frees": 990, "page_faults": 33,
                       "per_pid": {str(4000 + total % 1000): {"madvise_calls": madvise}},
                       "hists": {"madvise_len_log2": {"unit": "bytes", "buckets": [
                                     {"lo": 4096, "hi": 8191, "count": madvise}]},
                                 "madvise_ns_log2": {"unit": "ns", "buckets": []},
                                 "page_alloc_order": {"0": 1000}}},
            "wall_ns": total + 1000, "rss_bytes": {"vmm": 300 << 20},
            "workload": {"name": "idle", "prepare": {"used_pages": 16384}}, "errors": {"bad_pfn": 0}}


def trial(arm: str, idx: int, res: dict | None, *, warmup=False, status="ok", error=None) -> TrialRecord:
    return TrialRecord(arm=arm, idx=idx, round=idx // 2, warmup=warmup, status=status, started_at=now_iso(),
                       duration_s=0.5, result=res, error=error)


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "out" / "lab.db")
    yield s
    s.close()


SPEC = ExperimentSpec(name="t", arms=["pfn", "bitmap"], trials=3, warmups=0, probes=False)


def test_flatten_and_classify_a_runner_result():
    metrics, hists = lab_metrics.flatten(result(4_000_000_000))
    assert metrics["inflate.stages_ns.total"] == 4_000_000_000
    assert metrics["stages_ns.deflate.transmit"] == 1_000_000_000
    assert metrics["probes.madvise_calls"] == 131072
    assert "verified" not in metrics and "protocol" not in metrics and "probes.backend" not in metrics
    assert hists["inflate.run_length_hist"] == {"1": 3, "8": 20, "512": 17}
    assert hists["probes.hists.madvise_len_log2"] == {"4096": 131072}  # the probes' {lo, hi, count} shape
    assert hists["probes.hists.page_alloc_order"] == {"0": 1000}
    assert "probes.hists.madvise_ns_log2" not in hists  # empty
    assert not any("hist" in name for name in metrics)
    assert not any("per_pid" in name for name in metrics)  # pid-keyed: never the same name twice
    assert lab_metrics.classify("inflate.stages_ns.total") == lab_metrics.TIMING
    assert lab_metrics.classify("probes.madvise_kernel_ns") == lab_metrics.TIMING
    assert lab_metrics.classify("cpu_s_source") == lab_metrics.TIMING and lab_metrics.classify("downtime_ms") == lab_metrics.TIMING
    assert lab_metrics.classify("probes.madvise_calls") == lab_metrics.COUNTER and lab_metrics.classify("inflate.bytes_on_ring") == lab_metrics.COUNTER
    assert lab_metrics.classify("rss_bytes.vmm") == lab_metrics.GAUGE and lab_metrics.classify("probes.page_faults") == lab_metrics.GAUGE
    assert lab_metrics.classify("memory.source_vmm.rss_peak_bytes") == lab_metrics.GAUGE and lab_metrics.classify("workload.stop.cycles") == lab_metrics.GAUGE
    assert lab_metrics.classify("probes.stages.encode.ns") == lab_metrics.TIMING and lab_metrics.classify("probes.seconds") == lab_metrics.TIMING
    assert lab_metrics.classify("probes.stages.encode.count") == lab_metrics.COUNTER
    assert lab_metrics.unit("probes.stages.encode.ns") == "ns" and lab_metrics.unit("memory.source_vmm.rss_peak_bytes") == "bytes"


def test_database_is_created_in_wal_mode_with_its_directory(store, tmp_path):
    assert (tmp_path / "out" / "lab.db").exists()
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_trials_metrics_and_histograms_round_trip(store):
    run = store.create_run(SPEC, "balloon", {"kernel": "x"})
    totals = {"pfn": [400, 410, 420], "bitmap": [60, 65, 61]}
    idx = 0
    store.add_trial(run, trial("pfn", idx, result(999), warmup=True))
    for i in range(3):
        for arm in ("pfn", "bitmap"):
            idx += 1
            store.add_trial(run, trial(arm, idx, result(totals[arm][i] * 10**7)))
    idx += 1
    store.add_trial(run, trial("bitmap", idx, result(1, verified=False), status="failed", error="not verified"))
    table = store.metric_table(run)
    assert list(table) == ["pfn", "bitmap"]
    np.testing.assert_array_equal(table["bitmap"]["inflate.stages_ns.total"], np.array([60, 65, 61]) * 10**7)
    assert len(table["pfn"]["wall_ns"]) == 3  # warm-up and failed trial excluded
    kinds = dict(store.db.execute("SELECT DISTINCT name, kind FROM metrics"))
    assert kinds["probes.page_faults"] == "gauge" and kinds["pages"] == "counter"
    assert store.histogram_table(run)["pfn"]["inflate.run_length_hist"] == {"1": 9, "8": 60, "512": 51}
    measured = store.trials(run)
    assert len(measured) == 7 and len(store.trials(run, include_warmups=True)) == 8
    failed = [t for t in measured if t.status == "failed"]
    assert failed[0].error == "not verified" and failed[0].result["verified"] is False
    assert store.db.execute("SELECT count(*) FROM metrics WHERE trial_id=?", (failed[0].id,)).fetchone()[0] == 0
    info = store.get_run(run)
    assert (info.trials_ok, info.trials_failed, info.warmups, info.status) == (6, 1, 1, "running")
    assert info.spec["arms"] == ["pfn", "bitmap"] and info.command_line.startswith("balloon-lab compare")


def test_a_failing_write_leaves_no_part_of_the_trial(store):
    run = store.create_run(SPEC, "balloon", {})
    store.db.execute("CREATE TEMP TRIGGER boom BEFORE INSERT ON histograms BEGIN SELECT RAISE(ABORT, 'disk on fire'); END")
    with pytest.raises(sqlite3.IntegrityError, match="disk on fire"):
        store.add_trial(run, trial("pfn", 0, result(10**9)))
    for table in ("trials", "metrics", "histograms"):
        assert store.db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0


def test_ctrl_c_during_a_trial_write_is_held_until_the_trial_is_whole(store):
    run = store.create_run(SPEC, "balloon", {})
    store.db.create_function("interrupt_me", 0, lambda: os.kill(os.getpid(), signal.SIGINT))
    store.db.execute("CREATE TEMP TRIGGER ctrl_c AFTER INSERT ON metrics WHEN NEW.name = 'pages'"
                     " BEGIN SELECT interrupt_me(); END")
    with pytest.raises(KeyboardInterrupt):
        store.add_trial(run, trial("pfn", 0, result(10**9)))
    n_metrics = len(lab_metrics.flatten(result(10**9))[0])
    assert store.db.execute("SELECT count(*) FROM trials").fetchone()[0] == 1
    assert store.db.execute("SELECT count(*) FROM metrics").fetchone()[0] == n_metrics


def test_dead_owner_means_interrupted(store, tmp_path):
    code = ("import sys; from lab.store.store import Store; from lab.trials.spec import ExperimentSpec;"
            "s = Store(sys.argv[1]); print(s.create_run(ExperimentSpec(arms=['pfn']), 'balloon', {}))")
    dead = subprocess.run([sys.executable, "-c", code, str(store.path)], capture_output=True, text=True,
                          check=True).stdout.strip()
    alive = store.create_run(SPEC, "balloon", {})
    statuses = {r.id: r.status for r in store.list_runs()}
    assert statuses[dead] == "interrupted" and statuses[alive] == "running"
    # persisted, so the next reader sees it without re-checking
    assert store.db.execute("SELECT status FROM runs WHERE id=?", (dead,)).fetchone()[0] == "interrupted"
    store.finish_run(alive, "complete")
    assert store.get_run(alive).status == "complete" and store.get_run(alive).finished_at


def test_run_lookup_by_prefix_latest_and_errors(store):
    ids = [store.create_run(SPEC, "balloon", {}) for _ in range(3)]
    assert store.get_run(ids[1][:8]).id == ids[1]
    assert store.get_run("latest").id == ids[2]
    with pytest.raises(StoreError, match="no run"):
        store.get_run("ffffffffffffz")
    store.db.execute("UPDATE runs SET id='abc111' WHERE id=?", (ids[0],))
    store.db.execute("UPDATE runs SET id='abc222' WHERE id=?", (ids[1],))
    with pytest.raises(StoreError, match="ambiguous: abc111, abc222"):
        store.get_run("abc")
    with pytest.raises(StoreError):
        store.finish_run(ids[2], "running")


def test_missing_or_corrupt_database(tmp_path):
    with pytest.raises(StoreError, match="no results database"):
        Store(tmp_path / "nope.db", create=False)
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="is a text file, not a balloon-lab results database"):
        Store(bad)


def test_comparison_is_stored_and_replaced(store):
    run = store.create_run(SPEC, "balloon", {})
    assert store.get_comparison(run) is None
    store.save_comparison(run, {"baseline_arm": "pfn", "x": 1})
    store.save_comparison(run, {"baseline_arm": "pfn", "x": 2})
    assert store.get_comparison(run)["x"] == 2


def _complete_run(store) -> str:
    run = store.create_run(SPEC, "balloon", {"kernel": "6.1"})
    for i in range(3):
        store.add_trial(run, trial("pfn", 2 * i, result((400 + i) * 10**7)))
        store.add_trial(run, trial("bitmap", 2 * i + 1, result((60 + i) * 10**7, madvise=40)))
    store.finish_run(run, "complete")
    return run


def test_baseline_export_and_load(store, tmp_path):
    run = _complete_run(store)
    path = export_baseline(store, run, tmp_path / "ci" / "baseline.json")
    b = load_baseline(path)
    assert b.run["id"] == run and b.spec["arms"] == ["pfn", "bitmap"] and b.environment["kernel"] == "6.1"
    for arm in ("pfn", "bitmap"):
        assert set(b.table[arm]) == set(store.metric_table(run)[arm])
        np.testing.assert_array_equal(b.table[arm]["probes.madvise_calls"],
                                      store.metric_table(run)[arm]["probes.madvise_calls"])
    doc = json.loads(path.read_text())
    assert doc["arms"]["pfn"]["inflate.stages_ns.total"]["kind"] == "timing"


def test_incomplete_run_is_not_exported_unless_asked(store, tmp_path):
    run = store.create_run(SPEC, "balloon", {})
    store.add_trial(run, trial("pfn", 0, result(10**9)))
    with pytest.raises(StoreError, match="not complete"):
        export_baseline(store, run, tmp_path / "b.json")
    export_baseline(store, run, tmp_path / "b.json", allow_incomplete=True)
    assert load_baseline(tmp_path / "b.json").table["pfn"]["pages"][0] == 131072


@pytest.mark.parametrize("content, fragment", [
    (None, "does not exist"),
    ("{not json", "not valid JSON"),
    ('{"format": "something-else"}', "not a balloon-lab baseline"),
    ('{"format": "balloon-lab-baseline", "version": 99}', "version 99"),
    ('{"format": "balloon-lab-baseline", "version": 1, "arms": {}}', "no \"arms\""),
    ('{"format": "balloon-lab-baseline", "version": 1, "arms": {"pfn": {"wall_ns": {"samples": ["x"]}}}}',
     "arms.pfn.wall_ns.samples"),
])
def test_malformed_baselines_are_refused_clearly(tmp_path, content, fragment):
    p = tmp_path / "baseline.json"
    if content is not None:
        p.write_text(content)
    with pytest.raises(BaselineError, match=fragment.replace("(", r"\(")):
        load_baseline(p)
