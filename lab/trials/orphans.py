"""Trial processes die with the process that started them, are reaped when done, and
leave no scratch directory behind.

A VMM started for a trial must not outlive its orchestrator: a worker killed with
SIGKILL mid-trial (lab/testbed/task_queue.py) cannot tear anything down, and an orphaned VMM would
keep its guest's RAM and CPU while another worker re-runs the trial. Linux's
PR_SET_PDEATHSIG, set in the child between fork and exec, has the kernel send SIGKILL
to the child when the thread that started it exits; a trial's thread lives until the
trial's processes are closed, so only an orchestrator that dies fires it.

Children also run in a session of their own (spawn()): a terminal's Ctrl-C goes to the
whole foreground process group, and a VMM that got it too would die mid-trial with a
KeyboardInterrupt of its own; the lab, which alone gets it, quits them in order.

Scratch directories (sockets, logs) carry the pid of the process that made them
(scratch_dir()); they are removed when the trial closes them, at interpreter exit
(Ctrl-C and SIGTERM unwind to it, lab/trials/interrupts.py), and, for a process killed with
SIGKILL, by the next `balloon-lab` command (sweep_left_behind()).
"""
from __future__ import annotations

import atexit
import glob
import os
import re
import shutil
import signal
import subprocess
import tempfile
from typing import Any

from system.signals import die_with_parent

def wait_or_kill(proc: subprocess.Popen, timeout: float) -> int:
    """Give a child that was asked to quit `timeout` seconds to exit, then SIGKILL it;
    reaped either way (no zombie, no process outliving its trial). Its exit status."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def spawn(cmd: list[str], **popen_kwargs: Any) -> subprocess.Popen:
    """Start a trial's child: killed with its parent (die_with_parent), in its own
    session (a terminal's Ctrl-C reaches the lab only, which then closes the child)."""
    return subprocess.Popen(cmd, start_new_session=True, preexec_fn=die_with_parent, **popen_kwargs)


SCRATCH_PREFIX = "balloon-lab-"
_SCRATCH_RE = re.compile(r"^balloon-lab-(?:[a-z]+-)?p(\d+)-")
_scratch: list[str] = []


def scratch_dir(kind: str = "") -> str:
    """A new temporary directory for a trial's sockets and logs, named with this
    process's pid, removed at exit if its owner does not remove it (remove_scratch)."""
    if not _scratch:
        atexit.register(remove_all_scratch)
    d = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{kind + '-' if kind else ''}p{os.getpid()}-")
    _scratch.append(d)
    return d


def remove_scratch(d: str) -> None:
    shutil.rmtree(d, ignore_errors=True)
    if d in _scratch:
        _scratch.remove(d)


def remove_all_scratch() -> None:
    """Every scratch directory this process made and still holds (a forked child keeps
    its parent's: only the maker removes them)."""
    for d in list(_scratch):
        m = _SCRATCH_RE.match(os.path.basename(d))
        if m and int(m.group(1)) == os.getpid():
            remove_scratch(d)


def sweep_left_behind() -> list[str]:
    """Remove scratch directories whose maker is gone (killed with SIGKILL: it could not
    clean up); those of live processes, and directories not named by scratch_dir(), are
    left alone. Returns what was removed."""
    gone = []
    for d in glob.glob(os.path.join(tempfile.gettempdir(), SCRATCH_PREFIX + "*")):
        m = _SCRATCH_RE.match(os.path.basename(d))
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
    return gone
