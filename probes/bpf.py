"""Compose and load the probes' BPF module; say exactly why eBPF is unavailable.

One module per session: common.h plus each concern's C file, compiled once by BCC
(clang costs 1-3 s per compile on the lab's machines), reused across trials. The
concerns share the target-pid map, the madvise and kicks probes share one program on
the system-call exit (syscalls.c), and the stage probe shares its per-thread stage
stack with the madvise probe, which is why they are one module and not several.
Every program is a raw tracepoint (or the stage probe's uprobe): `suspend()` detaches
them all, `resume()` attaches them again, and `program_stats()` reads what the kernel
measured of each (probes/bpf_stats.py).
"""
from __future__ import annotations

import atexit
import ctypes
import importlib
import sys
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from probes.bpf_stats import ProgStats, prog_stats

if TYPE_CHECKING:
    import numpy as np

from system.signals import signals_deferred

PROBES_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PROBES_DIR.parent


class ProbeUnavailable(RuntimeError):
    """eBPF cannot be used here; `reason` says what is missing and `fix` what to run."""

    def __init__(self, reason: str, fix: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.fix = fix


class ConcernUnavailable(RuntimeError):
    """One probe cannot be built on this kernel (a tracepoint or field is missing)."""


@dataclass(frozen=True)
class Problem:
    check: str
    detail: str
    fix: str
    needs_root: bool = False          # the fix is simply to run as root


def setup_fix() -> str:
    return f"sudo bash {PROJECT_ROOT / 'scripts' / 'setup.sh'}"


def bcc_fix() -> str:
    venv = PROJECT_ROOT / ".venv"
    return (f"{setup_fix()}   (or by hand: sudo apt-get install python3-bpfcc bpfcc-tools && "
            f"rm -rf {venv} && /usr/bin/python3 -m venv --system-site-packages {venv} && "
            f"{venv}/bin/pip install -e '{PROJECT_ROOT}[test]')")


def headers_dir() -> Path:
    return Path("/lib/modules") / platform.release() / "build"


def headers_fix() -> str:
    krel = platform.release()
    src = sorted(Path("/usr/src").glob("linux-headers-*-cloud-amd64"))
    common = sorted(Path("/usr/src").glob("linux-headers-*-common"))
    hdr = str(src[-1]) if src else "/usr/src/linux-headers-<version>-cloud-amd64"
    com = str(common[-1]) if common else "/usr/src/linux-headers-<version>-common"
    return (f"{setup_fix()}   (or by hand: sudo apt-get install linux-headers-cloud-amd64 && "
            f"sudo ln -sfn {hdr} /lib/modules/{krel}/build && sudo ln -sfn {com} /lib/modules/{krel}/source)")


TRACEFS_FIX = "sudo mount -t tracefs nodev /sys/kernel/tracing && sudo mount -t debugfs nodev /sys/kernel/debug"


def import_bcc() -> Any:
    """The bcc module (Debian's python3-bpfcc), or ProbeUnavailable saying how to get it."""
    try:
        return importlib.import_module("bcc")
    except Exception as e:  # ImportError, or libbcc failing to load
        raise ProbeUnavailable(f"BCC is not importable from {os.path.realpath(sys.executable)}: {e}",
                               bcc_fix()) from e


def essentials_missing() -> str | None:
    """Why eBPF truly cannot work on this machine (not root, or no BCC at all), else None.
    Everything else preflight() finds (headers, tracefs) setup fixes: a test suite that
    needs eBPF may skip for these two reasons only, and must fail for the others."""
    if os.geteuid() != 0:
        return f"eBPF needs root (running as uid {os.geteuid()})"
    try:
        import_bcc()
    except ProbeUnavailable as e:
        return f"BCC is not importable: {e.reason}"
    return None


REQUIRE_ENV = "BALLOON_LAB_REQUIRE_EBPF"


def ebpf_skip_reason() -> str | None:
    """Why a test that needs eBPF may skip here (essentials_missing), or None. Where
    BALLOON_LAB_REQUIRE_EBPF=1 (.ci/run sets it) nothing excuses it: the test runs, and
    tests/conftest.py fails every `ebpf`-marked test with the reason instead."""
    if os.environ.get(REQUIRE_ENV) == "1":
        return None
    return essentials_missing()


def preflight() -> list[Problem]:
    """Everything eBPF needs that can be checked without loading a program."""
    from probes.tracefs import tracefs_mounts, tracefs_root

    problems: list[Problem] = []
    if os.geteuid() != 0:
        problems.append(Problem("root", f"running as uid {os.geteuid()}; loading eBPF programs needs root "
                                "(CAP_BPF + CAP_PERFMON)", "re-run as root, e.g. sudo .venv/bin/balloon-lab ...", True))
    try:
        import_bcc()
    except ProbeUnavailable as e:
        problems.append(Problem("bcc", e.reason, e.fix))
    if not (headers_dir() / "include").is_dir():
        problems.append(Problem("headers", f"no kernel headers at {headers_dir()}/include (BCC compiles against them)",
                                headers_fix()))
    if tracefs_root() is None:
        mounts = tracefs_mounts()
        if mounts:
            problems.append(Problem("tracefs", f"tracefs is mounted ({', '.join(mounts)}) but its events/ is not "
                                    f"readable by uid {os.geteuid()} (needs root)", "re-run as root", True))
        else:
            problems.append(Problem("tracefs", "tracefs is not mounted (no /sys/kernel/tracing/events)", TRACEFS_FIX))
    return problems


class Concern:
    """One probe: its C file, the -D flags it needs on this kernel, and how to read/clear its maps."""

    name: str = ""
    c_file: str = ""
    order: int = 0            # composition order: stages.c must come before madvise.c
    syscalls: bool = False    # served by syscalls.c's program on the system-call exit

    def cflags(self) -> list[str]:
        """-D flags for this kernel; raises ConcernUnavailable if the probe cannot be built."""
        return []

    def source(self) -> str:
        return (PROBES_DIR / self.c_file).read_text() if self.c_file else ""

    def read(self, bpf: Any, targets: list[int]) -> Any:
        """Counters since the last clear; targets[i] is the pid of target slot i (0 = free)."""
        raise NotImplementedError

    def clear(self, bpf: Any) -> None:
        raise NotImplementedError


LAB_MAX_TARGETS = 8             # common.h
COLLISIONS = ("syscall", "stage")
# syscalls.c reads the arguments from x86-64's saved registers; the numbers are its ABI's.
SYSCALL_NUMBERS = {"x86_64": {"NR_READ": 0, "NR_WRITE": 1, "NR_MADVISE": 28, "NR_FALLOCATE": 285}}


def syscall_cflags() -> list[str]:
    """-D flags with this machine's syscall numbers for syscalls.c; ConcernUnavailable on
    another machine or a kernel without the raw_syscalls tracepoints."""
    from probes.tracefs import tracepoint_exists

    machine = platform.machine()
    numbers = SYSCALL_NUMBERS.get(machine)
    if numbers is None:
        raise ConcernUnavailable(f"the syscall probes read x86-64 registers; this machine is {machine}")
    for ev in ("sys_enter", "sys_exit"):
        if not tracepoint_exists("raw_syscalls", ev):
            raise ConcernUnavailable(f"tracepoint raw_syscalls:{ev} missing")
    return [f"-D{k}={v}" for k, v in numbers.items()]
MAX_TID_SLOTS = 1 << 16
MAX_STAGE_TID_SLOTS = 1 << 14


def tid_slots() -> int:
    """Entries of the per-thread arrays: pid_max rounded up to a power of two, capped.

    With pid_max <= the slot count, tid & (slots - 1) is unique per live thread.
    """
    try:
        pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):
        pid_max = 1 << 22
    n = 1024
    while n < pid_max and n < MAX_TID_SLOTS:
        n <<= 1
    return n


def array_words(table: Any) -> "np.ndarray":
    """Every entry of a BPF array of u64 words as a (entries, words) uint64 matrix; a per-CPU
    array's entries summed over the CPUs. One batch syscall where the kernel allows."""
    import numpy as np      # here, not at the top: probed processes import probes.stages's helpers

    percpu = hasattr(table, "total_cpu")
    leaf = table.sLeaf if percpu else table.Leaf
    words = ctypes.sizeof(leaf) // 8
    n = len(table)
    try:
        raw = b"".join(bytes(v) for _, v in table.items_lookup_batch())
        if len(raw) != n * ctypes.sizeof(table.Leaf):
            raise ValueError("short batch")
    except Exception:
        raw = b"".join(bytes(table[table.Key(i)]) if not percpu else bytes(table.getvalue(table.Key(i)))
                       for i in range(n))
    m = np.frombuffer(raw, dtype=np.uint64).reshape(n, table.total_cpu if percpu else 1, words)
    return m.sum(axis=1, dtype=np.uint64)


def array_zero(table: Any) -> None:
    """Zero every entry of a BPF array (BCC's ArrayBase.clear() does nothing)."""
    n = len(table)
    keys = (table.Key * n)(*[table.Key(i) for i in range(n)])
    values = (table.Leaf * n)()
    try:
        table.items_update_batch(keys, values)
    except Exception:
        for i in range(n):
            table[table.Key(i)] = table.Leaf()


class BpfModule:
    """The compiled, loaded module; its raw tracepoint programs attach at load (BCC autoload)."""

    RAW_PREFIX = b"raw_tracepoint__"

    def __init__(self, concerns: list[Concern], usdt_text: str = "", debug: int = 0) -> None:
        bcc = import_bcc()
        self.concerns = sorted(concerns, key=lambda c: c.order)
        self.tid_slots = tid_slots()
        self.targets: list[int] = [0] * LAB_MAX_TARGETS
        cflags: list[str] = [f"-DLAB_TID_SLOTS={self.tid_slots}",
                             f"-DSTAGE_TID_SLOTS={min(self.tid_slots, MAX_STAGE_TID_SLOTS)}"]
        parts = [(PROBES_DIR / "common.h").read_text()]
        for c in self.concerns:
            cflags += c.cflags()
            if c.c_file:
                parts.append(f"/* ---- {c.c_file} ---- */\n" + c.source())
        if any(c.syscalls for c in self.concerns):
            cflags += syscall_cflags()
            parts.append("/* ---- syscalls.c ---- */\n" + (PROBES_DIR / "syscalls.c").read_text())
        self.text = usdt_text + "\n".join(parts)
        self.bpf = bcc.BPF(text=self.text.encode(), cflags=cflags, debug=debug)
        self.raw_tracepoints: list[bytes] = list(self.bpf.raw_tracepoint_fds.keys())
        self.suspended = False

    def set_targets(self, pids: list[int]) -> None:
        """Watch these tgids; pids[i] gets slot i, which indexes the per-target counters."""
        if len(pids) > LAB_MAX_TARGETS:
            raise ValueError(f"{len(pids)} pids: the probes watch at most {LAB_MAX_TARGETS} processes")
        table = self.bpf[b"lab_targets"]
        self.targets = list(pids) + [0] * (LAB_MAX_TARGETS - len(pids))
        table[table.Key(0)] = table.Leaf((table.Leaf._fields_[0][1])(*self.targets))

    def collisions(self) -> dict[str, int]:
        table = self.bpf[b"lab_collisions"]
        return {name: table[table.Key(i)].value for i, name in enumerate(COLLISIONS)}

    def clear_collisions(self) -> None:
        array_zero(self.bpf[b"lab_collisions"])

    def suspend(self) -> None:
        """Detach the raw tracepoint programs (the module stays loaded: resume() costs no compile).
        Ctrl-C and SIGTERM wait until BCC's bookkeeping matches the kernel's (system/signals.py)."""
        if not self.suspended:
            with signals_deferred():
                for tp in self.raw_tracepoints:
                    self.bpf.detach_raw_tracepoint(tp)
                self.suspended = True

    def resume(self) -> None:
        if self.suspended:
            with signals_deferred():
                for tp in self.raw_tracepoints:
                    self.bpf.attach_raw_tracepoint(tp=tp, fn_name=self.RAW_PREFIX + tp)
                self.suspended = False

    def program_stats(self) -> dict[str, ProgStats]:
        """The kernel's counters of every loaded program, by the name the lab shows
        (the tracepoint's, or the function's for the USDT program)."""
        out = {}
        for fn, f in self.bpf.funcs.items():
            name = fn[len(self.RAW_PREFIX):] if fn.startswith(self.RAW_PREFIX) else fn
            out[name.decode()] = prog_stats(f.fd)
        return out

    def close(self) -> None:
        """Detach and free everything, once: BCC's own atexit hook is taken off, so a
        teardown that failed half-way is not tried again (noisily) at interpreter exit."""
        with signals_deferred():
            try:
                self.bpf.cleanup()
            finally:
                atexit.unregister(self.bpf.cleanup)


def log2_buckets(slots: dict[int, int]) -> list[dict[str, int]]:
    """Log2 slots from common.h's lab_log2_slot as [{lo, hi, count}] (slot 0 is the value 0)."""
    out = []
    for slot in sorted(slots):
        lo = 0 if slot == 0 else 1 << (slot - 1)
        hi = 0 if slot == 0 else (1 << slot) - 1
        out.append({"lo": lo, "hi": hi, "count": int(slots[slot])})
    return out

