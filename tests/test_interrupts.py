"""Ctrl-C, SIGTERM and SIGKILL of a real `balloon-lab` command, and the kernel knobs it raised.

SIGTERM (as `timeout` sends it) and a terminal's Ctrl-C (SIGINT to the whole process
group) during a probed `compare` end it the same way: no process of the trial left,
no scratch directory left, BCC detached without a word, exactly one line saying the
run was interrupted, exit 128 + the signal, the run stored as interrupted with its
completed trials. `run --backing hugetlb` puts vm.nr_hugepages back on a normal exit,
on SIGTERM, and (through the next command) after SIGKILL. Two holders of one knob,
in two real processes, keep it raised until the last is gone.
"""
from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from system import knobs
from lab.store.store import Store

ROOT = Path(__file__).resolve().parents[1]
from conftest import BALLOON_LAB  # noqa: E402  (this checkout's CLI, or BALLOON_LAB_UNDER_TEST)
NOISE = ("Traceback", "ioctl(", "Exception ignored", "Failed to detach", "KeyboardInterrupt", "close perf event")


def descendants(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for d in glob.glob("/proc/[0-9]*"):
        try:
            with open(d + "/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(d[6:]))
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def scratch_dirs_of(pids: list[int]) -> set[str]:
    """The /tmp/balloon-lab-* directories named on these processes' command lines."""
    out = set()
    for p in pids:
        try:
            with open(f"/proc/{p}/cmdline") as f:
                args = f.read().split("\0")
        except OSError:
            continue
        out |= {"/".join(a.split("/")[:3]) for a in args if a.startswith("/tmp/balloon-lab-")}
    return out


def start(args: list[str], err_path: Path) -> subprocess.Popen:
    """The command in a session of its own, as a terminal would run it (its own process group)."""
    return subprocess.Popen([BALLOON_LAB, *args], stdout=subprocess.DEVNULL, stderr=open(err_path, "w"),
                            start_new_session=True)


def wait_for(path: Path, pattern: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, path.read_text()):
            return
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} never appeared: {path.read_text()[-2000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_a_probed_compare_ends_cleanly_with_one_message(sig, tmp_path):
    db, err = tmp_path / "lab.db", tmp_path / "err"
    p = start(["compare", "--arms", "pfn,chunks", "--trials", "10", "--warmups", "0", "--guest-mib", "256",
               "--inflate-mib", "128", "--probes", "--db", str(db)], err)
    wait_for(err, r"\[ 1/20\].* ok ")             # probes loaded, one trial stored, the next one running
    deadline = time.monotonic() + 60
    while True:                                   # a VMM and its guest up, mid-trial
        time.sleep(0.3)
        kids = descendants(p.pid)
        dirs = scratch_dirs_of(kids)
        if len(kids) >= 2 and dirs or time.monotonic() > deadline:
            break
    assert kids and dirs, "no VMM running when the signal was sent"
    if sig == signal.SIGINT:
        os.killpg(p.pid, sig)                     # a terminal's Ctrl-C goes to the whole foreground group
    else:
        os.kill(p.pid, sig)                       # `timeout`, `kill`
    assert p.wait(60) == 128 + sig
    text = err.read_text()
    assert not any(n in text for n in NOISE), text[-3000:]
    said = [ln for ln in text.splitlines() if "interrupt" in ln]
    assert len(said) == 1 and re.fullmatch(rf"balloon-lab compare: run [0-9a-f]+ interrupted by "
                                           rf"{signal.Signals(sig).name}; its \d+ completed trial\(s\) are kept",
                                           said[0]), text[-3000:]
    time.sleep(0.5)
    assert not [k for k in kids if alive(k)], [open(f"/proc/{k}/cmdline").read() for k in kids if alive(k)]
    assert not [d for d in dirs if os.path.exists(d)]
    run_id = said[0].split()[3]
    with Store(db, create=False) as s:
        run = s.get_run(run_id)
        kept = int(re.search(r"its (\d+)", said[0]).group(1))
        assert run.status == "interrupted" and run.trials_ok == kept >= 1


def hugepages() -> int:
    return int(Path("/proc/sys/vm/nr_hugepages").read_text())


def hugetlb_run(tmp_free_pages: int, cycles: int = 1) -> list[str]:
    """A hugetlb `run` whose guest needs 128 huge pages more than the pool has free now
    (another process on this shared machine may hold a pool of its own). A trial to be
    signalled mid-way runs many inflate/deflate cycles: one cycle of this small guest
    ends within the second the test waits on a quiet machine."""
    mib = (tmp_free_pages + 128) * 2
    return ["run", "--backing", "hugetlb", "--guest-mib", str(mib), "--inflate-mib", "128", "--no-probes",
            "--workload", "aged" if cycles > 1 else "idle", "--cycles", str(cycles)]


def free_huge_pages() -> int:
    from device.virtio.backing import hugetlb_pool
    return hugetlb_pool().available


@pytest.mark.slow
def test_hugetlb_pool_is_restored_on_exit_sigterm_and_after_sigkill(tmp_path):
    # a normal exit
    before, free = hugepages(), free_huge_pages()
    out = subprocess.run([BALLOON_LAB, *hugetlb_run(free)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(rf"set vm\.nr_hugepages from {before} to {before + 128} .*if it is killed: `sysctl -w "
                     rf"vm\.nr_hugepages={before}`", out.stderr), out.stderr
    assert f"set vm.nr_hugepages from {before + 128} back to {before}" in out.stderr, out.stderr
    assert hugepages() == before
    # SIGTERM mid-trial
    err = tmp_path / "err"
    before, free = hugepages(), free_huge_pages()
    p = start(hugetlb_run(free, cycles=100), err)
    wait_for(err, "nr_hugepages from")
    time.sleep(1.5)
    assert hugepages() == before + 128
    p.send_signal(signal.SIGTERM)
    assert p.wait(60) == 143
    assert hugepages() == before, err.read_text()
    # SIGKILL mid-trial: nothing can run in the killed process; the next command restores
    before, free = hugepages(), free_huge_pages()
    p = start(hugetlb_run(free, cycles=100), err)
    wait_for(err, "nr_hugepages from")
    time.sleep(1.0)
    dirs = scratch_dirs_of(descendants(p.pid))
    p.kill()
    p.wait(10)
    assert hugepages() == before + 128
    out = subprocess.run([BALLOON_LAB, "runs", "--db", str(tmp_path / "none.db")], capture_output=True, text=True,
                         timeout=60)
    assert f"set vm.nr_hugepages from {before + 128} back to {before} (left raised by balloon-lab pid {p.pid}, " \
           "which is gone)" in out.stderr, out.stderr
    assert hugepages() == before
    assert dirs and all(f"removed {d}, left behind" in out.stderr for d in dirs), out.stderr
    assert not [d for d in dirs if os.path.exists(d)]


def rss_mib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20
    except OSError:
        return 0


@pytest.mark.slow
def test_kill_9_of_the_lab_while_the_guest_fills_memory_leaves_no_process(tmp_path):
    """The guest of a killed lab's VMM must not go on writing guest RAM alone (it does
    not look at its control socket while a workload step runs): it dies with its VMM."""
    err = tmp_path / "err"
    p = start(["run", "--guest-mib", "2048", "--inflate-mib", "1024", "--workload", "aged", "--no-probes"], err)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:          # the guest is writing its RAM (aged: all of it)
        kids = descendants(p.pid)
        if len(kids) >= 2 and max(rss_mib(k) for k in kids) > 200:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the guest never started writing: {err.read_text()[-2000:]}")
    p.kill()
    p.wait(10)
    time.sleep(2.0)
    left = [k for k in kids if alive(k)]
    assert not left, [(k, rss_mib(k), open(f"/proc/{k}/cmdline").read()[:80]) for k in left]


HOLDER = textwrap.dedent("""
    import sys, time
    from system import knobs
    hold = knobs.raise_knob(knobs.HUGETLB_POOL, int(sys.argv[1]))
    print("held", hold.change, flush=True)
    sys.stdin.readline()          # hold until told
""")


def test_two_holders_of_one_knob_keep_it_until_the_last_is_gone(tmp_path, monkeypatch):
    """Two real processes raise the real hugetlb pool by 1 and 2 pages; the first to end
    leaves the other's share; the second is killed with SIGKILL: restore_left_behind puts
    the original back. Each knob's holders live in their own registry (a test directory)."""
    monkeypatch.setenv("BALLOON_LAB_KNOBS_DIR", str(tmp_path / "knobs"))
    monkeypatch.setattr(knobs, "REGISTRY", tmp_path / "knobs")
    before = hugepages()
    procs, said = [], []
    for share in (1, 2):
        p = subprocess.Popen([sys.executable, "-c", HOLDER, str(share)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=ROOT)
        said.append(p.stdout.readline().strip())
        assert said[-1].startswith("held ")
        procs.append(p)
    # each holder's by-hand command takes back its own share only, not the other's
    assert said[0].endswith(f"if it is killed: `sysctl -w vm.nr_hugepages={before}`"), said
    assert said[1].startswith(f"held set vm.nr_hugepages from {before + 1} to {before + 3} "), said
    assert said[1].endswith(f"if it is killed: `sysctl -w vm.nr_hugepages={before + 1}`"), said
    assert hugepages() == before + 3
    a, b = procs
    a.stdin.write("\n")
    a.stdin.close()
    assert a.wait(10) == 0                      # its atexit released its share only
    assert hugepages() == before + 2
    b.kill()
    b.wait(10)
    assert hugepages() == before + 2            # nobody could restore for it yet
    said = knobs.restore_left_behind()
    assert said == [f"set vm.nr_hugepages from {before + 2} back to {before} (left raised by balloon-lab pid "
                    f"{b.pid}, which is gone)"]
    assert hugepages() == before
    assert not list((tmp_path / "knobs").glob("*.json"))


def test_a_restore_the_kernel_refuses_gives_the_command(tmp_path, monkeypatch):
    """A raised setting whose restore fails (here: its registry says the original was a
    value the kernel does not take) is reported with the exact command, not dropped."""
    monkeypatch.setattr(knobs, "REGISTRY", tmp_path / "knobs")
    before = hugepages()
    hold = knobs.raise_knob(knobs.HUGETLB_POOL, 1)
    try:
        state = tmp_path / "knobs" / f"{knobs.HUGETLB_POOL.key}.json"
        state.write_text(state.read_text().replace('"original": "', '"original": "x'))
        with pytest.raises(knobs.KnobError, match=r"could not set vm\.nr_hugepages back to x\d+ .*restore it "
                                                       r"with `sysctl -w vm\.nr_hugepages=x\d+`"):
            hold.release()
    finally:
        Path("/proc/sys/vm/nr_hugepages").write_text(str(before))
