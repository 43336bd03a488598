"""The split ring of virtio 1.2 section 2.7: its layout, its structs, its rules.

What the driver's queue (driver_queue.py) and the device's queue (device_queue.py)
share: the spec's constants, the descriptor and used-element structs, the le16 fields
both processes touch at once, the ring sizes and their placement (ring_bytes,
ring_layout), the memfd offsets of one queue's three parts (RingOffsets, validated
once at queue setup), the notification test (vring_need_event) and the ring's errors.
The lab's driver and device size and place rings only through ring_bytes(),
ring_layout() and ring_pages() (the hostile raw guest, device/guest/raw_guest.py, keeps
its own arithmetic on purpose: it is written from the docs alone). See docs/VIRTQUEUE.md.
"""
from __future__ import annotations

import struct
import sys
import threading
from dataclasses import dataclass

import numpy as np

from device.virtio.layout import PAGE_SHIFT, PAGE_SIZE, BadAddress
from device.virtio.ram import GuestRAM

# --- constants from the spec -----------------------------------------------------------
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

DEFAULT_QUEUE_SIZE = 256
MAX_QUEUE_SIZE = 32768
DESC_SIZE = 16
DESC_ALIGN, AVAIL_ALIGN, USED_ALIGN = 16, 2, 4
# "Drivers MUST NOT add a descriptor chain longer than 2^32 bytes in total."
MAX_CHAIN_BYTES = 1 << 32
MAX_BUFFER_LEN = (1 << 32) - 1  # le32 len
# The longest chain the device walks (direct or through an indirect table). Walking a
# chain costs about 0.5 us per descriptor and the event loop serves nothing else
# meanwhile, so this bounds the monitor's wait (device/vmm/budget.py). The lab's driver
# sends at most 4096 chunks per request; QEMU accepts at most 1024 buffers per chain.
DEFAULT_MAX_CHAIN = 4096

DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])
assert DESC_DTYPE.itemsize == DESC_SIZE

DESC_STRUCT = struct.Struct("<QIHH")
USED_ELEM = struct.Struct("<II")


class Le16:
    """The le16 ring fields both processes touch at once (avail/used idx, flags, event
    indices): one 16-bit load or store each, as virtio needs. struct's pack_into writes
    byte by byte, so the peer could read half of a new index (0x00FF -> 0x0100 seen as
    0x0000) and take it for a bogus avail idx (NEEDS_RESET) or used idx: seen with a
    guest that publishes as fast as the device serves. Both take `words`, the queue's
    view of guest RAM as 16-bit words (RingOffsets.words, cast once: casting a fresh
    slice on every access cost ~0.5 us, a dozen times per request), and the field's
    byte offset (2-aligned, RingOffsets checks). Same pack_into/unpack_from interface
    as struct.Struct."""

    swap = sys.byteorder != "little"

    def pack_into(self, words: memoryview, off: int, value: int) -> None:
        value &= 0xFFFF
        words[off >> 1] = ((value & 0xFF) << 8 | value >> 8) if self.swap else value

    def unpack_from(self, words: memoryview, off: int) -> tuple[int]:
        v = words[off >> 1]
        return (((v & 0xFF) << 8 | v >> 8) if self.swap else v,)


LE16 = Le16()

_FENCE = threading.Lock()


def memory_barrier() -> None:
    """virtio_mb(): order a store to one ring field before a load of another. The spec
    needs it at four places, where each side publishes something and then looks at what
    the other published (the driver: avail idx, then avail_event for the kick decision;
    used_event, then used idx before sleeping; the device: avail_event, then avail idx
    before sleeping; used idx, then used_event for the call decision). Without it x86 may
    let the load pass the store (store buffer) and both sides miss each other: no kick,
    no call, a request that waits forever. A lock's acquire is an atomic
    read-modify-write (a locked instruction on x86): a full barrier, ~0.1 us here."""
    _FENCE.acquire()
    _FENCE.release()


class RingError(ValueError):
    """Malformed ring contents. `reason` is a stable short code the device counts by;
    `head` is the consumed avail-ring head the error belongs to (None if unknown), so
    the device may return it used with length 0 instead of leaking it."""

    def __init__(self, reason: str, message: str, head: int | None = None) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.head = head


class QueueFull(RuntimeError):
    """add_buf found no room now; it may fit after the device returns buffers."""


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """The spec's notification test: True when event_idx lies in [old_idx, new_idx),
    all in 16-bit wrapping arithmetic."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


def check_queue_size(size: int) -> None:
    if not isinstance(size, int) or size < 1 or size > MAX_QUEUE_SIZE or size & (size - 1):
        raise RingError("queue-size", f"queue size must be a power of two in 1..{MAX_QUEUE_SIZE}, got {size!r}")


def ring_bytes(size: int) -> tuple[int, int, int]:
    """(descriptor table, available ring, used ring) sizes in bytes, including the
    event-index fields (used_event, avail_event), which are always laid out."""
    check_queue_size(size)
    return DESC_SIZE * size, 6 + 2 * size, 6 + 8 * size


def _align_up(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


@dataclass(frozen=True)
class RingLayout:
    """Guest-physical placement of one queue's three parts: the one ring record. The
    driver lays them out back to back (ring_layout()); the device keeps what SET_VRING
    named, wherever the driver put them (device/virtio/transport.py `vrings`)."""

    size: int
    desc_gpa: int
    avail_gpa: int
    used_gpa: int

    @property
    def end(self) -> int:
        """The end of the used ring."""
        return self.used_gpa + ring_bytes(self.size)[2]

    @property
    def nbytes(self) -> int:
        """From desc_gpa to the end of the used ring (a contiguous layout's area)."""
        return self.end - self.desc_gpa

    def pages(self) -> np.ndarray:
        """PFNs of the pages the three parts touch (ring_pages())."""
        return ring_pages(self.size, self.desc_gpa, self.avail_gpa, self.used_gpa)


def ring_layout(base_gpa: int, size: int = DEFAULT_QUEUE_SIZE, *, used_align: int = USED_ALIGN) -> RingLayout:
    """Lay descriptor table, avail ring and used ring out back to back from base_gpa
    (which must be 16-byte aligned). used_align=4096 gives the legacy layout."""
    if base_gpa % DESC_ALIGN:
        raise ValueError(f"ring base {base_gpa:#x} is not {DESC_ALIGN}-byte aligned")
    if used_align < USED_ALIGN or used_align & (used_align - 1):
        raise ValueError(f"used_align must be a power of two >= {USED_ALIGN}, got {used_align}")
    d, a, _ = ring_bytes(size)
    avail = base_gpa + d
    used = _align_up(avail + a, used_align)
    return RingLayout(size, base_gpa, avail, used)


def ring_area_bytes(size: int = DEFAULT_QUEUE_SIZE, *, used_align: int = USED_ALIGN) -> int:
    """Bytes ring_layout() needs for one queue (round up to pages yourself)."""
    return ring_layout(0, size, used_align=used_align).nbytes


def ring_pages(size: int, desc_gpa: int, avail_gpa: int, used_gpa: int) -> np.ndarray:
    """PFNs of the pages one queue's three parts touch (a page may appear twice when two
    parts share it), wherever the driver placed them: the device never discards these
    and the migration source always resends them."""
    parts = [np.arange(gpa >> PAGE_SHIFT, (gpa + n + PAGE_SIZE - 1) >> PAGE_SHIFT)
             for gpa, n in zip((desc_gpa, avail_gpa, used_gpa), ring_bytes(size))]
    return np.concatenate(parts)


class RingOffsets:
    """memfd offsets of the three ring parts, validated once at queue setup."""

    def __init__(self, ram: GuestRAM, size: int, desc_gpa: int, avail_gpa: int, used_gpa: int) -> None:
        check_queue_size(size)
        d, a, u = ring_bytes(size)
        for name, gpa, nbytes, align in (
            ("descriptor table", desc_gpa, d, DESC_ALIGN),
            ("available ring", avail_gpa, a, AVAIL_ALIGN),
            ("used ring", used_gpa, u, USED_ALIGN),
        ):
            if not isinstance(gpa, int) or gpa < 0:
                raise RingError("ring-not-ram", f"{name} address {gpa!r} is not a guest-physical address")
            if gpa % align:
                raise RingError("ring-align", f"{name} at {gpa:#x} is not {align}-byte aligned")
            try:
                ram.layout.translate(gpa, nbytes)
            except BadAddress as e:
                raise RingError("ring-not-ram", f"{name} {gpa:#x}+{nbytes:#x} is not inside one RAM region ({e})") from None
        self.words = ram.mem.cast("H")      # guest RAM as 16-bit words, for LE16
        self.desc = ram.layout.translate(desc_gpa, d)
        self.avail = ram.layout.translate(avail_gpa, a)
        self.used = ram.layout.translate(used_gpa, u)
        self.avail_ring = self.avail + 4
        self.used_event = self.avail + 4 + 2 * size
        self.used_ring = self.used + 4
        self.avail_event = self.used + 4 + 8 * size

