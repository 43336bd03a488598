"""Was a process killed by the kernel's OOM killer? Asked when a trial's peer died of SIGKILL.

A VMM or guest that the OOM killer took looks like any SIGKILL from outside (exit
status -9); the message a user needs is "OOM-killed", with the kernel's own line.
The evidence, in order:

- the kernel log (/dev/kmsg, readable by root): the OOM killer writes
  `Out of memory: Killed process PID (comm) ...` (global) or `Memory cgroup out of
  memory: Killed process PID (comm) ...` (a cgroup at its limit) for every victim;
- without it (not root, dmesg_restrict), the oom_kill counter of this process's memory
  cgroup (v2 memory.events, v1 memory.oom_control) rising since the trial began: an
  OOM kill happened among the lab's processes, the dead one is the likely victim.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

_KILLED = re.compile(r"Killed process (\d+) \(")


def kernel_log_line(pid: int) -> str | None:
    """The kernel log's OOM-kill line for `pid`, or None (none, or no access)."""
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    found = None
    try:
        while True:
            try:
                rec = os.read(fd, 8192).decode(errors="replace")
            except BlockingIOError:
                break
            except OSError:            # EPIPE: a record overwritten while read; go on
                continue
            text = rec.split(";", 1)[-1].splitlines()[0] if rec else ""
            m = _KILLED.search(text)
            if m and int(m.group(1)) == pid:
                found = text.strip()
    finally:
        os.close(fd)
    return found


def cgroup_oom_kills() -> int | None:
    """The oom_kill counter of this process's memory cgroup (v2 or v1), None if unknown."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            f = Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.events"
        elif "memory" in controllers.split(","):
            f = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.oom_control"
        else:
            continue
        try:
            for row in f.read_text().splitlines():
                k, _, v = row.partition(" ")
                if k == "oom_kill":
                    return int(v)
        except (OSError, ValueError):
            continue
    return None


def oom_evidence(pid: int, cgroup_kills_before: int | None = None) -> str | None:
    """"OOM-killed (...)" with the evidence, or None if nothing says the OOM killer did it."""
    line = kernel_log_line(pid)
    if line is not None:
        return f"OOM-killed (kernel: {line!r})"
    now = cgroup_oom_kills()
    if cgroup_kills_before is not None and now is not None and now > cgroup_kills_before:
        return (f"probably OOM-killed (the memory cgroup's oom_kill count rose from {cgroup_kills_before} to {now} "
                "during the trial; the kernel log is not readable here)")
    return None
