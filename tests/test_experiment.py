"""The experiment loop with trial functions that do real work: os.urandom timed for
real, and real madvise(MADV_REMOVE) loops on a memfd (benchmarks/gate_false_positive.py)."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lab.results import metrics
from lab.trials.experiment import ExperimentInterrupted, analyse_run, load_comparison, run_experiment
from lab.trials.spec import ExperimentSpec
from lab.store.store import Store

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks" / "gate_false_positive.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("gate_false_positive", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SIZES = {"pfn": 1 << 20, "pfn-ranges": 1 << 18, "bitmap": 1 << 16, "chunks": 1 << 14}


def urandom_trial(calls: list | None = None):
    """Time os.urandom of an arm-dependent size: bigger reads take longer, for real."""
    def trial(spec, arm, rnd):
        if calls is not None:
            calls.append((arm, rnd, spec.probes))
        t0 = time.perf_counter_ns()
        data = os.urandom(SIZES[arm])
        t1 = time.perf_counter_ns()
        return {"protocol": arm, "verified": len(data) == SIZES[arm], "pages": SIZES[arm] // 4096,
                "inflate": {"stages_ns": {"encode": t1 - t0, "total": time.perf_counter_ns() - t0}},
                "probes": {"backend": "none"}, "wall_ns": time.perf_counter_ns() - t0}
    return trial


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "lab.db")
    yield s
    s.close()


def test_arms_interleave_warmups_first_and_comparison_is_stored(store, capsys):
    spec = ExperimentSpec(name="urandom", arms=["pfn", "bitmap", "chunks"], trials=6, warmups=2, probes=False)
    calls: list = []
    run_id = run_experiment(spec, urandom_trial(calls), store)
    # A B C A B C ..., with the round index the same for every arm of a round
    assert [(a, r) for a, r, _ in calls] == [(a, r) for r in range(8) for a in ("pfn", "bitmap", "chunks")]
    trials = store.trials(run_id, include_warmups=True)
    assert [t.arm for t in trials][:6] == ["pfn", "bitmap", "chunks"] * 2
    assert [t.warmup for t in trials] == [True] * 6 + [False] * 18
    table = store.metric_table(run_id)
    assert all(len(table[a]["inflate.stages_ns.total"]) == 6 for a in ("pfn", "bitmap", "chunks"))
    run = store.get_run(run_id)
    assert run.status == "complete" and run.finished_at and run.probe_backend == "none"
    assert run.environment["kernel"] == os.uname().release and run.environment["python_version"]
    comp = load_comparison(store, run_id, compute_if_missing=False)
    assert comp is not None and comp.baseline_arm == "pfn"
    # 1 MiB of urandom really takes longer than 16 KiB
    assert comp.pair("chunks", "inflate.stages_ns.encode").verdict == "faster"
    assert comp.pair("chunks", "pages").verdict == "fewer"
    err = capsys.readouterr().err
    assert f"run {run_id}" in err and "[24/24]" in err and "ETA" in err and "warm-up" in err


def test_raising_and_unverified_trials_are_recorded_failed(store):
    spec = ExperimentSpec(name="flaky", arms=["pfn", "bitmap"], trials=4, warmups=0, probes=False)
    good = urandom_trial()

    def flaky(spec, arm, rnd):
        if arm == "bitmap" and rnd == 1:
            raise OSError(28, "No space left on device")
        res = good(spec, arm, rnd)
        if arm == "bitmap" and rnd == 2:
            res["verified"] = False
            res["errors"] = {"bad_pfn": 3}
        return res

    run_id = run_experiment(spec, flaky, store, progress=False)
    failed = [t for t in store.trials(run_id) if t.status == "failed"]
    assert [(t.arm, t.round) for t in failed] == [("bitmap", 1), ("bitmap", 2)]
    assert failed[0].error.startswith("OSError: [Errno 28] No space left on device")
    assert "Traceback" in failed[0].error and failed[0].result is None
    assert "not verified" in failed[1].error and "bad_pfn" in failed[1].error
    assert failed[1].result["errors"] == {"bad_pfn": 3}
    assert len(store.metric_table(run_id)["bitmap"]["wall_ns"]) == 2
    run = store.get_run(run_id)
    assert (run.status, run.trials_ok, run.trials_failed) == ("complete", 6, 2)


def test_repeated_failures_stop_the_run(store):
    spec = ExperimentSpec(name="broken", arms=["pfn"], trials=50, warmups=0, probes=False)

    def broken(spec, arm, rnd):
        return {"verified": False, "pages": len(os.urandom(8))}

    run_id = run_experiment(spec, broken, store, progress=False, max_consecutive_failures=3)
    run = store.get_run(run_id)
    assert run.status == "failed" and run.trials_failed == 3 and "3 consecutive failed" in run.notes
    assert analyse_run(store, run_id) is None


def test_probe_overhead_arm_runs_without_probes(store):
    spec = ExperimentSpec(name="overhead", arms=["pfn", "bitmap"], trials=3, warmups=0, probes=True,
                          probe_overhead=True)
    calls: list = []
    run_id = run_experiment(spec, urandom_trial(calls), store, progress=False)
    assert calls[:3] == [("pfn", 0, True), ("bitmap", 0, True), ("pfn", 0, False)]
    assert list(store.metric_table(run_id)) == ["pfn", "bitmap", "pfn/no-probes"]
    assert store.get_run(run_id).arms == ["pfn", "bitmap", "pfn/no-probes"]


def test_real_madvise_trials(store):
    bench = load_bench()
    spec = ExperimentSpec(name="madvise", arms=["pfn", "pfn-ranges"], guest_mib=64, inflate_mib=4, trials=5,
                          warmups=1, probes=False)
    run_id = run_experiment(spec, bench.madvise_loop_trial, store, progress=False)
    comp = load_comparison(store, run_id)
    calls = comp.pair("pfn-ranges", "discard_calls")
    assert calls.exact and calls.baseline_median == 1024 and calls.median < 1024
    assert comp.pair("pfn-ranges", "pages").verdict == "equal"
    assert comp.pair("pfn-ranges", "memfd_freed_bytes").verdict == "equal"
    assert comp.summary("pfn", "memfd_freed_bytes").median == 4 << 20  # freed, as the memfd itself says


CHILD = textwrap.dedent("""
    import importlib.util, sys
    from lab.trials.experiment import ExperimentInterrupted, run_experiment
    from lab.trials.spec import ExperimentSpec
    from lab.store.store import Store
    s = importlib.util.spec_from_file_location("bench", sys.argv[2])
    bench = importlib.util.module_from_spec(s); s.loader.exec_module(bench)
    spec = ExperimentSpec(name="killme", arms=["pfn", "pfn-ranges"], guest_mib=64, inflate_mib=8,
                          trials=500, warmups=0, probes=False)
    try:
        run_experiment(spec, bench.madvise_loop_trial, Store(sys.argv[1]), progress=False)
    except ExperimentInterrupted as e:
        print("interrupted", e.run_id, flush=True)
        sys.exit(130)
""")


def _start_child(db: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(db), str(BENCH)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_trials(db: Path, n: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        if db.exists():
            with Store(db) as s:
                if s.db.execute("SELECT count(*) FROM trials").fetchone()[0] >= n:
                    return
        time.sleep(0.05)
    raise AssertionError("child never wrote trials")


def _assert_only_whole_trials(store: Store) -> None:
    n_metrics = len(metrics.flatten(load_bench().madvise_loop_trial(
        ExperimentSpec(arms=["pfn"], guest_mib=64, inflate_mib=1, probes=False), "pfn", 0))[0])
    n_hists = 1
    for tid, in store.db.execute("SELECT id FROM trials").fetchall():
        assert store.db.execute("SELECT count(*) FROM metrics WHERE trial_id=?", (tid,)).fetchone()[0] == n_metrics
        assert store.db.execute("SELECT count(DISTINCT name) FROM histograms WHERE trial_id=?",
                                (tid,)).fetchone()[0] == n_hists


@pytest.mark.parametrize("after", [4, 11])
def test_sigkill_mid_run_leaves_whole_trials_and_an_interrupted_run(tmp_path, after):
    db = tmp_path / "lab.db"
    proc = _start_child(db)
    _wait_for_trials(db, after, proc)
    proc.kill()
    proc.wait()
    with Store(db) as store:
        (run,) = store.list_runs()
        assert run.status == "interrupted" and run.finished_at is None
        assert run.trials_ok >= after
        _assert_only_whole_trials(store)
        assert store.get_comparison(run.id) is None
        # the statistics of what was finished are still available
        assert load_comparison(store, run.id).baseline_arm == "pfn"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_mark_the_run_interrupted(tmp_path, sig):
    db = tmp_path / "lab.db"
    proc = _start_child(db)
    _wait_for_trials(db, 5, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    run_id = out.split()[1]
    with Store(db) as store:
        run = store.get_run(run_id)
        assert run.status == "interrupted" and run.finished_at is not None
        _assert_only_whole_trials(store)


def test_interrupt_in_process_raises_with_run_id(store):
    spec = ExperimentSpec(name="ctrl-c", arms=["pfn", "bitmap"], trials=5, warmups=0, probes=False)
    good = urandom_trial()

    def trial(spec, arm, rnd):
        if rnd == 2 and arm == "bitmap":
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler raises KeyboardInterrupt here, mid-trial
        return good(spec, arm, rnd)

    with pytest.raises(ExperimentInterrupted) as ei:
        run_experiment(spec, trial, store, progress=False)
    run = store.get_run(ei.value.run_id)
    assert run.status == "interrupted"
    assert [(t.arm, t.round) for t in store.trials(run.id)] == [("pfn", 0), ("bitmap", 0), ("pfn", 1), ("bitmap", 1),
                                                                ("pfn", 2)]
    assert json.loads(json.dumps(load_comparison(store, run.id).to_dict()))["baseline_arm"] == "pfn"
