"""Split virtqueue (virtio 1.2 section 2.7), driver side and device side.

The rings live in guest RAM and are addressed by guest-physical address, so the
guest process (DriverQueue) and the VMM process (DeviceQueue) each work on their own
mapping of the same memfd. Ring addresses are translated to memfd offsets once, at
queue setup; per request the code does a few struct.pack_into/unpack_from calls on
the mapping and nothing else, because the lab measures protocol overhead and the
PFN path sends 1024 requests per GiB.

The device side treats every ring byte as hostile: each malformed structure raises
RingError with a stable short reason code, every walk is bounded (no loop can hang
the device), and indirect tables are copied before they are walked so the guest
cannot change them under the device's feet.

One deliberate deviation from the letter of the spec, shared with Linux and QEMU: a
chain that goes through an indirect table may be longer than the queue size (up to
the device's max_chain, default 4096, which also caps direct chains on larger rings).
Pass max_chain=size to a DeviceQueue for the strict reading. See docs/VIRTQUEUE.md.
"""
from __future__ import annotations

import struct
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from device.virtio.ram import GuestRAM
from device.virtio.layout import BadAddress

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
# meanwhile, so this bounds the monitor's wait (device/host/budget.py). The lab's driver
# sends at most 4096 chunks per request; QEMU accepts at most 1024 buffers per chain.
DEFAULT_MAX_CHAIN = 4096

DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])
assert DESC_DTYPE.itemsize == DESC_SIZE

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")


class _Le16:
    """The le16 ring fields both processes touch at once (avail/used idx, flags, event
    indices): one 16-bit load or store each, as virtio needs. struct's pack_into writes
    byte by byte, so the peer could read half of a new index (0x00FF -> 0x0100 seen as
    0x0000) and take it for a bogus avail idx (NEEDS_RESET) or used idx: seen with a
    guest that publishes as fast as the device serves. A memoryview cast to 'H' stores
    the two bytes in one go. Same pack_into/unpack_from interface as struct.Struct."""

    swap = sys.byteorder != "little"

    def pack_into(self, mem, off: int, value: int) -> None:
        value &= 0xFFFF
        _view(mem)[off:off + 2].cast("H")[0] = ((value & 0xFF) << 8 | value >> 8) if self.swap else value

    def unpack_from(self, mem, off: int) -> tuple[int]:
        v = _view(mem)[off:off + 2].cast("H")[0]
        return (((v & 0xFF) << 8 | v >> 8) if self.swap else v,)


def _view(mem) -> memoryview:
    return mem if type(mem) is memoryview else memoryview(mem)


_U16 = _Le16()


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
    """Guest-physical placement of one queue's three parts in one contiguous area."""

    size: int
    desc_gpa: int
    avail_gpa: int
    used_gpa: int
    nbytes: int  # from desc_gpa to the end of the used ring

    @property
    def end(self) -> int:
        return self.desc_gpa + self.nbytes


def ring_layout(base_gpa: int, size: int = DEFAULT_QUEUE_SIZE, *, used_align: int = USED_ALIGN) -> RingLayout:
    """Lay descriptor table, avail ring and used ring out back to back from base_gpa
    (which must be 16-byte aligned). used_align=4096 gives the legacy layout."""
    if base_gpa % DESC_ALIGN:
        raise ValueError(f"ring base {base_gpa:#x} is not {DESC_ALIGN}-byte aligned")
    if used_align < USED_ALIGN or used_align & (used_align - 1):
        raise ValueError(f"used_align must be a power of two >= {USED_ALIGN}, got {used_align}")
    d, a, u = ring_bytes(size)
    avail = base_gpa + d
    used = _align_up(avail + a, used_align)
    return RingLayout(size, base_gpa, avail, used, used + u - base_gpa)


def ring_area_bytes(size: int = DEFAULT_QUEUE_SIZE, *, used_align: int = USED_ALIGN) -> int:
    """Bytes ring_layout() needs for one queue (round up to pages yourself)."""
    return ring_layout(0, size, used_align=used_align).nbytes


class _RingOffsets:
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
        self.desc = ram.layout.translate(desc_gpa, d)
        self.avail = ram.layout.translate(avail_gpa, a)
        self.used = ram.layout.translate(used_gpa, u)
        self.avail_ring = self.avail + 4
        self.used_event = self.avail + 4 + 2 * size
        self.used_ring = self.used + 4
        self.avail_event = self.used + 4 + 8 * size


# ======================================================================================
# Driver side
# ======================================================================================
class _ExtentAllocator:
    """First-fit allocator of 16-byte units inside the driver's indirect-table area.
    Tables are freed when their chain comes back used, usually in order, so the free
    list stays short."""

    def __init__(self, units: int) -> None:
        self.units = units
        self.free: list[list[int]] = [[0, units]] if units else []  # sorted [start, length]

    def alloc(self, n: int) -> int | None:
        for k, ext in enumerate(self.free):
            if ext[1] >= n:
                start = ext[0]
                if ext[1] == n:
                    del self.free[k]
                else:
                    ext[0] += n
                    ext[1] -= n
                return start
        return None

    def release(self, start: int, n: int) -> None:
        fl = self.free
        lo, hi = 0, len(fl)
        while lo < hi:
            mid = (lo + hi) // 2
            if fl[mid][0] < start:
                lo = mid + 1
            else:
                hi = mid
        fl.insert(lo, [start, n])
        if lo + 1 < len(fl) and fl[lo][0] + fl[lo][1] == fl[lo + 1][0]:
            fl[lo][1] += fl[lo + 1][1]
            del fl[lo + 1]
        if lo > 0 and fl[lo - 1][0] + fl[lo - 1][1] == fl[lo][0]:
            fl[lo - 1][1] += fl[lo][1]
            del fl[lo]

    @property
    def free_units(self) -> int:
        return sum(e[1] for e in self.free)


BufList = Sequence[tuple[int, int]] | np.ndarray


def _as_pairs(bufs: BufList) -> np.ndarray:
    """(n, 2) uint64 array of (gpa, len); ValueError naming the problem otherwise."""
    if len(bufs) == 0:
        return np.zeros((0, 2), dtype=np.uint64)
    try:
        a = np.asarray(bufs, dtype=np.uint64) if not isinstance(bufs, np.ndarray) or bufs.dtype.kind == "u" \
            else np.asarray(bufs)
    except (OverflowError, TypeError, ValueError) as e:
        raise ValueError(f"buffers must be (gpa, len) pairs of integers in 0..2^64-1: {e}") from None
    if a.ndim != 2 or a.shape[1] != 2:
        raise ValueError(f"buffers must be (gpa, len) pairs, got shape {a.shape}")
    if a.dtype.kind != "u":
        if a.dtype.kind != "i" or (a < 0).any():
            raise ValueError("buffer (gpa, len) values must be non-negative integers")
        a = a.astype(np.uint64)
    return a


class DriverQueue:
    """Driver (guest) side of one split virtqueue.

    add_buf() places a chain and its avail-ring entry; publish() makes everything
    added so far visible by writing avail.idx (entries first, idx last, as the spec
    orders it); kick_if_needed() publishes and notifies the device unless it asked
    not to be (used.avail_event with EVENT_IDX, used.flags NO_NOTIFY without)."""

    def __init__(
        self,
        ram: GuestRAM,
        index: int,
        size: int,
        desc_gpa: int,
        avail_gpa: int,
        used_gpa: int,
        *,
        event_idx: bool,
        indirect: bool,
        kick: Callable[[], None],
        indirect_area: tuple[int, int] | None = None,
    ) -> None:
        self.ram = ram
        self.index = index
        self.size = size
        self.mask = size - 1
        self.event_idx = event_idx
        self.indirect = indirect
        self.kick = kick
        self._off = _RingOffsets(ram, size, desc_gpa, avail_gpa, used_gpa)
        self.desc_gpa, self.avail_gpa, self.used_gpa = desc_gpa, avail_gpa, used_gpa
        self._mem = ram.mem
        # The driver allocates the rings: they start zeroed (used.flags = 0 is required).
        d, a, u = ring_bytes(size)
        for off, n in ((self._off.desc, d), (self._off.avail, a), (self._off.used, u)):
            self._mem[off : off + n] = bytes(n)

        # indirect-table area (driver-owned guest memory)
        self.indirect_area = indirect_area
        self._ind_tables: np.ndarray | None = None
        self._ind_alloc = _ExtentAllocator(0)
        if indirect_area is not None:
            gpa, nbytes = indirect_area
            if gpa % DESC_ALIGN:
                raise ValueError(f"indirect area {gpa:#x} is not {DESC_ALIGN}-byte aligned")
            units = nbytes // DESC_SIZE
            try:
                off = ram.layout.translate(gpa, units * DESC_SIZE)
            except BadAddress as e:
                raise ValueError(f"indirect area {gpa:#x}+{nbytes:#x} is not guest RAM: {e}") from None
            self._ind_gpa = gpa
            self._ind_tables = np.frombuffer(self._mem[off : off + units * DESC_SIZE], dtype=DESC_DTYPE)
            self._ind_alloc = _ExtentAllocator(units)

        # driver-private state (never read back from shared memory)
        self._next = list(range(1, size + 1))  # free-list links, mirror of desc.next
        self._free_head = 0
        self._num_free = size
        self._ndesc = [0] * size  # descriptors held by the chain headed here (0 = not in use)
        self._tail = [0] * size
        self._tokens: list[Any] = [None] * size
        self._ind_of: dict[int, tuple[int, int]] = {}  # head -> (unit start, units)
        self._avail_shadow = 0  # next avail idx to write
        self._avail_published = 0
        self._kick_old = 0  # avail idx at the last kick decision
        self.last_used_idx = 0
        self._avail_flags = 0

        # counters
        self.added = 0
        self.indirect_added = 0
        self.kicks = 0
        self.notifications_suppressed = 0
        self.used_seen = 0

    # --- adding buffers --------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Free descriptors in the ring's descriptor table."""
        return self._num_free

    @property
    def indirect_free(self) -> int:
        """Free descriptor slots in the indirect-table area."""
        return self._ind_alloc.free_units

    @property
    def in_flight(self) -> int:
        """Chains added and not yet returned used."""
        return (self._avail_shadow - self.last_used_idx) & 0xFFFF

    def add_buf(self, out: BufList, inn: BufList, token: Any, *, indirect: bool | None = None) -> int:
        """Add one chain: `out` device-readable (gpa, len) buffers, then `inn`
        device-writable ones. Uses an indirect table when INDIRECT_DESC was negotiated
        and the chain needs more descriptors than are free (indirect=None), always
        (indirect=True) or never (indirect=False). Returns the head index; the buffer
        is visible to the device after publish()/kick_if_needed().
        Raises QueueFull when it would fit later, ValueError when it never can."""
        n_out, n_in = len(out), len(inn)
        n = n_out + n_in
        if n == 0:
            raise ValueError("a chain needs at least one buffer")
        if indirect is None:
            use_ind = self.indirect and n > 1 and n > self._num_free and self._ind_tables is not None
        else:
            use_ind = indirect
        if use_ind and not self.indirect:
            raise ValueError("indirect descriptors requested but VIRTIO_F_INDIRECT_DESC was not negotiated")
        if use_ind and self._ind_tables is None:
            raise ValueError("indirect descriptors requested but the queue has no indirect_area")
        if not use_ind and n > self.size:
            raise ValueError(
                f"a chain of {n} descriptors never fits a ring of {self.size}"
                + ("" if self.indirect else " (VIRTIO_F_INDIRECT_DESC not negotiated)")
                + ("; give the queue an indirect_area" if self.indirect and self._ind_tables is None else "")
            )
        if self._num_free < 1 or (not use_ind and n > self._num_free):
            raise QueueFull(f"queue {self.index}: chain needs {1 if use_ind else n} descriptors, {self._num_free} free")
        if use_ind:
            return self._add_indirect(out, inn, n_out, n, token)
        return self._add_direct(out, inn, n_out, n, token)

    def _check_buf(self, addr: int, ln: int) -> None:
        if not (0 <= addr < 1 << 64) or not (0 <= ln <= MAX_BUFFER_LEN):
            raise ValueError(f"buffer (gpa={addr:#x}, len={ln}) does not fit a descriptor (le64 addr, le32 len)")

    def _add_direct(self, out: BufList, inn: BufList, n_out: int, n: int, token: Any) -> int:
        mem, base, nxt, pack = self._mem, self._off.desc, self._next, _DESC.pack_into
        total = 0
        bufs = list(out) + list(inn) if n_out and n - n_out else (out if n_out else inn)
        for k in range(n):
            addr, ln = int(bufs[k][0]), int(bufs[k][1])
            self._check_buf(addr, ln)
            total += ln
        if total > MAX_CHAIN_BYTES:
            raise ValueError(f"chain of {total} bytes exceeds the spec's 2^32-byte limit")
        head = i = self._free_head
        last = i
        for k in range(n):
            flags = (VIRTQ_DESC_F_NEXT if k < n - 1 else 0) | (VIRTQ_DESC_F_WRITE if k >= n_out else 0)
            j = nxt[i]
            pack(mem, base + DESC_SIZE * i, int(bufs[k][0]), int(bufs[k][1]), flags, j & 0xFFFF)
            last, i = i, j
        self._free_head = i
        self._num_free -= n
        return self._expose(head, last, n, token)

    def _add_indirect(self, out: BufList, inn: BufList, n_out: int, n: int, token: Any) -> int:
        pairs = [p for p in (_as_pairs(out), _as_pairs(inn)) if len(p)]
        arr = np.concatenate(pairs) if len(pairs) > 1 else pairs[0]
        lens = arr[:, 1]
        if (lens > MAX_BUFFER_LEN).any():
            k = int(np.argmax(lens > MAX_BUFFER_LEN))
            raise ValueError(f"buffer {k} has len {int(lens[k])} > le32 max")
        if int(lens.sum(dtype=np.uint64)) > MAX_CHAIN_BYTES:
            raise ValueError("chain exceeds the spec's 2^32-byte limit")
        assert self._ind_tables is not None
        if n > self._ind_alloc.units:
            raise ValueError(f"indirect table of {n} descriptors is larger than the indirect area ({self._ind_alloc.units})")
        start = self._ind_alloc.alloc(n)
        if start is None:
            raise QueueFull(f"queue {self.index}: indirect area has no room for {n} descriptors "
                            f"({self._ind_alloc.free_units} units free, fragmented)")
        tbl = self._ind_tables[start : start + n]
        tbl["addr"] = arr[:, 0]
        tbl["len"] = lens
        flags = np.full(n, VIRTQ_DESC_F_NEXT, dtype=np.uint16)
        flags[n_out:] |= VIRTQ_DESC_F_WRITE
        flags[-1] &= ~np.uint16(VIRTQ_DESC_F_NEXT)
        tbl["flags"] = flags
        nexts = np.arange(1, n + 1, dtype=np.uint16)
        nexts[-1] = 0
        tbl["next"] = nexts
        head = self._free_head
        self._free_head = self._next[head]
        self._num_free -= 1
        _DESC.pack_into(self._mem, self._off.desc + DESC_SIZE * head,
                        self._ind_gpa + DESC_SIZE * start, DESC_SIZE * n, VIRTQ_DESC_F_INDIRECT, 0)
        self._ind_of[head] = (start, n)
        self.indirect_added += 1
        return self._expose(head, head, 1, token)

    def _expose(self, head: int, tail: int, ndesc: int, token: Any) -> int:
        self._ndesc[head] = ndesc
        self._tail[head] = tail
        self._tokens[head] = token
        # ring entry first; avail.idx only in publish()
        _U16.pack_into(self._mem, self._off.avail_ring + 2 * (self._avail_shadow & self.mask), head)
        self._avail_shadow = (self._avail_shadow + 1) & 0xFFFF
        self.added += 1
        return head

    # --- notifying the device ----------------------------------------------------------
    def publish(self) -> None:
        """Write avail.idx so the device sees every chain added so far."""
        if self._avail_published != self._avail_shadow:
            _U16.pack_into(self._mem, self._off.avail + 2, self._avail_shadow)
            self._avail_published = self._avail_shadow

    def kick_if_needed(self) -> bool:
        """publish(), then kick unless the device suppressed notifications. One
        decision covers every chain added since the previous decision; a decision
        with nothing new neither kicks nor counts as suppressed."""
        self.publish()
        new, old = self._avail_shadow, self._kick_old
        if new == old:
            return False
        self._kick_old = new
        if self.event_idx:
            need = vring_need_event(_U16.unpack_from(self._mem, self._off.avail_event)[0], new, old)
        else:
            need = not (_U16.unpack_from(self._mem, self._off.used)[0] & VIRTQ_USED_F_NO_NOTIFY)
        if need:
            self.kicks += 1
            self.kick()
        else:
            self.notifications_suppressed += 1
        return need

    # --- used buffers --------------------------------------------------------------------
    def has_used(self) -> bool:
        return _U16.unpack_from(self._mem, self._off.used + 2)[0] != self.last_used_idx

    def get_used(self, limit: int | None = None) -> list[tuple[Any, int]]:
        """Reclaim the chains the device returned: [(token, written_len)], in used order.
        A used id that is not an outstanding head raises RingError('used-id')."""
        mem, off = self._mem, self._off
        used_idx = _U16.unpack_from(mem, off.used + 2)[0]
        pending = (used_idx - self.last_used_idx) & 0xFFFF
        if pending > self.in_flight:
            raise RingError("used-idx", f"queue {self.index}: device used idx {used_idx} is {pending} ahead "
                                        f"of {self.last_used_idx} but only {self.in_flight} chains are in flight")
        if limit is not None:
            pending = min(pending, limit)
        out: list[tuple[Any, int]] = []
        last = self.last_used_idx
        for _ in range(pending):
            hid, ln = _USED_ELEM.unpack_from(mem, off.used_ring + 8 * (last & self.mask))
            if hid >= self.size or self._ndesc[hid] == 0:
                raise RingError("used-id", f"queue {self.index}: device returned id {hid}, which is not an outstanding chain")
            n = self._ndesc[hid]
            self._next[self._tail[hid]] = self._free_head
            self._free_head = hid
            self._num_free += n
            self._ndesc[hid] = 0
            ind = self._ind_of.pop(hid, None)
            if ind is not None:
                self._ind_alloc.release(*ind)
            out.append((self._tokens[hid], ln))
            self._tokens[hid] = None
            last = (last + 1) & 0xFFFF
        self.last_used_idx = last
        self.used_seen += len(out)
        return out

    def enable_interrupts(self) -> bool:
        """Ask for a call on the next used buffer (used_event = last seen used idx with
        EVENT_IDX, else clear avail.flags NO_INTERRUPT). Returns True if used buffers
        are already pending, i.e. the caller should poll again instead of sleeping."""
        if self.event_idx:
            _U16.pack_into(self._mem, self._off.used_event, self.last_used_idx)
        elif self._avail_flags & VIRTQ_AVAIL_F_NO_INTERRUPT:
            self._avail_flags &= ~VIRTQ_AVAIL_F_NO_INTERRUPT
            _U16.pack_into(self._mem, self._off.avail, self._avail_flags)
        return self.has_used()

    def set_used_event(self, idx: int) -> None:
        """EVENT_IDX: ask for a call once used.idx passes idx (i.e. reaches idx + 1)."""
        _U16.pack_into(self._mem, self._off.used_event, idx & 0xFFFF)

    def disable_interrupts(self) -> None:
        """Ask for no calls. Without EVENT_IDX sets avail.flags NO_INTERRUPT; with it
        (flags must stay 0) moves used_event just behind the last seen used idx, so the
        device would only call after 65535 more used buffers."""
        if self.event_idx:
            _U16.pack_into(self._mem, self._off.used_event, (self.last_used_idx - 1) & 0xFFFF)
        elif not self._avail_flags & VIRTQ_AVAIL_F_NO_INTERRUPT:
            self._avail_flags |= VIRTQ_AVAIL_F_NO_INTERRUPT
            _U16.pack_into(self._mem, self._off.avail, self._avail_flags)

    def counters(self) -> dict[str, int]:
        return {"added": self.added, "indirect_added": self.indirect_added, "kicks": self.kicks,
                "notifications_suppressed": self.notifications_suppressed, "used": self.used_seen}


# ======================================================================================
# Device side
# ======================================================================================
@dataclass(slots=True)
class DescChain:
    """One available chain as the device validated it. elements are (gpa, len,
    writable) in chain order, device-readable ones first; offsets are the matching
    memfd offsets (the translation the device already paid for)."""

    head: int
    elements: list[tuple[int, int, bool]]
    offsets: list[int]
    n_readable: int
    readable_bytes: int
    writable_bytes: int
    indirect: bool
    _mem: memoryview = field(repr=False)
    _gpas: np.ndarray | None = field(default=None, repr=False)
    _lens: np.ndarray | None = field(default=None, repr=False)

    def gpas(self) -> np.ndarray:
        """Buffer addresses as a uint64 array (for vectorized decoding of chunks)."""
        if self._gpas is None:
            self._gpas = np.fromiter((e[0] for e in self.elements), dtype=np.uint64, count=len(self.elements))
        return self._gpas

    def lens(self) -> np.ndarray:
        """Buffer lengths as a uint64 array."""
        if self._lens is None:
            self._lens = np.fromiter((e[1] for e in self.elements), dtype=np.uint64, count=len(self.elements))
        return self._lens

    def readable(self) -> list[memoryview]:
        """Zero-copy views of the device-readable buffers (live guest memory: copy
        before validating anything the guest could change meanwhile)."""
        mem, el, off = self._mem, self.elements, self.offsets
        if self.readable_bytes == 0:
            return []
        # zero-length buffers carry nothing: skipped, with numpy when the chain is long
        # (a hostile chain may be 32768 empty descriptors)
        if self._lens is not None and self.n_readable > 64:
            ks = np.flatnonzero(self._lens[: self.n_readable]).tolist()
        else:
            ks = [k for k in range(self.n_readable) if el[k][1]]
        return [mem[off[k] : off[k] + el[k][1]] for k in ks]

    def writable(self) -> list[memoryview]:
        mem, el, off = self._mem, self.elements, self.offsets
        return [mem[off[k] : off[k] + el[k][1]] for k in range(self.n_readable, len(el))]

    def gather(self, limit: int, *, truncate: bool = False) -> bytes:
        return gather(self, limit, truncate=truncate)


def gather(chain: DescChain, limit: int, *, truncate: bool = False) -> bytes:
    """Copy the chain's device-readable bytes, at most `limit` of them: more raises
    RingError('gather-limit') (or, with truncate=True, returns the first `limit`), so a
    hostile guest cannot make the device copy more than it chose to."""
    if chain.readable_bytes > limit and not truncate:
        raise RingError("gather-limit", f"chain {chain.head} has {chain.readable_bytes} readable bytes, "
                                        f"more than the {limit} this request may carry", chain.head)
    views = chain.readable()
    if len(views) == 1:
        return bytes(views[0][:limit])
    out = bytearray()
    left = limit
    for v in views:
        if left <= 0:
            break
        out += v[:left]
        left -= len(v)
    return bytes(out)


class DeviceQueue:
    """Device (VMM) side of one split virtqueue; every ring byte is hostile input."""

    def __init__(
        self,
        ram: GuestRAM,
        index: int,
        size: int,
        desc_gpa: int,
        avail_gpa: int,
        used_gpa: int,
        *,
        event_idx: bool,
        indirect: bool,
        max_chain: int | None = None,
    ) -> None:
        self.ram = ram
        self.layout = ram.layout
        self.index = index
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        self._off = _RingOffsets(ram, size, desc_gpa, avail_gpa, used_gpa)
        self.mask = size - 1
        self.max_chain = DEFAULT_MAX_CHAIN if max_chain is None else int(max_chain)
        if not 1 <= self.max_chain <= 1 << 16:  # le16 next: no chain can be longer
            raise ValueError(f"max_chain must be in 1..65536, got {max_chain}")
        self._mem = ram.mem
        regions = ram.layout.regions
        self._r_start = np.array([r.gpa for r in regions], dtype=np.uint64)
        self._r_end = np.array([r.end for r in regions], dtype=np.uint64)
        self._r_off = np.array([r.offset for r in regions], dtype=np.uint64)
        self.last_avail_idx = 0
        self.used_idx = 0
        self._signalled_used = 0
        self._used_flags = 0
        # counters
        self.chains = 0
        self.descriptors = 0
        self.walked = 0            # descriptors read, refused chains included: the walk's cost
        self.indirect_chains = 0
        self.calls = 0
        self.calls_suppressed = 0
        self.errors: Counter[str] = Counter()

    def _fail(self, reason: str, message: str, head: int | None = None) -> RingError:
        self.errors[reason] += 1
        return RingError(reason, f"queue {self.index}: {message}", head)

    # --- available ring --------------------------------------------------------------------
    def avail_idx(self) -> int:
        return _U16.unpack_from(self._mem, self._off.avail + 2)[0]

    def has_avail(self) -> bool:
        return self.avail_idx() != self.last_avail_idx

    def pop_avail(self) -> DescChain | None:
        """Next available chain, validated, or None. Raises RingError (only) on a
        malformed ring. A bad avail.idx consumes nothing; a bad chain is consumed and
        its head is in the error, so the device can return it or reset the queue."""
        avail_idx = _U16.unpack_from(self._mem, self._off.avail + 2)[0]
        last = self.last_avail_idx
        pending = (avail_idx - last) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.size:
            raise self._fail("avail-idx", f"avail idx {avail_idx} is {pending} ahead of {last}, more than the queue size {self.size}")
        head = _U16.unpack_from(self._mem, self._off.avail_ring + 2 * (last & self.mask))[0]
        self.last_avail_idx = (last + 1) & 0xFFFF
        if head >= self.size:
            raise self._fail("desc-index", f"avail ring entry {last} names head {head} >= queue size {self.size}")
        try:
            chain = self._walk(head)
        except RingError as e:
            e.head = head
            raise
        except Exception as e:  # belt and braces: nothing but RingError may escape
            raise self._fail("internal", f"unexpected {type(e).__name__} walking chain {head}: {e}", head) from e
        self.chains += 1
        return chain

    def _walk(self, head: int) -> DescChain:
        mem, base, size, unpack = self._mem, self._off.desc, self.size, _DESC.unpack_from
        max_chain = self.max_chain
        addrs: list[int] = []
        lens: list[int] = []
        writ: list[bool] = []
        seen: list[int] = []
        i = head
        ind = None
        while True:
            if len(seen) >= size or len(seen) >= max_chain:
                # exact diagnosis: a repeated index is a loop, otherwise just too long
                if len(set(seen)) < len(seen) or len(seen) >= size:
                    raise self._fail("desc-loop", f"descriptor chain from head {head} revisits a descriptor")
                raise self._fail("chain-too-long", f"chain from head {head} is longer than max_chain {max_chain}")
            seen.append(i)
            addr, ln, fl, nx = unpack(mem, base + DESC_SIZE * i)
            self.descriptors += 1
            self.walked += 1
            if fl & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect:
                    raise self._fail("indirect-not-negotiated", f"descriptor {i} has INDIRECT but VIRTIO_F_INDIRECT_DESC was not negotiated")
                if fl & VIRTQ_DESC_F_NEXT:
                    raise self._fail("indirect-next", f"descriptor {i} has both INDIRECT and NEXT")
                ind = self._walk_indirect(head, addr, ln, len(addrs))
                break
            addrs.append(addr)
            lens.append(ln)
            writ.append(bool(fl & VIRTQ_DESC_F_WRITE))
            if not fl & VIRTQ_DESC_F_NEXT:
                break
            if nx >= size:
                raise self._fail("desc-index", f"descriptor {i} of chain {head} has next {nx} >= queue size {size}")
            i = nx
        return self._finish(head, addrs, lens, writ, ind)

    def _walk_indirect(self, head: int, addr: int, ln: int, n_direct: int) -> np.ndarray:
        """Validate and follow one indirect table; returns its chain (DESC_DTYPE records)."""
        if ln == 0 or ln % DESC_SIZE:
            raise self._fail("indirect-len", f"indirect table of chain {head} has len {ln}, not a positive multiple of {DESC_SIZE}")
        n = ln // DESC_SIZE
        budget = self.max_chain - n_direct
        if n > self.max_chain:
            raise self._fail("indirect-len", f"indirect table of chain {head} has {n} descriptors, more than max_chain {self.max_chain}")
        self.walked += n           # the table is copied and checked whole: that is the cost
        try:
            off = self.layout.translate(addr, ln)
        except BadAddress as e:
            raise self._fail("indirect-not-ram", f"indirect table {addr:#x}+{ln:#x} of chain {head} is not inside one RAM region ({e})") from None
        # snapshot: the guest cannot change the table while the device walks it
        tbl = np.frombuffer(bytes(self._mem[off : off + ln]), dtype=DESC_DTYPE)
        flags = tbl["flags"]
        nexts = tbl["next"]
        if (flags[: n - 1] & VIRTQ_DESC_F_NEXT).all() and not flags[n - 1] & VIRTQ_DESC_F_NEXT and \
                (nexts[: n - 1] == np.arange(1, n, dtype=np.uint16)).all():
            order = None  # the usual in-order table: the chain is the whole table
            m = n
            if (flags & VIRTQ_DESC_F_INDIRECT).any():
                raise self._fail("indirect-nested", f"indirect table of chain {head} contains an INDIRECT descriptor")
        else:
            fl_l, nx_l = flags.tolist(), nexts.tolist()
            order = []
            i = 0
            while True:
                if len(order) >= n or len(order) >= budget:
                    if len(set(order)) < len(order) or len(order) >= n:
                        raise self._fail("desc-loop", f"indirect table of chain {head} loops")
                    raise self._fail("chain-too-long", f"chain from head {head} is longer than max_chain {self.max_chain}")
                order.append(i)
                f = fl_l[i]
                if f & VIRTQ_DESC_F_INDIRECT:
                    raise self._fail("indirect-nested", f"indirect table of chain {head} contains an INDIRECT descriptor ({i})")
                if not f & VIRTQ_DESC_F_NEXT:
                    break
                i = nx_l[i]
                if i >= n:
                    raise self._fail("desc-index", f"indirect descriptor of chain {head} has next {i} >= table size {n}")
            m = len(order)
        self.descriptors += m
        if m > budget:
            raise self._fail("chain-too-long", f"chain from head {head} has {n_direct + m} elements, more than max_chain {self.max_chain}")
        return tbl if order is None else tbl[order]

    def _finish(self, head: int, addrs: list[int], lens: list[int], writ: list[bool], ind: np.ndarray | None) -> DescChain:
        a: np.ndarray | None = None
        ln: np.ndarray | None = None
        if ind is not None:
            a = np.concatenate([np.array(addrs, dtype=np.uint64), ind["addr"]])
            ln = np.concatenate([np.array(lens, dtype=np.uint64), ind["len"].astype(np.uint64)])
            w = np.concatenate([np.array(writ, dtype=bool), (ind["flags"] & VIRTQ_DESC_F_WRITE) != 0])
            addrs, lens, writ = a.tolist(), ln.tolist(), w.tolist()
        n = len(addrs)
        # device-readable before device-writable (spec 2.7.4)
        try:
            n_read = writ.index(True)
        except ValueError:
            n_read = n
        else:
            if not all(writ[n_read:]):
                raise self._fail("desc-order", f"chain {head} has a device-readable buffer after a device-writable one")
        if n <= 8:
            offsets = self._translate_few(head, addrs, lens)
            rbytes = sum(lens[:n_read])
            wbytes = sum(lens) - rbytes
        else:
            if a is None or ln is None:
                a, ln = np.array(addrs, dtype=np.uint64), np.array(lens, dtype=np.uint64)
            offsets = self._translate_many(head, a, ln)
            rbytes = int(ln[:n_read].sum())
            wbytes = int(ln.sum()) - rbytes
        if rbytes + wbytes > MAX_CHAIN_BYTES:
            raise self._fail("chain-bytes", f"chain {head} covers {rbytes + wbytes} bytes, more than the spec's 2^32")
        if ind is not None:
            self.indirect_chains += 1
        return DescChain(head, list(zip(addrs, lens, writ)), offsets, n_read, rbytes, wbytes, ind is not None,
                         self._mem, a, ln)

    def _translate_few(self, head: int, addrs: list[int], lens: list[int]) -> list[int]:
        """memfd offsets of a short chain's buffers; each must lie inside one RAM region."""
        tr = self.layout.translate
        out = []
        for a, ln in zip(addrs, lens):
            try:
                out.append(tr(a, ln))
            except BadAddress as e:
                raise self._fail("buffer-not-ram", f"chain {head}: buffer {a:#x}+{ln:#x} is not inside one RAM region ({e})") from None
        return out

    def _translate_many(self, head: int, a: np.ndarray, ln: np.ndarray) -> list[int]:
        """Vectorized _translate_few for long (chunk) chains: one searchsorted."""
        idx = np.searchsorted(self._r_start, a, side="right").astype(np.int64) - 1
        cl = np.clip(idx, 0, len(self._r_start) - 1)
        end = self._r_end[cl]
        ok = (idx >= 0) & (a < end) & (ln <= end - np.minimum(a, end))
        if not ok.all():
            k = int(np.argmin(ok))
            raise self._fail("buffer-not-ram", f"chain {head}: buffer {k} {int(a[k]):#x}+{int(ln[k]):#x} is not inside one RAM region")
        return (self._r_off[cl] + (a - self._r_start[cl])).tolist()

    # --- used ring -----------------------------------------------------------------------------
    def push_used(self, head: int, written_len: int = 0) -> None:
        """Return a chain: write the used element, then bump used.idx (spec order)."""
        if not 0 <= head < self.size:
            raise ValueError(f"queue {self.index}: head {head} out of range")
        if not 0 <= written_len <= MAX_BUFFER_LEN:
            raise ValueError(f"written_len {written_len} does not fit le32")
        _USED_ELEM.pack_into(self._mem, self._off.used_ring + 8 * (self.used_idx & self.mask), head, written_len)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        _U16.pack_into(self._mem, self._off.used + 2, self.used_idx)

    def need_call(self) -> bool:
        """Should the device call (interrupt) the driver for what it pushed since the
        last decision? EVENT_IDX: vring_need_event(used_event, new, old); otherwise
        honour avail.flags NO_INTERRUPT. Counts calls / calls_suppressed; the caller
        writes the call eventfd."""
        new, old = self.used_idx, self._signalled_used
        if new == old:
            return False
        self._signalled_used = new
        if self.event_idx:
            need = vring_need_event(_U16.unpack_from(self._mem, self._off.used_event)[0], new, old)
        else:
            need = not (_U16.unpack_from(self._mem, self._off.avail)[0] & VIRTQ_AVAIL_F_NO_INTERRUPT)
        if need:
            self.calls += 1
        else:
            self.calls_suppressed += 1
        return need

    # --- available-buffer notification suppression ------------------------------------------
    def set_avail_event(self, idx: int) -> None:
        """EVENT_IDX: ask for a kick once avail.idx passes idx (reaches idx + 1)."""
        _U16.pack_into(self._mem, self._off.avail_event, idx & 0xFFFF)

    def enable_notifications(self) -> bool:
        """Re-arm kicks before sleeping: avail_event = last_avail_idx with EVENT_IDX,
        else clear used.flags NO_NOTIFY. Returns True if chains arrived meanwhile (the
        caller should pop again rather than wait for a kick that will not come)."""
        if self.event_idx:
            self.set_avail_event(self.last_avail_idx)
        else:
            self._used_flags &= ~VIRTQ_USED_F_NO_NOTIFY
            _U16.pack_into(self._mem, self._off.used, self._used_flags)
        return self.has_avail()

    def disable_notifications(self) -> None:
        """Ask for no kicks while busy. Without EVENT_IDX sets used.flags NO_NOTIFY;
        with it (flags must stay 0) simply leaves avail_event behind, as vhost does."""
        if not self.event_idx and not self._used_flags & VIRTQ_USED_F_NO_NOTIFY:
            self._used_flags |= VIRTQ_USED_F_NO_NOTIFY
            _U16.pack_into(self._mem, self._off.used, self._used_flags)

    # --- queue state (vhost-user GET/SET_VRING_BASE, migration) ------------------------------
    def state(self) -> dict[str, int]:
        return {"last_avail_idx": self.last_avail_idx, "used_idx": self.used_idx}

    def restore(self, last_avail_idx: int, used_idx: int | None = None) -> None:
        """Resume a queue another device instance served (e.g. after migration):
        last_avail_idx comes from that device; used_idx defaults to the used ring's
        idx, which lives in (migrated) guest RAM."""
        if used_idx is None:
            used_idx = _U16.unpack_from(self._mem, self._off.used + 2)[0]
        if not (0 <= last_avail_idx <= 0xFFFF and 0 <= used_idx <= 0xFFFF):
            raise ValueError(f"ring indices must be 16-bit, got {last_avail_idx}, {used_idx}")
        if (last_avail_idx - used_idx) & 0xFFFF > self.size:
            raise RingError("avail-idx", f"queue {self.index}: last_avail_idx {last_avail_idx} is more than "
                                         f"{self.size} ahead of used idx {used_idx}")
        self.last_avail_idx = last_avail_idx
        self.used_idx = self._signalled_used = used_idx

    def counters(self) -> dict[str, Any]:
        return {"chains": self.chains, "descriptors": self.descriptors, "indirect_chains": self.indirect_chains,
                "calls": self.calls, "calls_suppressed": self.calls_suppressed, "errors": dict(self.errors)}
