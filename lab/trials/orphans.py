"""Trial processes die with the process that started them, and are reaped when done.

A VMM started for a trial must not outlive its orchestrator: a worker killed with
SIGKILL mid-trial (lab/testbed/task_queue.py) cannot tear anything down, and an orphaned VMM would
keep its guest's RAM and CPU while another worker re-runs the trial. Linux's
PR_SET_PDEATHSIG, set in the child between fork and exec, has the kernel send SIGKILL
to the child when the thread that started it exits; a trial's thread lives until the
trial's processes are closed, so only an orchestrator that dies fires it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def die_with_parent() -> None:
    """subprocess.Popen(preexec_fn=die_with_parent): SIGKILL this child when its parent
    dies, and at once if the parent already died before the call."""
    parent = os.getppid()
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def wait_or_kill(proc: subprocess.Popen, timeout: float) -> int:
    """Give a child that was asked to quit `timeout` seconds to exit, then SIGKILL it;
    reaped either way (no zombie, no process outliving its trial). Its exit status."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
