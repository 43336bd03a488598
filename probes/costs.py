"""What the probes cost, measured: per program, per reading.

Three parts, each measured, none quoted:

- **each BPF program's own run time**: the kernel's bpf_stats (probes/bpf_stats.py),
  run_cnt and run_time_ns read when a reading starts and when it ends: `events`,
  `ns_per_event`, `ms`. A program on a tracepoint runs for every process (every system
  call on the machine, every page fault) and the kernel keeps one total per program,
  so these are the program's cost to the whole machine in the window: for the probed
  processes, an upper bound (the others' runs leave at the target check, the cheapest
  path). `probed_events` is how many runs were the probed processes' (the programs
  count them);
- **the system-call hook**: while a program is attached to the system-call path, every
  system call of every process takes the kernel's slow path and dispatches to it; that
  cost is outside any program's run time. It is measured once per session, timed with
  the programs attached and detached, interleaved, less the programs' own run time, on
  two system calls, because it is not the same on both: on a cheap one (getppid,
  `calibrate_syscall_hook`) and on the pfn arm's discard, madvise(MADV_REMOVE) of one
  resident page of a memfd (`calibrate_discard_hook`), where it costs about twice as
  much here (the slow path beside a call that itself walks page tables, frees a page and
  flushes a TLB; docs/PROBES.md). The targets' discard calls (madvise and fallocate, the
  madvise probe counts them) are charged at the second figure (`syscall_hook_discard`),
  their other system calls (syscalls.c counts all of them) at the first;
- **the USDT trap**: a stage marker is a uprobe, a trap into the kernel before the
  program runs; measured once per session the same way (`calibrate_usdt_trap`, with the
  stage program attached to this process and detached) and charged per marker fired.

Other tools' BPF programs (another lab session, bpftrace, ...) run in the lab's processes
too, and while the statistics are on every program pays for them: `foreign_row` says what
every BPF program on the machine that is not this session's ran in the window (the same
bpf_stats), apart from the lab's own total (`ProbeReading.foreign_bpf`).

The rows of a reading (`ProbeReading.programs`) are {name: {events, ns_per_event, ms}}
(and `probed_events` for the programs): one per BPF program by its tracepoint's name
(on_audit for the USDT program), and `syscall_hook` and `usdt_trap`. `total_ms` is the
sum of the rows' ms.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

from device.virtio.discard import ResidentPages
from probes.bpf_stats import ProgStats

SYSCALL_HOOK = "syscall_hook"
SYSCALL_HOOK_DISCARD = "syscall_hook_discard"
USDT_TRAP = "usdt_trap"
SYSCALL_PROGRAMS = ("sys_exit", "sys_enter")
USDT_PROGRAM = "on_audit"
# What each row is, for tables (`balloon-lab probe`, show, the report).
ROW_DOCS = {
    "sys_exit": "raw_syscalls:sys_exit: madvise, fallocate, eventfd write/read",
    "sys_enter": "raw_syscalls:sys_enter: entry time stamps (syscall-time)",
    "mm_page_alloc": "kmem:mm_page_alloc",
    "page_fault_user": "exceptions:page_fault_user",
    "mm_page_free": "kmem:mm_page_free (pagefree)",
    "mm_page_free_batched": "kmem:mm_page_free_batched (pagefree)",
    USDT_PROGRAM: "USDT python:audit: the stage markers",
    SYSCALL_HOOK: "the syscall path with a hook on, per syscall but the discards (calibrated on getppid)",
    SYSCALL_HOOK_DISCARD: "the syscall path with a hook on, per madvise/fallocate (calibrated on a page's MADV_REMOVE)",
    USDT_TRAP: "the uprobe trap, per marker (calibrated)",
}


@dataclass
class Calibration:
    """Costs no program's run time holds, measured once per session with no process
    probed (ns per event)."""

    syscall_hook_ns: float | None = None    # per system call, with the syscall programs attached
    syscall_hook_discard_ns: float | None = None   # the same, per madvise(MADV_REMOVE) of a resident page
    usdt_trap_ns: float | None = None       # per stage marker, with the stage program attached

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _ns_per_call(loop: Callable[[int], None], n: int, prepare: Callable[[], None] | None = None) -> float:
    """This thread's CPU time (user + kernel: a trap and a hook are both in it) per call;
    `prepare` runs first, outside the timing."""
    if prepare is not None:
        prepare()
    t0 = time.thread_time_ns()
    loop(n)
    return (time.thread_time_ns() - t0) / n


def _body_ns(before: Mapping[str, ProgStats], after: Mapping[str, ProgStats], names: tuple[str, ...]) -> float:
    """The summed mean run time per run of these programs between two snapshots."""
    total = 0.0
    for n in names:
        if n in before and n in after:
            runs = after[n].run_cnt - before[n].run_cnt
            total += (after[n].run_time_ns - before[n].run_time_ns) / runs if runs > 0 else 0.0
    return total


def _calibrate(detach: Callable[[], None], attach: Callable[[], None], stats: Callable[[], Mapping[str, ProgStats]],
               loop: Callable[[int], None], programs: tuple[str, ...], calls: int, rounds: int,
               prepare: Callable[[], None] | None = None) -> float:
    """Per call: the fastest round attached minus the fastest detached (the minimum is what
    a busy machine disturbs least), less the programs' own run time per call."""
    off, on, body = [], [], []
    for _ in range(rounds):
        detach()
        off.append(_ns_per_call(loop, calls, prepare))
        attach()
        s0 = stats()
        on.append(_ns_per_call(loop, calls, prepare))
        body.append(_body_ns(s0, stats(), programs))
    return max(0.0, min(on) - min(off) - statistics.median(body))


def _getppid_loop(n: int) -> None:
    for _ in range(n):
        os.getppid()


def calibrate_syscall_hook(module: Any, calls: int = 20000, rounds: int = 5) -> float | None:
    """ns a system call costs with syscalls.c's programs attached, beyond their run time
    (the slow syscall path and the dispatch); None when no syscall program is loaded.
    `module` is attached on entry and on return (probes/bpf.py's BpfModule)."""
    programs = tuple(p for p in SYSCALL_PROGRAMS if p.encode() in module.raw_tracepoints)
    if not programs:
        return None
    return _calibrate(module.suspend, module.resume, module.program_stats, _getppid_loop, programs, calls, rounds)


def calibrate_discard_hook(module: Any, pages: int = 8192, rounds: int = 5) -> float | None:
    """ns a madvise(MADV_REMOVE) of one resident page of a memfd (the pfn arm's discard,
    page by page as the device makes it) costs with syscalls.c's programs attached, beyond
    their run time; None when no syscall program is loaded. The pages are made resident
    (MADV_POPULATE_WRITE, one call) before each timed pass, outside its timing."""
    programs = tuple(p for p in SYSCALL_PROGRAMS if p.encode() in module.raw_tracepoints)
    if not programs:
        return None
    with ResidentPages(pages, "balloon-lab-calibration") as rp:
        return _calibrate(module.suspend, module.resume, module.program_stats, rp.discard_each, programs, pages,
                          rounds, rp.populate)


def calibrate_usdt_trap(module: Any, stages: Any, calls: int = 2000, rounds: int = 5) -> float | None:
    """ns a stage marker costs with the stage program attached, beyond its run time (the
    uprobe trap and Python firing the marker); measured on this very process, which is
    not a target (the program leaves at its first test). None without the stage probe."""
    pid = os.getpid()
    audit = sys.audit

    def loop(n: int) -> None:
        for _ in range(n):
            audit("balloon-lab-calibration")

    def detach() -> None:
        if pid in stages.attached:
            stages.detach(module.bpf, pid)

    try:
        return _calibrate(detach, lambda: stages.attach(module.bpf, pid), module.program_stats, loop,
                          (USDT_PROGRAM,), calls, rounds)
    finally:
        detach()


def row(events: int, ns: float) -> dict[str, float]:
    return {"events": int(events), "ns_per_event": ns / events if events else 0.0, "ms": ns / 1e6}


def program_rows(before: Mapping[str, ProgStats], after: Mapping[str, ProgStats], probed: Mapping[str, int],
                 cal: Calibration | None) -> dict[str, dict[str, float]]:
    """The cost rows of one reading window (see the module doc). `probed`: per program,
    its runs for the probed processes (the programs' own counts; "syscalls" for the
    system-call programs and the hook)."""
    out: dict[str, dict[str, float]] = {}
    for name, a in sorted(after.items()):
        b = before.get(name)
        out[name] = row(a.run_cnt - (b.run_cnt if b else 0), a.run_time_ns - (b.run_time_ns if b else 0))
        mine = probed.get("syscalls" if name in SYSCALL_PROGRAMS else name)
        if name == USDT_PROGRAM:
            mine = int(out[name]["events"])        # attached to the probed processes only
        if mine is not None:
            out[name]["probed_events"] = min(int(mine), int(out[name]["events"]))
    syscalls = probed.get("syscalls")
    if cal is not None and cal.syscall_hook_ns is not None and syscalls is not None:
        split = cal.syscall_hook_discard_ns is not None and "discards" in probed
        discards = min(probed["discards"], syscalls) if split else 0
        out[SYSCALL_HOOK] = row(syscalls - discards, (syscalls - discards) * cal.syscall_hook_ns)
        if split:
            out[SYSCALL_HOOK_DISCARD] = row(discards, discards * cal.syscall_hook_discard_ns)
    if cal is not None and cal.usdt_trap_ns is not None and USDT_PROGRAM in out:
        markers = int(out[USDT_PROGRAM]["events"])
        out[USDT_TRAP] = row(markers, markers * cal.usdt_trap_ns)
    return out


def foreign_row(before: Mapping[int, ProgStats], after: Mapping[int, ProgStats], ours: set[int]) -> dict[str, float]:
    """The BPF programs on the machine that are not in `ours` (program ids), over the
    window: how many ran, their runs and ms (programs loaded or unloaded meanwhile count
    for what they ran while both snapshots saw them)."""
    ids = [i for i in after if i in before and i not in ours]
    runs = [after[i].run_cnt - before[i].run_cnt for i in ids]
    ns = sum(after[i].run_time_ns - before[i].run_time_ns for i in ids)
    return {"programs": sum(1 for r in runs if r > 0), "events": sum(runs), "ms": ns / 1e6}


def foreign_line(f: Mapping[str, float] | None) -> str:
    """The foreign programs in words ("" when none ran)."""
    if not f or not f.get("events"):
        return ""
    return (f"not the lab's: {f['programs']:.0f} other BPF program(s) on this machine ran {_count(f['events'])} times, "
            f"{f['ms']:.2f} ms, in the window (every process's runs; the statistics this session turned on slow "
            f"them too)")


def total_ms(rows: Mapping[str, Mapping[str, float]]) -> float:
    return sum(r["ms"] for r in rows.values())


def median_rows(readings: list[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per row, the median of each figure over the readings that have it (readings as
    stored: ProbeReading.to_json() dicts)."""
    names = sorted({n for r in readings for n in (r.get("programs") or {})}, key=row_order)
    out = {}
    for n in names:
        rows = [r["programs"][n] for r in readings if n in (r.get("programs") or {})]
        out[n] = {k: statistics.median(float(x[k]) for x in rows) for k in rows[0] if all(k in x for x in rows)}
    return out


def _count(n: float) -> str:
    return f"{n:,.0f}".replace(",", " ")


def row_order(name: str) -> tuple[int, str]:
    order = list(ROW_DOCS)
    return (order.index(name) if name in order else len(order), name)


def cost_lines(rows: Mapping[str, Mapping[str, float]], op_ms: float | None = None, docs: bool = True) -> list[str]:
    """The rows as a table, like the OVERHEAD section of a BCC tool's man page but measured:
    per program (and the calibrated hook and trap) its events, ns per event, ms, and the
    share of `op_ms` (the timed operation) when given; then the total."""
    if not rows:
        return []
    head = (["program", "events", "probed", "ns/event", "ms"] + (["of op"] if op_ms else [])
            + (["what it is"] if docs else []))
    cells = []
    for name in sorted(rows, key=row_order):
        r = rows[name]
        probed = r.get("probed_events", r["events"] if name in (SYSCALL_HOOK, SYSCALL_HOOK_DISCARD, USDT_TRAP) else None)
        c = [name, _count(r["events"]), "" if probed is None else _count(probed), f"{r['ns_per_event']:.0f}",
             f"{r['ms']:.2f}"]
        if op_ms:
            c.append(f"{100 * r['ms'] / op_ms:.2f} %")
        if docs:
            c.append(ROW_DOCS.get(name, ""))
        cells.append(c)
    tot = total_ms(rows)
    cells.append(["total", "", "", "", f"{tot:.2f}"] + ([f"{100 * tot / op_ms:.2f} %"] if op_ms else [])
                 + ([""] if docs else []))
    widths = [max(len(c[i]) for c in cells + [head]) for i in range(len(head))]
    last = len(head) - 1 if docs else len(head)

    def fmt(c: list[str]) -> str:
        return "  ".join(v.ljust(w) if i == 0 or i == last else v.rjust(w)
                         for i, (v, w) in enumerate(zip(c, widths))).rstrip()
    return [fmt(head)] + [fmt(c) for c in cells]
