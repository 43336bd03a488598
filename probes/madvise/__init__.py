"""Loader for madvise.c: madvise(2)/fallocate(2) calls, advice, lengths, and (with the
opt-in syscall-time concern) kernel time.

Standalone: `python -m probes.madvise -p PID [-d SECONDS] [--json]`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from probes.bpf import Concern, array_words, array_zero, log2_buckets, syscall_cflags

SC_MADVISE, SC_FALLOCATE = 0, 1
SYSCALLS = {SC_MADVISE: "madvise", SC_FALLOCATE: "fallocate"}
HIST_SLOTS = 65                      # madvise.c's SC_HIST_SLOTS
SC_OPS = 128                         # madvise.c's SC_OPS: advice/mode values >= 127 share 127

# linux/mman-common.h
ADVICE_NAMES = {
    0: "MADV_NORMAL", 1: "MADV_RANDOM", 2: "MADV_SEQUENTIAL", 3: "MADV_WILLNEED",
    4: "MADV_DONTNEED", 8: "MADV_FREE", 9: "MADV_REMOVE", 10: "MADV_DONTFORK",
    11: "MADV_DOFORK", 12: "MADV_MERGEABLE", 13: "MADV_UNMERGEABLE", 14: "MADV_HUGEPAGE",
    15: "MADV_NOHUGEPAGE", 16: "MADV_DONTDUMP", 17: "MADV_DODUMP", 18: "MADV_WIPEONFORK",
    19: "MADV_KEEPONFORK", 20: "MADV_COLD", 21: "MADV_PAGEOUT", 22: "MADV_POPULATE_READ",
    23: "MADV_POPULATE_WRITE", 24: "MADV_DONTNEED_LOCKED", 25: "MADV_COLLAPSE",
    100: "MADV_HWPOISON", 101: "MADV_SOFT_OFFLINE",
}
# linux/falloc.h
FALLOC_FLAGS = ((0x01, "KEEP_SIZE"), (0x02, "PUNCH_HOLE"), (0x08, "COLLAPSE_RANGE"),
                (0x10, "ZERO_RANGE"), (0x20, "INSERT_RANGE"), (0x40, "UNSHARE_RANGE"))


def advice_name(advice: int) -> str:
    return ADVICE_NAMES.get(advice, f"MADV_{advice}")


def fallocate_mode_name(mode: int) -> str:
    names = [n for bit, n in FALLOC_FLAGS if mode & bit]
    rest = mode & ~sum(bit for bit, _ in FALLOC_FLAGS)
    if rest:
        names.append(hex(rest))
    return "|".join(sorted(names, key=lambda n: n != "PUNCH_HOLE")) or "ALLOCATE"


@dataclass
class SyscallStats:
    calls: int = 0
    ns: int = 0
    errors: int = 0
    bytes: int = 0

    def add(self, other: "SyscallStats") -> None:
        self.calls += other.calls
        self.ns += other.ns
        self.errors += other.errors
        self.bytes += other.bytes


@dataclass
class MadviseReading:
    """stats[(pid, syscall, op)] where op is the advice (madvise) or mode (fallocate)."""

    stats: dict[tuple[int, str, int], SyscallStats] = field(default_factory=dict)
    timed: bool = False               # kernel time measured (syscall-time); else every ns is 0, not measured
    len_hist: dict[str, dict[int, int]] = field(default_factory=dict)
    ns_hist: dict[str, dict[int, int]] = field(default_factory=dict)

    def total(self, syscall: str, pid: int | None = None) -> SyscallStats:
        out = SyscallStats()
        for (p, sc, _), s in self.stats.items():
            if sc == syscall and (pid is None or p == pid):
                out.add(s)
        return out

    def by_op(self, syscall: str) -> dict[str, int]:
        """Calls per advice name (madvise) or mode name (fallocate)."""
        name = advice_name if syscall == "madvise" else fallocate_mode_name
        out: dict[str, int] = {}
        for (_, sc, op), s in self.stats.items():
            if sc == syscall:
                out[name(op)] = out.get(name(op), 0) + s.calls
        return out

    def pids(self) -> set[int]:
        return {p for p, _, _ in self.stats}

    def hists(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for sc in SYSCALLS.values():
            out[f"{sc}_len_log2"] = {"unit": "bytes", "buckets": log2_buckets(self.len_hist.get(sc, {}))}
            if self.timed:
                out[f"{sc}_ns_log2"] = {"unit": "ns", "buckets": log2_buckets(self.ns_hist.get(sc, {}))}
        return out


class MadviseProbe(Concern):
    """`timed`: the opt-in syscall-time concern is on (an entry program and two clock reads per call)."""

    name = "madvise"
    c_file = "madvise.c"
    order = 20
    syscalls = True

    def __init__(self, timed: bool = False) -> None:
        self.timed = timed

    def cflags(self) -> list[str]:
        syscall_cflags()                   # this machine and kernel can run syscalls.c
        return ["-DLAB_SYSCALL_TIME"] if self.timed else []

    def read(self, bpf: Any, targets: list[int]) -> MadviseReading:
        r = MadviseReading(timed=self.timed)
        stats = array_words(bpf[b"sc_stats"])            # calls, ns, errors, bytes
        for idx in np.flatnonzero(stats[:, 0]).tolist():
            slot_kind, op = divmod(idx, SC_OPS)
            slot, kind = divmod(slot_kind, 2)
            pid = targets[slot] if slot < len(targets) else 0
            if pid:
                r.stats[(pid, SYSCALLS[kind], op)] = SyscallStats(*(int(x) for x in stats[idx]))
        tables = [(b"sc_len_hist", r.len_hist)] + ([(b"sc_ns_hist", r.ns_hist)] if self.timed else [])
        for table, dest in tables:
            counts = array_words(bpf[table])[:, 0]
            for idx in np.flatnonzero(counts).tolist():
                kind, slot = divmod(idx, HIST_SLOTS)
                dest.setdefault(SYSCALLS[kind], {})[slot] = int(counts[idx])
        return r

    def clear(self, bpf: Any) -> None:
        for t in (b"sc_stats", b"sc_len_hist") + ((b"sc_ns_hist",) if self.timed else ()):
            array_zero(bpf[t])
