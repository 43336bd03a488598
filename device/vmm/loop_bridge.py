"""Run closures in the VMM's main loop from another thread, and wait for their results.

The VMM's event loop owns the device, the virtqueues and the control socket; a thread
(the migration source) must not touch them. It hands a closure to LoopBridge.call(),
which queues it and writes the bridge's eventfd; the loop, which waits on that fd like
on any other, runs the queued closures (run_pending) and the thread gets the result
or the exception back.
"""
from __future__ import annotations

import os
import queue
import threading
from typing import Any, Callable


class LoopBridge:
    """Run closures in the VMM's main loop from another thread, and wait for them."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.q: queue.SimpleQueue = queue.SimpleQueue()

    def call(self, fn: Callable[[], Any], timeout: float = 30.0) -> Any:
        box: list = [None, None]
        done = threading.Event()
        self.q.put((fn, box, done))
        os.eventfd_write(self.fd, 1)
        if not done.wait(timeout):
            raise TimeoutError(f"the VMM main loop did not run {getattr(fn, '__name__', fn)} within {timeout} s")
        if box[1] is not None:
            raise box[1]
        return box[0]

    def run_pending(self) -> None:
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        while True:
            try:
                fn, box, done = self.q.get_nowait()
            except queue.Empty:
                return
            try:
                box[0] = fn()
            except Exception as e:
                box[1] = e
            done.set()
