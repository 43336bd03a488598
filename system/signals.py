"""Signals a lab process holds back or is sent: SIGINT and SIGTERM held over a section
that must not be cut in two, and SIGKILL when the parent dies.

A Python signal handler runs between two bytecodes of the main thread, so Ctrl-C can
raise KeyboardInterrupt between two statements of one database transaction, or
between the kernel call that closes a BPF program's perf event and the line that
forgets its file descriptor (BCC then closes it again at exit: "ioctl(
PERF_EVENT_IOC_DISABLE) failed: Bad file descriptor", then "Failed to detach BPF from
tracepoint" from its atexit hook). Inside `signals_deferred()` a SIGINT or SIGTERM is
only noted; it is delivered to the handlers that were in place when the section ends.
(A signal mask would not do: a process-directed signal goes to any thread not blocking
it, e.g. a BLAS worker, and Python then runs the handler in the main thread anyway.)
Handlers only run in the main thread, so other threads need no protection. Used by
the results store (lab/store/store.py) and the probes (probes/bpf.py, probes/session.py).

die_with_parent() (PR_SET_PDEATHSIG) makes a child die with the process that started
it: the lab's VMMs with the lab (lab/trials/orphans.py), a guest with its VMM
(device/vmm/process.py). A guest busy writing memory for a workload does not look at its
control socket, so without it a guest whose VMM was killed went on filling host
memory alone until its workload step was done.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import threading
from typing import Iterator

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

DEFERRED = (signal.SIGINT, signal.SIGTERM)


_nesting = 0          # signals_deferred blocks open in the main thread


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block is done, then deliver them (each once; an
    inner block leaves the delivery to the outermost)."""
    global _nesting
    if threading.current_thread() is not threading.main_thread() or _nesting:
        _nesting += threading.current_thread() is threading.main_thread()
        try:
            yield
        finally:
            _nesting -= threading.current_thread() is threading.main_thread()
        return
    pending: list[int] = []
    old = {s: signal.getsignal(s) for s in DEFERRED}
    old = {s: h for s, h in old.items() if h is not None}  # None: installed from C, leave it alone
    for s in old:
        signal.signal(s, lambda signum, _frame: pending.append(signum))
    _nesting = 1
    try:
        yield
    finally:
        _nesting = 0
        for s, h in old.items():
            signal.signal(s, h)
        for s in dict.fromkeys(pending):       # each signal once: a second Ctrl-C adds nothing
            signal.raise_signal(s)


def die_with_parent() -> None:
    """subprocess.Popen(preexec_fn=die_with_parent): SIGKILL this child when its parent
    dies, and at once if the parent already died before the call."""
    parent = os.getppid()
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)
