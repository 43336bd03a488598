"""Loader for stages.c: the lab's stages via Python's `python:audit` USDT marker.

USDT needs a pid: BCC's USDT(pid) bumps the marker's semaphore in that process (so
Python fires it at all) and names the uprobe's address. The argument-reading code
BCC generates depends only on the interpreter binary, so the module is compiled once
with the readers of one process, and every further process of the same binary gets
the same program attached at its own uprobe (checked: its generated readers must be
identical, else that pid is refused with the reason).
Standalone: `python -m probes.stages -p PID [-d SECONDS] [--json]`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from probes.bpf import Concern, array_zero, import_bcc
from probes.elfnotes import ET_EXEC, elf_type, has_marker, usdt_notes
from probes.markers import prefix_words

USDT_PROBE = "python:audit"
FN_NAME = "on_audit"
ANOMALIES = ("unmatched_end", "unclosed", "too_deep", "malformed")


def exe_has_audit(pid: int) -> bool:
    """True when the process's executable carries the python:audit marker."""
    return has_marker(f"/proc/{pid}/exe", "python", "audit")


def audit_semaphore(pid: int) -> int | None:
    """The python:audit USDT semaphore in `pid` (> 0 while some tracer is attached), or None if unknown.

    Read from /proc/PID/mem at the note's semaphore address, shifted by the load bias
    for a PIE interpreter (first mapping of the executable at file offset 0).
    """
    exe = f"/proc/{pid}/exe"
    try:
        note = next((n for n in usdt_notes(exe) if n.provider == "python" and n.name == "audit"), None)
        if note is None or note.semaphore == 0:
            return None
        bias = 0
        if elf_type(exe) != ET_EXEC:
            real = os.path.realpath(exe)
            with open(f"/proc/{pid}/maps") as f:
                starts = [int(line.split("-", 1)[0], 16) for line in f
                          if line.rstrip().endswith(real) and int(line.split()[2], 16) == 0]
            if not starts:
                return None
            bias = min(starts)
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as m:
            m.seek(note.semaphore + bias)
            return int.from_bytes(m.read(2), "little")
    except (OSError, ValueError):
        return None


@dataclass
class StageStats:
    count: int = 0
    ns: int = 0
    madvise_calls: int = 0
    madvise_kernel_ns: int = 0
    fallocate_calls: int = 0
    fallocate_kernel_ns: int = 0

    def add(self, o: "StageStats") -> None:
        for f in self.__dataclass_fields__:
            setattr(self, f, getattr(self, f) + getattr(o, f))


@dataclass
class StagesReading:
    per_pid: dict[int, dict[str, StageStats]] = field(default_factory=dict)
    anomalies: dict[str, int] = field(default_factory=dict)

    def stages(self) -> dict[str, StageStats]:
        """Summed over pids (the device's and the guest's stages have different names)."""
        out: dict[str, StageStats] = {}
        for stages in self.per_pid.values():
            for name, s in stages.items():
                out.setdefault(name, StageStats()).add(s)
        return out


class UsdtMismatch(RuntimeError):
    pass


# BCC 0.26's USDT(pid) context opens /proc/PID/root, closes it at once (a temporary
# ProcStat) and closes the same fd number AGAIN when the context is deleted: by then
# that number belongs to someone else (seen here: the BPF program's own fd). The
# context is therefore created while the lowest free fd is known, and that number
# is immediately re-occupied by a placeholder which the context's close then takes.
_immortal: list[Any] = []     # contexts whose fd could not be protected: never deleted


class UsdtContext:
    """BCC's USDT(pid) with the double close contained; close() releases the semaphore."""

    def __init__(self, pid: int, probe: str, fn_name: str) -> None:
        bcc = import_bcc()
        lowest = os.open("/dev/null", os.O_RDONLY)
        os.close(lowest)
        self.usdt = bcc.USDT(pid=pid)
        self.placeholder: int | None = os.open("/dev/null", os.O_RDONLY)
        if self.placeholder != lowest:        # another thread opened fds meanwhile
            os.close(self.placeholder)
            self.placeholder = None
        try:
            self.usdt.enable_probe(probe, fn_name)
        except Exception:
            self.close()
            raise

    def text(self) -> str:
        return self.usdt.get_text()

    def active_probes(self) -> list[tuple[bytes, bytes, int, int]]:
        return self.usdt.enumerate_active_probes()

    def close(self) -> None:
        u, self.usdt = self.usdt, None
        if u is None:
            return
        if self.placeholder is None:
            _immortal.append(u)               # deleting it could close a live fd
            return
        del u                                 # bcc_usdt_close: semaphore down, stray close
        try:
            os.fstat(self.placeholder)
            os.close(self.placeholder)        # a BCC without the double close
        except OSError:
            pass
        self.placeholder = None


class StagesProbe(Concern):
    name = "stages"
    c_file = "stages.c"
    order = 10               # before madvise.c: it defines stage_account_syscall()

    def __init__(self) -> None:
        self.usdt_text = ""
        self.attached: dict[int, tuple[Any, list[bytes]]] = {}   # pid -> (USDT context, uprobe events)

    def cflags(self) -> list[str]:
        w0, w1 = prefix_words()
        return [f"-DSTAGE_PREFIX_W0={w0:#x}ULL", f"-DSTAGE_PREFIX_W1={w1:#x}U"]

    def prepare(self, pid: int) -> str:
        """Generate the USDT argument readers from `pid`'s interpreter; returns them for the module text."""
        u = UsdtContext(pid, USDT_PROBE, FN_NAME)
        try:
            self.usdt_text = u.text()
        finally:
            u.close()             # releases the semaphore again; attach() takes it for real
        return self.usdt_text

    def attach(self, bpf: Any, pid: int) -> None:
        """Attach on_audit at `pid`'s python:audit (raises with the reason if it cannot)."""
        if pid in self.attached:
            return
        u = UsdtContext(pid, USDT_PROBE, FN_NAME)
        if u.text() != self.usdt_text:
            u.close()
            raise UsdtMismatch(f"pid {pid}: its interpreter's python:audit arguments differ from the "
                               f"compiled probe's ({os.path.realpath(f'/proc/{pid}/exe')})")
        before = set(bpf.uprobe_fds)
        try:
            for binpath, fn, addr, p in u.active_probes():
                bpf.attach_uprobe(name=binpath, addr=addr, fn_name=fn, pid=p)
        except Exception:
            for ev in set(bpf.uprobe_fds) - before:
                bpf.detach_uprobe_event(ev)
            u.close()
            raise
        self.attached[pid] = (u, sorted(set(bpf.uprobe_fds) - before))

    def detach(self, bpf: Any, pid: int) -> None:
        u, events = self.attached.pop(pid)
        for ev in events:
            try:
                bpf.detach_uprobe_event(ev)
            except Exception:
                pass              # the process is gone: nothing left to detach
        u.close()                 # the semaphore drops back in a live process

    def detach_all(self, bpf: Any) -> None:
        for pid in list(self.attached):
            self.detach(bpf, pid)

    def read(self, bpf: Any, targets: list[int] | None = None) -> StagesReading:
        r = StagesReading()
        for k, v in bpf[b"stage_stats"].items():
            name = bytes(k.name.w[0].to_bytes(8, "little") + k.name.w[1].to_bytes(8, "little"))
            name_s = name.rstrip(b"\0").decode(errors="replace")
            r.per_pid.setdefault(k.tgid, {})[name_s] = StageStats(
                v.count, v.ns, v.sc_calls[0], v.sc_ns[0], v.sc_calls[1], v.sc_ns[1])
        table = bpf[b"stage_anomalies"]
        for i, n in enumerate(ANOMALIES):
            r.anomalies[n] = table[table.Key(i)].value
        return r

    def clear(self, bpf: Any) -> None:
        bpf[b"stage_stats"].clear()
        array_zero(bpf[b"stage_anomalies"])

