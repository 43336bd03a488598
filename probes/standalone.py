"""Point the probes at any running process (a real QEMU, a lab process, anything).

Shared by `balloon-lab probe` and each probe's own `python -m probes.<name>` program.
That program is its package's __main__.py, not the loader (the package's __init__.py):
this module imports the loaders through probes/session.py, so a loader that imported
it back would close an import circle, and `python -m` would run the loader twice.

The lab cannot know another program's virtqueue fds, so every eventfd the process
has open when probing starts is registered as kind "other" (cheap: one readlink per
fd), unless the caller names fds explicitly (FD[:QUEUE[:KIND]]).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from probes.costs import cost_lines, foreign_line
from probes.kicks import KINDS, eventfds_of
from probes.session import DEFAULT_CONCERNS, ProbeReading, ProbeSession
from fmt.numbers import fmt_bytes, fmt_count, fmt_ns
from fmt.text_width import fold


class NoSuchProcess(LookupError):
    pass


@dataclass(frozen=True)
class EventfdSpec:
    fd: int
    queue: int | None = None
    kind: str = "other"


def parse_eventfd(spec: str) -> EventfdSpec:
    """'FD', 'FD:QUEUE' or 'FD:QUEUE:KIND' (KIND one of kick/call/config/other; QUEUE may be '-')."""
    parts = spec.split(":")
    if not 1 <= len(parts) <= 3:
        raise ValueError(f"--eventfd {spec!r}: expected FD[:QUEUE[:KIND]]")
    try:
        fd = int(parts[0])
        queue = None if len(parts) < 2 or parts[1] in ("", "-") else int(parts[1])
    except ValueError:
        raise ValueError(f"--eventfd {spec!r}: FD and QUEUE must be integers") from None
    kind = parts[2] if len(parts) == 3 else ("kick" if queue is not None else "other")
    if kind not in KINDS:
        raise ValueError(f"--eventfd {spec!r}: kind must be one of {', '.join(KINDS)}")
    if fd < 0 or (queue is not None and queue < 0):
        raise ValueError(f"--eventfd {spec!r}: FD and QUEUE must be non-negative")
    return EventfdSpec(fd, queue, kind)


def process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        raise NoSuchProcess(f"no process with pid {pid}") from None


def probe_pid(pid: int, duration: float, concerns: Iterable[str] = DEFAULT_CONCERNS,
              eventfds: list[EventfdSpec] | None = None, quiet: bool = False) -> ProbeReading:
    """Attach to `pid`, count for `duration` seconds (or until it exits), return the reading."""
    if duration <= 0:
        raise ValueError(f"duration {duration!r}: must be > 0 seconds")
    return next(probe_intervals(pid, duration, 1, concerns, eventfds, quiet))


def probe_intervals(pid: int, interval: float | None, count: int | None, concerns: Iterable[str] = DEFAULT_CONCERNS,
                    eventfds: list[EventfdSpec] | None = None, quiet: bool = False,
                    on_attached: Callable[[], None] | None = None) -> Iterator[ProbeReading]:
    """BCC's interval convention (`biolatency 1 10`): attach once, then yield one reading
    per `interval` seconds with the counters zeroed after each, `count` times (None: until
    the process exits). `interval` None is one reading until the process exits. On
    Ctrl-C (KeyboardInterrupt) the interval in progress is yielded, partial, and the
    generator ends: an interrupted tool still prints what it counted. Counting starts
    when `on_attached` is called. Events between a read and the clear that follows it
    are lost, as in BCC's tools (microseconds against seconds-long intervals)."""
    process_name(pid)                            # NoSuchProcess before any compile
    s = ProbeSession(concerns=concerns, quiet=quiet)
    try:
        s.attach([pid])
        if s.active and "kicks" in s.probes:
            specs = eventfds if eventfds else [EventfdSpec(fd) for fd in _safe_eventfds(pid)]
            for e in specs:
                s.register_eventfd(pid, e.fd, e.queue, e.kind)
        # No clear() before the first interval: the maps are new, and counting starts the
        # moment the pid is a target.
        if on_attached is not None:
            on_attached()
        done = 0
        while count is None or done < count:
            end = None if interval is None else time.monotonic() + interval
            try:
                while (end is None or time.monotonic() < end) and _alive(pid):
                    time.sleep(0.05 if end is None else min(0.05, max(0.0, end - time.monotonic())))
            except KeyboardInterrupt:
                yield s.read()
                return
            yield s.read()
            done += 1
            if not _alive(pid):
                return
            s.clear()
    finally:
        s.detach()


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _safe_eventfds(pid: int) -> list[int]:
    try:
        return eventfds_of(pid)
    except OSError:
        return []


def _ms(ns: int | None) -> str:
    return "-" if ns is None else fmt_ns(ns)


def _hist_lines(h: dict[str, Any], width: int = 30) -> list[str]:
    buckets = h.get("buckets", [])
    if not buckets:
        return []
    top = max(b["count"] for b in buckets) or 1
    out = []
    for b in buckets:
        rng = f"{b['lo']}" if b["lo"] == b["hi"] else f"{b['lo']} -> {b['hi']}"
        out.append(f"      {rng:>25} {h['unit']:<5} {fmt_count(b['count']):>11} |{'*' * max(1, round(width * b['count'] / top)):<{width}}|")
    return out


def format_summary(r: ProbeReading, title: str = "") -> str:
    lines = [title] if title else []
    lines.append(f"  backend {r.backend}, {r.seconds:.2f} s" + (f" - {r.reason}" if r.reason else ""))
    if r.backend == "none":
        return "\n".join(lines)
    for sc in ("madvise", "fallocate"):
        calls = getattr(r, f"{sc}_calls")
        if calls is None:
            continue
        ns = getattr(r, f"{sc}_kernel_ns")
        per = f" ({fmt_ns(ns / calls)}/call)" if calls and ns is not None else ""
        kernel = "not timed (--programs ...,syscall-time)" if ns is None else _ms(ns)
        lines.append(f"  {sc:<10} calls {fmt_count(calls)}  kernel {kernel}{per}  "
                     f"errors {fmt_count(getattr(r, f'{sc}_errors'))}  length {fmt_bytes(getattr(r, f'{sc}_bytes'))}")
        ops = r.advice if sc == "madvise" else r.fallocate_modes
        if ops:
            lines.append("    " + ", ".join(f"{k} {fmt_count(v)}" for k, v in sorted(ops.items())))
        if calls:
            lines.append("    length:")
            lines += _hist_lines(r.hists.get(f"{sc}_len_log2", {}))
            if ns is not None:
                lines.append("    kernel time:")
                lines += _hist_lines(r.hists.get(f"{sc}_ns_log2", {}))
    if r.eventfd_writes is not None:
        lines.append(f"  eventfds   writes {fmt_count(r.eventfd_writes)} (kicks {fmt_count(r.kicks)}, interrupts "
                     f"{fmt_count(r.interrupts)}, config {fmt_count(r.config_notifications)}), device wake-ups "
                     f"{fmt_count(r.device_wakeups)}, interrupt reads {fmt_count(r.interrupt_reads)}, "
                     f"empty reads {fmt_count(r.empty_reads)}")
        fds = ", ".join(f"{e['fd']}" + ("" if e["queue"] is None else f":q{e['queue']}") + f":{e['kind']}"
                        for e in r.eventfds)
        lines.append(f"    registered fds: {fds or 'none (the process had no eventfd open)'}")
        for q, counts in r.per_queue.items():
            lines.append(f"    queue {q}: " + ", ".join(f"{k} {fmt_count(v)}" for k, v in sorted(counts.items())))
    if r.page_allocs is not None or r.page_frees is not None:
        frees = ("frees not counted (--programs ...,pagefree)" if r.page_frees is None else
                 f"frees {fmt_count(r.page_frees)} ({fmt_count(r.page_free_pages)} pages), batched frees "
                 f"{fmt_count(r.page_frees_batched)}")
        allocs = ("" if r.page_allocs is None else
                  f"allocs {fmt_count(r.page_allocs)} ({fmt_count(r.page_alloc_pages)} pages), "
                  f"user faults {fmt_count(r.page_faults)}, ")
        lines.append(f"  pages      {allocs}{frees}")
        lines += _hist_lines(r.hists.get("page_alloc_order", {}))
    if r.stages:
        lines.append(f"  {'stage':<16}{'count':>8}{'total':>14}{'mean':>12}{'madvise':>10}{'madvise kernel':>16}")
        for name, s in r.stages.items():
            mean = fmt_ns(s["ns"] / s["count"]) if s["count"] else "-"
            lines.append(f"  {name:<16}{fmt_count(s['count']):>8}{_ms(s['ns']):>14}{mean:>12}"
                         f"{fmt_count(s['madvise_calls']):>10}"
                         f"{_ms(s['madvise_kernel_ns']):>16}")
    if r.programs:
        lines.append(f"  what the probes cost in these {r.seconds:.2f} s (measured: each program's run time from "
                     f"bpf_stats, every process's runs, `probed` of them this process's; the syscall hook and the "
                     f"USDT trap calibrated at load):")
        lines += ["    " + line for line in cost_lines(r.programs)]
        if foreign_line(r.foreign_bpf):
            lines.append("    " + foreign_line(r.foreign_bpf))
    for what, why in r.missing.items():
        lines.append(f"  note: {what}: {why}")
    return fold("\n".join(lines))


def main(concerns: list[str], argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m probes.{concerns[0]}",
                                 description=f"balloon-lab {', '.join(concerns)} probe on one process")
    ap.add_argument("-p", "--pid", type=int, required=True)
    ap.add_argument("-d", "--duration", type=float, default=5.0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    try:
        r = probe_pid(a.pid, a.duration, concerns)
    except NoSuchProcess as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r.to_json(), indent=1) if a.json else format_summary(r, f"pid {a.pid}"))
    return 0 if r.backend == "bcc" else 1
