"""The VMM's event loop (device/vmm/event_loop.py) with real eventfds, sockets and a device.

A guest that resets the device (or replaces its kick eventfds) keeps its own ends of the
old eventfds. The device closes its ends before it tells the loop, so if the loop had
registered those fds, epoll could not remove them (EBADF on a closed number) and would
go on reporting the guest's writes to them under numbers the loop no longer knows. Each
such stale event takes a slot of a wake-up's event list, sized by what the loop
watches: with enough of them kept readable, the monitor's socket is never reported and
the monitor starves. Found by the fuzzer once it ran this loop (fuzz/wakeups.py).
"""
from __future__ import annotations

import os
import socket

from device.vmm.event_loop import EventHandler, EventLoop, QueueKicks
from device.virtio.transport import DeviceListener

RINGS = {0: 0x10000, 1: 0x11000}


def test_old_kick_eventfds_the_guest_keeps_readable_cannot_starve_the_monitor(make_device_rig):
    rig = make_device_rig(mib=64, protocol="pfn")
    dev = rig.device
    loop = EventLoop()
    kicks = QueueKicks(loop, dev)
    dev.listener = DeviceListener(kick_fds_changed=kicks.rearm)
    monitor, client = socket.socketpair()
    answered: list[bytes] = []
    loop.watch(monitor, EventHandler(lambda mask, budget: answered.append(monitor.recv(64))))
    kept: list[int] = []
    try:
        for _ in range(3):                   # set up, keep the guest's ends, reset: three times
            rig.start(RINGS, 8)
            kicks.rearm()                    # (the rig installs kick fds directly; SET_VRING_KICK tells the loop)
            kept += [os.dup(fd) for fd in rig.driver_kick_fds.values()]
            dev.reset()                      # closes the device's ends, then tells the loop
        for fd in kept:
            os.eventfd_write(fd, 1)          # and keeps every old one readable
        client.send(b"query-status")
        assert loop.wakeup(0)
        assert answered == [b"query-status"]
        assert not loop.wakeup(0)            # nothing else is ready for the loop
    finally:
        for fd in kept:
            os.close(fd)
        kicks.clear()
        loop.close()
        monitor.close()
        client.close()


def test_kicks_are_read_on_the_devices_own_fd_and_served(make_device_rig):
    """The loop watches its duplicate, but reads the device's fd (the probes count reads of
    that fd as device wake-ups) and serves the queue."""
    rig = make_device_rig(mib=64, protocol="pfn")
    rig.start(RINGS, 8)
    loop = EventLoop()
    kicks = QueueKicks(loop, rig.device)
    kicks.rearm()
    try:
        rig.post(0, [(0x20000, 4, False)])
        rig.write(0x20000, (0x100).to_bytes(4, "little"))
        os.eventfd_write(rig.driver_kick_fds[0], 1)
        assert loop.wakeup(0) and kicks.reads == 1
        assert rig.device.inflate.pages == 1
        dup = kicks.registered[0][1]
        assert dup != rig.device.kick_fds[0]
    finally:
        kicks.clear()
        loop.close()


def test_a_real_vmm_keeps_answering_a_guest_that_keeps_its_old_kick_eventfds_readable():
    """The same attack on the real VMM process, from the hostile raw guest: set up the
    queues, reset, three times, keeping every old kick eventfd and writing to each. With
    the stale registrations, epoll reported them on every call: the VMM's loop never
    slept again (a CPU burnt for good) and reached the monitor only every few turns. Now
    it sleeps, the monitor answers at once, and the new queues are still served."""
    import time
    from lab.trials.model.hostile_vm import HostileVM

    with HostileVM(256, "pfn") as vm:
        g = vm.guest
        g.map_memory()
        old: list[int] = []
        for _ in range(3):
            g.negotiate()
            for index, base in RINGS.items():
                old.append(os.dup(g.add_queue(index, base).kick_fd))
            assert g.driver_ok()[0] == 0
            g.reset()
        try:
            for fd in old:
                os.eventfd_write(fd, 1)            # readable for good: the guest never reads them
            cpu0 = vmm_cpu_s(vm.vmm.pid)
            time.sleep(1.0)
            spent = vmm_cpu_s(vm.vmm.pid) - cpu0
            assert spent < 0.05, spent                    # an idle VMM sleeps in its loop (a spinning one: 0.2-1 s)
            t0 = time.monotonic()
            assert vm.qmp.execute("query-status", timeout=5)["running"]
            assert time.monotonic() - t0 < 1.0
            g.negotiate()                          # and the device still serves new queues
            q = g.add_queue(0, RINGS[0])
            assert g.driver_ok()[0] == 0
            g.write(0x20000, (0x100).to_bytes(4, "little"))
            q.ring.desc(0, 0x20000, 4, 0, 0)
            q.offer([0])
            q.kick()
            assert q.wait_used(1, 5.0)
            assert vm.qmp.execute("x-balloon-lab-counters", timeout=5)["inflate"]["pages"] == 1
        finally:
            for fd in old:
                os.close(fd)


def vmm_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_the_loop_reports_selectors_masks_and_unwatches_a_closed_socket():
    """The loop waits on epoll itself: its handlers still get selectors' masks (readable,
    writable once asked for, both on a hang-up), and a socket closed before it is
    unwatched is unwatched all the same, as selectors does."""
    import selectors
    loop = EventLoop()
    a, b = socket.socketpair()
    seen: list[int] = []
    try:
        loop.watch(a, EventHandler(lambda mask, budget: seen.append(mask)))
        assert not loop.wakeup(0)                       # nothing to read yet
        b.send(b"x")
        assert loop.wakeup(0) and seen[-1] == selectors.EVENT_READ
        a.recv(1)
        loop.modify(a, selectors.EVENT_READ | selectors.EVENT_WRITE)
        assert loop.wakeup(0) and seen[-1] == selectors.EVENT_WRITE
        loop.modify(a, selectors.EVENT_READ)
        b.close()                                       # the peer hangs up
        assert loop.wakeup(0) and seen[-1] == selectors.EVENT_READ | selectors.EVENT_WRITE
        a.close()
        loop.unwatch(a)                                 # closed first: no error, and it is gone
        assert not loop.handlers and not loop.wakeup(0)
        loop.unwatch(a)                                 # twice: nothing to do
    finally:
        a.close()
        b.close()
        loop.close()
