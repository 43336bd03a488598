"""What the machine looked like when a run started.

Timings are only comparable on the same kernel, CPU, Python build and code; the gate
warns when any of these differ between baseline and candidate, and the report
prints them so a number can be defended (or discounted) later.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from lab.paths import REPO_ROOT

# Fields whose difference makes timings across two runs suspect (see differences()).
COMPARABILITY_KEYS = ("kernel", "cpu_model", "cores", "python_version", "python_executable",
                      "numpy", "scipy", "probe_backend", "qemu_accel", "qemu_version", "guest_kernel")


def collect(probe_backend: str | None = None, repo: Path = REPO_ROOT) -> dict[str, Any]:
    """A JSON-ready description of this machine, process and checkout."""
    uname = platform.uname()
    commit, dirty = git_state(repo)
    return {
        "hostname": socket.gethostname(),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "kernel": uname.release,
        "kernel_version": uname.version,
        "machine": uname.machine,
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_bytes": meminfo_bytes("MemTotal"),
        "memory_available_bytes": meminfo_bytes("MemAvailable"),
        "loadavg": loadavg(),
        "cpu_governor": cpu_governor(),
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "python_executable": sys.executable,
        "numpy": _version("numpy"),
        "scipy": _version("scipy"),
        "balloon_lab": _version("balloon-lab"),
        "git_commit": commit,
        "git_dirty": dirty,
        "probe_backend": probe_backend,
        "job": job_id(),
        "boot_id": boot_id(),
    }


JOB_ENV = "BALLOON_LAB_JOB"


def job_id(environ: Mapping[str, str] = os.environ) -> str | None:
    """The job a run belongs to (the gate compares timings only within one,
    lab/gate_time.py): $BALLOON_LAB_JOB, else the CI system's (GitHub Actions' run id,
    attempt and job; GitLab's CI_JOB_ID), else None."""
    if environ.get(JOB_ENV):
        return environ[JOB_ENV]
    if environ.get("GITHUB_RUN_ID"):
        return (f"github:{environ['GITHUB_RUN_ID']}/{environ.get('GITHUB_RUN_ATTEMPT', '1')}"
                f"/{environ.get('GITHUB_JOB', '')}")
    if environ.get("CI_JOB_ID"):
        return f"gitlab:{environ['CI_JOB_ID']}"
    return None


def boot_id() -> str | None:
    """This boot of the machine (a reboot starts another one)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def meminfo_bytes(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def loadavg() -> list[float] | None:
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except (OSError, ValueError):
        return None


def cpu_governor() -> str | None:
    """The cpufreq scaling governor(s) of the usable CPUs ("performance", "powersave",
    "a/b" when they differ), or None where the kernel exposes no cpufreq (most VMs)."""
    found = []
    for cpu in sorted(os.sched_getaffinity(0)):
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/cpufreq/scaling_governor") as f:
                g = f.read().strip()
        except OSError:
            continue
        if g and g not in found:
            found.append(g)
    return "/".join(found) or None


# A run is "under load" when the 1-minute load average exceeds the usable cores: more
# runnable tasks than CPUs, so the lab's processes waited for a CPU (pyperf records the
# same load average with every run and `pyperf system show` flags a governor other
# than "performance"). The lab's own trial keeps about one task runnable (VMM and guest
# take turns), which stays below the limit on any machine with two or more cores.
LOAD_PER_CORE_LIMIT = 1.0


def load_snapshot() -> dict[str, Any]:
    """What the machine's load was at this moment: recorded with every trial."""
    return {"loadavg": loadavg(), "cpu_governor": cpu_governor(), "cores_usable": len(os.sched_getaffinity(0))}


def load_warnings(snapshots: list[dict[str, Any]], where: str = "trials") -> list[str]:
    """Warnings for a run whose trials ran under load or with a governor other than performance."""
    out = []
    hot = [s for s in snapshots if isinstance(s, dict) and s.get("loadavg")
           and s["loadavg"][0] > LOAD_PER_CORE_LIMIT * (s.get("cores_usable") or os.cpu_count() or 1)]
    if hot:
        peak = max(s["loadavg"][0] for s in hot)
        cores = hot[0].get("cores_usable") or "?"
        out.append(f"taken under load: {len(hot)} of {len(snapshots)} {where} started with a 1-minute load "
                   f"average above the {cores} usable cores (peak {peak:.2f}); timings are slower and noisier "
                   "than on a quiet machine, so compare them only with runs taken under the same load")
    govs = sorted({s.get("cpu_governor") for s in snapshots if isinstance(s, dict) and s.get("cpu_governor")})
    odd = [g for g in govs if g != "performance"]
    if odd:
        out.append(f"CPU frequency governor {', '.join(odd)} (not performance): clock speed changed under the "
                   "timings (`cpupower frequency-set -g performance`)")
    return out


def git_state(repo: Path) -> tuple[str | None, bool | None]:
    """(HEAD commit, whether tracked files differ from it); (None, None) outside git."""
    base = ["git", "-c", f"safe.directory={repo}", "-C", str(repo)]
    try:
        head = subprocess.run(base + ["rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None, None
        status = subprocess.run(base + ["status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    return head.stdout.strip(), dirty


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Human-readable differences in the fields that make timings incomparable."""
    out = []
    for key in COMPARABILITY_KEYS:
        va, vb = a.get(key), b.get(key)
        if va is not None and vb is not None and va != vb:
            out.append(f"{key}: {va} vs {vb}")
    return out
