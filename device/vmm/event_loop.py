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
import select
import selectors
from dataclasses import dataclass
from typing import Any, Callable

from device.vmm.balloon_device import BalloonDevice
from device.vmm.budget import WorkBudget, cpu_ns
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
    (the worst, the count over SLOW_WAKEUP_S, and `on_wakeup(cpu_s)` if given).

    It waits on an epoll object itself rather than through `selectors`, whose select()
    costs 3-4 us more on a request's round trip (cache-cold after the request's
    discards, docs/BENCHMARKS.md); handlers still get selectors' masks (EVENT_READ,
    EVENT_WRITE), and a file object closed before it is unwatched is unwatched by the
    number it was watched under, as selectors does."""

    def __init__(self, on_wakeup: Callable[[float], None] | None = None) -> None:
        self.ep = select.epoll()
        self.handlers: dict[int, EventHandler] = {}
        self._fds: dict[Any, int] = {}    # file object (or fd) as watched -> its fd
        self.on_wakeup = on_wakeup
        self.wakeups = 0                  # wake-ups that served something
        self.max_wakeup_cpu_s = 0.0       # CPU time of the costliest one
        self.wakeups_over_10ms = 0

    def watch(self, fileobj: Any, handler: EventHandler, events: int = selectors.EVENT_READ) -> None:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        if fileobj in self._fds or fd in self.handlers:
            raise KeyError(f"{fileobj!r} (fd {fd}) is already watched")
        self.ep.register(fd, _epoll_mask(events))
        self._fds[fileobj] = fd
        self.handlers[fd] = handler

    def unwatch(self, fileobj: Any) -> None:
        """Stop waiting on fileobj (gone already: nothing to do)."""
        fd = self._fds.pop(fileobj, None)
        if fd is None:
            return
        self.handlers.pop(fd, None)
        try:
            self.ep.unregister(fd)
        except OSError:                   # closed already: epoll dropped it with its last reference
            pass

    def modify(self, fileobj: Any, events: int) -> None:
        self.ep.modify(self._fds[fileobj], _epoll_mask(events))

    def wakeup(self, timeout: float | None) -> bool:
        """Wait up to `timeout` s (0: only what is ready now) and serve what woke the loop.
        False when nothing did."""
        events = self.ep.poll(-1 if timeout is None else timeout, len(self.handlers) or 1)
        if not events:
            return False
        t_cpu = cpu_ns()
        # Handlers are looked up once, at wake-up, as epoll reported the fds.
        if len(events) == 1:              # the usual wake-up on the PFN path: one kick
            fd, ev = events[0]
            handler = self.handlers.get(fd)
            budget = WorkBudget(woke_cpu_ns=t_cpu)
            if handler is not None:
                handler.serve(_selector_mask(ev), budget)
        else:
            budget = WorkBudget()         # shared by every queue served in this wake-up
            ready = sorted(((self.handlers[fd], _selector_mask(ev)) for fd, ev in events if fd in self.handlers),
                           key=lambda r: r[0].queue_work)
            for handler, mask in ready:
                handler.serve(mask, budget)
        # the clock the queue read as it finished, when it was all this wake-up served
        done = budget.served_cpu_ns if budget.served_cpu_ns is not None else cpu_ns()
        spent = (done - t_cpu) / 1e9
        self.wakeups += 1
        self.max_wakeup_cpu_s = max(self.max_wakeup_cpu_s, spent)
        self.wakeups_over_10ms += spent > SLOW_WAKEUP_S
        if self.on_wakeup is not None:
            self.on_wakeup(spent)
        return True

    def close(self) -> None:
        self.ep.close()


def _epoll_mask(events: int) -> int:
    return (select.EPOLLIN if events & selectors.EVENT_READ else 0) | \
        (select.EPOLLOUT if events & selectors.EVENT_WRITE else 0)


def _selector_mask(ev: int) -> int:
    """epoll's events as selectors reports them: an error or hang-up is both readable
    and writable, so whoever waits for either hears of it."""
    return (selectors.EVENT_WRITE if ev & ~select.EPOLLIN else 0) | \
        (selectors.EVENT_READ if ev & ~select.EPOLLOUT else 0)


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
        """The loop saw queue idx's kick: read the device's own kick fd (the probes count
        reads of that fd as device wake-ups), then serve the queue within the wake-up's
        budget; unless a request served earlier in this wake-up replaced or closed its fd
        (it is then watched anew, or not at all)."""
        if self.registered.get(idx, (None, None))[0] != fd:
            return
        try:
            os.eventfd_read(fd)
            self.reads += 1        # a wake-up is a read that returned data, as the probe counts it
        except BlockingIOError:
            pass                   # emptied meanwhile (the guest holds the same eventfd): look anyway
        self.device.process_queue(idx, budget)

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
