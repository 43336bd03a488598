"""Control-plane fuzzer: hostile message sequences against the VMM's control service.

Each execution is one guest session, in-process but over the real pieces: a
SOCK_SEQPACKET socket pair, the VMM's DeviceChannel and ControlService
(device/host/control_peer.py), a fresh BalloonDevice over a real memfd, real eventfds,
and `LoopModel`, one event-loop wake-up as device/host/vmm.py runs it (control socket
first, then kicks under one WorkBudget). The guest sends generated and mutated
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
  hang         one wake-up used more than WAKEUP_BOUND_S of CPU time (the monitor
               would wait that long), or the execution passed the fuzz time limit;
  oob-discard  a page lost its data (memfd SEEK_DATA) that the guest never named in
               an inflate request (the only requests it writes are its `inflate`
               steps; every other byte of guest RAM is the fill pattern or zero,
               which names no RAM page in any wire format).
"""
from __future__ import annotations

import os
import random
import select
import selectors
import socket
import struct
import time

import numpy as np

from device.virtio import control
from device.host.balloon_device import BalloonDevice
from device.host.budget import WorkBudget, cpu_time
from device.host.control_peer import ControlService, DeviceChannel
from device.virtio.features import QUEUE_FEATURE, protocol_device_features
from device.host.hint_queues import HintQueues
from device.virtio.hint_format import hint_device_features
from device.virtio.ram import GuestRAM, memfd_data_extents
from device.virtio.layout import PAGE_SHIFT, GuestLayout, Region
from device.virtio.transport import VringConfig
from device.guest.raw_guest import RawRing, RingAddrs

KiB256 = 256 << 10
WAKEUP_BOUND_S = 0.050            # one wake-up's CPU time: the monitor's worst wait (docs/BAD_INPUT.md)
PROTOCOLS = ("pfn", "pfn-ranges", "bitmap", "chunks")
HINTS = ("none", "upstream", "bitmap")
FD_KINDS = ("eventfd", "memfd", "pipe", "socket", "devnull")
RING0 = 0x10000                   # where `inflate` steps put queue 0's ring (size 8) ...
REQ_BUF = 0x12000                 # ... and their request
LOW = 0x20000                     # rings and buffers the guest writes live below this
PATTERN = 0xA5                    # every other byte of guest RAM (names no RAM page in any format)
QUEUE_GPAS = (0x1000, 0x3000, 0x5000, 0x7000, 0x9000, 0xB000, RING0, KiB256 - 0x100, 2 * KiB256,
              3 * KiB256 - 0x1000, 0x4000_0000_0000)
STATUS_VALUES = (0, 1, 3, 11, 15, 4, 8, 64, 128, 0xFF, 0x10F)


def layout() -> GuestLayout:
    """256 KiB of RAM, a 256 KiB hole, 256 KiB of RAM: small, with a hole to aim at."""
    return GuestLayout((Region(0, KiB256, 0), Region(2 * KiB256, KiB256, KiB256)))


# ======================================================================================
# Generation and mutation
# ======================================================================================
def _payload(rng: random.Random, req: int) -> bytes:
    """A plausible payload for `req`, often slightly wrong."""
    r = rng.random()
    if r < 0.08:
        return bytes(rng.choice([0, 1, 3, 11, 4095, 4096, 4097, 4200]) * [0])[:0] + \
            rng.randbytes(rng.choice([0, 1, 3, 11, 4095, 4096, 4097, 4200]))
    if req == control.Req.SET_FEATURES:
        feats = protocol_device_features(rng.choice(PROTOCOLS)) | hint_device_features(rng.choice(HINTS))
        return control.U64.pack(feats if r < 0.8 else rng.getrandbits(64))
    if req == control.Req.SET_STATUS:
        return control.U32.pack(rng.choice(STATUS_VALUES))
    if req in (control.Req.GET_CONFIG, control.Req.SET_CONFIG):
        off, size = rng.choice([(4, 4), (0, 16), (12, 4), (12, 8), (16, 0), (0, 0), (rng.randrange(20), rng.randrange(20))])
        data = b"" if req == control.Req.GET_CONFIG else rng.randbytes(size if rng.random() < 0.8 else rng.randrange(24))
        return control.CONFIG_ACCESS.pack(off, size) + data
    if req == control.Req.SET_VRING:
        q = rng.choice([0, 1, 2, 3, 5, 4, 6, 7])
        size = rng.choice([8, 8, 1, 2, 256, 32768, 0, 3, 65536])
        base = rng.choice(QUEUE_GPAS)
        a = RingAddrs.at(base, max(size, 1)) if size and not size & (size - 1) and size <= 32768 else \
            RingAddrs(size, base, base + 16 * 8, base + 0x100)
        return control.VRING.pack(q, size, a.desc, a.avail, a.used)
    if req in (control.Req.SET_VRING_KICK, control.Req.SET_VRING_CALL):
        return control.U32.pack(rng.choice([0, 1, 2, 3, 5, 6, 1 << 31]))
    if req == control.Req.SET_DIRTY_LOG:
        return struct.pack("<QQQQ", 768, 4096, 0, 8192)
    return b"" if r < 0.9 else rng.randbytes(rng.randrange(16))


def _fds_for(rng: random.Random, req: int) -> list[str]:
    takes = req in (control.Req.SET_VRING_KICK, control.Req.SET_VRING_CALL, control.Req.SET_CONFIG_CALL, control.Req.SET_DIRTY_LOG)
    if takes and rng.random() < 0.85:
        return ["eventfd"] if req != control.Req.SET_DIRTY_LOG else ["memfd"]
    if rng.random() < 0.1:
        return [rng.choice(FD_KINDS) for _ in range(rng.choice([1, 2, 8]))]
    return []


def _msg(rng: random.Random, req: int | None = None) -> list:
    if req is None:
        req = rng.choice(list(range(1, 14)) + [0, 14, 99, 0xFFFFFFFF])
    payload = _payload(rng, req)
    flags = control.VERSION
    if rng.random() < 0.05:
        flags = rng.choice([0, 2, 3, control.VERSION | control.FLAG_REPLY, 0xFFFFFFFF])
    size = None if rng.random() < 0.93 else rng.choice([0, len(payload) + 1, max(0, len(payload) - 1), 4097, 1 << 31])
    return ["msg", req, flags, size, payload.hex(), _fds_for(rng, req)]


def ring_base(q: int) -> int:
    return RING0 if q == 0 else 0x1000 + 0x2000 * q


def _setup_steps(rng: random.Random, queues: list[int]) -> list[list]:
    """A valid start-up sequence (docs/PROTOCOL.md), so executions reach DRIVER_OK."""
    R = control.Req
    st = [["msg", R.SET_STATUS, 1, None, control.U32.pack(3).hex(), []],
          ["msg", R.SET_FEATURES, 1, None, "@offered", []],
          ["msg", R.SET_STATUS, 1, None, control.U32.pack(11).hex(), []],
          ["msg", R.SET_CONFIG_CALL, 1, None, "", ["eventfd"]]]
    for q in queues:
        a = RingAddrs.at(ring_base(q), 8)
        st += [["msg", R.SET_VRING, 1, None, control.VRING.pack(q, 8, a.desc, a.avail, a.used).hex(), []],
               ["msg", R.SET_VRING_KICK, 1, None, control.U32.pack(q).hex(), ["eventfd"]],
               ["msg", R.SET_VRING_CALL, 1, None, control.U32.pack(q).hex(), ["eventfd"]]]
    st.append(["msg", R.SET_STATUS, 1, None, control.U32.pack(15).hex(), []])
    return st


def _step(rng: random.Random) -> list:
    r = rng.random()
    if r < 0.45:
        return _msg(rng)
    if r < 0.55:
        return ["raw", rng.randbytes(rng.choice([0, 1, 11, 12, 13, 100, 4108, 4109, 4609, 9000])).hex()]
    if r < 0.65:
        return ["serve", rng.choice([1, 2, 5, 20])]
    if r < 0.75:
        return ["read", rng.choice([0, 1, 5, 1000])]
    if r < 0.82:
        return ["flood", rng.choice([10, 40, 100])]            # requests, replies left unread
    if r < 0.90:
        return ["kick", rng.choice([0, 1, 2, 3, 5])]
    if r < 0.97:
        return ["inflate", sorted(rng.sample(range(0, 200), rng.choice([1, 2, 16])))]
    return ["hup"]


def gen_control(rng: random.Random) -> dict:
    queues = rng.choice([[0, 1], [0, 1, 2], [0], [0, 1, 2, 3, 5]])
    r = rng.random()
    steps = [["setup", queues]] if r < 0.7 else _setup_steps(rng, queues) if r < 0.85 else []
    steps += [_step(rng) for _ in range(rng.choice([1, 2, 4, 8, 16]))]
    return {"t": "control", "proto": rng.choice(PROTOCOLS), "hint": rng.choice(HINTS),
            "max_queued": rng.choice([1, 2, 8, 64]), "steps": steps}


def copy_steps(steps: list[list]) -> list[list]:
    """Copy a case's steps (each a list; a msg step's fd kinds too): a cheap deep copy."""
    return [[*st[:5], list(st[5])] if st[0] == "msg" else list(st) for st in steps]


def mutate_control(case: dict, rng: random.Random, pool: list[dict]) -> dict:
    c = dict(case, steps=copy_steps(case["steps"]))
    steps = c["steps"]
    for _ in range(rng.choice([1, 1, 2, 4])):
        r = rng.random()
        if r < 0.3 or not steps:
            steps.insert(rng.randrange(len(steps) + 1), _step(rng))
        elif r < 0.45:
            del steps[rng.randrange(len(steps))]
        elif r < 0.6:
            i, j = rng.randrange(len(steps)), rng.randrange(len(steps))
            steps[i], steps[j] = steps[j], steps[i]
        elif r < 0.75:
            s = steps[rng.randrange(len(steps))]
            if s[0] == "msg" and s[4] != "@offered":
                b = bytearray(bytes.fromhex(s[4]))
                if b:
                    b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
                s[4] = bytes(b).hex()
        elif r < 0.85 and pool:
            other = rng.choice(pool)["steps"]
            if other:
                k = rng.randrange(len(other))
                steps[rng.randrange(len(steps) + 1):0] = copy_steps(other[k:k + rng.choice([1, 3, 8])])
        else:
            c["max_queued"] = rng.choice([1, 2, 8, 64])
    del steps[200:]
    return c


# ======================================================================================
# One wake-up of the VMM's loop, as device/host/vmm.py runs it
# ======================================================================================
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
            self.vrings_seen.add((q, v.desc, v.avail, v.used, v.size))
        return True

    def on_gone(self, why: str) -> None:
        self.gone = why


def open_fd(kind: str, ram: GuestRAM) -> int:
    if kind == "eventfd":
        return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    if kind == "memfd":
        return os.dup(ram.fd)
    if kind == "pipe":
        r, w = os.pipe()
        os.close(w)
        return r
    if kind == "socket":
        a, b = socket.socketpair()
        b.close()
        return a.detach()
    return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# ======================================================================================
# Execution
# ======================================================================================
class ControlRig:
    """One worker's guest RAM (sealed memfd, filled with the pattern) for these fuzzers."""

    def __init__(self) -> None:
        self.layout = layout()
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


def _named_by(data: bytes, buf_gpa: int, max_pfn: int) -> set[int]:
    """Every RAM PFN the request bytes could name, read as a PFN array, a bitmap, or
    (chunks) the buffer's own range: the bound does not depend on the negotiated format."""
    out: set[int] = set()
    n = len(data) // 4
    out.update(int(p) for p in np.frombuffer(data[:4 * n], dtype="<u4") if p < max_pfn)
    if len(data) >= 32:
        start = struct.unpack_from("<Q", data, 16)[0]
        bits = np.unpackbits(np.frombuffer(data[32:], dtype=np.uint8), bitorder="little")
        out.update(int(p) for p in np.flatnonzero(bits) + start if p < max_pfn)
    out.update(range(buf_gpa >> PAGE_SHIFT, ((buf_gpa + max(len(data), 1) - 1) >> PAGE_SHIFT) + 1))
    return out


class Guest:
    """The hostile guest's end: its socket, its eventfds, and what it expects back."""

    def __init__(self, sock: socket.socket, rig: ControlRig, dev: BalloonDevice) -> None:
        self.sock, self.rig, self.dev = sock, rig, dev
        sock.setblocking(False)
        self.fds: dict[int, int] = {}          # queue -> its kick eventfd as the guest holds it
        self.sent_requests: list[int] = []     # well-formed requests, in order: each owes one reply
        self.replies: list[int] = []
        self.bad_reply: str | None = None
        self.closed = False
        self.named: set[int] = set()
        self.rings: dict[int, RawRing] = {}
        self.vmm_requests: list[tuple[int, bytes, list[int]]] = []   # requests the VMM sent us

    def send(self, data: bytes, kinds: list[str], req: int | None) -> None:
        if self.closed:
            return
        fds = [open_fd(k, self.rig.ram) for k in kinds]
        try:
            if fds:
                socket.send_fds(self.sock, [data], fds, socket.MSG_DONTWAIT)
            else:
                self.sock.send(data, socket.MSG_DONTWAIT)
            if req is not None:
                self.sent_requests.append(req)
                if req == control.Req.SET_VRING_KICK and kinds == ["eventfd"] and len(data) >= 16:
                    old = self.fds.pop(struct.unpack_from("<I", data, 12)[0], None)
                    if old is not None:
                        os.close(old)
                    self.fds[struct.unpack_from("<I", data, 12)[0]] = os.dup(fds[0])
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            pass
        finally:
            for fd in fds:
                os.close(fd)

    def read(self, n: int) -> int:
        got = 0
        while got < n and not self.closed:
            try:
                data, fds, _f, _a = socket.recv_fds(self.sock, control.HEADER.size + control.MAX_PAYLOAD + 1, control.MAX_FDS,
                                                    socket.MSG_DONTWAIT)
            except (BlockingIOError, ConnectionResetError):
                break
            if not data:
                break
            got += 1
            if len(data) >= control.HEADER.size and control.HEADER.unpack_from(data)[1] == control.VERSION:
                self.vmm_requests.append((control.HEADER.unpack_from(data)[0], bytes(data[control.HEADER.size:]), list(fds)))
                continue                             # a request from the VMM (SET_DIRTY_LOG)
            for fd in fds:
                os.close(fd)
            if len(data) < control.HEADER.size:
                self.bad_reply = f"reply of {len(data)} bytes"
                continue
            req, flags, size = control.HEADER.unpack_from(data)
            if size != len(data) - control.HEADER.size or flags != control.VERSION | control.FLAG_REPLY:
                self.bad_reply = f"reply framing: req {req} flags {flags:#x} size {size}, {len(data)} bytes"
            self.replies.append(req)
        return got

    def write(self, gpa: int, data: bytes) -> None:
        """Guest bytes in guest RAM: whatever they could name if read as a request is named."""
        self.rig.ram.mem[gpa:gpa + len(data)] = data
        self.named |= _named_by(data, gpa, self.rig.layout.max_pfn)

    def post(self, q: int, bufs: list[tuple[int, int, bool]]) -> bool:
        """Put one chain of (gpa, len, writable) on queue q's ring, if the session set the
        queue up where the guest keeps it (ring_base(q), size 8)."""
        a = RingAddrs.at(ring_base(q), 8)
        v = self.dev.vrings.get(q)
        if v is None or (v.desc, v.avail, v.used, v.size) != (a.desc, a.avail, a.used, 8):
            return False
        ring = self.rings.get(q)
        if ring is None:
            ring = self.rings[q] = RawRing(self.rig.ram.mem, self.rig.layout.translate, a)
        slot = ring.next_avail % 8
        n = len(bufs)
        for k, (g, ln, w) in enumerate(bufs):     # descriptors slot.. (a size-8 ring: at most 8)
            i = (slot + k) % 8
            ring.desc(i, g, ln, (2 if w else 0) | (1 if k + 1 < n else 0), (i + 1) % 8)
        ring.offer([slot])
        if q in self.fds:
            os.eventfd_write(self.fds[q], 1)       # and kick, as a driver does
        return True

    def inflate(self, pfns: list[int]) -> None:
        """An inflate request (a PFN array) on queue 0."""
        raw = struct.pack(f"<{len(pfns)}I", *pfns)
        if self.post(0, [(REQ_BUF, len(raw), False)]):
            self.write(REQ_BUF, raw)

    def close_vmm_requests(self) -> None:
        for _req, _p, fds in self.vmm_requests:
            for fd in fds:
                os.close(fd)
        self.vmm_requests.clear()

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        self.close_vmm_requests()
        if not self.closed:
            self.sock.close()
            self.closed = True


def direct_setup(dev: BalloonDevice, guest: Guest, queues: list[int]) -> None:
    """RESET, then the start-up sequence applied to the device directly (what the
    messages of _setup_steps do, without their cost): most executions start from a
    live device."""
    dev.reset()
    dev.driver_features = dev.device_features
    for q in queues:
        need = QUEUE_FEATURE.get(q)
        if need is not None and not dev.has(need):
            continue
        a = RingAddrs.at(ring_base(q), 8)
        dev.vrings[q] = VringConfig(8, a.desc, a.avail, a.used)
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        for table, fd in ((guest.fds, os.dup(kick)), (dev.kick_fds, kick),
                          (dev.call_fds, os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))):
            old = table.pop(q, None)
            if old is not None:
                os.close(old)
            table[q] = fd
    if dev.config_call_fd is not None:
        os.close(dev.config_call_fd)
    dev.config_call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    dev.activate()
    dev.status = 15


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


def run_control(rig: ControlRig, case: dict, limit_s: float, *, extra=None) -> tuple[str | None, str, tuple]:
    """One session. Returns (failure, detail, signature). `extra` lets the migration
    fuzzer add its own steps and checks: extra.step(step, ctx) -> True when it served
    the step, extra.check(ctx) -> (failure or None, detail), extra.signature(ctx)."""
    from lab.fuzz import Hang, _arm, _disarm, _hang_detail     # the shared time limit

    offered = protocol_device_features(case["proto"]) | hint_device_features(case["hint"])
    dev = BalloonDevice(rig.ram, offered, ranges_policy=case["proto"] == "pfn-ranges")
    hints = HintQueues(dev)
    hints.register_queues(dev.register_queue)
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    mine.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)    # a full socket after a few replies
    chan = DeviceChannel(mine, max_queued=case["max_queued"])
    loop = None
    failure, detail = None, ""
    guest = Guest(theirs, rig, dev)
    ctx = {"dev": dev, "hints": hints, "guest": guest, "chan": chan, "rig": rig, "expect": [], "case": case}

    def on_reply(msg: control.Message) -> bool:      # as MigrationController.on_control_reply
        exp = ctx["expect"]
        if not msg.is_reply or not exp or exp[0] != msg.req:
            return False
        exp.pop(0)
        control._close(msg.fds)
        return True

    loop = LoopModel(dev, None)                     # type: ignore[arg-type]
    svc = ControlService(chan, dev, on_reply, loop.on_gone)
    loop.svc = svc
    ctx["loop"] = loop
    try:
        _arm(limit_s)
        try:
            for step in case["steps"]:
                kind = step[0]
                if extra is not None and extra.step(step, ctx):
                    pass
                elif kind == "msg":
                    _, req, flags, size, payload, kinds = step
                    body = control.U64.pack(dev.device_features).hex() if payload == "@offered" else payload
                    body = bytes.fromhex(body)
                    data = control.HEADER.pack(req & 0xFFFFFFFF, flags & 0xFFFFFFFF,
                                         (len(body) if size is None else size) & 0xFFFFFFFF) + body
                    guest.send(data, kinds, _well_formed(data))
                    loop.wakeup()
                elif kind == "raw":
                    data = bytes.fromhex(step[1])
                    guest.send(data, [], _well_formed(data))
                    loop.wakeup()
                elif kind == "serve":
                    for _ in range(step[1]):
                        if not loop.wakeup():
                            break
                elif kind == "read":
                    guest.read(step[1])
                elif kind == "flood":
                    for _ in range(step[1]):
                        guest.send(control.HEADER.pack(control.Req.GET_STATUS, control.VERSION, 0), [], control.Req.GET_STATUS)
                        if len(guest.sent_requests) % 7 == 0:
                            loop.wakeup()
                elif kind == "kick":
                    fd = guest.fds.get(step[1])
                    if fd is not None:
                        os.eventfd_write(fd, 1)
                        loop.wakeup()
                elif kind == "inflate":
                    guest.inflate(step[1])
                    loop.wakeup()
                elif kind == "setup":
                    direct_setup(dev, guest, step[1])
                elif kind == "hup":
                    guest.close()
                    loop.wakeup()
            # drain: the guest reads everything, the loop serves until quiet
            idle = 0
            while idle < 2 and loop.gone is None:
                progressed = loop.wakeup()
                got = guest.read(1 << 30)
                idle = 0 if progressed or got else idle + 1
        finally:
            _disarm()
    except Hang:
        failure, detail = "hang", _hang_detail(limit_s)
    except Exception as e:      # anything escaping the service or the device is a crash
        failure, detail = "crash", f"{type(e).__name__}: {e}"
    errors = dict(dev.errors)
    if failure is None and (errors.get("control-internal") or errors.get("device-internal")):
        failure, detail = "crash", f"internal error counted: {errors}"
    if failure is None and loop.worst_wakeup_s > WAKEUP_BOUND_S:
        failure, detail = "hang", (f"one wake-up used {loop.worst_wakeup_s * 1e3:.1f} ms of CPU, more than the "
                                   f"{WAKEUP_BOUND_S * 1e3:.0f} ms bound")
    if failure is None and guest.bad_reply:
        failure, detail = "crash", guest.bad_reply
    if failure is None and not guest.closed and loop.gone is None:
        want = guest.sent_requests
        # replies to requests the device could not parse are none; every parsed request has one
        if guest.replies != want[:len(guest.replies)] or len(guest.replies) != len(want):
            failure, detail = "crash", (f"{len(want)} well-formed requests, {len(guest.replies)} replies "
                                        f"(first requests {want[:6]}, replies {guest.replies[:6]})")
    sig = ("control", case["proto"], case["hint"], tuple(sorted(errors)), bool(dev.status & 64),
           dev.live, bool(chan.throttle_episodes), loop.gone is not None, bool(dev.inflate.pages))
    ballooned = set(np.flatnonzero(dev.ballooned_np == 1).tolist())
    vol = volatile(dev, loop.vrings_seen | {(q, v.desc, v.avail, v.used, v.size) for q, v in dev.vrings.items()})
    ctx["volatile"] = vol
    rig.volatile += vol
    if failure is None and extra is not None:
        failure, detail = extra.check(ctx)
        sig += extra.signature(ctx)
    guest.close()
    try:
        dev.reset()
    except Exception as e:
        failure, detail = failure or "crash", detail or f"reset: {type(e).__name__}: {e}"
    chan.close()
    if extra is not None:
        extra.close()
    lost = rig.restore()
    if failure is None and not vol:
        lost_pfns = set(rig.layout.offset_to_pfn(lost << PAGE_SHIFT).tolist()) if lost.size else set()
        named = guest.named
        if any(p < LOW >> PAGE_SHIFT for p in named):
            # the guest named a page of its own rings or requests: once discarded it reads
            # as zeros, and a PFN array of zeros names PFN 0 (found by this fuzzer)
            named = named | {0}
        out = (lost_pfns | ballooned) - named
        if out:
            failure, detail = "oob-discard", f"pages {sorted(out)[:8]} lost their data or were ballooned, never named"
    fds = fd_count()
    if rig.fds is not None and fds != rig.fds and failure is None:
        failure, detail = "crash", f"file descriptors leaked: {fds - rig.fds}"
    rig.fds = fds
    return failure, detail, sig


