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

from probes.bpf import Concern, array_words, array_zero, import_bcc
from probes.elfnotes import ET_EXEC, elf_type, has_marker, usdt_notes
from probes.markers import prefix_words

USDT_PROBE = "python:audit"
FN_NAME = "on_audit"
ANOMALIES = ("unmatched_end", "unclosed", "too_deep", "malformed", "too_many_names", "name_race")  # stages.c ANOM_*
STAGE_NAMES = 32                     # stages.c: distinct names per session


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

    def intern(self, bpf: Any, names: tuple[str, ...]) -> None:
        """Enter these stage names in stages.c's table before any marker fires (the lab's
        own names: the probe never has to enter them itself, see stages.c)."""
        table = bpf[b"stage_names"]
        t = table[0]
        known = set(self.names(bpf))
        for name in names:
            if name in known or t.count >= STAGE_NAMES:
                continue
            raw = name.encode().ljust(16, b"\0")
            t.n[t.count].w[0] = int.from_bytes(raw[:8], "little")
            t.n[t.count].w[1] = int.from_bytes(raw[8:], "little")
            t.count += 1
        table[0] = t

    def names(self, bpf: Any) -> list[str]:
        """The interned stage names, by index (stages.c's stage_names; "" for a slot being written)."""
        t = bpf[b"stage_names"][0]
        out = []
        for i in range(min(t.count, STAGE_NAMES)):
            raw = t.n[i].w[0].to_bytes(8, "little") + t.n[i].w[1].to_bytes(8, "little")
            out.append(raw.rstrip(b"\0").decode(errors="replace"))
        return out

    def read(self, bpf: Any, targets: list[int]) -> StagesReading:
        r = StagesReading()
        names = self.names(bpf)
        stats = array_words(bpf[b"stage_stats"])       # count, ns, sc_calls[2], sc_ns[2]
        for idx in stats[:, 0].nonzero()[0].tolist():
            slot, i = divmod(idx, STAGE_NAMES)
            pid = targets[slot] if slot < len(targets) else 0
            if not pid or i >= len(names) or not names[i]:
                continue
            v = [int(x) for x in stats[idx]]
            s = StageStats(v[0], v[1], v[2], v[4], v[3], v[5])
            r.per_pid.setdefault(pid, {}).setdefault(names[i], StageStats()).add(s)   # a name interned twice
        anomalies = array_words(bpf[b"stage_anomalies"])[:, 0]
        r.anomalies = {n: int(anomalies[i]) for i, n in enumerate(ANOMALIES)}
        return r

    def clear(self, bpf: Any) -> None:
        """Zero the totals (the interned names stay: frames in flight point at them)."""
        array_zero(bpf[b"stage_stats"])
        array_zero(bpf[b"stage_anomalies"])
