"""The regression gate on real experiments: this project gates itself against the
baseline committed in .ci/gate/, and a real slowdown (a smaller driver batch) is caught."""
from __future__ import annotations

import json
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAB = str(ROOT / ".venv" / "bin" / "balloon-lab")
GATE = ROOT / ".ci" / "gate"


def lab(*args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([LAB, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_project_gates_itself_against_committed_baseline(tmp_path):
    db = str(tmp_path / "ci.db")
    r = lab("compare", "--spec", str(GATE / "spec.toml"), "--db", db, "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    junit = tmp_path / "gate.xml"
    g = lab("gate", "--baseline", str(GATE / "baseline.json"), "--candidate", "latest", "--db", db,
            "--thresholds", str(GATE / "thresholds.toml"), "--junit", str(junit), "--json")
    verdict = json.loads(g.stdout)
    assert g.returncode == 0, json.dumps([c for c in verdict.get("checks", []) if c.get("status") == "regression"])[:3000]
    suite = ET.parse(junit).getroot()
    cases = suite.findall(".//testcase")
    assert len(cases) > 50 and not suite.findall(".//failure")


@pytest.mark.slow
def test_smaller_driver_batch_is_a_regression(tmp_path):
    """Same experiment, the PFN driver's batch cut from 256 to 32 pages: 8x the requests,
    kicks and round trips. The gate must exit 1 and name what regressed."""
    db = str(tmp_path / "b.db")
    common = ["--arms", "pfn", "--guest-mib", "256", "--inflate-mib", "128", "--trials", "7", "--warmups", "1",
              "--seed", "3", "--no-probes", "--db", db, "--quiet"]
    base = lab("compare", *common, "--batch-pages", "256", "--json")
    assert base.returncode == 0, base.stderr[-3000:]
    cand = lab("compare", *common, "--batch-pages", "32", "--json")
    assert cand.returncode == 0, cand.stderr[-3000:]
    b_id, c_id = json.loads(base.stdout)["run_id"], json.loads(cand.stdout)["run_id"]
    g = lab("gate", "--baseline", b_id, "--candidate", c_id, "--db", db, "--allow-spec-change")
    assert g.returncode == 1, g.stdout + g.stderr
    assert "REGRESSION  pfn  requests: 128 -> 1 024" in g.stdout   # counts grouped as reports.fmt does
    assert "stages_ns." in g.stdout          # and the time it costs, significant after Holm
    # the same comparison without the spec change being allowed is unusable input, not a pass
    g2 = lab("gate", "--baseline", b_id, "--candidate", c_id, "--db", db)
    assert g2.returncode == 2
