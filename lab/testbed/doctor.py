"""`balloon-lab doctor`: is the eBPF lab fully usable here, and if not, the exact fix.

Every check is real: the tracepoint check loads a BPF program and counts the
doctor's own madvise calls, the USDT check counts sys.audit events fired by a
child interpreter, the memory check frees memfd blocks and reads st_blocks back.
"""
from __future__ import annotations

import mmap
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

from fmt.text_width import fold
from lab.trials.orphans import wait_or_kill
from probes.bpf import PROJECT_ROOT, Problem, bcc_fix, preflight

MADVISE_CALLS = 100          # the tracepoint check's known number of calls
AUDIT_PAIRS = 50             # the USDT check's known number of stage begin/end pairs
PAGE = 4096

# Child for the USDT check: waits until the probe is attached, fires the markers, exits.
_AUDIT_CHILD = r"""
import sys
sys.stdout.write("ready\n"); sys.stdout.flush()
if sys.stdin.readline().strip() != "go":
    sys.exit(3)
n = int(sys.argv[1])
for _ in range(n):
    sys.audit("balloon-lab:doctor:b")
    sys.audit("balloon-lab:doctor:e")
sys.stdout.write("done\n"); sys.stdout.flush()
sys.stdin.readline()
"""


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _rerun_as_root() -> str:
    return "run it as root: sudo " + " ".join(shlex.quote(a) for a in sys.argv)


def _venv_fix() -> str:
    return (f"use Debian's interpreter, which carries the markers: sudo bash {PROJECT_ROOT}/scripts/setup.sh "
            f"(it makes {PROJECT_ROOT}/.venv from /usr/bin/python3 with --system-site-packages)")


def check_prerequisites() -> tuple[list[Check], list[Problem]]:
    problems = preflight()
    by = {p.check: p for p in problems}
    checks = []
    if "root" in by:
        checks.append(Check("root", False, by["root"].detail, _rerun_as_root()))
    else:
        checks.append(Check("root", True, "running as root"))
    if "bcc" in by:
        checks.append(Check("bcc", False, by["bcc"].detail, bcc_fix()))
    else:
        import bcc  # noqa: F401  (importable: preflight said so)
        checks.append(Check("bcc", True, f"BCC importable from {os.path.realpath(sys.executable)} "
                                         f"({os.path.dirname(bcc.__file__)})"))
    if "headers" in by:
        checks.append(Check("kernel-headers", False, by["headers"].detail, by["headers"].fix))
    else:
        build = f"/lib/modules/{platform.release()}/build"
        checks.append(Check("kernel-headers", True, f"{build}/include present (-> {os.path.realpath(build)})"))
    if "tracefs" in by:
        t = by["tracefs"]
        checks.append(Check("tracefs", False, t.detail, _rerun_as_root() if t.needs_root else t.fix))
    else:
        from probes.tracefs import tracefs_root
        checks.append(Check("tracefs", True, f"{tracefs_root()}/events present"))
    return checks, problems


def check_tracepoint_program() -> Check:
    """Load the madvise probe, make exactly MADVISE_CALLS madvise(MADV_REMOVE) calls, expect that count."""
    from probes.bpf import BpfModule
    from probes.madvise import MadviseProbe

    name = "tracepoint-program"
    t0 = time.monotonic()
    try:
        probe = MadviseProbe()
        module = BpfModule([probe])
    except Exception as e:
        return Check(name, False, f"the madvise tracepoint program did not load: {type(e).__name__}: {e}",
                     f"sudo bash {PROJECT_ROOT}/scripts/setup.sh, then re-run the doctor")
    fd = os.memfd_create("balloon-lab-doctor", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, MADVISE_CALLS * PAGE)
        mm = mmap.mmap(fd, MADVISE_CALLS * PAGE)
        load_s = time.monotonic() - t0
        module.set_targets([os.getpid()])
        for i in range(MADVISE_CALLS):
            mm.madvise(mmap.MADV_REMOVE, i * PAGE, PAGE)
        reading = probe.read(module.bpf, module.targets)
        mm.close()
    finally:
        os.close(fd)
        module.close()
    seen = sum(s.calls for (pid, sc, op), s in reading.stats.items()
               if pid == os.getpid() and sc == "madvise" and op == mmap.MADV_REMOVE)
    if seen != MADVISE_CALLS:
        return Check(name, False, f"made {MADVISE_CALLS} madvise(MADV_REMOVE) calls, the probe counted {seen}",
                     "the kernel's raw syscall tracepoint does not report every call; check "
                     "/sys/kernel/tracing/events/raw_syscalls/sys_exit exists")
    return Check(name, True, f"raw_syscalls:sys_exit program loaded in {load_s:.1f} s and counted "
                             f"{seen} of {MADVISE_CALLS} madvise calls exactly")


def check_usdt_markers() -> Check:
    from probes.elfnotes import usdt_notes

    exe = os.path.realpath(sys.executable)
    try:
        notes = usdt_notes(exe)
    except Exception as e:
        return Check("usdt-markers", False, f"cannot read ELF notes of {exe}: {e}", _venv_fix())
    audit = [n for n in notes if n.provider == "python" and n.name == "audit"]
    if not audit:
        return Check("usdt-markers", False, f"{exe} has no python:audit USDT marker ({len(notes)} markers in all)",
                     _venv_fix())
    return Check("usdt-markers", True, f"{exe} carries python:audit (args {audit[0].args!r}, "
                                       f"semaphore {audit[0].semaphore:#x}) among {len(notes)} USDT markers")


def check_usdt_audit() -> Check:
    """A child fires AUDIT_PAIRS stage begin/end pairs via sys.audit; the stage probe must see all."""
    from probes.bpf import BpfModule
    from probes.stages import StagesProbe

    name = "usdt-audit"
    child = subprocess.Popen([sys.executable, "-c", _AUDIT_CHILD, str(AUDIT_PAIRS)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    module = None
    probe = StagesProbe()
    try:
        if child.stdout.readline().strip() != "ready":
            return Check(name, False, "the child interpreter did not start", _venv_fix())
        try:
            text = probe.prepare(child.pid)
            module = BpfModule([probe], usdt_text=text)
            module.set_targets([child.pid])
            probe.attach(module.bpf, child.pid)
        except Exception as e:
            return Check(name, False, f"attaching to python:audit of pid {child.pid} failed: "
                                      f"{type(e).__name__}: {e}", _venv_fix())
        child.stdin.write("go\n")
        child.stdin.flush()
        if child.stdout.readline().strip() != "done":
            return Check(name, False, "the child did not finish firing its markers", _venv_fix())
        reading = probe.read(module.bpf, module.targets)
    finally:
        if module is not None:
            probe.detach_all(module.bpf)
            module.close()
        try:
            child.stdin.close()
        except OSError:
            pass
        wait_or_kill(child, 10)
    stats = reading.per_pid.get(child.pid, {}).get("doctor")
    seen = stats.count if stats else 0
    bad = {k: v for k, v in reading.anomalies.items() if v}
    if seen != AUDIT_PAIRS or bad:
        return Check(name, False, f"child fired {AUDIT_PAIRS} begin/end pairs, the probe saw {seen} complete"
                                  + (f", anomalies {bad}" if bad else ""),
                     "USDT semaphores need a uprobe-capable kernel and the same interpreter for the lab; "
                     + _venv_fix())
    return Check(name, True, f"{2 * AUDIT_PAIRS} sys.audit events from a child seen exactly through python:audit "
                             f"({seen} stages, {stats.ns / seen / 1e3:.1f} us each)")


def check_memory_syscalls() -> Check:
    """memfd_create, MADV_REMOVE freeing memfd blocks, fallocate(PUNCH_HOLE), eventfd round trip."""
    from device.api import punch_hole

    name = "memfd-eventfd-madv-remove"
    n = 256
    try:
        fd = os.memfd_create("balloon-lab-doctor", os.MFD_CLOEXEC)
    except OSError as e:
        return Check(name, False, f"memfd_create failed: {e}", "a kernel with memfd (>= 3.17) is required")
    try:
        os.ftruncate(fd, n * PAGE)
        mm = mmap.mmap(fd, n * PAGE)
        mm.write(b"\x5a" * (n * PAGE))
        full = os.fstat(fd).st_blocks * 512
        mm.madvise(mmap.MADV_REMOVE, 0, n // 2 * PAGE)
        half = os.fstat(fd).st_blocks * 512
        punch_hole(fd, n // 2 * PAGE, n // 2 * PAGE)
        empty = os.fstat(fd).st_blocks * 512
        intact = mm[0:PAGE] == b"\0" * PAGE
        mm.close()
    except OSError as e:
        return Check(name, False, f"memfd discard failed: {e}", "MADV_REMOVE needs Linux >= 2.6.16 on shmem/memfd")
    finally:
        os.close(fd)
    try:
        efd = os.eventfd(0, os.EFD_NONBLOCK)
        for _ in range(3):
            os.eventfd_write(efd, 1)
        got = os.eventfd_read(efd)
        os.close(efd)
    except OSError as e:
        return Check(name, False, f"eventfd failed: {e}", "a kernel with eventfd is required")
    problems = []
    if full < n * PAGE:
        problems.append(f"memfd holds {full} bytes after writing {n * PAGE}")
    if half != full - n // 2 * PAGE:
        problems.append(f"MADV_REMOVE of {n // 2 * PAGE} bytes freed {full - half}")
    if empty != 0:
        problems.append(f"{empty} bytes left after fallocate(PUNCH_HOLE)")
    if not intact:
        problems.append("a removed page did not read back as zeros")
    if got != 3:
        problems.append(f"eventfd read {got} after 3 writes of 1")
    if problems:
        return Check(name, False, "; ".join(problems), "the kernel's shmem does not free discarded pages; "
                                                        "the lab's discard measurements would be wrong here")
    return Check(name, True, f"memfd of {n * PAGE} bytes: MADV_REMOVE freed {full - half}, PUNCH_HOLE freed "
                             f"{half - empty} (st_blocks), eventfd 3 writes -> read {got}")


def _smaps_field(addr_prefix: str, field: str) -> int:
    """kB of `field` in this process's smaps entry starting at address `addr_prefix`."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            if line[:1] in "0123456789abcdef" and "-" in line.split()[0]:
                inside = line.startswith(addr_prefix)
            elif inside and line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _huge_discard_probe(flags: int, thp: bool) -> tuple[int, int, int]:
    """A 4 MiB memfd (flags: 0 or MFD_HUGETLB), touched, then 2 MiB discarded:
    (bytes held after touching, bytes held after the discard, kB mapped by PMD)."""
    import ctypes
    from device.api import advise_mapping
    size = 4 << 20
    fd = os.memfd_create("balloon-lab-doctor-huge", os.MFD_CLOEXEC | flags)
    try:
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size)
        try:
            advise_mapping(mm, "thp" if thp else "4k")
            mm.write(b"\x5a" * size)
            held = os.fstat(fd).st_blocks * 512
            addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
            pmd = _smaps_field(f"{addr:x}-", "ShmemPmdMapped") if thp else 0
            mm.madvise(mmap.MADV_REMOVE, 2 << 20, 2 << 20)
            after = os.fstat(fd).st_blocks * 512
        finally:
            import gc
            gc.collect()
            try:
                mm.close()
            except BufferError:
                pass
    finally:
        os.close(fd)
    return held, after, pmd


def check_huge_pages() -> Check:
    """--backing thp and hugetlb: set the THP knob (root), prove a memfd gets 2 MiB pages
    and frees one whole on MADV_REMOVE; try a hugetlb memfd from a pool raised just
    for the check (then restored). The detail says every change made."""
    from device.api import (MFD_HUGE_2MB, MFD_HUGETLB, NR_HUGEPAGES, THP_SHMEM_KNOB, BackingError,
                                ensure_backing, hugetlb_pool, thp_shmem_state)
    from system.knobs import HUGETLB_POOL, KnobError, raise_knob
    name = "huge-pages"
    notes: list[str] = []
    try:
        notes += ensure_backing("thp")
    except BackingError as e:
        return Check(name, False, f"--backing thp unavailable: {e}",
                     f"echo advise > {THP_SHMEM_KNOB} (as root; scripts/setup.sh does it)")
    held, after, pmd = _huge_discard_probe(0, thp=True)
    if pmd < 2048 or held - after != 2 << 20:
        return Check(name, False, f"shmem_enabled is `{thp_shmem_state()}` but a MADV_HUGEPAGE memfd got "
                                  f"{pmd} kB PMD-mapped and a 2 MiB discard freed {held - after} bytes",
                     "a kernel with CONFIG_TRANSPARENT_HUGEPAGE and shmem THP")
    detail = f"thp: 4 MiB memfd PMD-mapped ({pmd} kB), 2 MiB MADV_REMOVE freed {held - after} bytes"
    pool = hugetlb_pool()
    hold = None
    try:
        hold = raise_knob(HUGETLB_POOL, 2 - pool.available, "2 huge pages for the check")
        held, after, _ = _huge_discard_probe(MFD_HUGETLB | MFD_HUGE_2MB, thp=False)
        hug = f"hugetlb: 4 MiB memfd held {held} bytes, 2 MiB MADV_REMOVE freed {held - after}"
        ok_h = held == 4 << 20 and held - after == 2 << 20
    except (OSError, KnobError) as e:
        hug, ok_h = f"hugetlb: {e}", False
    finally:
        if hold is not None:
            notes.append(f"{hold.change.split(' until ')[0]} for the check and restored it")
            hold.release()
    changed = ("; changed: " + "; ".join(notes)) if notes else "; nothing changed"
    tail = (f"; pool now {pool.total} pages (the lab raises it to the guest's size for a hugetlb trial "
            f"and says so)")
    if not ok_h:
        return Check(name, False, detail + "; " + hug + changed + tail,
                     f"run as root with free memory for 2 huge pages ({NR_HUGEPAGES})")
    return Check(name, True, detail + "; " + hug + changed + tail)


def run_checks() -> list[Check]:
    checks, problems = check_prerequisites()
    blocked = [c for c in checks if not c.ok]

    def gated(name: str, fn: Callable[[], Check]) -> Check:
        if blocked:
            first = blocked[0]
            return Check(name, False, "not attempted: " + ", ".join(c.name for c in blocked) + " failed",
                         first.fix)
        try:
            return fn()
        except Exception as e:       # the doctor reports, it does not crash
            return Check(name, False, f"{type(e).__name__}: {e}", "re-run with BALLOON_LAB_DEBUG=1 and report")

    checks.append(gated("tracepoint-program", check_tracepoint_program))
    checks.append(check_usdt_markers())
    if checks[-1].ok:
        checks.append(gated("usdt-audit", check_usdt_audit))
    else:
        checks.append(Check("usdt-audit", False, "not attempted: the interpreter has no python:audit marker",
                            checks[-1].fix))
    checks.append(check_memory_syscalls())
    try:
        checks.append(check_huge_pages())
    except Exception as e:       # the doctor reports, it does not crash
        checks.append(Check("huge-pages", False, f"{type(e).__name__}: {e}", "run as root"))
    checks.append(check_qemu())
    return checks


QEMU_CHECK = "qemu-backend"


def check_qemu() -> Check:
    """The real stack's arms (qemu-pfn, qemu-pfn-punch): a real boot and inflate."""
    from lab.trials.qemu.health import check_qemu_backend
    try:
        ok, detail, fix = check_qemu_backend()
    except Exception as e:       # the doctor reports, it does not crash
        return Check(QEMU_CHECK, False, f"{type(e).__name__}: {e}", "re-run with BALLOON_LAB_DEBUG=1 and report")
    return Check(QEMU_CHECK, ok, detail, fix)


def report(checks: list[Check]) -> dict:
    return {"ok": all(c.ok for c in checks), "checks": [asdict(c) for c in checks]}


def format_text(checks: list[Check]) -> str:
    lines = []
    width = max(len(c.name) for c in checks)
    hang = " " * (width + 10)              # details continue under themselves, within 120 columns
    for c in checks:
        lines.append(fold(f"  {'PASS' if c.ok else 'FAIL'}  {c.name:<{width}}  {c.detail}", hang=hang))
        if not c.ok and c.fix:
            lines.append(fold(f"        {'':<{width}}  fix: {c.fix}", hang=hang))
    lab_checks = [c for c in checks if c.name != QEMU_CHECK]
    ok = all(c.ok for c in lab_checks)
    lines.append("eBPF lab: ready" if ok else
                 f"eBPF lab: NOT usable ({sum(not c.ok for c in lab_checks)} of {len(lab_checks)} checks failed); "
                 "experiments would run with probes off")
    qemu = next((c for c in checks if c.name == QEMU_CHECK), None)
    if qemu is not None:
        lines.append("real stack (qemu arms): ready" if qemu.ok else "real stack (qemu arms): NOT usable")
    return "\n".join(lines)
