"""One wake-up of the VMM's event loop, as device/vmm/process.py runs it, for the control fuzzer.

The control socket first, then the kick eventfds under one WorkBudget; each
wake-up's CPU time is measured (the control fuzzer's hang bound is per wake-up).
"""
from __future__ import annotations

import os
import select
import selectors

from device.vmm.balloon_device import BalloonDevice
from device.vmm.budget import WorkBudget, cpu_time
from device.vmm.control_peer import ControlService


class LoopModel:
    """The VMM's event loop over the control socket and the kick eventfds, one wake-up
    per call; measures each wake-up's CPU time (a busy machine does not make it longer)."""

    def __init__(self, dev: BalloonDevice, svc: ControlService) -> None:
        self.dev, self.svc = dev, svc
        self.gone: str | None = None
        self.worst_wakeup_s = 0.0
        self.wakeups = 0
        self.vrings_seen: set[tuple] = set()

    def wakeup(self) -> bool:
        """Serve what is ready now; False when nothing was."""
        p = select.poll()
        cfd = -1
        if self.gone is None:
            want = self.svc.wanted()
            self.svc.mask = want or self.svc.mask
            cfd = self.svc.chan.fileno()
            p.register(cfd, (select.POLLIN if want & selectors.EVENT_READ else 0)
                       | (select.POLLOUT if want & selectors.EVENT_WRITE else 0))
        kicks = dict(self.dev.kick_fds)
        for idx, fd in kicks.items():
            p.register(fd, select.POLLIN)
        ready = p.poll(0)
        if not ready:
            return False
        t0 = cpu_time()
        budget = WorkBudget()
        ready.sort(key=lambda e: e[0] != cfd)        # control first, kicks last, as the VMM
        for fd, ev in ready:
            if fd == cfd:
                mask = (selectors.EVENT_READ if ev & (select.POLLIN | select.POLLHUP | select.POLLERR) else 0) \
                    | (selectors.EVENT_WRITE if ev & (select.POLLOUT | select.POLLHUP | select.POLLERR) else 0)
                if self.gone is None:
                    self.svc.on_event(mask)
                continue
            idx = next((i for i, f in kicks.items() if f == fd), None)
            if idx is None or self.dev.kick_fds.get(idx) != fd:
                continue                           # replaced by a request served just now
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass
            self.dev.process_queue(idx, budget)
        self.worst_wakeup_s = max(self.worst_wakeup_s, cpu_time() - t0)
        self.wakeups += 1
        for q, v in self.dev.vrings.items():
            self.vrings_seen.add((q, v.desc_gpa, v.avail_gpa, v.used_gpa, v.size))
        return True

    def on_gone(self, why: str) -> None:
        self.gone = why

