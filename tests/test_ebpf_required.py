"""Issue 22 item 7: where CI requires eBPF (BALLOON_LAB_REQUIRE_EBPF=1, set by .ci/run), an
eBPF test whose BCC cannot load fails instead of skipping, so a broken BCC turns CI red.

BCC is made unloadable the way a broken install is: a `bcc` package first on the path
whose import raises (Debian's real one stays where it is)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEST = "tests/test_ebpf_probes.py::test_madvise_errors_are_counted"


def _pytest(broken_bcc: Path, require: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "BALLOON_LAB_REQUIRE_EBPF"}
    env["PYTHONPATH"] = os.pathsep.join([str(broken_bcc), str(ROOT)])
    if require:
        env["BALLOON_LAB_REQUIRE_EBPF"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", TEST], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def broken_bcc(tmp_path: Path) -> Path:
    pkg = tmp_path / "bcc"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('libbcc.so.0: cannot open shared object file (test)')\n")
    return tmp_path


@pytest.mark.skipif(os.geteuid() != 0, reason="without root the eBPF tests skip for that reason first")
def test_a_broken_bcc_skips_by_default_and_fails_where_ci_requires_ebpf(broken_bcc):
    free = _pytest(broken_bcc, require=False)
    assert free.returncode == 0 and "1 skipped" in free.stdout, free.stdout[-2000:]
    assert "BCC is not importable" in free.stdout
    required = _pytest(broken_bcc, require=True)       # fails in its setup: pytest counts an error
    assert required.returncode == 1 and "1 error" in required.stdout, required.stdout[-2000:]
    assert "skipped" not in required.stdout
    assert "eBPF is required here (BALLOON_LAB_REQUIRE_EBPF=1) but BCC is not importable" in required.stdout
    assert "libbcc.so.0: cannot open shared object file (test)" in required.stdout
