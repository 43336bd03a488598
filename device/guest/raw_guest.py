"""A raw, hostile guest: the control protocol and split rings written from the docs alone.

Tests use it to play an untrusted guest against the real VMM (`python -m device.vmm.process`).
Nothing here imports the lab's device code: the framing follows docs/PROTOCOL.md and
the ring layout docs/VIRTQUEUE.md (virtio 1.2 section 2.7), byte by byte, so a test
that passes also shows the documents are enough to drive the device, and a bug shared
by the lab's driver and device cannot hide itself. Every byte the device reads is
under the caller's control: malformed packets, descriptor loops, rings in the MMIO
hole, fds that are not eventfds.

How it connects: `HostileVM` starts the VMM with `--guest-cmd "python -m device.guest.raw_guest"`.
The VMM spawns that trampoline as its guest, passing `--control-fd N --agent PATH` as
it does for the real guest; the trampoline hands the control socket to the test over
the agent socket (SCM_RIGHTS) and then waits, so the test process itself holds the
guest's end of the control plane and the VMM still has a live guest process to watch.

    with HostileVM(guest_mib=3200) as vm:
        g = vm.guest
        g.map_memory(); g.negotiate(); q = g.add_queue(0, 0x10000); g.driver_ok()
        q.ring.desc(0, 3 << 30, 4096)         # a buffer in the MMIO hole
        q.offer([0]); q.kick()
        vm.counters()["errors"]               # {'ring-buffer-not-ram': 1}
"""
from __future__ import annotations

import argparse
import mmap
import os
import select
import socket
import struct
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable

# --- framing (docs/PROTOCOL.md "Framing") ---------------------------------------------
# What a launcher names as the VMM's guest program: python -m RAW_GUEST_MODULE
RAW_GUEST_MODULE = "device.guest.raw_guest"

HEADER = struct.Struct("<III")     # request, flags, size
VERSION = 1
FLAG_REPLY = 0x4
MAX_PAYLOAD = 4096

GET_FEATURES, SET_FEATURES, GET_MEM_TABLE, GET_CONFIG, SET_CONFIG, SET_VRING = 1, 2, 3, 4, 5, 6
SET_VRING_KICK, SET_VRING_CALL, SET_CONFIG_CALL, SET_STATUS, GET_STATUS, RESET = 7, 8, 9, 10, 11, 12
SET_DIRTY_LOG = 13

ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET, FAILED = 1, 2, 4, 8, 64, 128

# --- split ring (docs/VIRTQUEUE.md) ---------------------------------------------------
DESC = struct.Struct("<QIHH")      # addr, len, flags, next
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
PAGE = 4096


class RawError(RuntimeError):
    """The VMM did something this client did not expect (no reply, wrong reply)."""


@dataclass
class Packet:
    req: int
    flags: int
    payload: bytes
    fds: list[int]

    def result(self) -> tuple[int, str]:
        """(code, reason) of a RESULT payload: le64 signed code + UTF-8 reason."""
        if len(self.payload) < 8:
            raise RawError(f"reply to {self.req} is not a RESULT ({len(self.payload)} bytes)")
        return struct.unpack_from("<q", self.payload)[0], self.payload[8:].decode(errors="replace")


class RawControl:
    """The guest's end of the SOCK_SEQPACKET control socket, no validation of our own."""

    def __init__(self, sock: socket.socket, timeout: float = 10.0) -> None:
        self.sock = sock
        self.timeout = timeout

    def send_packet(self, data: bytes, fds: Iterable[int] = ()) -> None:
        """Send any bytes as one packet (a malformed header is the caller's choice)."""
        fds = list(fds)
        if fds:
            socket.send_fds(self.sock, [data], fds)
        else:
            self.sock.send(data)

    def send(self, req: int, payload: bytes = b"", fds: Iterable[int] = (), *, flags: int = VERSION,
             size: int | None = None) -> None:
        self.send_packet(HEADER.pack(req, flags, len(payload) if size is None else size) + payload, fds)

    def recv(self, timeout: float | None = None) -> Packet:
        r, _, _ = select.select([self.sock], [], [], self.timeout if timeout is None else timeout)
        if not r:
            raise RawError(f"no reply from the VMM within {self.timeout if timeout is None else timeout} s")
        data, fds, _, _ = socket.recv_fds(self.sock, HEADER.size + MAX_PAYLOAD + 1, 8)
        if not data:
            raise RawError("the VMM closed the control socket")
        if len(data) < HEADER.size:
            raise RawError(f"short packet from the VMM ({len(data)} bytes)")
        req, flags, size = HEADER.unpack_from(data)
        if size != len(data) - HEADER.size:
            raise RawError(f"VMM packet size {size} != {len(data) - HEADER.size}")
        return Packet(req, flags, bytes(data[HEADER.size:]), list(fds))

    def call(self, req: int, payload: bytes = b"", fds: Iterable[int] = ()) -> Packet:
        self.send(req, payload, fds)
        p = self.recv()
        if p.req != req or not p.flags & FLAG_REPLY:
            raise RawError(f"expected the reply to {req}, got request {p.req} flags {p.flags:#x}")
        return p

    def result(self, req: int, payload: bytes = b"", fds: Iterable[int] = ()) -> tuple[int, str]:
        return self.call(req, payload, fds).result()

    def pending(self, timeout: float = 0.0) -> bool:
        return bool(select.select([self.sock], [], [], timeout)[0])


# --- rings ------------------------------------------------------------------------------
@dataclass(frozen=True)
class RingAddrs:
    """Guest-physical addresses of one split ring's three parts (spec layout)."""

    size: int
    desc: int
    avail: int
    used: int

    @classmethod
    def at(cls, base: int, size: int) -> "RingAddrs":
        avail = base + 16 * size
        used = (avail + 6 + 2 * size + 3) & ~3
        return cls(size, base, avail, used)

    @property
    def end(self) -> int:
        return self.used + 6 + 8 * self.size


def store16(mv: memoryview, off: int, value: int) -> None:
    """One 16-bit store (the device may read the field at the same moment; struct writes
    byte by byte and the device could see half of it). x86: native order is little-endian."""
    mv[off:off + 2].cast("H")[0] = value & 0xFFFF


def load16(mv: memoryview, off: int) -> int:
    return mv[off:off + 2].cast("H")[0]


class RawRing:
    """Write any ring contents: descriptors, avail entries and index, read the used ring.
    `off(gpa, n)` maps a guest-physical range to an offset in `mem`."""

    def __init__(self, mem, off: Callable[[int, int], int], addrs: RingAddrs) -> None:
        if sys.byteorder != "little":
            raise RuntimeError("the raw guest writes le16 ring fields natively: little-endian hosts only")
        self.mem = mem
        self.mv = mem if isinstance(mem, memoryview) else memoryview(mem)
        self.a = addrs
        self.size = addrs.size
        self.d = off(addrs.desc, 16 * addrs.size)
        self.av = off(addrs.avail, 6 + 2 * addrs.size)
        self.u = off(addrs.used, 6 + 8 * addrs.size)
        self.next_avail = 0        # our shadow avail idx

    def zero(self) -> None:
        n = self.a.end - self.a.desc
        self.mem[self.d:self.d + n] = bytes(n)
        self.next_avail = 0

    def desc(self, i: int, addr: int, ln: int, flags: int = 0, nxt: int = 0) -> None:
        DESC.pack_into(self.mem, self.d + 16 * i, addr & (2**64 - 1), ln & 0xFFFFFFFF, flags & 0xFFFF, nxt & 0xFFFF)

    def avail_entry(self, slot: int, head: int) -> None:
        store16(self.mv, self.av + 4 + 2 * (slot % self.size), head)

    def set_avail_idx(self, idx: int) -> None:
        store16(self.mv, self.av + 2, idx)

    def set_avail_flags(self, flags: int) -> None:
        store16(self.mv, self.av, flags)

    def set_used_event(self, idx: int) -> None:
        store16(self.mv, self.av + 4 + 2 * self.size, idx)

    def offer(self, heads: Iterable[int]) -> None:
        """Put heads in the avail ring and publish them (entries first, idx last)."""
        for h in heads:
            self.avail_entry(self.next_avail, h)
            self.next_avail = (self.next_avail + 1) & 0xFFFF
        self.set_avail_idx(self.next_avail)

    def used_idx(self) -> int:
        return load16(self.mv, self.u + 2)

    def used_elem(self, i: int) -> tuple[int, int]:
        return struct.unpack_from("<II", self.mem, self.u + 4 + 8 * (i % self.size))

    def avail_event(self) -> int:
        return load16(self.mv, self.u + 4 + 8 * self.size)


class RawQueue:
    def __init__(self, index: int, ring: RawRing, kick_fd: int, call_fd: int) -> None:
        self.index, self.ring, self.kick_fd, self.call_fd = index, ring, kick_fd, call_fd

    def offer(self, heads: Iterable[int]) -> None:
        self.ring.offer(heads)

    def kick(self) -> None:
        os.eventfd_write(self.kick_fd, 1)

    def wait_used(self, idx: int, timeout: float = 5.0) -> bool:
        """Poll until used.idx reaches idx; False on timeout (nothing was used)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ring.used_idx() == idx & 0xFFFF:
                return True
            select.select([self.call_fd], [], [], 0.01)
        return self.ring.used_idx() == idx & 0xFFFF


# --- the guest ----------------------------------------------------------------------------
class RawGuest:
    """One hostile guest on a control socket. Keeps its own map of guest RAM."""

    def __init__(self, sock: socket.socket, timeout: float = 10.0) -> None:
        self.ctl = RawControl(sock, timeout)
        self.regions: list[tuple[int, int, int]] = []   # gpa, size, memfd offset
        self.memfd: int | None = None
        self.mm: mmap.mmap | None = None
        self.queues: dict[int, RawQueue] = {}
        self.config_fd: int | None = None
        self.features = 0
        self._fds: list[int] = []

    # --- memory ------------------------------------------------------------------------
    def map_memory(self) -> list[tuple[int, int, int]]:
        p = self.ctl.call(GET_MEM_TABLE)
        n, _ = struct.unpack_from("<II", p.payload)
        self.regions = [struct.unpack_from("<QQQ", p.payload, 8 + 24 * i) for i in range(n)]
        if len(p.fds) != 1:
            raise RawError(f"GET_MEM_TABLE carried {len(p.fds)} fds, expected the memfd")
        self.memfd = p.fds[0]
        size = max(off + sz for _, sz, off in self.regions)
        self.mm = mmap.mmap(self.memfd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        return self.regions

    def off(self, gpa: int, n: int = 1) -> int:
        """memfd offset of guest-physical [gpa, gpa+n); ValueError unless inside one region."""
        for g, sz, o in self.regions:
            if g <= gpa and gpa + n <= g + sz:
                return o + gpa - g
        raise ValueError(f"{gpa:#x}+{n:#x} is not guest RAM")

    def write(self, gpa: int, data: bytes) -> None:
        o = self.off(gpa, len(data))
        self.mm[o:o + len(data)] = data

    def read(self, gpa: int, n: int) -> bytes:
        o = self.off(gpa, n)
        return bytes(self.mm[o:o + n])

    def fill(self, gpa: int, n: int, byte: int = 0xA5) -> None:
        self.write(gpa, bytes([byte]) * n)

    def data_ranges(self) -> list[tuple[int, int]]:
        """(memfd offset, length) of every range that holds data, from the kernel's
        SEEK_DATA/SEEK_HOLE on our own copy of the memfd: the independent oracle."""
        out, pos = [], 0
        size = max(off + sz for _, sz, off in self.regions)
        while pos < size:
            try:
                start = os.lseek(self.memfd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = min(os.lseek(self.memfd, start, os.SEEK_HOLE), size)
            out.append((start, end - start))
            pos = end
        return out

    def pfns_with_data(self, pfns: Iterable[int]) -> set[int]:
        """Which of these RAM PFNs hold data in the memfd."""
        ranges = self.data_ranges()
        have = set()
        for pfn in pfns:
            o = self.off(pfn * PAGE, PAGE)
            if any(s <= o < s + ln for s, ln in ranges):
                have.add(pfn)
        return have

    # --- negotiation -------------------------------------------------------------------
    def set_status(self, status: int) -> tuple[int, str]:
        return self.ctl.result(SET_STATUS, U32.pack(status))

    def status(self) -> int:
        return U32.unpack(self.ctl.call(GET_STATUS).payload)[0]

    def offered(self) -> int:
        return U64.unpack(self.ctl.call(GET_FEATURES).payload)[0]

    def negotiate(self, features: int | None = None) -> int:
        """ACKNOWLEDGE|DRIVER, accept `features` (default: all offered), FEATURES_OK, config eventfd."""
        self._check(self.set_status(ACKNOWLEDGE | DRIVER), "SET_STATUS")
        offered = self.offered()
        self.features = offered if features is None else features
        self._check(self.ctl.result(SET_FEATURES, U64.pack(self.features)), "SET_FEATURES")
        self._check(self.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK), "FEATURES_OK")
        self.config_fd = self._eventfd()
        self._check(self.ctl.result(SET_CONFIG_CALL, b"", [self.config_fd]), "SET_CONFIG_CALL")
        return self.features

    def add_queue(self, index: int, base_gpa: int, size: int = 8, *, zero: bool = True) -> RawQueue:
        """Place a ring at base_gpa, hand it to the device with fresh kick/call eventfds."""
        addrs = RingAddrs.at(base_gpa, size)
        ring = RawRing(self.mm, self.off, addrs)
        if zero:
            ring.zero()
        self._check(self.set_vring(index, addrs), f"SET_VRING {index}")
        kick, call = self._eventfd(), self._eventfd()
        self._check(self.ctl.result(SET_VRING_KICK, U32.pack(index), [kick]), "SET_VRING_KICK")
        self._check(self.ctl.result(SET_VRING_CALL, U32.pack(index), [call]), "SET_VRING_CALL")
        q = RawQueue(index, ring, kick, call)
        self.queues[index] = q
        return q

    def set_vring(self, index: int, a: RingAddrs) -> tuple[int, str]:
        return self.ctl.result(SET_VRING, struct.pack("<IIQQQ", index, a.size, a.desc, a.avail, a.used))

    def driver_ok(self) -> tuple[int, str]:
        return self.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)

    def reset(self) -> tuple[int, str]:
        self.queues.clear()
        return self.ctl.result(RESET)

    def config(self) -> tuple[int, int, int, int]:
        p = self.ctl.call(GET_CONFIG, struct.pack("<II", 0, 16))
        return struct.unpack_from("<IIII", p.payload, 8)

    def set_actual(self, pages: int) -> tuple[int, str]:
        return self.ctl.result(SET_CONFIG, struct.pack("<III", 4, 4, pages & 0xFFFFFFFF))

    def setup(self, queues: dict[int, int], features: int | None = None, size: int = 8) -> dict[int, RawQueue]:
        """Negotiate, set up {index: ring base gpa} and go DRIVER_OK; RawError if refused."""
        self.negotiate(features)
        for index, base in queues.items():
            self.add_queue(index, base, size)
        self._check(self.driver_ok(), "DRIVER_OK")
        return self.queues

    def _eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._fds.append(fd)
        return fd

    @staticmethod
    def _check(res: tuple[int, str], what: str) -> None:
        if res[0] != 0:
            raise RawError(f"{what} refused: {res[1]} ({res[0]})")

    def close(self) -> None:
        try:
            self.ctl.sock.close()
        except OSError:
            pass
        self.queues.clear()
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:     # a ring view still exists; the mapping goes with it
                pass
        for fd in self._fds + ([self.memfd] if self.memfd is not None else []):
            try:
                os.close(fd)
            except OSError:
                pass


# --- the trampoline the VMM spawns ---------------------------------------------------------
def trampoline(argv: list[str] | None = None) -> int:
    """`python -m device.guest.raw_guest --control-fd N --agent PATH`: hand the control socket to
    whoever connects to PATH, then stay alive (the VMM watches this pid) until they hang up."""
    p = argparse.ArgumentParser(prog="device.guest.raw_guest")
    p.add_argument("--control-fd", type=int, required=True)
    p.add_argument("--agent", required=True)
    args, _ = p.parse_known_args(argv)
    lis = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lis.bind(args.agent)
    lis.listen(1)
    conn, _ = lis.accept()
    socket.send_fds(conn, [b"control"], [args.control_fd])
    os.close(args.control_fd)
    while conn.recv(4096):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(trampoline())
