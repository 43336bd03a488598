"""Every wake-up of an execution, timed on the VMM's own loop code, against the 50 ms bound.

The VMM serves the monitor, the control socket and every queue from one event loop
(device/vmm/event_loop.py): a wake-up's CPU time is how long the monitor may have to
wait, and no guest may make one cost more than WAKEUP_BOUND_S (docs/BAD_INPUT.md).
So every target runs its device work the way the VMM does:

- targets with queues (device, report, control, migration) drive a `FuzzLoop`: the
  real EventLoop with the real QueueKicks (each kick eventfd read, its queue served
  under the wake-up's real WorkBudget, a device that yields re-kicks itself and is
  served in later wake-ups) and, for the control targets, the real ControlWatch; the
  loop measures each wake-up itself (`EventLoop.on_wakeup`);
- targets without a loop (the decoders, the ring walker) time each call that one
  wake-up would make (a request's decode, one chain's walk) with the same clock.

A wake-up over the bound fails the execution as `slow-wakeup`, the first time it
happens, with what the wake-up served; the case is saved like any other failure.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

from device.vmm.balloon_device import BalloonDevice
from device.vmm.budget import cpu_time
from device.vmm.control_peer import ControlService, DeviceChannel
from device.vmm.event_loop import ControlWatch, EventLoop, QueueKicks
from device.virtio.transport import DeviceListener

WAKEUP_BOUND_S = 0.050            # one wake-up's CPU time: the monitor's worst wait (docs/BAD_INPUT.md)
MAX_WAKEUPS = 20_000              # wake-ups one step may take before the loop counts as never idle


class Wakeups:
    """One execution's wake-ups: how many, the worst CPU time and what it served."""

    def __init__(self) -> None:
        self.count = 0
        self.worst_s = 0.0
        self.worst_what = ""
        self.now = ""                   # what the next wake-up serves (set by the target)

    def record(self, spent_s: float, what: str | None = None) -> None:
        self.count += 1
        if spent_s > self.worst_s:
            self.worst_s, self.worst_what = spent_s, what if what is not None else self.now

    @contextlib.contextmanager
    def timed(self, what: str) -> Iterator[None]:
        """One wake-up's worth of work outside a loop (a decode, a chain walk)."""
        t0 = cpu_time()
        try:
            yield
        finally:
            self.record(cpu_time() - t0, what)

    def failure(self) -> tuple[str, str] | None:
        """("slow-wakeup", detail) when a wake-up went over the bound."""
        if self.worst_s <= WAKEUP_BOUND_S:
            return None
        return ("slow-wakeup", f"one wake-up used {self.worst_s * 1e3:.1f} ms of CPU, more than the "
                               f"{WAKEUP_BOUND_S * 1e3:.0f} ms bound ({self.worst_what})")


class NeverIdle(Exception):
    """The loop still had work after MAX_WAKEUPS wake-ups of one step."""


class FuzzLoop:
    """The VMM's EventLoop and QueueKicks over one device (and its ControlWatch once a
    control channel is attached), every wake-up recorded in `wakeups`."""

    def __init__(self, dev: BalloonDevice, wakeups: Wakeups) -> None:
        self.dev, self.wakeups = dev, wakeups
        self.loop = EventLoop(on_wakeup=wakeups.record)
        self.kicks = QueueKicks(self.loop, dev)
        dev.listener = DeviceListener(kick_fds_changed=self.kicks.rearm, actual_changed=dev.listener.actual_changed)
        self.kicks.rearm()
        self.control: ControlWatch | None = None

    def attach_control(self, chan: DeviceChannel, service: ControlService) -> None:
        self.control = ControlWatch(self.loop, chan, service)

    def detach_control(self) -> None:
        if self.control is not None:
            self.control.detach()
            self.control = None

    def wakeup(self, what: str) -> bool:
        """One wake-up of whatever is ready now (False: nothing was), as the VMM's loop
        runs it, then what the VMM does after each (the control socket's wait mask)."""
        self.wakeups.now = what
        served = self.loop.wakeup(0)
        if self.control is not None:
            self.control.update()
        return served

    def until_idle(self, what: str) -> int:
        """Wake-ups until nothing is ready (a device that yields re-kicks itself and is
        served again); NeverIdle past MAX_WAKEUPS. Returns how many there were."""
        for n in range(MAX_WAKEUPS):
            if not self.wakeup(what):
                return n
        raise NeverIdle(f"the loop still had work after {MAX_WAKEUPS} wake-ups ({what})")

    def kick(self, index: int, driver_fd: int, what: str) -> int:
        """The guest's kick (a write to its end of the kick eventfd), then the loop until idle."""
        os.eventfd_write(driver_fd, 1)
        return self.until_idle(what)

    def close(self) -> None:
        self.kicks.clear()
        self.detach_control()
        self.loop.close()
