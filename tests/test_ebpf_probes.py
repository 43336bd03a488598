"""The probes against real BCC, real child processes, real memfds and eventfds.

Every count is checked exactly against what a child process did. The children wait
for "go" on stdin after printing their setup, so the work happens only once the
probes are attached. One ProbeSession (one clang compile) serves the whole module,
re-attached to each test's children: the reuse the lab's runner relies on.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from probes.bpf import ebpf_skip_reason
from probes.markers import check_name, event
from probes.standalone import EventfdSpec, parse_eventfd

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


_SKIP = ebpf_skip_reason()
if _SKIP:
    print(f"\nSKIPPING eBPF tests: {_SKIP}", file=sys.stderr)


def EBPF(f):
    """An eBPF test: marked, and skipped (with the printed reason) only where eBPF truly is missing."""
    return pytest.mark.ebpf(pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")(f))


PRELUDE = r'''
import json, mmap, os, sys, time
PAGE = 4096
def handshake(**info):
    print(json.dumps(info), flush=True)
    if sys.stdin.readline().strip() != "go":
        sys.exit(3)
def report(**result):
    print(json.dumps(result), flush=True)
    sys.stdin.read()              # stay alive (same pid) until the test is done
def memfd(pages):
    fd = os.memfd_create("t", os.MFD_CLOEXEC)
    os.ftruncate(fd, pages * PAGE)
    return fd, mmap.mmap(fd, pages * PAGE)
'''


class Child:
    """A python3.11 child: prints its setup as JSON, works on "go", prints its result as JSON."""

    def __init__(self, body: str, *args: str) -> None:
        code = PRELUDE + textwrap.dedent(body)
        self.p = subprocess.Popen([PY, "-c", code, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, cwd=str(ROOT))
        self.info = self._line()

    def _line(self) -> dict:
        line = self.p.stdout.readline()
        assert line, f"child exited early with {self.p.wait()}"
        return json.loads(line)

    @property
    def pid(self) -> int:
        return self.p.pid

    def go(self) -> dict:
        self.p.stdin.write("go\n")
        self.p.stdin.flush()
        return self._line()

    def finish(self) -> None:
        if self.p.poll() is None:
            try:
                self.p.stdin.close()
            except OSError:
                pass
            try:
                self.p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


@pytest.fixture
def children():
    made: list[Child] = []

    def make(body: str, *args: str) -> Child:
        c = Child(body, *args)
        made.append(c)
        return c

    yield make
    for c in made:
        c.finish()


@pytest.fixture(scope="module")
def session():
    """Every probe, the opt-in ones too (pagefree, syscall-time): each count below is exact."""
    from probes.session import CONCERNS, ProbeSession

    s = ProbeSession(concerns=CONCERNS)
    assert s.backend == "bcc", s.reason
    assert s.load(), s.reason               # compile once for the module
    assert s.backend == "bcc" and set(s.probes) == {"madvise", "kicks", "pagealloc", "pagefree", "stages"}, s.missing
    yield s
    s.detach()


MADVISE_CHILD = """
n = int(sys.argv[1])
fd, mm = memfd(n)
handshake()
for i in range(n):
    mm[i * PAGE] = 1
    mm.madvise(mmap.MADV_REMOVE, i * PAGE, PAGE)
report(blocks=os.fstat(fd).st_blocks)
"""

IDLE_CHILD = """
handshake()
report()
"""


# --- pure helpers (no eBPF) ---------------------------------------------------------------
def test_marker_names_are_checked():
    assert event("discard", "b") == "balloon-lab:discard:b"
    assert check_name("a" * 15) == "a" * 15
    for bad in ("", "a" * 16, "Discard", "dis card", "x:y"):
        with pytest.raises(ValueError):
            check_name(bad)
    with pytest.raises(ValueError):
        event("discard", "x")


def test_parse_eventfd_specs():
    assert parse_eventfd("7") == EventfdSpec(7, None, "other")
    assert parse_eventfd("7:2") == EventfdSpec(7, 2, "kick")
    assert parse_eventfd("7:-:call") == EventfdSpec(7, None, "call")
    for bad in ("x", "7:y", "7:1:bogus", "-1", "1:2:3:4"):
        with pytest.raises(ValueError):
            parse_eventfd(bad)


def test_python_audit_marker_in_the_interpreter():
    from probes.elfnotes import has_marker, usdt_notes

    exe = os.path.realpath(PY)
    assert has_marker(exe, "python", "audit"), f"{exe} lacks python:audit: the venv is not Debian's python3.11"
    assert not has_marker("/bin/true", "python", "audit")
    assert any(n.name == "function__entry" for n in usdt_notes(exe))


# --- madvise / fallocate ---------------------------------------------------------------------
@EBPF
@pytest.mark.parametrize("n", [1000])
def test_madvise_count_is_exact_per_pid(session, children, n):
    worker = children(MADVISE_CHILD, str(n))
    idle = children(IDLE_CHILD)
    outsider = children(MADVISE_CHILD, "500")          # makes calls but is not a target
    session.attach([worker.pid, idle.pid])
    session.clear()
    for c in (worker, idle, outsider):
        c.go()
    r = session.read()
    assert r.backend == "bcc"
    assert r.madvise_calls == n
    assert r.per_pid[worker.pid]["madvise_calls"] == n
    assert r.per_pid[idle.pid]["madvise_calls"] == 0
    assert outsider.pid not in r.per_pid
    assert r.advice == {"MADV_REMOVE": n}
    assert r.madvise_errors == 0 and r.madvise_bytes == n * 4096
    assert r.madvise_kernel_ns > 0
    lens = r.hists["madvise_len_log2"]["buckets"]
    assert lens == [{"lo": 4096, "hi": 8191, "count": n}]
    assert sum(b["count"] for b in r.hists["madvise_ns_log2"]["buckets"]) == n
    js = json.loads(r.dumps())
    assert js["per_pid"][str(worker.pid)]["madvise_calls"] == n


@EBPF
def test_madvise_errors_are_counted(session, children):
    c = children("""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    handshake()
    bad = [libc.madvise(ctypes.c_void_p(4096 * 3 + 1), 4096, 4) for _ in range(25)]  # EINVAL: unaligned
    report(bad=bad)
    """)
    session.attach([c.pid])
    session.clear()
    out = c.go()
    assert all(v == -1 for v in out["bad"])
    r = session.read()
    assert r.madvise_calls == 25 and r.madvise_errors == 25 and r.advice == {"MADV_DONTNEED": 25}


@EBPF
def test_fallocate_punch_hole_count(session, children):
    c = children("""
    from device.virtio.discard import punch_hole
    n = int(sys.argv[1])
    fd, mm = memfd(n)
    mm.write(b"x" * (n * PAGE))
    handshake()
    for i in range(n):
        punch_hole(fd, i * PAGE, PAGE)
    report(blocks=os.fstat(fd).st_blocks)
    """, "300")
    session.attach([c.pid])
    session.clear()
    out = c.go()
    assert out["blocks"] == 0
    r = session.read()
    assert r.fallocate_calls == 300
    assert r.fallocate_modes == {"PUNCH_HOLE|KEEP_SIZE": 300}
    assert r.fallocate_bytes == 300 * 4096 and r.fallocate_errors == 0
    assert r.madvise_calls == 0


# --- kicks ----------------------------------------------------------------------------------
KICK_CHILD = """
kick = os.eventfd(0, os.EFD_NONBLOCK)
call = os.eventfd(0, os.EFD_NONBLOCK)
other = os.eventfd(0, os.EFD_NONBLOCK)
handshake(kick=kick, call=call, other=other)
for _ in range(37):
    os.eventfd_write(kick, 1)
for _ in range(11):
    os.eventfd_write(call, 1)
for _ in range(19):
    os.eventfd_write(other, 1)
got = [os.eventfd_read(kick)]          # the device's wake-up: consumes all 37
for _ in range(4):
    os.eventfd_write(kick, 1)
    got.append(os.eventfd_read(kick))
try:
    os.eventfd_read(kick)              # nothing pending: EAGAIN
except BlockingIOError:
    got.append("EAGAIN")
got.append(os.eventfd_read(call))      # the guest handling its interrupt
report(got=got)
"""


@EBPF
def test_kicks_count_registered_eventfds_only(session, children):
    a = children(KICK_CHILD)
    twin = children(KICK_CHILD)          # same fd numbers in another process: not registered
    session.attach([a.pid, twin.pid])
    session.register_eventfd(a.pid, a.info["kick"], 0, "kick")
    session.register_eventfd(a.pid, a.info["call"], 0, "call")
    session.clear()
    out = a.go()
    twin.go()
    assert out["got"] == [37, 1, 1, 1, 1, "EAGAIN", 11]
    r = session.read()
    # the child plays both sides: it reads its kick fd, so it is the device side, and its
    # kick-fd writes count as the device's own re-kicks, not as guest kicks
    assert r.device_rekicks == 41 and r.kicks == 0
    assert r.interrupts == 11
    assert r.eventfd_writes == 52                 # the 19 writes to the unregistered fd are not seen
    assert r.device_wakeups == 5
    assert r.interrupt_reads == 1
    assert r.empty_reads == 1
    assert r.per_queue == {"0": {"kick_write": 41, "kick_read": 5, "kick_read_empty": 1,
                                 "call_write": 11, "call_read": 1}}
    assert r.per_pid[a.pid]["kick_writes"] == 41 and r.per_pid[twin.pid]["kick_writes"] == 0
    assert {(e["pid"], e["fd"], e["queue"], e["kind"]) for e in r.eventfds} == {
        (a.pid, a.info["kick"], 0, "kick"), (a.pid, a.info["call"], 0, "call")}
    session.unregister_eventfds(a.pid)
    assert session.read().eventfds == []


@EBPF
def test_register_eventfd_rejects_bad_input(session):
    for args in [(1, 3, 0, "bogus"), (-1, 3, 0, "kick"), (1, "3", 0, "kick"), (1, 3, -2, "kick")]:
        with pytest.raises(ValueError):
            session.register_eventfd(*args)
    with pytest.raises(ValueError):
        session.attach([0])


# --- stages (USDT python:audit) --------------------------------------------------------------
STAGE_CHILD = """
import threading
from probes.markers import stage
n, per = int(sys.argv[1]), int(sys.argv[2])
fd, mm = memfd(per)
def discard():
    for i in range(per):
        mm[i * PAGE] = 1
        mm.madvise(mmap.MADV_REMOVE, i * PAGE, PAGE)
handshake()
own_ns = 0
for _ in range(n):
    with stage("inflate"):
        with stage("alloc"):
            pass
        t0 = time.perf_counter_ns()
        with stage("discard"):
            side = threading.Thread(target=discard)      # another thread's calls: not this stage's
            side.start(); side.join()
            discard()
        own_ns += time.perf_counter_ns() - t0
discard()                                                # outside every stage
sys.audit("balloon-lab:abcdefghijklmno:b"); sys.audit("balloon-lab:abcdefghijklmno:e")
sys.audit("balloon-lab:this-name-is-too-long:b")         # malformed: ignored, counted
sys.audit("balloon-lab:neverbegun:e")                    # unmatched end
sys.audit("some.other.event", 1)                         # not ours
report(own_ns=own_ns)
"""


@EBPF
def test_usdt_stages_count_time_and_attribute_madvise(session, children):
    n, per = 20, 50
    c = children(STAGE_CHILD, str(n), str(per))
    session.attach([c.pid])
    assert f"stages:{c.pid}" not in session.missing, session.missing
    session.clear()
    out = c.go()
    r = session.read()
    st = r.stages
    assert set(st) == {"inflate", "alloc", "discard", "abcdefghijklmno"}
    assert st["discard"]["count"] == n and st["inflate"]["count"] == n and st["alloc"]["count"] == n
    assert st["abcdefghijklmno"]["count"] == 1
    # own madvise calls only: not the side thread's, not the ones after the stage
    assert st["discard"]["madvise_calls"] == n * per
    assert st["inflate"]["madvise_calls"] == n * per            # nested: inclusive
    assert st["alloc"]["madvise_calls"] == 0
    # (glibc also madvises each exiting thread's stack: MADV_DONTNEED, counted apart)
    assert r.advice["MADV_REMOVE"] == 2 * n * per + per
    assert 0 < st["discard"]["madvise_kernel_ns"] <= r.madvise_kernel_ns
    assert st["discard"]["madvise_kernel_ns"] < st["discard"]["ns"]
    # the probe's clock sits inside the child's (markers are inside its timer)
    ratio = st["discard"]["ns"] / out["own_ns"]
    assert 0.8 < ratio <= 1.0, (st["discard"]["ns"], out["own_ns"])
    assert r.stage_anomalies == {"unmatched_end": 1, "unclosed": 0, "too_deep": 0, "malformed": 1,
                                 "too_many_names": 0, "name_race": 0}
    assert r.per_pid[c.pid]["stages"]["discard"]["count"] == n


@EBPF
def test_usdt_semaphore_follows_attach_suspend_and_retarget(session, children):
    from probes.stages import audit_semaphore

    c = children(IDLE_CHILD)
    other = children(IDLE_CHILD)
    assert audit_semaphore(c.pid) == 0
    session.attach([c.pid])
    assert audit_semaphore(c.pid) == 1            # Python now fires python:audit
    session.suspend()
    assert audit_semaphore(c.pid) == 0            # truly unprobed while suspended
    session.resume()
    assert audit_semaphore(c.pid) == 1
    session.attach([other.pid])                   # the next trial's processes
    assert audit_semaphore(c.pid) == 0 and audit_semaphore(other.pid) == 1
    session.attach([])
    assert audit_semaphore(other.pid) == 0


# --- page allocator and faults -------------------------------------------------------------
@EBPF
def test_pagealloc_sees_faults_of_touched_pages(session, children):
    k = 2000
    c = children("""
    k = int(sys.argv[1])
    fd, mm = memfd(k)
    handshake()
    for i in range(k):
        mm[i * PAGE] = 1
    report(blocks=os.fstat(fd).st_blocks)
    """, str(k))
    idle = children(IDLE_CHILD)
    session.attach([c.pid, idle.pid])
    session.clear()
    out = c.go()
    idle.go()
    assert out["blocks"] * 512 == k * 4096
    r = session.read()
    assert r.per_pid[c.pid]["page_faults"] >= k
    assert r.per_pid[c.pid]["page_allocs"] >= k
    assert r.page_faults >= k and r.page_alloc_pages >= k
    assert r.per_pid[idle.pid]["page_faults"] < 50          # blocked in read(2): next to nothing
    orders = {b["lo"]: b["count"] for b in r.hists["page_alloc_order"]["buckets"]}
    assert orders.get(0, 0) >= k


# --- balloon-lab probe --pid ---------------------------------------------------------------
@EBPF
def test_probe_command_counts_a_process(children):
    n = 777
    c = children("""
    from probes.stages import audit_semaphore
    n = int(sys.argv[1])
    fd, mm = memfd(n)
    handshake()
    deadline = time.monotonic() + 60
    while audit_semaphore(os.getpid()) == 0:     # the probe is attached once it takes the semaphore
        if time.monotonic() > deadline:
            sys.exit(4)
        time.sleep(0.01)
    for i in range(n):
        mm[i * PAGE] = 1
        mm.madvise(mmap.MADV_REMOVE, i * PAGE, PAGE)
    """, str(n))
    c.p.stdin.write("go\n")
    c.p.stdin.flush()
    cli = subprocess.run([str(ROOT / ".venv/bin/balloon-lab"), "probe", "--pid", str(c.pid), "--duration", "60",
                          "--json"], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    r = json.loads(cli.stdout)
    assert c.p.wait(timeout=10) == 0
    assert r["backend"] == "bcc"
    assert r["madvise_calls"] == n and r["advice"] == {"MADV_REMOVE": n}
    assert r["per_pid"][str(c.pid)]["page_faults"] >= n
    assert r["seconds"] < 55                                  # stopped when the process exited


def test_probe_command_rejects_missing_pid():
    pid = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1     # can never exist
    cli = subprocess.run([str(ROOT / ".venv/bin/balloon-lab"), "probe", "--pid", str(pid), "--duration", "1"],
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 2
    assert f"no process with pid {pid}" in cli.stderr


# --- overhead -------------------------------------------------------------------------------
@EBPF
def test_measure_overhead_counts_only_probed_runs(session):
    from probes.overhead import MadviseLoop, measure_overhead

    loop = MadviseLoop(2048)
    res = measure_overhead(loop, repeats=2, session=session, ops=loop.pages, setup=loop.populate)
    assert res.backend == "bcc"
    assert len(res.base_s) == len(res.probed_s) == 2
    assert res.reading["madvise_calls"] == 2 * 2048              # suspended runs are really unprobed
    assert res.ratio > 0 and res.summary()["base_ns_per_op"] > 0


# --- degraded mode ---------------------------------------------------------------------------
def test_disabled_session_keeps_the_experiment_path_working():
    from probes.session import ProbeSession

    s = ProbeSession(enabled=False)
    assert s.backend == "none" and "disabled" in s.reason
    s.attach([os.getpid()])
    s.register_eventfd(os.getpid(), 3, 0, "kick")
    s.clear()
    r = s.read()
    assert r.backend == "none" and r.reason and r.madvise_calls is None and r.stages == {}
    assert json.loads(r.dumps())["backend"] == "none"
    s.suspend(), s.resume(), s.detach()


DEGRADED_SCRIPT = r"""
import json, mmap, os, sys
from probes.session import ProbeSession
from probes.overhead import MadviseLoop, measure_overhead
s = ProbeSession()
s.attach([os.getpid()])
s.register_eventfd(os.getpid(), 0, 1, "call")
loop = MadviseLoop(64)
loop.populate(); loop()
s.clear()
r = s.read()
res = measure_overhead(loop, repeats=1, ops=64, setup=loop.populate)   # a second session: no 2nd banner
s.detach()
print(json.dumps({"reading": r.to_json(), "session_backend": s.backend, "reason": s.reason,
                  "overhead_backend": res.backend, "runs": len(res.base_s) + len(res.probed_s)}))
"""


def test_unprivileged_session_degrades_loudly_once():
    as_user = NOBODY if os.geteuid() == 0 else []               # unprivileged already: run as is
    p = subprocess.run(as_user + [PY, "-c", DEGRADED_SCRIPT], capture_output=True, text=True, timeout=120,
                       cwd="/")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["session_backend"] == "none" and out["overhead_backend"] == "none"
    assert f"uid {65534 if as_user else os.geteuid()}" in out["reason"]
    assert out["reading"]["backend"] == "none" and out["reading"]["madvise_calls"] is None
    assert out["reading"]["reason"] == out["reason"]
    assert out["runs"] == 2
    assert p.stderr.count("eBPF PROBES ARE OFF") == 1, p.stderr
    assert "fix:" in p.stderr and "balloon-lab doctor" in p.stderr


def test_stage_context_manager_ends_on_error():
    # in a child: audit hooks cannot be removed once added
    code = textwrap.dedent("""
    import sys
    from probes.markers import stage
    seen = []
    sys.addaudithook(lambda ev, args: seen.append(ev) if ev.startswith("balloon-lab:") else None)
    try:
        with stage("discard"):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    print(",".join(seen))
    """)
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.strip() == "balloon-lab:discard:b,balloon-lab:discard:e"
