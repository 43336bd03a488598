"""`balloon-lab probe` in BCC's manner: INTERVAL [COUNT] summaries, a reading on Ctrl-C,
an examples epilog. Against a real process that calls madvise, with real BCC probes."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_ebpf_probes import EBPF

from conftest import BALLOON_LAB  # noqa: E402  (this checkout's CLI, or BALLOON_LAB_UNDER_TEST)
BUSY = r"""
import mmap, os, time
fd = os.memfd_create("busy")
os.ftruncate(fd, 1 << 20)
mm = mmap.mmap(fd, 1 << 20)
while True:
    for i in range(16):
        mm[i * 4096] = 1
        mm.madvise(mmap.MADV_REMOVE, i * 4096, 4096)
    time.sleep(0.01)
"""


@pytest.fixture
def busy():
    p = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        yield p.pid
    finally:
        p.kill()
        p.wait()


def _calls(text: str) -> list[int]:
    return [int(m.replace(" ", "")) for m in re.findall(r"madvise +calls ([\d ]+?)  ", text)]


@EBPF
def test_interval_and_count_print_one_summary_each(busy):
    out = subprocess.run([BALLOON_LAB, "probe", "--pid", str(busy), "1", "3"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert [int(n) for n in re.findall(r"interval (\d)/3", out.stdout)] == [1, 2, 3]
    calls = _calls(out.stdout)
    assert len(calls) == 3 and all(c > 100 for c in calls)      # ~16 calls per 10 ms, counters zeroed each time
    assert "Hit Ctrl-C to end" in out.stderr


@EBPF
def test_sigint_prints_the_reading_and_exits_0(busy):
    p = subprocess.Popen([BALLOON_LAB, "probe", "--pid", str(busy)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert "Hit Ctrl-C to end" in p.stderr.readline()        # the probes are attached
        time.sleep(3)
        p.send_signal(signal.SIGINT)
        stdout, stderr = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 0, stderr
    assert "Aborted" not in stderr and "Traceback" not in stderr
    seconds = float(re.search(r"backend bcc, ([\d.]+) s", stdout).group(1))
    assert 2.9 < seconds < 10
    assert _calls(stdout)[0] > 300


def test_help_has_examples_and_bad_pid_is_one_line():
    from click.testing import CliRunner
    from lab.cli.group import main
    h = CliRunner().invoke(main, ["probe", "--help"])
    assert "examples:" in h.stdout and "probe --pid 1234 1 10" in h.stdout
    pid = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    bad = CliRunner().invoke(main, ["probe", "--pid", str(pid), "1", "3"])
    assert bad.exit_code == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--pid" in bad.stderr
