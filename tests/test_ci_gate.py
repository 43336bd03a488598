"""The stored-run gate on real experiments made in one job: a real slowdown (a smaller
driver batch) is caught. (CI gates timings with `balloon-lab ab` against the revision in
.ci/gate/base: tests/test_ab.py.)"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAB = str(ROOT / ".venv" / "bin" / "balloon-lab")


def lab(*args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([LAB, *args], capture_output=True, text=True, timeout=timeout)


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
