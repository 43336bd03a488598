"""Memory a trial needs, checked before it starts, and a guest the OOM killer takes.

The refusal is the real check against the real MemAvailable: a guest larger than what
the host has now is refused in one line with the figures, before any process starts
(`run`, `compare`, `migrate`), and a trial started anyway is refused by the same
check at its start. The OOM report is seen for real without risking anyone else's
process on this shared machine: the lab runs in a small memory cgroup of its own
(made and removed by the test), so the kernel's OOM killer can only pick inside it;
the guest it kills is reported as OOM-killed, with the kernel's line.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from lab.machine import memory
from lab.trials.model.balloon_trial import BalloonTrial, TrialFailed
from lab.trials.model.processes import LabProcesses

from conftest import BALLOON_LAB  # noqa: E402  (this checkout's CLI, or BALLOON_LAB_UNDER_TEST)


def too_big_mib() -> int:
    """A guest size (MiB, multiple of 4, at most the lab's 65536) above MemAvailable now."""
    avail_mib = memory.meminfo()["MemAvailable"] >> 20
    mib = (avail_mib + 1024 + 3) // 4 * 4
    if mib > 65536:
        pytest.fail(f"MemAvailable is {avail_mib} MiB: no guest the lab allows is larger")
    return mib


SWEEP_NOTICE = "left behind by a balloon-lab process that was killed"


def own_stderr(out: subprocess.CompletedProcess) -> str:
    """stderr without the notice of a scratch dir an earlier, killed lab process left (the
    kill tests leave one on purpose; the next command sweeps it and says so)."""
    return "\n".join(line for line in out.stderr.strip().splitlines() if SWEEP_NOTICE not in line)


def one_line(out: subprocess.CompletedProcess) -> str:
    err = own_stderr(out)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err[-2000:]
    return err


@pytest.mark.parametrize("command", [["run"], ["compare", "--arms", "pfn,chunks", "--trials", "2"],
                                     ["migrate", "--hint", "none", "--workload", "aged"]])
def test_a_guest_above_memavailable_is_refused_in_one_line_before_anything_starts(command, tmp_path):
    mib = too_big_mib()
    out = subprocess.run([BALLOON_LAB, *command, "--guest-mib", str(mib),
                          *(["--inflate-mib", "128"] if command[0] != "migrate" else []),
                          *(["--db", str(tmp_path / "lab.db")] if command[0] != "run" else [])],
                         capture_output=True, text=True, timeout=15,   # a refusal is at once; a regression
                         env={**os.environ, "TMPDIR": str(tmp_path)})  # must not fill the shared machine for long
    assert out.returncode == 2, out.stderr[-2000:]
    err = one_line(out)
    copies = 2 if command[0] == "migrate" else 1
    assert re.fullmatch(
        rf"balloon-lab {command[0]}: not enough memory for a {mib} MiB guest with workload \w+"
        + (r" \(source and destination at once\)" if copies == 2 else "")
        + rf": it would make the host back [\d.]+ GiB \(guest RAM .*\); MemAvailable is [\d.]+ GiB, of which "
          r"[\d.]+ GiB is kept free; use a smaller --guest-mib, or --ignore-memory-check to go ahead anyway", err), err
    need = float(re.search(r"back ([\d.]+) GiB", err).group(1))
    assert need >= copies * mib / 1024                # aged writes all of guest RAM, in each copy
    assert not (tmp_path / "lab.db").exists()        # nothing was started, not even the store


def test_the_same_check_refuses_a_trial_at_its_start():
    mib = too_big_mib()
    with pytest.raises(TrialFailed, match=rf"not enough memory for a {mib} MiB guest with workload aged: .*"
                                          r"MemAvailable is"):
        LabProcesses(BalloonTrial(guest_mib=mib, inflate_mib=128))


def test_an_idle_guest_larger_than_memory_is_not_refused():
    """What counts is what the workload writes: a 64 GiB guest that writes 1 % of it fits."""
    need = memory.balloon_trial_need(65536, 0.01)
    memory.check(need, "an idle guest")              # raises if not


# --- the OOM killer, inside a cgroup of our own ---------------------------------------------
def _memory_cgroup_dir() -> tuple[Path, str, str]:
    """This process's memory cgroup directory, its limit file and its procs file (v2 or v1)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/"), "memory.limit_in_bytes", "cgroup.procs"
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            d = Path("/sys/fs/cgroup") / path.lstrip("/")
            if "memory" in (d / "cgroup.controllers").read_text().split():
                return d, "memory.max", "cgroup.procs"
    pytest.fail("no memory cgroup controller (v1 or v2) on this machine")


@pytest.fixture
def small_cgroup():
    """A memory cgroup of 700 MiB under ours (made and removed here)."""
    parent, limit_file, procs = _memory_cgroup_dir()
    d = parent / f"balloon-lab-test-oom-{os.getpid()}"
    d.mkdir()
    try:
        (d / limit_file).write_text(str(700 << 20))
        yield d / procs
    finally:
        for _ in range(100):
            try:
                d.rmdir()
                break
            except OSError:          # its last process is still exiting
                import time
                time.sleep(0.1)


def run_in(procs: Path, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([BALLOON_LAB, *args], capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: procs.write_text(str(os.getpid())))


HOG = ["run", "--guest-mib", "1024", "--inflate-mib", "128", "--workload", "hog", "--param", "share=0.9",
       "--no-probes"]


@pytest.mark.slow
def test_a_guest_killed_by_the_oom_killer_is_reported_as_oom_killed(small_cgroup):
    # the check sees the cgroup's limit, not only MemAvailable
    out = run_in(small_cgroup, HOG)
    assert out.returncode == 2, out.stderr[-2000:]
    assert re.search(r"not enough memory .* the memory cgroup \S+'s limit 0\.7 GiB less its use [\d.]+ GiB is",
                     one_line(out)), out.stderr
    # gone ahead anyway: the guest writes past the limit, the OOM killer takes it
    out = run_in(small_cgroup, HOG + ["--ignore-memory-check"])
    assert out.returncode == 1, out.stderr[-3000:]
    m = re.search(r"guest process (\d+) died .*killed by SIGKILL\): OOM-killed \(kernel: '(Memory cgroup out of "
                  r"memory: )?Killed process (\d+) \(", out.stderr)
    assert m and m.group(1) == m.group(3), out.stderr[-3000:]
    assert own_stderr(out).startswith("balloon-lab run: trial failed: workload-prepare failed: "), out.stderr[-3000:]
