"""scripts/setup.sh: idempotent and quiet on a ready machine, precise without root."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / "scripts" / "setup.sh"


def test_second_run_changes_nothing_and_says_nothing():
    # the suite itself started through the set-up, so the machine is ready now
    r = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and r.stderr == ""
    assert Path(f"/lib/modules/{os.uname().release}/build/include").exists()
    assert (ROOT / ".venv" / "bin" / "balloon-lab").exists()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to drop to nobody")
def test_without_root_it_says_what_it_needs():
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "bash", str(SETUP)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "must run as root" in r.stderr
    for need in ("apt-get install", "python3-bpfcc", "tracefs", "/lib/modules"):
        assert need in r.stderr
