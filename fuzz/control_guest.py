"""The hostile guest's end of a control-plane session: its socket, eventfds and rings.

It sends whatever the case says (and remembers which packets were well formed, each
owing one reply), reads replies and checks their framing, keeps the requests the VMM
sends it (SET_DIRTY_LOG), and writes its rings with the raw guest's RawRing. Every
byte it writes into guest RAM is recorded as "named" by _named_by, the bound the
discard oracle uses.
"""
from __future__ import annotations

import os
import socket
import struct

import numpy as np

from device.guest.raw_guest import RawRing, RingAddrs
from device.vmm.balloon_device import BalloonDevice
from device.virtio import control
from device.virtio.layout import PAGE_SHIFT
from device.virtio.ram import GuestRAM
from fuzz.control_cases import REQ_BUF, ring_base


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

    def __init__(self, sock: socket.socket, state, dev: BalloonDevice) -> None:
        self.sock, self.state, self.dev = sock, state, dev
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
        fds = [open_fd(k, self.state.ram) for k in kinds]
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
        self.state.ram.mem[gpa:gpa + len(data)] = data
        self.named |= _named_by(data, gpa, self.state.regions.max_pfn)

    def post(self, q: int, bufs: list[tuple[int, int, bool]]) -> bool:
        """Put one chain of (gpa, len, writable) on queue q's ring, if the session set the
        queue up where the guest keeps it (ring_base(q), size 8)."""
        a = RingAddrs.at(ring_base(q), 8)
        v = self.dev.vrings.get(q)
        if v is None or (v.desc_gpa, v.avail_gpa, v.used_gpa, v.size) != (a.desc, a.avail, a.used, 8):
            return False
        ring = self.rings.get(q)
        if ring is None:
            ring = self.rings[q] = RawRing(self.state.ram.mem, self.state.regions.translate, a)
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


