"""What the stored-run gate checks (issue 22 items 3-6, and timings only within a job):
a metric the candidate lost, the declared direction of each metric, must-be-zero
figures, every field of the spec, one JUnit test case per gated check, units in the
JSON, and runs made at different times. Real SQLite stores, the real CLI command."""
from __future__ import annotations

import dataclasses
import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from click.testing import CliRunner

from lab.cli.commands import gate as gate_cmd
from lab.gate.baseline_file import export_baseline
from lab.gate.inputs import NOT_COMPARED_SPEC_FIELDS, spec_differences
from lab.store.store import Store, TrialRecord, now_iso
from lab.trials.spec import ExperimentSpec
from lab.cli.report_data import ReportData
from reports.comparison_table import _goodness
from test_gate import db, store  # noqa: F401 - the same store fixtures


SPEC = ExperimentSpec(name="gate-checks", arms=["pfn", "bitmap"], trials=8, warmups=0, probes=False,
                      guest_mib=1024, inflate_mib=512)


def make_run(store: Store, result, *, spec: ExperimentSpec = SPEC, seed: int = 1) -> str:
    """A complete run: result(arm, round, rng) -> one trial's result dict."""
    rng = np.random.default_rng(seed)
    run = store.create_run(spec, spec.kind, {"kernel": "6.1"})
    idx = 0
    for rnd in range(spec.trials):
        for arm in spec.arms:
            store.add_trial(run, TrialRecord(arm=arm, idx=idx, round=rnd, warmup=False, status="ok",
                                             started_at=now_iso(), duration_s=0.1, result=result(arm, rnd, rng)))
            idx += 1
    store.finish_run(run, "complete")
    return run


def trial(arm, rnd, rng, *, total=4e8, probes=True, gbit=None, corruptions=None):
    t = total * float(rng.lognormal(0, 0.03))
    r = {"verified": True, "pages": 131072, "requests": 512, "deflate": {"pages": 131072},
         "stages_ns": {"inflate": {"total": t, "discard": t / 2}}}
    if probes:
        r["probes"] = {"madvise_calls": 131072, "madvise_kernel_ns": t / 3}
    if gbit is not None:
        r["wire_gbit_s"] = gbit * float(rng.lognormal(0, 0.02))
    if corruptions is not None:
        r["workload"] = {"stop": {"corruptions": corruptions}}
    return r


def gate(db, *args):
    res = CliRunner().invoke(gate_cmd.command, ["--db", str(db), *map(str, args)])
    return res.exit_code, res.output


# --- item 3: a metric the candidate lost --------------------------------------------------------------
def test_a_candidate_whose_probes_gave_nothing_is_a_regression_unless_ignored_by_name(store, db):
    base = make_run(store, trial)
    lost = make_run(store, lambda a, r, g: trial(a, r, g, probes=False), seed=2)
    code, out = gate(db, "--baseline", base, "--candidate", lost)
    assert code == 1, out
    assert "REGRESSION  pfn  probes.madvise_calls: in the baseline (8 trials), missing from the candidate" in out
    code, out = gate(db, "--baseline", base, "--candidate", lost, "--threshold", "probes.*=ignore")
    assert code == 0, out
    # the other way round a metric is new, not a regression
    code, out = gate(db, "--baseline", lost, "--candidate", base)
    assert code == 0 and "new: 4 metric(s) only in the candidate" in out, out     # 2 probe metrics x 2 arms


# --- item 4: directions --------------------------------------------------------------------------------
def test_a_throughput_loss_is_a_regression_and_a_gain_is_not(store, db):
    base = make_run(store, lambda a, r, g: trial(a, r, g, gbit=10.0))
    slower = make_run(store, lambda a, r, g: trial(a, r, g, gbit=7.0), seed=2)
    faster = make_run(store, lambda a, r, g: trial(a, r, g, gbit=13.0), seed=3)
    code, out = gate(db, "--baseline", base, "--candidate", slower)
    assert code == 1 and "REGRESSION  pfn  wire_gbit_s" in out and "limit -10%" in out, out
    code, out = gate(db, "--baseline", base, "--candidate", faster, "-v")
    assert code == 0 and "improvement pfn  wire_gbit_s" in out, out
    # the report colours the same way: a rise is good for a throughput, bad for a timing
    assert _goodness(ReportData, "wire_gbit_s", "higher", 1.3) == "good"      # the lab's directions, handed in
    assert _goodness(ReportData, "wire_gbit_s", "lower", 0.7) == "bad"
    assert _goodness(ReportData, "stages_ns.inflate.total", "slower", 1.3) == "bad"


def test_corruptions_above_zero_are_a_regression_whatever_the_baseline(store, db):
    base = make_run(store, lambda a, r, g: trial(a, r, g, corruptions=0))
    bad = make_run(store, lambda a, r, g: trial(a, r, g, corruptions=1 if r == 5 else 0), seed=2)
    code, out = gate(db, "--baseline", base, "--candidate", bad)
    assert code == 1 and "workload.stop.corruptions: must be 0: above 0 in 1 of 8 candidate trials" in out, out


# --- item 5: every field of the spec --------------------------------------------------------------------
def test_every_spec_field_is_compared_or_named_as_not_defining_the_experiment():
    a = SPEC.to_dict()
    for f in dataclasses.fields(ExperimentSpec):
        if f.name in NOT_COMPARED_SPEC_FIELDS:
            continue
        b = dict(a)
        b[f.name] = "something else"
        assert spec_differences(a, b), f"a different {f.name} went unnoticed"
        del b[f.name]
        assert spec_differences(a, b) == [f"{f.name}: {a[f.name]!r} vs absent"]


def test_a_candidate_on_other_backing_is_another_experiment(store, db):
    base = make_run(store, trial)
    thp = make_run(store, trial, spec=dataclasses.replace(SPEC, backing="thp"), seed=2)
    code, out = gate(db, "--baseline", base, "--candidate", thp)
    assert code == 2 and "backing: '4k' vs 'thp'" in out, out


# --- item 6: JUnit and units ---------------------------------------------------------------------------
def test_junit_has_one_case_per_gated_check_and_json_values_carry_units(store, db, tmp_path):
    base = make_run(store, trial)
    cand = make_run(store, trial, seed=2)
    junit = tmp_path / "gate.xml"
    code, out = gate(db, "--baseline", base, "--candidate", cand, "--json", "--junit", junit,
                     "--threshold", "probes.madvise_kernel_ns=ignore")
    assert code == 0, out
    doc = json.loads(out[:out.rindex("}") + 1])
    checks = doc["checks"]
    gated = [c for c in checks if c["status"] not in ("duplicate", "missing")]
    cases = ET.parse(junit).getroot().findall(".//testcase")
    assert len(cases) == len(gated)
    skipped = [tc for tc in cases if tc.find("skipped") is not None]
    assert [tc.get("name") for tc in skipped] == ["probes.madvise_kernel_ns"] * 2     # really skipped, per arm
    # pages and deflate.pages hold the same samples: one check, whose case names both
    dup = [c for c in checks if c["status"] == "duplicate"]
    assert dup and all(c["limit"].startswith("as ") for c in dup)
    assert any("the same samples, so the same check" in (tc.findtext("system-out") or "") for tc in cases)
    units = {c["metric"]: c["unit"] for c in checks}
    assert units["stages_ns.inflate.total"] == "ns" and units["pages"] == "count"


# --- runs made at different times -----------------------------------------------------------------------
def test_timings_of_runs_made_an_hour_apart_are_refused_unless_asked(store, db, tmp_path):
    base = make_run(store, trial)
    cand = make_run(store, trial, seed=2)
    f = export_baseline(store, base, tmp_path / "old.json")
    doc = json.loads(f.read_text())
    doc["run"]["created_at"], doc["run"]["finished_at"] = "2020-01-01T10:00:00+00:00", "2020-01-01T10:05:00+00:00"
    f.write_text(json.dumps(doc))
    code, out = gate(db, "--baseline", f, "--candidate", cand)
    assert code == 2 and "not made in one job (made " in out and "balloon-lab ab" in out, out
    assert gate(db, "--baseline", f, "--candidate", cand, "--counters-only")[0] == 0
    code, out = gate(db, "--baseline", f, "--candidate", cand, "--across-time")
    assert code == 0 and "compared, as asked" in out, out
    assert gate(db, "--baseline", base, "--candidate", cand)[0] == 0       # made minutes apart: one job


def test_under_github_actions_the_gate_writes_a_step_summary_and_annotations(store, db, tmp_path, monkeypatch):
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    base = make_run(store, lambda a, r, g: trial(a, r, g, gbit=10.0))
    slower = make_run(store, lambda a, r, g: trial(a, r, g, gbit=7.0), seed=2)
    code, out = gate(db, "--baseline", base, "--candidate", slower)
    assert code == 1
    assert "::error title=balloon-lab gate::pfn wire_gbit_s: 10 Gbit/s -> " in out and "limit -10%25)" in out
    text = summary.read_text()
    assert text.startswith("### balloon-lab gate: ❌ REGRESSION (exit 1)") and "**regression** bitmap wire_gbit_s" in text
