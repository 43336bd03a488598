"""Control-plane fuzzer: hostile message sequences against the VMM's control service.

Each execution is one guest session, in-process but over the real pieces: a
SOCK_SEQPACKET socket pair, the VMM's DeviceChannel and ControlService
(device/vmm/control_peer.py), a fresh BalloonDevice over a real memfd, real eventfds,
and the VMM's own event loop code (device/vmm/event_loop.py through fuzz/wakeups.py:
control socket first, then kicks under the wake-up's WorkBudget). The guest sends generated and mutated
sequences: well-formed requests in and out of order, every request code, payloads
of any size (0 to past the 4096-byte limit), lying size fields, bad versions, reply
flags, zero-length and short packets, fds of every kind (eventfd, the memfd, pipes,
sockets, /dev/null) on any request, SET_DIRTY_LOG from the guest, kicks, and reads
withheld (requests sent while replies pile up, then drained, or never).

Oracle, per execution:
  crash        anything escaping the device or the service, or `control-internal` /
               `device-internal` counted, or a reply that breaks the framing, or a
               request that got no reply or two (checked once the guest drains), or
               a file descriptor the VMM side leaked;
  slow-wakeup  one wake-up used more than WAKEUP_BOUND_S of CPU time (the monitor
               would wait that long), the first time it happens;
  hang         the execution passed the fuzz time limit, or the loop never went idle;
  oob-discard  a page lost its data (memfd SEEK_DATA) that the guest never named in
               an inflate request (the only requests it writes are its `inflate`
               steps; every other byte of guest RAM is the fill pattern or zero,
               which names no RAM page in any wire format).
"""
from __future__ import annotations

import os
import socket

import numpy as np

from device.guest.raw_guest import RingAddrs
from device.vmm.balloon_device import BalloonDevice
from device.rig import DeviceRig
from device.vmm.control_peer import ControlService, DeviceChannel
from device.vmm.hint_queues import HintQueues
from device.virtio import control
from device.virtio.protocols import protocol_device_features
from device.virtio.hint_format import hint_device_features
from device.virtio.layout import PAGE_SHIFT
from device.virtio.ram import GuestRAM, memfd_data_extents
from fuzz.control_cases import LOW, PATTERN, layout, regions, ring_base
from fuzz.control_guest import Guest, fd_count
from fuzz.wakeups import FuzzLoop, NeverIdle, Wakeups
from fuzz.time_limit import guarded


class ControlWorkerState:
    """One worker's state for the control-plane and migration sessions: the guest RAM
    (a sealed memfd, filled with the pattern), the open-fd count between sessions (a
    leak makes it grow) and the count of volatile sessions."""

    def __init__(self) -> None:
        self.layout = layout()               # the device's table; the guest and the oracle use `regions`
        self.regions = regions()
        self.ram = GuestRAM.create(self.layout, name="balloon-lab-fuzz-control")
        self.ram.mem[:] = bytes([PATTERN]) * self.ram.size
        self.ram.mem[:LOW] = bytes(LOW)
        self.pristine = np.frombuffer(bytes(self.ram.mem), dtype=np.uint8).copy()
        self.expected = tuple(memfd_data_extents(self.ram.fd, self.ram.size))
        self.fds: int | None = None          # open fds between executions (a leak makes it grow)
        self.volatile = 0                    # executions whose oracle allowed every page (volatile())

    def restore(self) -> np.ndarray:
        """memfd pages that lost their data in the last execution (then every byte is
        put back as it was, so each execution starts from the same memory)."""
        ext = tuple(memfd_data_extents(self.ram.fd, self.ram.size))
        lost = np.zeros(0, dtype=np.int64)
        if ext != self.expected:
            mask = np.zeros(self.ram.size >> PAGE_SHIFT, dtype=bool)
            for o, n in ext:
                mask[o >> PAGE_SHIFT:(o + n) >> PAGE_SHIFT] = True
            want = np.zeros_like(mask)
            for o, n in self.expected:
                want[o >> PAGE_SHIFT:(o + n) >> PAGE_SHIFT] = True
            lost = np.flatnonzero(want & ~mask)
        cur = np.frombuffer(self.ram.mem, dtype=np.uint8).reshape(-1, 1 << PAGE_SHIFT)
        want = self.pristine.reshape(-1, 1 << PAGE_SHIFT)
        for pg in np.flatnonzero((cur != want).any(axis=1)).tolist():     # only the pages that changed
            cur[pg] = want[pg]
        del cur
        return lost

    def close(self) -> None:
        self.ram.close()


def direct_setup(rig: DeviceRig, guest: Guest, queues: list[int]) -> None:
    """RESET, then the start-up sequence applied to the device directly (what the
    messages of control_cases._setup_steps do, without their cost; DeviceRig.start):
    most executions start from a live device. The guest keeps its own descriptor of
    each kick eventfd."""
    rig.device.reset()
    rig.start({q: ring_base(q) for q in queues}, 8, zero=False)
    for q in rig.device.kick_fds:                   # the queues set up just now
        old = guest.fds.pop(q, None)
        if old is not None:
            os.close(old)
        guest.fds[q] = os.dup(rig.driver_kick_fds[q])


def volatile(dev: BalloonDevice, seen: set) -> bool:
    """True when a queue was set up (at any time, `seen`) over the low area where the
    guest writes its rings and requests, other than where the guest keeps it: the
    device may then read its own used-ring writes as requests, which no model of the
    guest's bytes bounds. Such executions allow every page (counted, rare)."""
    for q, desc, avail, used, size in seen:
        a = RingAddrs.at(ring_base(q), 8) if q < 8 else None
        if a is not None and (desc, avail, used, size) == (a.desc, a.avail, a.used, 8):
            continue
        lo = min(desc, avail, used)
        hi = max(desc + 16 * size, avail + 6 + 2 * size, used + 6 + 8 * size)
        if lo < LOW and hi > 0x1000:
            return True
    return False


def _well_formed(data: bytes) -> int | None:
    """The request code if the device must answer this packet, else None."""
    if len(data) < control.HEADER.size:
        return None
    req, flags, size = control.HEADER.unpack_from(data)
    if flags & 3 != control.VERSION or size != len(data) - control.HEADER.size or size > control.MAX_PAYLOAD:
        return None
    return None if flags & control.FLAG_REPLY else req


def run_control(state: ControlWorkerState, case: dict, limit_s: float, *, extra=None) -> tuple[str | None, str, tuple]:
    """One session. Returns (failure, detail, signature). `extra` lets the migration
    fuzzer add its own steps and checks: extra.step(step, ctx) -> True when it served
    the step, extra.check(ctx) -> (failure or None, detail), extra.signature(ctx)."""
    offered = protocol_device_features(case["proto"]) | hint_device_features(case["hint"])
    rig = DeviceRig(state.ram, protocol=case["proto"], features=offered)
    dev = rig.device
    hints = HintQueues(dev)
    hints.register_queues(dev.register_queue)
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    mine.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)    # a full socket after a few replies
    chan = DeviceChannel(mine, max_queued=case["max_queued"])
    loop = None
    failure, detail = None, ""
    guest = Guest(theirs, state, dev)
    ctx = {"dev": dev, "hints": hints, "guest": guest, "chan": chan, "state": state, "expect": [], "case": case}

    def on_reply(msg: control.Message) -> bool:      # as MigrationController.on_control_reply
        exp = ctx["expect"]
        if not msg.is_reply or not exp or exp[0] != msg.req:
            return False
        exp.pop(0)
        control._close(msg.fds)
        return True

    wake = Wakeups()
    loop = FuzzLoop(dev, wake)                      # the VMM's own loop code, real budget per wake-up
    gone: list[str] = []

    def on_gone(why: str) -> None:                  # as VMM._guest_gone: stop watching the guest
        gone.append(why)
        loop.detach_control()
        loop.kicks.clear()

    svc = ControlService(chan, dev, on_reply, on_gone)
    loop.attach_control(chan, svc)
    seen: set[tuple] = set()                        # every ring layout the device was given

    def wakeup(what: str) -> bool:
        served = loop.wakeup(what)
        seen.update((q, v.desc_gpa, v.avail_gpa, v.used_gpa, v.size) for q, v in dev.vrings.items())
        return served

    ctx["loop"], ctx["wakeup"], ctx["gone"], ctx["wake"] = loop, wakeup, gone, wake
    def exec_() -> None:        # anything escaping the service or the device is a crash
        for i, step in enumerate(case["steps"]):
            kind = step[0]
            what = f"step {i}: {kind}"
            if extra is not None and extra.step(step, ctx):
                pass
            elif kind == "msg":
                _, req, flags, size, payload, kinds = step
                body = control.U64.pack(dev.device_features).hex() if payload == "@offered" else payload
                body = bytes.fromhex(body)
                data = control.HEADER.pack(req & 0xFFFFFFFF, flags & 0xFFFFFFFF,
                                     (len(body) if size is None else size) & 0xFFFFFFFF) + body
                guest.send(data, kinds, _well_formed(data))
                wakeup(what)
            elif kind == "raw":
                data = bytes.fromhex(step[1])
                guest.send(data, [], _well_formed(data))
                wakeup(what)
            elif kind == "serve":
                for _ in range(step[1]):
                    if not wakeup(what):
                        break
            elif kind == "read":
                guest.read(step[1])
            elif kind == "flood":
                for _ in range(step[1]):
                    guest.send(control.HEADER.pack(control.Req.GET_STATUS, control.VERSION, 0), [], control.Req.GET_STATUS)
                    if len(guest.sent_requests) % 7 == 0:
                        wakeup(what)
            elif kind == "kick":
                fd = guest.fds.get(step[1])
                if fd is not None:
                    os.eventfd_write(fd, 1)
                    wakeup(what)
            elif kind == "inflate":
                guest.inflate(step[1])
                wakeup(what)
            elif kind == "setup":
                direct_setup(rig, guest, step[1])
                loop.kicks.rearm()          # the rig installs kick fds directly, as SET_VRING_KICK would
            elif kind == "hup":
                guest.close()
                wakeup(what)
        # drain: the guest reads everything, the loop serves until quiet
        idle, drained = 0, 0
        while idle < 2 and not gone:
            drained += 1
            if drained > 20_000:
                raise NeverIdle("the loop and the guest never went quiet while draining")
            progressed = wakeup("draining")
            got = guest.read(1 << 30)
            idle = 0 if progressed or got else idle + 1

    _, failure, detail = guarded(exec_, limit_s, hangs=(NeverIdle,))
    errors = dict(dev.errors)
    if failure is None and (errors.get("control-internal") or errors.get("device-internal")):
        failure, detail = "crash", f"internal error counted: {errors}"
    if failure is None and wake.failure() is not None:
        failure, detail = wake.failure()
    if failure is None and guest.bad_reply:
        failure, detail = "crash", guest.bad_reply
    if failure is None and not guest.closed and not gone:
        want = guest.sent_requests
        # replies to requests the device could not parse are none; every parsed request has one
        if guest.replies != want[:len(guest.replies)] or len(guest.replies) != len(want):
            failure, detail = "crash", (f"{len(want)} well-formed requests, {len(guest.replies)} replies "
                                        f"(first requests {want[:6]}, replies {guest.replies[:6]})")
    sig = ("control", case["proto"], case["hint"], tuple(sorted(errors)), bool(dev.status & 64),
           dev.live, bool(chan.throttle_episodes), bool(gone), bool(dev.inflate.pages))
    ballooned = set(np.flatnonzero(dev.ballooned_np == 1).tolist())
    vol = volatile(dev, seen | {(q, v.desc_gpa, v.avail_gpa, v.used_gpa, v.size) for q, v in dev.vrings.items()})
    ctx["volatile"] = vol
    state.volatile += vol
    if failure is None and extra is not None:
        failure, detail = extra.check(ctx)
        sig += extra.signature(ctx)
    guest.close()
    loop.close()
    try:
        dev.reset()
    except Exception as e:
        failure, detail = failure or "crash", detail or f"reset: {type(e).__name__}: {e}"
    chan.close()
    rig.close()
    if extra is not None:
        extra.close()
    lost = state.restore()
    if failure is None and not vol:
        lost_pfns = set(state.regions.offset_to_pfn(lost << PAGE_SHIFT).tolist()) if lost.size else set()
        named = guest.named
        if any(p < LOW >> PAGE_SHIFT for p in named):
            # the guest named a page of its own rings or requests: once discarded it reads
            # as zeros, and a PFN array of zeros names PFN 0 (found by this fuzzer)
            named = named | {0}
        out = (lost_pfns | ballooned) - named
        if out:
            failure, detail = "oob-discard", f"pages {sorted(out)[:8]} lost their data or were ballooned, never named"
    fds = fd_count()
    if state.fds is not None and fds != state.fds and failure is None:
        failure, detail = "crash", f"file descriptors leaked: {fds - state.fds}"
    state.fds = fds
    return failure, detail, sig

