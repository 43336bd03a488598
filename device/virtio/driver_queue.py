"""The driver (guest) side of one split virtqueue: DriverQueue.

The guest process adds chains of (gpa, len) buffers, publishes them and kicks the
device unless it asked not to be; it reclaims what the device returned used. All
its bookkeeping is private (never read back from shared memory); per request it does
a few struct.pack_into/unpack_from calls on its mapping of guest RAM and nothing else,
because the lab measures protocol overhead and the PFN path sends 1024 requests per
GiB. Indirect tables live in a driver-owned area of guest RAM (indirect_area).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from device.virtio.layout import BadAddress
from device.virtio.ram import GuestRAM
from device.virtio.split_ring import (DESC_ALIGN, DESC_DTYPE, DESC_SIZE, DESC_STRUCT, LE16, MAX_BUFFER_LEN,
                                      MAX_CHAIN_BYTES, USED_ELEM, VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT,
                                      VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_USED_F_NO_NOTIFY, QueueFull,
                                      RingError, RingOffsets, memory_barrier, ring_bytes, vring_need_event)


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
        self._off = RingOffsets(ram, size, desc_gpa, avail_gpa, used_gpa)
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
        mem, base, nxt, pack = self._mem, self._off.desc, self._next, DESC_STRUCT.pack_into
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
        DESC_STRUCT.pack_into(self._mem, self._off.desc + DESC_SIZE * head,
                        self._ind_gpa + DESC_SIZE * start, DESC_SIZE * n, VIRTQ_DESC_F_INDIRECT, 0)
        self._ind_of[head] = (start, n)
        self.indirect_added += 1
        return self._expose(head, head, 1, token)

    def _expose(self, head: int, tail: int, ndesc: int, token: Any) -> int:
        self._ndesc[head] = ndesc
        self._tail[head] = tail
        self._tokens[head] = token
        # ring entry first; avail.idx only in publish()
        LE16.pack_into(self._off.words, self._off.avail_ring + 2 * (self._avail_shadow & self.mask), head)
        self._avail_shadow = (self._avail_shadow + 1) & 0xFFFF
        self.added += 1
        return head

    # --- notifying the device ----------------------------------------------------------
    def publish(self) -> None:
        """Write avail.idx so the device sees every chain added so far."""
        if self._avail_published != self._avail_shadow:
            LE16.pack_into(self._off.words, self._off.avail + 2, self._avail_shadow)
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
        memory_barrier()                 # avail idx out before avail_event / used.flags are read
        if self.event_idx:
            need = vring_need_event(LE16.unpack_from(self._off.words, self._off.avail_event)[0], new, old)
        else:
            need = not (LE16.unpack_from(self._off.words, self._off.used)[0] & VIRTQ_USED_F_NO_NOTIFY)
        if need:
            self.kicks += 1
            self.kick()
        else:
            self.notifications_suppressed += 1
        return need

    # --- used buffers --------------------------------------------------------------------
    def has_used(self) -> bool:
        return LE16.unpack_from(self._off.words, self._off.used + 2)[0] != self.last_used_idx

    def get_used(self, limit: int | None = None) -> list[tuple[Any, int]]:
        """Reclaim the chains the device returned: [(token, written_len)], in used order.
        A used id that is not an outstanding head raises RingError('used-id')."""
        mem, off = self._mem, self._off
        used_idx = LE16.unpack_from(off.words, off.used + 2)[0]
        pending = (used_idx - self.last_used_idx) & 0xFFFF
        if pending > self.in_flight:
            raise RingError("used-idx", f"queue {self.index}: device used idx {used_idx} is {pending} ahead "
                                        f"of {self.last_used_idx} but only {self.in_flight} chains are in flight")
        if limit is not None:
            pending = min(pending, limit)
        out: list[tuple[Any, int]] = []
        last = self.last_used_idx
        for _ in range(pending):
            hid, ln = USED_ELEM.unpack_from(mem, off.used_ring + 8 * (last & self.mask))
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
            LE16.pack_into(self._off.words, self._off.used_event, self.last_used_idx)
        elif self._avail_flags & VIRTQ_AVAIL_F_NO_INTERRUPT:
            self._avail_flags &= ~VIRTQ_AVAIL_F_NO_INTERRUPT
            LE16.pack_into(self._off.words, self._off.avail, self._avail_flags)
        memory_barrier()                 # the request for a call out before used idx is read
        return self.has_used()

    def set_used_event(self, idx: int) -> None:
        """EVENT_IDX: ask for a call once used.idx passes idx (i.e. reaches idx + 1)."""
        LE16.pack_into(self._off.words, self._off.used_event, idx & 0xFFFF)

    def disable_interrupts(self) -> None:
        """Ask for no calls. Without EVENT_IDX sets avail.flags NO_INTERRUPT; with it
        (flags must stay 0) moves used_event just behind the last seen used idx, so the
        device would only call after 65535 more used buffers."""
        if self.event_idx:
            LE16.pack_into(self._off.words, self._off.used_event, (self.last_used_idx - 1) & 0xFFFF)
        elif not self._avail_flags & VIRTQ_AVAIL_F_NO_INTERRUPT:
            self._avail_flags |= VIRTQ_AVAIL_F_NO_INTERRUPT
            LE16.pack_into(self._off.words, self._off.avail, self._avail_flags)

    def counters(self) -> dict[str, int]:
        return {"added": self.added, "indirect_added": self.indirect_added, "kicks": self.kicks,
                "notifications_suppressed": self.notifications_suppressed, "used": self.used_seen}
