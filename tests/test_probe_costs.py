"""What the probes cost, measured (probes/bpf_stats.py, probes/costs.py), and the cheaper
hooks counting exactly what the tracepoints they replace count. Real BCC, real kernel
statistics, real child processes."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from probes.bpf_stats import prog_stats, stats_enabled, sysctl_value
from test_ebpf_probes import EBPF, IDLE_CHILD, MADVISE_CHILD, children, session  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


# --- bpf_stats: on for a block, and back to what it was on every way out -----------------------
@EBPF
def test_stats_count_runs_only_while_enabled():
    from bcc import BPF

    b = BPF(text="RAW_TRACEPOINT_PROBE(sys_exit) { return 0; }")
    try:
        fd = b.funcs[b"raw_tracepoint__sys_exit"].fd
        before = prog_stats(fd)
        for _ in range(100):
            os.getppid()
        off = prog_stats(fd)
        if off.run_cnt != before.run_cnt:
            pytest.skip("run-time statistics are already on (another process holds them): nothing to compare")
        with stats_enabled() as how:
            assert how == "fd" and sysctl_value() == 0          # the sysctl is never written
            for _ in range(100):
                os.getppid()
            on = prog_stats(fd)
        assert off.run_cnt == before.run_cnt                    # statistics off: nothing counted
        assert on.run_cnt - off.run_cnt >= 100 and on.run_time_ns > off.run_time_ns
        assert on.name == "sys_exit" and on.prog_id > 0
    finally:
        b.cleanup()


SYSCTL_CHILD = r"""
import os, sys, time
from probes.bpf_stats import stats_enabled, sysctl_value
with stats_enabled(force_sysctl=True) as how:
    print(how, sysctl_value(), flush=True)
    if sys.argv[1] == "kill":
        time.sleep(60)                     # SIGKILLed here: nothing of this process restores
    elif sys.argv[1] == "exit":
        sys.exit(5)                        # leaves through the block's finally
    else:
        raise RuntimeError("boom")
"""


@EBPF
@pytest.mark.parametrize("how", ["kill", "exit", "raise"])
def test_sysctl_fallback_is_restored_on_every_way_out(how, tmp_path):
    """Where BPF_ENABLE_STATS is refused the sysctl is raised (system/knobs.py) and put
    back when the block ends, when the process exits, and, for a process killed with
    SIGKILL, by the next lab process (restore_left_behind, which every command runs)."""
    from system import knobs

    if sysctl_value() != 0:
        pytest.skip(f"kernel.bpf_stats_enabled is {sysctl_value()} (someone else turned statistics on)")
    env = dict(os.environ, BALLOON_LAB_KNOBS_DIR=str(tmp_path))
    p = subprocess.Popen([PY, "-c", SYSCTL_CHILD, how], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=str(ROOT), env=env)
    line = p.stdout.readline().split()
    assert line == ["sysctl", "1"], p.stderr.read()
    if how == "kill":
        p.kill()
    rc = p.wait(timeout=30)
    assert rc == {"kill": -signal.SIGKILL, "exit": 5, "raise": 1}[how]
    if how == "kill":
        assert sysctl_value() == 1                         # left raised by the killed process ...
        monkey = knobs.REGISTRY
        knobs.REGISTRY = tmp_path
        try:
            assert any("bpf_stats_enabled" in c for c in knobs.restore_left_behind())
        finally:
            knobs.REGISTRY = monkey
    assert sysctl_value() == 0                             # ... and back where it was


# --- the cheaper hooks count exactly what the tracepoints count -------------------------------
class FtraceCount:
    """The kernel's own record of tracepoint firings in one task: a private ftrace instance
    with the events enabled and filtered on the pid, no BPF at all, so an independent,
    exact reference (the perf-tracepoint BPF programs the probes used before skip a firing
    that nests inside another such program on the same CPU)."""

    def __init__(self, events: list[tuple[str, str]], pid: int) -> None:
        from probes.tracefs import tracefs_root
        self.dir = Path(tracefs_root(), "instances", f"balloon-lab-test-{os.getpid()}")
        self.dir.mkdir()
        self.events = events
        (self.dir / "buffer_size_kb").write_text("16384")
        for cat, ev in events:
            (self.dir / "events" / cat / ev / "filter").write_text(f"common_pid == {pid}")
            (self.dir / "events" / cat / ev / "enable").write_text("1")

    def counts(self) -> dict[str, int]:
        (self.dir / "tracing_on").write_text("0")
        text = (self.dir / "trace").read_text()
        m = re.search(r"entries-in-buffer/entries-written: (\d+)/(\d+)", text)
        assert m and m.group(1) == m.group(2), "the trace buffer lost events"
        # a syscall's exit prints as "sys_madvise -> 0x0", every other event as "<event>: ..."
        return {ev: len(re.findall(rf" (?:{ev}:|sys_{ev[len('sys_exit_'):]} -> )", text)) for _, ev in self.events}

    def close(self) -> None:
        for cat, ev in self.events:
            (self.dir / "events" / cat / ev / "enable").write_text("0")
        self.dir.rmdir()


def _wait_blocked(pid: int, timeout: float = 5.0) -> None:
    """Until the child sleeps (state S twice, 10 ms apart): after it prints its result it
    still runs into sys.stdin.read(), and a page it frees on the way would fall between the
    two counts (CI on e2beed5: mm_page_free 3001 by BPF, 3002 by ftrace read a moment later)."""
    import time
    deadline, asleep = time.monotonic() + timeout, 0
    while asleep < 2 and time.monotonic() < deadline:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        asleep = asleep + 1 if state == "S" else 0
        time.sleep(0.01)


@EBPF
def test_raw_tracepoints_count_every_firing(session, children):
    """The probes moved from perf tracepoints to raw ones (no event record built, the
    tracepoint's own arguments): each count equals the kernel's own count of that
    tracepoint's firings in the probed process."""
    c = children(MADVISE_CHILD, "3000")
    fields = {"sys_exit_madvise": "madvise_calls", "mm_page_free": "page_frees",
              "mm_page_free_batched": "page_frees_batched", "mm_page_alloc": "page_allocs",
              "page_fault_user": "page_faults"}
    ref = FtraceCount([("syscalls", "sys_exit_madvise"), ("kmem", "mm_page_free"), ("kmem", "mm_page_free_batched"),
                       ("kmem", "mm_page_alloc"), ("exceptions", "page_fault_user")], c.pid)
    try:
        session.attach([c.pid])
        session.clear()
        c.go()
        _wait_blocked(c.pid)    # both counts read with the child asleep in its last read()
        r = session.read()
        counts = ref.counts()
    finally:
        ref.close()
    assert counts["sys_exit_madvise"] == r.madvise_calls == 3000
    assert counts["page_fault_user"] >= 3000 and counts["mm_page_free"] >= 3000
    for ev, n in counts.items():
        assert getattr(r, fields[ev]) == n, (ev, getattr(r, fields[ev]), n)


# --- what each program cost, per reading ------------------------------------------------------
@EBPF
def test_reading_says_what_each_program_cost(session, children):
    c = children(MADVISE_CHILD, "2000")
    session.attach([c.pid])
    session.clear()
    c.go()
    r = session.read()
    cal = session.calibration
    assert cal.syscall_hook_ns > 0 and cal.usdt_trap_ns > 0 and cal.syscall_hook_discard_ns > 0
    progs = r.programs
    # the kernel's runs of each program, and the programs' own count of those for the probed process
    assert progs["page_fault_user"]["probed_events"] == r.page_faults
    assert progs["mm_page_free"]["probed_events"] == r.page_frees
    assert progs["sys_exit"]["probed_events"] >= r.madvise_calls == 2000
    assert progs["sys_enter"]["probed_events"] == progs["sys_exit"]["probed_events"]   # both run for every syscall
    # every syscall of the probed process charged once: its 2000 discards at the discard calibration
    assert progs["syscall_hook_discard"]["events"] == r.madvise_calls == 2000
    assert progs["syscall_hook"]["events"] + 2000 == progs["sys_exit"]["probed_events"]
    assert progs["syscall_hook_discard"]["ns_per_event"] == pytest.approx(cal.syscall_hook_discard_ns)
    for name in ("sys_exit", "sys_enter", "page_fault_user", "mm_page_free", "mm_page_alloc"):
        assert progs[name]["events"] >= progs[name]["probed_events"] > 0
        assert progs[name]["ms"] > 0
        assert progs[name]["ns_per_event"] == pytest.approx(1e6 * progs[name]["ms"] / progs[name]["events"])
    assert progs["syscall_hook"]["ns_per_event"] == pytest.approx(cal.syscall_hook_ns)
    assert r.probe_cost_ms == pytest.approx(sum(p["ms"] for p in progs.values()))
    assert json.loads(r.dumps())["programs"]["sys_exit"]["events"] == progs["sys_exit"]["events"]


STAGE_MARKERS = """
from probes.markers import chain, stage
class R:
    encode_ns = transmit_ns = 0
rep = R()
n = int(sys.argv[1])
handshake()
for _ in range(n):
    with chain() as c:
        c.next("encode", rep)
        time.sleep(0.001)
        c.next("transmit", rep)
        time.sleep(0.002)
sys.audit("balloon-lab:a:b:e")            # a ':' inside the name: malformed
sys.audit("balloon-lab:x:q")              # no such phase: malformed
sys.audit("balloon-lab:lonely:n")         # a next with no open stage: its begin still counts
sys.audit("balloon-lab:lonely:e")
report(encode_ns=rep.encode_ns, transmit_ns=rep.transmit_ns)
"""


@EBPF
def test_one_marker_per_boundary(session, children):
    """chain(): encode:b, transmit:n, transmit:e per round, three markers for two stages,
    each stage's time as the lab's own timers see it."""
    n = 40
    c = children(STAGE_MARKERS, str(n))
    session.attach([c.pid])
    session.clear()
    out = c.go()
    r = session.read()
    st = r.stages
    assert st["encode"]["count"] == st["transmit"]["count"] == n
    assert r.programs["on_audit"]["events"] == 3 * n + 4
    for name in ("encode", "transmit"):
        lab = out[f"{name}_ns"]
        assert 0.9 * lab < st[name]["ns"] < 1.1 * lab + n * 200_000, (name, st[name]["ns"], lab)
    assert st["lonely"]["count"] == 1
    assert r.stage_anomalies["malformed"] == 2 and r.stage_anomalies["unmatched_end"] == 1


@EBPF
def test_default_session_leaves_the_opt_in_probes_out(children):
    from probes.session import ProbeSession

    s = ProbeSession()
    try:
        assert s.load() and set(s.probes) == {"madvise", "kicks", "pagealloc", "stages"}
        c = children(MADVISE_CHILD, "500")
        s.attach([c.pid])
        s.clear()
        c.go()
        r = s.read()
        assert r.madvise_calls == 500 and r.madvise_kernel_ns is None and r.page_frees is None
        assert "sys_enter" not in r.programs and "mm_page_free" not in r.programs
        assert set(r.programs) >= {"sys_exit", "syscall_hook", "page_fault_user", "mm_page_alloc"}
    finally:
        s.detach()


def test_unknown_or_incomplete_probe_sets_are_refused():
    from probes.session import ProbeSession
    with pytest.raises(ValueError, match="opt-in: pagefree, syscall-time"):
        ProbeSession(concerns=("madvise", "bogus"))
    with pytest.raises(ValueError, match="add madvise"):
        ProbeSession(concerns=("kicks", "syscall-time"))


@EBPF
def test_other_tools_programs_are_measured_apart(session, children):
    """Another tool's BPF program runs in the probed process too (and pays for the
    statistics the session turned on): the reading measures it, apart from the lab's cost."""
    from bcc import BPF

    other = BPF(text=b"RAW_TRACEPOINT_PROBE(sys_exit) { return 0; }")
    try:
        c = children(MADVISE_CHILD, "1000")
        session.attach([c.pid])
        session.clear()
        c.go()
        r = session.read()
    finally:
        other.cleanup()
    assert r.foreign_bpf["programs"] >= 1 and r.foreign_bpf["events"] >= 1000 and r.foreign_bpf["ms"] > 0
    assert r.probe_cost_ms == pytest.approx(sum(p["ms"] for p in r.programs.values()))     # not in the lab's total


@EBPF
def test_hook_floor_benchmark_measures_every_set_up_and_names_the_hooks_it_tried():
    """benchmarks/syscall_hook_floor.py, small: every set-up timed on both calls, the
    statistics' own cost visible on getppid (a quarter of a microsecond here, over
    50 000 calls), and what the kernel said of fentry and kprobes."""
    out = subprocess.run([PY, str(ROOT / "benchmarks" / "syscall_hook_floor.py"), "--rounds", "2", "--pages", "2048",
                          "--getppid", "50000", "--json"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    assert set(r["median_ns"]) == {"none", "empty", "lab", "lab target", "lab + stats"}
    assert all(v["discard"] > 0 and v["getppid"] > 0 for v in r["median_ns"].values())
    assert r["added_ns"]["lab + stats"]["getppid"] > 0
    assert r["cheaper_hooks"]["fentry"].startswith("an fentry program on do_madvise")
    assert r["cheaper_hooks"]["kprobe"].startswith("kprobes:")
