"""The regression gate through its real CLI command, on real SQLite stores and files."""
from __future__ import annotations

import hashlib
import json
import math
import time
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from click.testing import CliRunner

from lab.cli.commands import gate as gate_cmd
from lab.trials.experiment import run_experiment
from lab.gate.baseline_file import export_baseline
from lab.gate.inputs import GateInputError
from lab.gate.thresholds import Limit, Thresholds
from lab.trials.spec import ExperimentSpec
from lab.store.store import Store, TrialRecord, now_iso

SPEC = ExperimentSpec(name="gate-test", arms=["pfn", "bitmap"], trials=10, warmups=0, probes=False,
                      guest_mib=1024, inflate_mib=512)


def make_run(store: Store, *, medians: dict[str, float], seed: int, n: int = 10, discards: dict[str, int] | None = None,
             spec: ExperimentSpec = SPEC, sigma: float = 0.05, skip: tuple[str, int] | None = None,
             runs_bump: tuple[str, int] | None = None) -> str:
    """A complete run whose timings are drawn from lognormal distributions with known
    medians; `pages` depends on the round like a seed-dependent counter; `skip` leaves
    out one (arm, round) as a failed trial would; `runs_bump` adds 1 to one (arm, round)."""
    rng = np.random.default_rng(seed)
    run = store.create_run(spec, spec.kind, {"kernel": "6.1"})
    idx = 0
    for rnd in range(n):
        for arm in spec.arms:
            total = int(rng.lognormal(math.log(medians[arm]), sigma))
            if (arm, rnd) == skip:
                continue
            res = {"verified": True, "pages": 131072, "runs": 100 + 7 * rnd + ((arm, rnd) == runs_bump),
                   "inflate": {"stages_ns": {"total": total, "discard": total // 3},
                               "discard_calls": (discards or {}).get(arm, 512)}, "wall_ns": total + 5000}
            store.add_trial(run, TrialRecord(arm=arm, idx=idx, round=rnd, warmup=False, status="ok",
                                             started_at=now_iso(), duration_s=0.1, result=res))
            idx += 1
    store.finish_run(run, "complete")
    return run


def gate(db, *args):
    res = CliRunner().invoke(gate_cmd.command, ["--db", str(db), *map(str, args)])
    return res.exit_code, res.output, res.stderr if hasattr(res, "stderr") else ""


@pytest.fixture
def db(tmp_path):
    return tmp_path / "lab.db"


@pytest.fixture
def store(db):
    s = Store(db)
    yield s
    s.close()


def test_same_distributions_pass(store, db):
    base = make_run(store, medians={"pfn": 4e9, "bitmap": 6e8}, seed=1)
    cand = make_run(store, medians={"pfn": 4e9, "bitmap": 6e8}, seed=2)
    code, out, _ = gate(db, "--baseline", base, "--candidate", cand)
    assert code == 0, out
    assert "PASS" in out


def test_slower_timing_exits_1_naming_the_metric(store, db):
    base = make_run(store, medians={"pfn": 4e9, "bitmap": 6e8}, seed=1)
    cand = make_run(store, medians={"pfn": 4e9, "bitmap": 9e8}, seed=2)  # bitmap 50 % slower
    code, out, _ = gate(db, "--baseline", base, "--candidate", cand)
    assert code == 1, out
    regressed = [line for line in out.splitlines() if line.strip().startswith("REGRESSION")]
    assert any("bitmap  inflate.stages_ns.total" in line for line in regressed)
    line = next(line for line in regressed if "inflate.stages_ns.total" in line)
    assert "ms ->" in line or "s ->" in line  # both values shown
    assert not any(" pfn " in line for line in regressed)


def test_small_slowdown_below_threshold_passes_but_is_caught_with_tighter_threshold(store, db):
    base = make_run(store, medians={"pfn": 4e9, "bitmap": 6e8}, seed=1, sigma=0.01)
    cand = make_run(store, medians={"pfn": 4e9, "bitmap": 6.3e8}, seed=2, sigma=0.01)  # +5 %
    assert gate(db, "--baseline", base, "--candidate", cand)[0] == 0
    code, out, _ = gate(db, "--baseline", base, "--candidate", cand, "--threshold", "inflate.stages_ns.*=2%")
    assert code == 1 and "inflate.stages_ns.total" in out


def test_counter_differing_by_one_exits_1(store, db):
    base = make_run(store, medians={"pfn": 4e9, "bitmap": 6e8}, seed=1)
    cand = make_run(store, medians={"pfn": 4e9, "bitmap": 6e8}, seed=1, discards={"bitmap": 513})
    code, out, _ = gate(db, "--baseline", base, "--candidate", cand)
    assert code == 1
    assert "bitmap  inflate.discard_calls: 512 -> 513: differs in 10 of 10 common rounds (round 0: 512 -> 513, +1)" in out
    # an explicit tolerance lets it through
    assert gate(db, "--baseline", base, "--candidate", cand, "--threshold", "inflate.discard_calls=1")[0] == 0


def test_counters_are_compared_round_by_round(store, db, tmp_path):
    base = make_run(store, medians={"pfn": 4e9, "bitmap": 6e8}, seed=1)
    # a failed trial in round 3 shifts the median of a round-dependent counter, but no round differs
    missing = make_run(store, medians={"pfn": 4e9, "bitmap": 6e8}, seed=2, skip=("pfn", 3))
    # (a missing trial is itself a regression unless the minimum allows it: see test_gate_arms.py)
    code, out, _ = gate(db, "--baseline", base, "--candidate", missing, "-v", "--min-trials", "9")
    assert code == 0, out
    assert "pfn  runs: 131.5 -> 135 (equal in all 9 common rounds)" in out
    bumped = make_run(store, medians={"pfn": 4e9, "bitmap": 6e8}, seed=3, runs_bump=("bitmap", 6))
    code, out, _ = gate(db, "--baseline", base, "--candidate", bumped)
    assert code == 1 and "bitmap  runs: 131.5 -> 131.5: differs in 1 of 10 common rounds (round 6: 142 -> 143, +1)" in out
    # the same through a baseline file, which keeps the rounds
    f = export_baseline(store, base, tmp_path / "b.json")
    assert gate(db, "--baseline", f, "--candidate", missing, "--min-trials", "9")[0] == 0
    assert gate(db, "--baseline", f, "--candidate", bumped)[0] == 1


def test_baseline_file_round_trip_through_the_gate(store, db, tmp_path):
    base = make_run(store, medians={"pfn": 4e9, "bitmap": 6e8}, seed=1)
    cand = make_run(store, medians={"pfn": 6e9, "bitmap": 6e8}, seed=2)
    f = export_baseline(store, base, tmp_path / "baseline.json")
    code, out, _ = gate(db, "--baseline", f, "--candidate", cand)
    assert code == 1 and "pfn  inflate.stages_ns.total" in out and f"file {f}" in out


@pytest.mark.parametrize("content", [None, "{oops", '{"format": "balloon-lab-baseline", "version": 1}'])
def test_missing_or_malformed_baseline_exits_2(store, db, tmp_path, content):
    cand = make_run(store, medians={"pfn": 4e9, "bitmap": 6e8}, seed=2)
    f = tmp_path / "baseline.json"
    if content is not None:
        f.write_text(content)
    code, out, _ = gate(db, "--baseline", f, "--candidate", cand, "--json")
    assert code == 2
    verdict = json.loads(out[out.index("{"):])
    assert verdict["verdict"] == "unusable" and verdict["exit_code"] == 2 and verdict["error"]


def test_unknown_run_and_missing_database_exit_2(store, db, tmp_path):
    cand = make_run(store, medians={"pfn": 4e9, "bitmap": 6e8}, seed=2)
    code, out, _ = gate(db, "--baseline", "deadbeef", "--candidate", cand)
    assert code == 2 and "no run 'deadbeef'" in out
    code, out, _ = gate(tmp_path / "none.db", "--baseline", "abc", "--candidate", "def")
    assert code == 2 and "no results database" in out


def test_too_few_trials_exits_2_with_what_is_needed(store, db):
    three = ExperimentSpec(name="gate-test", arms=["pfn", "bitmap"], trials=3, warmups=0, probes=False,
                           guest_mib=1024, inflate_mib=512)
    base = make_run(store, medians={"pfn": 4e9, "bitmap": 6e8}, seed=1, n=3, spec=three)
    cand = make_run(store, medians={"pfn": 4e9, "bitmap": 6e8}, seed=2, n=3, spec=three)
    code, out, _ = gate(db, "--baseline", base, "--candidate", cand)
    assert code == 2 and "too few trials" in out and "at least" in out


def test_different_experiments_exit_2_unless_allowed(store, db):
    other = ExperimentSpec(name="gate-test", arms=["pfn", "bitmap"], trials=10, warmups=0, probes=False,
                           guest_mib=2048, inflate_mib=512)
    base = make_run(store, medians={"pfn": 4e9, "bitmap": 6e8}, seed=1)
    cand = make_run(store, medians={"pfn": 4e9, "bitmap": 6e8}, seed=2, spec=other)
    code, out, _ = gate(db, "--baseline", base, "--candidate", cand)
    assert code == 2 and "guest_mib: 1024 vs 2048" in out
    assert gate(db, "--baseline", base, "--candidate", cand, "--allow-spec-change")[0] == 0


def test_no_common_arms_is_a_regression_of_every_baseline_arm(store, db):
    other = ExperimentSpec(name="gate-test", arms=["chunks"], trials=10, warmups=0, probes=False)
    base = make_run(store, medians={"pfn": 4e9, "bitmap": 6e8}, seed=1)
    cand = make_run(store, medians={"chunks": 4e8}, seed=2, spec=other)
    code, out, _ = gate(db, "--baseline", base, "--candidate", cand, "--allow-spec-change")
    assert code == 1, out
    assert "arm pfn is missing from the candidate" in out and "arm bitmap is missing from the candidate" in out
    assert "arm(s) only in the candidate, not gated: chunks" in out


def test_json_and_junit_outputs(store, db, tmp_path):
    base = make_run(store, medians={"pfn": 4e9, "bitmap": 6e8}, seed=1)
    cand = make_run(store, medians={"pfn": 4e9, "bitmap": 1.2e9}, seed=2, discards={"pfn": 600})
    junit = tmp_path / "gate.xml"
    code, out, _ = gate(db, "--baseline", base, "--candidate", cand, "--json", "--junit", junit)
    assert code == 1
    verdict = json.loads(out[out.index("{"):out.rindex("}") + 1])
    assert verdict["verdict"] == "regression" and verdict["exit_code"] == 1
    regressed = {(r["arm"], r["metric"]) for r in verdict["regressions"]}
    assert {("bitmap", "inflate.stages_ns.total"), ("bitmap", "wall_ns"), ("pfn", "inflate.discard_calls")} <= regressed
    assert ("pfn", "inflate.stages_ns.total") not in regressed
    root = ET.parse(junit).getroot()
    cases = root.findall(".//testcase")
    # 2 arms x (ok_trials, pages, runs, discard_calls, total, discard, wall_ns)
    assert len(cases) == len(verdict["checks"]) == 2 * 7
    failed = {(c.get("classname").rsplit(".", 1)[1], c.get("name")) for c in cases if c.find("failure") is not None}
    assert failed == regressed
    assert root.find("testsuite").get("failures") == str(len(regressed))


def test_junit_written_for_unusable_input(store, db, tmp_path):
    junit = tmp_path / "gate.xml"
    code, _, _ = gate(db, "--baseline", tmp_path / "missing.json", "--candidate", "x", "--junit", junit)
    assert code == 2
    assert ET.parse(junit).getroot().find(".//error") is not None


def test_thresholds_file_and_bad_thresholds(store, db, tmp_path):
    base = make_run(store, medians={"pfn": 4e9, "bitmap": 6e8}, seed=1)
    cand = make_run(store, medians={"pfn": 4e9, "bitmap": 9e8}, seed=2, discards={"bitmap": 520})
    f = tmp_path / "thresholds.toml"
    f.write_text('alpha = 0.01\ntiming = "60%"\n[metrics]\n"inflate.discard_calls" = 10\n')
    code, out, _ = gate(db, "--baseline", base, "--candidate", cand, "--thresholds", f)
    assert code == 0, out
    code, out, _ = gate(db, "--baseline", base, "--candidate", cand, "--thresholds", f,
                        "--threshold", "inflate.discard_calls=exact")  # CLI rules come last and win
    assert code == 1 and "inflate.discard_calls" in out
    f.write_text("alpha = 2\n")
    assert gate(db, "--baseline", base, "--candidate", cand, "--thresholds", f)[0] == 2
    assert gate(db, "--baseline", base, "--candidate", cand, "--threshold", "wall_ns=fast")[0] == 2
    assert gate(db, "--baseline", base, "--candidate", cand, "--threshold", "nonsense")[0] == 2


def test_limit_parsing():
    assert Limit.parse("10%", what="x").for_kind("timing") == Limit("relative", 0.1)
    assert Limit.parse(0.2, what="x").for_kind("timing") == Limit("relative", 0.2)
    assert Limit.parse(2, what="x").for_kind("counter") == Limit("absolute", 2.0)
    assert Limit.parse("5%", what="x").for_kind("counter") == Limit("relative", 0.05)
    assert Limit.parse("ignore", what="x").mode == "ignore"
    with pytest.raises(GateInputError, match="threshold for x"):
        Limit.parse(-1, what="x")
    th = Thresholds().add_cli(["inflate.*=50%", "inflate.stages_ns.total=5%"])
    assert th.limit("inflate.stages_ns.total", "timing").value == 0.05  # last match wins
    assert th.limit("inflate.stages_ns.discard", "timing").value == 0.5
    assert th.limit("wall_ns", "timing").value == 0.10


def test_relative_mode_cancels_machine_wide_drift(store, db):
    base = make_run(store, medians={"pfn": 4e9, "bitmap": 6e8}, seed=1)
    drift = make_run(store, medians={"pfn": 8e9, "bitmap": 1.2e9}, seed=2)  # the whole machine 2x slower
    assert gate(db, "--baseline", base, "--candidate", drift)[0] == 1
    code, out, _ = gate(db, "--baseline", base, "--candidate", drift, "--relative")
    assert code == 0, out
    worse = make_run(store, medians={"pfn": 4e9, "bitmap": 9e8}, seed=3)  # only bitmap slower
    code, out, _ = gate(db, "--baseline", base, "--candidate", worse, "--relative")
    assert code == 1 and "bitmap  inflate.stages_ns.total" in out and "x pfn" in out


def hashing_trial(factor: int):
    """Real work, really timed: SHA-256 over a buffer; `factor` times the work is a
    genuinely slower implementation of the same experiment."""
    data = bytes(range(256)) * 16384  # 4 MiB: milliseconds of work, above the gate's 1 ms floor

    def trial(spec, arm, rnd):
        t0 = time.perf_counter_ns()
        for _ in range(factor * (2 if arm == "bitmap" else 1)):
            digest = hashlib.sha256(data).hexdigest()
        return {"verified": len(digest) == 64, "inflate": {"stages_ns": {"total": time.perf_counter_ns() - t0}},
                "pages": 128}
    return trial


def test_real_work_three_times_slower_is_a_regression(store, db):
    base = run_experiment(SPEC, hashing_trial(1), store, progress=False)
    cand = run_experiment(SPEC, hashing_trial(3), store, progress=False)
    code, out, _ = gate(db, "--baseline", base, "--candidate", cand)
    assert code == 1, out
    assert "pfn  inflate.stages_ns.total" in out and "bitmap  inflate.stages_ns.total" in out


def test_sub_millisecond_drift_is_below_the_practical_floor(store, db, tmp_path):
    """A 0.4 ms stage drifting to 0.6 ms is significant but not practical: the default
    1 ms floor lets it pass (with a note); a thresholds file can lower the floor."""
    base = make_run(store, medians={"pfn": 4e5, "bitmap": 2e5}, seed=1, sigma=0.01)
    cand = make_run(store, medians={"pfn": 6e5, "bitmap": 2e5}, seed=2, sigma=0.01)
    code, out, _ = gate(db, "--baseline", base, "--candidate", cand, "-v")
    assert code == 0, out
    assert "floor of practical significance" in out
    f = tmp_path / "t.toml"
    f.write_text("timing_floor_ms = 0\n")
    code, out, _ = gate(db, "--baseline", base, "--candidate", cand, "--thresholds", f)
    assert code == 1 and "pfn  inflate.stages_ns.total" in out


def test_partly_failed_arm_is_a_regression_by_default(store, db):
    base = make_run(store, medians={"pfn": 4e9, "bitmap": 6e8}, seed=1)
    cand = make_run(store, medians={"pfn": 4e9, "bitmap": 6e8}, seed=2, skip=("bitmap", 4))
    code, out, _ = gate(db, "--baseline", base, "--candidate", cand)
    assert code == 1, out
    assert "REGRESSION  bitmap  ok_trials: arm bitmap: 9 ok measured trial(s) in the candidate, minimum 10" in out
    assert gate(db, "--baseline", base, "--candidate", cand, "--min-trials", "9")[0] == 0


def test_min_trials_from_the_thresholds_file_is_applied(store, db, tmp_path):
    """min_trials read from the file (it once raised: the parser used `th` before making it)
    lowers the trials a candidate arm needs exactly as --min-trials does."""
    base = make_run(store, medians={"pfn": 4e9, "bitmap": 6e8}, seed=1)
    cand = make_run(store, medians={"pfn": 4e9, "bitmap": 6e8}, seed=2, skip=("bitmap", 4))
    f = tmp_path / "thresholds.toml"
    f.write_text('min_trials = 9\ntiming = "20%"\n')
    th = Thresholds.from_file(f)
    assert th.min_trials == 9 and th.timing == Limit("relative", 0.2)
    assert "every baseline arm needs >= 9 ok measured trials" in th.describe()
    code, out, _ = gate(db, "--baseline", base, "--candidate", cand, "--thresholds", f, "-v")
    assert code == 0, out
    assert "pass        bitmap  ok_trials: arm bitmap: 9 ok measured trials (minimum 9)" in out
    f.write_text("min_trials = 10\n")
    code, out, _ = gate(db, "--baseline", base, "--candidate", cand, "--thresholds", f)
    assert code == 1 and "9 ok measured trial(s) in the candidate, minimum 10" in out, out
    f.write_text("min_trials = 0\n")
    assert gate(db, "--baseline", base, "--candidate", cand, "--thresholds", f)[0] == 2


def test_scheduling_gauges_never_fail_an_aa_comparison(store, db):
    """The A/A false alarm seen on main: probes.per_queue.0.call_read_empty 255 -> 255
    'differs in 2 of 7 common rounds'. Every name in the one gauge list is compared
    statistically, so the same distribution on both sides passes."""
    from lab.results import metrics

    names = ["probes.per_queue.0.call_read_empty", "probes.per_queue.1.kick_read_empty", "probes.empty_reads",
             "probes.per_queue.0.config_read", "kicks", "interrupts", "deflate.device_calls"]
    assert all(metrics.classify(n) == metrics.GAUGE for n in names)
    assert metrics.classify("probes.madvise_calls") == metrics.COUNTER and metrics.classify("discard_calls") == metrics.COUNTER

    def run(seed):
        rng = np.random.default_rng(seed)
        rid = store.create_run(SPEC, SPEC.kind, {"kernel": "6.1"})
        for rnd in range(10):
            for i, arm in enumerate(SPEC.arms):
                res = {"verified": True, "pages": 131072, "wall_ns": int(rng.lognormal(math.log(4e9), 0.05)),
                       "probes": {"per_queue": {"0": {"call_read_empty": int(rng.integers(250, 260))}}}}
                store.add_trial(rid, TrialRecord(arm=arm, idx=2 * rnd + i, round=rnd, warmup=False, status="ok",
                                                 started_at=now_iso(), duration_s=0.1, result=res))
        store.finish_run(rid, "complete")
        return rid

    code, out, _ = gate(db, "--baseline", run(1), "--candidate", run(2), "-v")
    assert code == 0, out
    lines = [ln for ln in out.splitlines() if "call_read_empty" in ln]
    assert len(lines) == 2 and all("Holm p=" in ln and "common rounds" not in ln for ln in lines), lines


def test_failed_reference_arm_in_relative_mode_is_a_regression(store, db):
    base = make_run(store, medians={"pfn": 4e9, "bitmap": 6e8}, seed=1)
    only_bitmap = ExperimentSpec(name="gate-test", arms=["pfn", "bitmap"], trials=10, warmups=0, probes=False,
                                 guest_mib=1024, inflate_mib=512)
    rid = store.create_run(only_bitmap, "balloon", {"kernel": "6.1"})
    for rnd in range(10):
        store.add_trial(rid, TrialRecord(arm="pfn", idx=2 * rnd, round=rnd, warmup=False, status="failed",
                                         started_at=now_iso(), duration_s=0.1, result=None,
                                         error="TrialFailed: inflate failed: VMM process 1 died"))
        store.add_trial(rid, TrialRecord(arm="bitmap", idx=2 * rnd + 1, round=rnd, warmup=False, status="ok",
                                         started_at=now_iso(), duration_s=0.1,
                                         result={"verified": True, "pages": 131072, "runs": 100 + 7 * rnd,
                                                 "wall_ns": 6e8}))
    store.finish_run(rid, "complete")
    for extra in ((), ("--relative",)):
        code, out, _ = gate(db, "--baseline", base, "--candidate", rid, *extra)
        assert code == 1, out
        assert "pfn  ok_trials: arm pfn: 0 ok measured trial(s) in the candidate, minimum 10 (baseline: 10); " \
               "10 failed, first error: TrialFailed: inflate failed: VMM process 1 died" in out
