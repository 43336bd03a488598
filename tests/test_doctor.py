"""`balloon-lab doctor`: every check passes on this machine; as an unprivileged user it fails
on root and names the fix."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLI = str(ROOT / ".venv" / "bin" / "balloon-lab")
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
EXPECTED = ["root", "bcc", "kernel-headers", "tracefs", "tracepoint-program", "usdt-markers", "usdt-audit",
            "memfd-eventfd-madv-remove", "huge-pages", "qemu-backend"]


def run(args: list[str], prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run((prefix or []) + [CLI, *args], capture_output=True, text=True, timeout=60, cwd="/")


@pytest.mark.ebpf
@pytest.mark.skipif(os.geteuid() != 0, reason="the full doctor needs root (eBPF)")
def test_doctor_passes_every_check_here():
    p = run(["doctor", "--json"])
    rep = json.loads(p.stdout)
    failed = [c for c in rep["checks"] if not c["ok"]]
    assert p.returncode == 0 and rep["ok"] and not failed, failed
    assert [c["name"] for c in rep["checks"]] == EXPECTED
    for c in rep["checks"]:
        assert set(c) == {"name", "ok", "detail", "fix"} and c["detail"]
    by = {c["name"]: c for c in rep["checks"]}
    assert "counted 100 of 100" in by["tracepoint-program"]["detail"]
    assert "100 sys.audit events" in by["usdt-audit"]["detail"]
    # the real stack: a real boot of QEMU + the Linux guest and a verified 16 MiB inflate
    assert "booted kernel" in by["qemu-backend"]["detail"] and "inflated 4096 pages" in by["qemu-backend"]["detail"]


def test_doctor_unprivileged_names_root_and_its_fix():
    prefix = NOBODY if os.geteuid() == 0 else []
    p = run(["doctor", "--json"], prefix)
    assert p.returncode == 1, p.stderr
    rep = json.loads(p.stdout)
    assert rep["ok"] is False
    by = {c["name"]: c for c in rep["checks"]}
    assert by["root"]["ok"] is False
    assert "uid" in by["root"]["detail"]
    assert by["root"]["fix"].startswith("run it as root: sudo ") and "doctor" in by["root"]["fix"]
    assert by["tracepoint-program"]["ok"] is False and "root" in by["tracepoint-program"]["detail"]
    assert by["memfd-eventfd-madv-remove"]["ok"] is True       # no privilege needed for these
    text = run(["doctor"], prefix)
    assert text.returncode == 1
    assert "FAIL  root" in text.stdout and "fix: run it as root: sudo" in text.stdout
