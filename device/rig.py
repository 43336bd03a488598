"""DeviceRig: the one test rig for the balloon device, shared by the tests and the fuzzer.

After Firecracker's balloon test_utils.rs (a queue event written, the handler run,
the used entry checked): a real BalloonDevice over a real sealed memfd (GuestRAM),
real kick and call eventfds, and a driver-side ring writer, all in one process. The
steps follow docs/PROTOCOL.md's start-up sequence (negotiate, SET_VRING,
SET_VRING_KICK / SET_VRING_CALL, DRIVER_OK) applied to the device directly, so a test
starts from a live device in microseconds and still goes through the device's own
activation and queue code. Nothing is mocked.

The driver side writes rings with device/guest/raw_guest.py's RawRing, the hostile
raw guest's own ring writer. RawRing stays a separate, deliberately independent piece:
it is written from docs/VIRTQUEUE.md alone and imports nothing of the device, so the
bytes a test puts on a ring do not come from the code that reads them (a bug shared by
the device's ring reader and the lab's DriverQueue cannot hide), and it can write any
hostile ring contents (loops, bad indices, buffers in the hole) that a validating
driver would refuse. The raw guest keeps using it against the real VMM process; this
rig uses it in-process.

Who uses it: the device's unit tests (through tests/conftest.py's fixtures) and every
fuzz target (fuzz/). The hostile-guest tests (tests/test_hostile_*.py) stay on
lab/trials/model/hostile_vm.py's HostileVM: they drive the real VMM process over the control
socket, log and monitor included, which an in-process rig cannot stand in for.

    rig = DeviceRig(mib=64, protocol="pfn")
    rig.start({0: 0x10000, 1: 0x11000})
    rig.write(0x20000, struct.pack("<2I", 300, 301))
    rig.post(0, [(0x20000, 8, False)]); rig.kick(0)
    rig.used(0)                  # [(head, 0)]
    rig.close()
"""
from __future__ import annotations

import os

import numpy as np

from device.guest.raw_guest import F_NEXT, F_WRITE, RawRing, RingAddrs
from device.vmm.balloon_device import BalloonDevice
from device.vmm.budget import WorkBudget
from device.virtio.features import QUEUE_FEATURE, S_ACKNOWLEDGE, S_DRIVER, S_DRIVER_OK, S_FEATURES_OK
from device.virtio.layout import PAGE_SHIFT, GuestLayout
from device.virtio.protocols import PROTOCOLS, protocol_device_features
from device.virtio.ram import GuestRAM
from device.virtio.split_ring import RingLayout

Buffer = tuple[int, int, bool]          # (gpa, length, device-writable)


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def _replace(table: dict[int, int], index: int, fd: int) -> None:
    """Install fd at index, closing the one it replaces (as SET_VRING_KICK does)."""
    old = table.pop(index, None)
    if old is not None:
        os.close(old)
    table[index] = fd


class DeviceRig:
    """A BalloonDevice and the driver side of its queues over one guest RAM.

    `ram` given: the rig uses it and leaves it open (the fuzzer reuses one memfd for
    many devices); otherwise it creates a sealed memfd of `layout` (default: the PC
    layout of `mib` MiB) and closes it in close(). `features` is what the device
    offers (default: its offer for `protocol`, whose table row also gives the merge
    policy, merge_runs); other keywords go to BalloonDevice."""

    def __init__(self, ram: GuestRAM | None = None, *, mib: int = 64, layout: GuestLayout | None = None,
                 protocol: str = "pfn", features: int | None = None, backing: str = "4k",
                 name: str = "balloon-lab-device-rig", **device_options) -> None:
        self.owns_ram = ram is None
        self.ram = ram if ram is not None else GuestRAM.create(layout or GuestLayout.pc(mib), name=name,
                                                               backing=backing)
        self.layout = self.ram.layout
        offered = protocol_device_features(protocol) if features is None else features
        self.device = BalloonDevice(self.ram, offered, merge_runs=PROTOCOLS[protocol].merge_runs, **device_options)
        self.rings: dict[int, RawRing] = {}
        self.driver_kick_fds: dict[int, int] = {}     # the driver's ends of the eventfds
        self.driver_call_fds: dict[int, int] = {}
        self._next_desc: dict[int, int] = {}
        self._used_seen: dict[int, int] = {}

    # --- the start-up sequence (docs/PROTOCOL.md), applied to the device directly ---------
    def negotiate(self, features: int | None = None) -> int:
        """ACKNOWLEDGE|DRIVER, accept `features` (default: all offered), FEATURES_OK."""
        dev = self.device
        dev.status = S_ACKNOWLEDGE | S_DRIVER
        dev.driver_features = dev.device_features if features is None else features
        dev.status |= S_FEATURES_OK
        return dev.driver_features

    def set_vring(self, index: int, base_gpa: int, size: int = 8, *, zero: bool = True) -> RawRing:
        """SET_VRING: the queue's ring laid out from base_gpa (spec layout); zeroed unless
        zero=False (a caller that wrote the ring's contents already). Returns its writer."""
        a = RingAddrs.at(base_gpa, size)
        self.device.vrings[index] = RingLayout(size, a.desc, a.avail, a.used)
        ring = self.rings[index] = RawRing(self.ram.mem, self.layout.translate, a)
        if zero:
            ring.zero()
        self._next_desc[index] = 0
        self._used_seen[index] = 0
        return ring

    def connect(self, index: int) -> None:
        """SET_VRING_KICK and SET_VRING_CALL: fresh eventfds for the device, the driver
        keeps its own descriptor of each (two processes would each hold one)."""
        kick, call = _eventfd(), _eventfd()
        _replace(self.driver_kick_fds, index, os.dup(kick))
        _replace(self.driver_call_fds, index, os.dup(call))
        _replace(self.device.kick_fds, index, kick)
        _replace(self.device.call_fds, index, call)

    def add_queue(self, index: int, base_gpa: int, size: int = 8, *, zero: bool = True) -> RawRing:
        """set_vring() and connect()."""
        ring = self.set_vring(index, base_gpa, size, zero=zero)
        self.connect(index)
        return ring

    def connect_config(self) -> None:
        """SET_CONFIG_CALL: the config-change eventfd."""
        dev = self.device
        if dev.config_call_fd is not None:
            os.close(dev.config_call_fd)
        dev.config_call_fd = _eventfd()

    def driver_ok(self) -> None:
        """DRIVER_OK: the device builds its queues (and validates the ring addresses)."""
        self.device.activate()
        self.device.status |= S_DRIVER_OK

    def start(self, queues: dict[int, int], size: int = 8, *, features: int | None = None,
              zero: bool = True) -> None:
        """The whole sequence: negotiate, every queue of `queues` (index -> ring gpa)
        whose feature was negotiated (SET_VRING refuses the others), the config
        eventfd, DRIVER_OK."""
        self.negotiate(features)
        for index, base in queues.items():
            need = QUEUE_FEATURE.get(index)
            if need is None or self.device.has(need):
                self.add_queue(index, base, size, zero=zero)
        self.connect_config()
        self.driver_ok()

    # --- requests -------------------------------------------------------------------------
    def ring(self, index: int) -> RawRing:
        return self.rings[index]

    def write(self, gpa: int, data: bytes) -> None:
        """Guest bytes at a guest-physical address (one region)."""
        self.ram.view(gpa, len(data))[:] = data

    def fill(self, gpa: int, n: int, byte: int = 0xA5) -> None:
        self.write(gpa, bytes([byte]) * n)

    def post(self, index: int, bufs: list[Buffer]) -> int:
        """Lay one chain of (gpa, length, device-writable) buffers in the next free
        descriptors (round robin: callers let the device use each chain before the ring
        wraps) and offer it. Returns the head."""
        ring = self.rings[index]
        head = self._next_desc[index] % ring.size
        for k, (gpa, ln, writable) in enumerate(bufs):
            i = (head + k) % ring.size
            last = k + 1 == len(bufs)
            ring.desc(i, gpa, ln, (F_WRITE if writable else 0) | (0 if last else F_NEXT), (i + 1) % ring.size)
        self._next_desc[index] = head + max(1, len(bufs))
        ring.offer([head])
        return head

    def kick(self, index: int, budget: WorkBudget | None = None) -> None:
        """The driver's kick (a write to its kick eventfd), then the VMM's wake-up for it."""
        os.eventfd_write(self.driver_kick_fds[index], 1)
        self.serve(index, budget)

    def serve(self, index: int, budget: WorkBudget | None = None) -> None:
        """What the VMM's loop does on a kick: read the kick eventfd, serve the queue."""
        fd = self.device.kick_fds.get(index)
        if fd is not None:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass
        self.device.process_queue(index, budget)

    def used(self, index: int) -> list[tuple[int, int]]:
        """(head, written length) of every used entry since the last call."""
        ring = self.rings[index]
        idx = ring.used_idx()
        out = []
        while self._used_seen[index] != idx:
            out.append(ring.used_elem(self._used_seen[index]))
            self._used_seen[index] = (self._used_seen[index] + 1) & 0xFFFF
        return out

    def interrupts(self, index: int) -> int:
        """Calls the device signalled on this queue since the last look (the driver
        reads its call eventfd)."""
        try:
            return os.eventfd_read(self.driver_call_fds[index])
        except BlockingIOError:
            return 0

    def request(self, index: int, bufs: list[Buffer]) -> list[tuple[int, int]]:
        """post(), kick(), used(): one request served, as a driver waits for it."""
        self.post(index, bufs)
        self.kick(index)
        return self.used(index)

    # --- what the kernel says ---------------------------------------------------------------
    def data_pfns(self) -> set[int]:
        """PFNs whose page holds data in the memfd (SEEK_DATA, not the device's bookkeeping)."""
        mask = self.ram.data_page_mask()
        return set(self.layout.offset_to_pfn(np.flatnonzero(mask).astype(np.int64) << PAGE_SHIFT).tolist())

    @property
    def errors(self) -> dict[str, int]:
        return dict(self.device.errors)

    def close(self) -> None:
        """Close the driver's eventfds, reset the device (which closes its own, as a
        guest's reset does), and the RAM if the rig made it."""
        for table in (self.driver_kick_fds, self.driver_call_fds):
            for fd in table.values():
                os.close(fd)
            table.clear()
        self.device.reset()
        if self.owns_ram:
            self.ram.close()

