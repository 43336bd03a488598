"""The VMM's one event loop, written once: the VMM runs it, and so does the fuzzer.

One thread serves the monitor, the control socket and every queue. A wake-up is one
select(): every ready fd's handler is served with the wake-up's shared WorkBudget
(device/vmm/budget.py), the guest's queue work last, so it never delays a monitor
answer; its CPU time is measured (getrusage, this thread), because a wake-up's CPU
time is how long the monitor may have to wait. The fuzzer (fuzz/) drives this same
code, one wake-up at a time, and checks every wake-up against its bound: the bound is
checked on the code the VMM runs, not on a model of it.

- EventLoop: the fd -> handler table (watch/unwatch/modify) and wakeup();
- QueueKicks: the device's kick eventfds on a loop (a readable kick fd is read, which
  the probes count as a device wake-up, and its queue is served within the budget;
  re-armed whenever the device's kick fds change);
- ControlWatch: the control socket on a loop, waiting for what the control service
  needs now (readable, writable while replies wait).
"""
from __future__ import annotations

import os
import selectors
from dataclasses import dataclass
from typing import Any, Callable

from device.vmm.balloon_device import BalloonDevice
from device.vmm.budget import WorkBudget, cpu_time
from device.vmm.control_peer import ControlService, DeviceChannel

SLOW_WAKEUP_S = 0.010         # counted in the VMM's `loop.wakeups_over_10ms_cpu`


@dataclass(frozen=True)
class EventHandler:
    """What the loop does when one fd it waits on is ready: serve(mask, budget), with the
    wake-up's shared WorkBudget. Guest queue work (kicks) is served after everything
    else that woke the loop, so it never delays a monitor answer."""

    serve: Callable[[int, WorkBudget], None]
    queue_work: bool = False


class EventLoop:
    """The fd -> handler table and one wake-up at a time; each wake-up's CPU time kept
    (the worst, the count over SLOW_WAKEUP_S, and `on_wakeup(cpu_s)` if given)."""

    def __init__(self, on_wakeup: Callable[[float], None] | None = None) -> None:
        self.sel = selectors.DefaultSelector()
        self.handlers: dict[int, EventHandler] = {}
        self.on_wakeup = on_wakeup
        self.wakeups = 0                  # wake-ups that served something
        self.max_wakeup_cpu_s = 0.0       # CPU time of the costliest one
        self.wakeups_over_10ms = 0

    def watch(self, fileobj: Any, handler: EventHandler, events: int = selectors.EVENT_READ) -> None:
        key = self.sel.register(fileobj, events)
        self.handlers[key.fd] = handler

    def unwatch(self, fileobj: Any) -> None:
        """Stop waiting on fileobj (gone already: nothing to do)."""
        try:
            key = self.sel.unregister(fileobj)
        except (KeyError, ValueError):
            return
        self.handlers.pop(key.fd, None)

    def modify(self, fileobj: Any, events: int) -> None:
        self.sel.modify(fileobj, events)

    def wakeup(self, timeout: float | None) -> bool:
        """Wait up to `timeout` s (0: only what is ready now) and serve what woke the loop.
        False when nothing did."""
        events = self.sel.select(timeout=timeout)
        if not events:
            return False
        t_cpu = cpu_time()
        budget = WorkBudget()             # shared by every queue served in this wake-up
        # Handlers are looked up once, at wake-up, as the selector reported the fds.
        if len(events) == 1:              # the usual wake-up on the PFN path: one kick
            key, mask = events[0]
            handler = self.handlers.get(key.fd)
            if handler is not None:
                handler.serve(mask, budget)
        else:
            ready = sorted(((self.handlers[key.fd], mask) for key, mask in events if key.fd in self.handlers),
                           key=lambda r: r[0].queue_work)
            for handler, mask in ready:
                handler.serve(mask, budget)
        spent = cpu_time() - t_cpu
        self.wakeups += 1
        self.max_wakeup_cpu_s = max(self.max_wakeup_cpu_s, spent)
        self.wakeups_over_10ms += spent > SLOW_WAKEUP_S
        if self.on_wakeup is not None:
            self.on_wakeup(spent)
        return True

    def close(self) -> None:
        self.sel.close()


class QueueKicks:
    """The device's kick eventfds, watched on a loop.

    The loop watches its own duplicate of each kick fd, never the device's: the device
    closes its fd on a reset or a new SET_VRING_KICK *before* it tells the loop, and
    epoll cannot then remove the closed number (EBADF). The guest still holds the
    eventfd, so epoll would keep the registration, and a guest that keeps its old kick
    eventfds readable would fill every wake-up's event list with fds the loop no longer
    knows: the monitor starves (found by the fuzzer once it ran this code). A duplicate
    is unwatched while still open, then closed."""

    def __init__(self, loop: EventLoop, device: BalloonDevice) -> None:
        self.loop, self.device = loop, device
        self.registered: dict[int, tuple[int, int]] = {}   # queue index -> (device's fd, our duplicate)
        self.reads = 0                           # kick reads that returned data: device wake-ups

    def rearm(self) -> None:
        """Watch exactly the device's kick fds now (the device's listener calls this)."""
        for idx, (fd, dup) in list(self.registered.items()):
            if self.device.kick_fds.get(idx) != fd:
                self._drop(idx, dup)
        for idx, fd in self.device.kick_fds.items():
            if idx not in self.registered:
                dup = os.dup(fd)
                self.loop.watch(dup, EventHandler(lambda mask, budget, idx=idx, fd=fd: self._ready(idx, fd, budget),
                                                  queue_work=True))
                self.registered[idx] = (fd, dup)

    def _drop(self, idx: int, dup: int) -> None:
        self.loop.unwatch(dup)
        os.close(dup)
        del self.registered[idx]

    def _ready(self, idx: int, fd: int, budget: WorkBudget) -> None:
        """The loop saw queue idx's kick: serve it, unless a request served earlier in this
        wake-up replaced or closed its fd (it is then watched anew, or not at all)."""
        if self.registered.get(idx, (None, None))[0] == fd:
            self.serve(fd, idx, budget)

    def serve(self, fd: int, index: int, budget: WorkBudget) -> None:
        """Read the device's own kick fd (the probes count reads of that fd as device
        wake-ups), then serve the queue within the wake-up's budget."""
        try:
            os.eventfd_read(fd)
            self.reads += 1        # a wake-up is a read that returned data, as the probe counts it
        except BlockingIOError:
            pass                   # emptied meanwhile (the guest holds the same eventfd): look anyway
        self.device.process_queue(index, budget)

    def clear(self) -> None:
        for idx, (_fd, dup) in list(self.registered.items()):
            self._drop(idx, dup)


class ControlWatch:
    """The control socket on a loop, waiting for what its service needs now."""

    def __init__(self, loop: EventLoop, chan: DeviceChannel, service: ControlService) -> None:
        self.loop, self.chan, self.service = loop, chan, service
        loop.watch(chan.sock, EventHandler(lambda mask, budget: service.on_event(mask)))

    def update(self) -> None:
        """After a wake-up: readable, and writable while replies wait (control_peer.py)."""
        mask = self.service.wanted()
        if mask and mask != self.service.mask:
            self.loop.modify(self.chan.sock, mask)
            self.service.mask = mask

    def detach(self) -> None:
        self.loop.unwatch(self.chan.sock)
