"""Loader for kicks.c: write(2)/read(2) on registered eventfds, per queue and kind.

Register each eventfd of each process with its queue index and kind:
  kick   guest -> device notification: the guest writes it, the device reads it (wake-up)
  call   device -> guest interrupt: the device writes it, the guest reads it
  config config-change notification
  other  an eventfd whose role is unknown (e.g. found in /proc/PID/fd by `balloon-lab probe`)
"wakeup" is accepted for the device's end of a kick eventfd and stored as "kick"
(its reads are the device's wake-ups either way).
Standalone: `python -m probes.kicks -p PID [-d SECONDS] [--json]` (registers all of
the pid's eventfds as "other").
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from probes.bpf import Concern, syscall_cflags

KINDS = ("kick", "call", "config", "other")
ALIASES = {"wakeup": "kick"}
NO_QUEUE = 0xFFFFFFFF          # queue index unknown (stored as u32)
OPS = ("write", "read", "read_empty")


@dataclass
class KicksReading:
    """counts[(pid, queue, kind, op)]; queue is None when unknown."""

    counts: dict[tuple[int, int | None, str, str], int] = field(default_factory=dict)

    def total(self, kind: str | None = None, op: str | None = None, pid: int | None = None) -> int:
        return sum(n for (p, _, k, o), n in self.counts.items()
                   if (kind is None or k == kind) and (op is None or o == op) and (pid is None or p == pid))

    def device_pids(self) -> set[int]:
        """The processes that read kick eventfds: the device side (the VMM, or QEMU)."""
        return {p for (p, _, k, o) in self.counts if k == "kick" and o in ("read", "read_empty")}

    @property
    def kicks(self) -> int:
        """Guest -> device notifications: kick-fd writes by processes other than the device."""
        dev = self.device_pids()
        return sum(n for (p, _, k, o), n in self.counts.items() if k == "kick" and o == "write" and p not in dev)

    @property
    def device_rekicks(self) -> int:
        """Kick-fd writes by the device itself: it re-kicks a queue when its per-wake-up work
        budget ends with work left (device/vmm/budget.py), counted as `budget_yields` there."""
        dev = self.device_pids()
        return sum(n for (p, _, k, o), n in self.counts.items() if k == "kick" and o == "write" and p in dev)

    @property
    def interrupts(self) -> int:
        return self.total("call", "write")

    @property
    def config_notifications(self) -> int:
        return self.total("config", "write")

    @property
    def device_wakeups(self) -> int:
        return self.total("kick", "read")

    @property
    def interrupt_reads(self) -> int:
        return self.total("call", "read")

    def per_queue(self) -> dict[str, dict[str, int]]:
        """{queue: {"<kind>_<op>": n}}, e.g. {"0": {"kick_write": 3, "kick_read": 2}}."""
        out: dict[str, dict[str, int]] = {}
        for (_, q, k, o), n in sorted(self.counts.items(), key=lambda kv: (kv[0][1] is None, kv[0][1] or 0)):
            d = out.setdefault("unknown" if q is None else str(q), {})
            d[f"{k}_{o}"] = d.get(f"{k}_{o}", 0) + n
        return out


def eventfds_of(pid: int) -> list[int]:
    """The pid's open eventfds (from /proc/PID/fd: links read 'anon_inode:[eventfd]')."""
    out = []
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            if os.readlink(f"{base}/{name}") == "anon_inode:[eventfd]":
                out.append(int(name))
        except OSError:
            continue                  # closed while we looked
    return sorted(out)


class KicksProbe(Concern):
    name = "kicks"
    c_file = "kicks.c"
    order = 30
    syscalls = True

    def cflags(self) -> list[str]:
        syscall_cflags()                   # this machine and kernel can run syscalls.c
        return []

    @staticmethod
    def check(pid: int, fd: int, queue: int | None, kind: str) -> str:
        """Validate a registration; returns the canonical kind."""
        kind = ALIASES.get(kind, kind)
        if kind not in KINDS:
            raise ValueError(f"eventfd kind {kind!r}: must be one of {', '.join(KINDS)} (or 'wakeup' = kick)")
        for what, v in (("pid", pid), ("fd", fd)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v > 0x7FFFFFFF:
                raise ValueError(f"eventfd {what} {v!r}: must be a non-negative int")
        if queue is not None and (not isinstance(queue, int) or isinstance(queue, bool) or not 0 <= queue < NO_QUEUE):
            raise ValueError(f"queue {queue!r}: must be a non-negative int or None")
        return kind

    def register(self, bpf: Any, pid: int, fd: int, queue: int | None, kind: str) -> None:
        kind = self.check(pid, fd, queue, kind)
        t = bpf[b"eventfds"]
        key = t.Key(pid, fd)
        t[key] = t.Leaf(NO_QUEUE if queue is None else queue, KINDS.index(kind))

    def unregister(self, bpf: Any, pid: int | None = None) -> None:
        t = bpf[b"eventfds"]
        for k in list(t.keys()):
            if pid is None or k.tgid == pid:
                del t[k]

    def registered(self, bpf: Any) -> dict[tuple[int, int], tuple[int | None, str]]:
        return {(k.tgid, k.fd): (None if v.queue == NO_QUEUE else v.queue, KINDS[v.kind])
                for k, v in bpf[b"eventfds"].items()}

    def read(self, bpf: Any, targets: list[int]) -> KicksReading:
        r = KicksReading()
        for k, v in bpf[b"notify_counts"].items():
            q = None if k.queue == NO_QUEUE else k.queue
            r.counts[(k.tgid, q, KINDS[k.kind] if k.kind < len(KINDS) else str(k.kind), OPS[k.op])] = v.value
        return r

    def clear(self, bpf: Any) -> None:
        bpf[b"notify_counts"].clear()

