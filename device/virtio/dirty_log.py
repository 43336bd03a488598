"""The dirty log: one byte per guest PFN in shared memory, marked by every guest write.

Like KVM's dirty bitmap, but kept by the guest model itself: GuestPageContents sets
log[pfn] = 1 after the data of a write chunk is in place (attach_dirty_log), and
counts write chunks in progress in `inflight`. The VMM creates the log as its own
small memfd (one page of header, then max_pfn bytes; only touched pages cost
memory) and hands it to the guest with SET_DIRTY_LOG (control request 13, VMM to
guest). Layout of the memfd:

    offset 0      le64 inflight (write chunks in progress in the guest)
    offset 4096   max_pfn bytes: 1 = written since the VMM last harvested it

Harvesting is race-free without atomic exchange: the VMM reads the set entries,
clears exactly those, and only then reads the pages. The guest writes data before
its mark, so a write that races the harvest either is in the data the VMM reads
afterwards or leaves its mark set for the next round.
"""
from __future__ import annotations

import mmap
import os
import struct

import numpy as np

from device.virtio.ram import seal_size
from device.virtio.layout import PAGE_SIZE

LOG_OFFSET = PAGE_SIZE
INFLIGHT_OFFSET = 0
# SET_DIRTY_LOG payload: le64 max_pfn, le64 log_offset, le64 inflight_offset, le64 memfd size
SET_DIRTY_LOG = struct.Struct("<QQQQ")


class DirtyLog:
    """VMM side: owns the memfd; harvest() returns the PFNs written since last time."""

    def __init__(self, max_pfn: int) -> None:
        if max_pfn <= 0:
            raise ValueError(f"max_pfn must be positive, got {max_pfn}")
        self.max_pfn = max_pfn
        self.size = LOG_OFFSET + (-(-max_pfn // PAGE_SIZE)) * PAGE_SIZE
        self.fd = os.memfd_create("balloon-lab-dirty-log", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, self.size)
        seal_size(self.fd)          # the guest holds this fd too: it must not shrink it under us
        self.mm = mmap.mmap(self.fd, self.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.log = np.frombuffer(self.mm, dtype=np.uint8, count=max_pfn, offset=LOG_OFFSET)
        self.inflight = np.frombuffer(self.mm, dtype=np.uint64, count=1, offset=INFLIGHT_OFFSET)
        self.harvests = 0

    def payload(self) -> bytes:
        return SET_DIRTY_LOG.pack(self.max_pfn, LOG_OFFSET, INFLIGHT_OFFSET, self.size)

    def harvest(self) -> np.ndarray:
        """Sorted PFNs marked since the last harvest; their marks are cleared. Works on
        a copy: the guest keeps marking while the VMM looks."""
        pfns = np.flatnonzero(self.log.copy())
        self.log[pfns] = 0
        self.harvests += 1
        return pfns

    def peek(self) -> np.ndarray:
        return np.flatnonzero(self.log.copy())

    def mark(self, pfns) -> None:
        """Writes the VMM itself makes into guest RAM (device-written buffers)."""
        pfns = np.asarray(pfns, dtype=np.int64)
        self.log[pfns[(pfns >= 0) & (pfns < self.max_pfn)]] = 1

    def close(self) -> None:
        _close_mapping(self)


def _close_mapping(log) -> None:
    """Drop the numpy views, unmap and close the memfd (either side of the log)."""
    log.log = log.inflight = None
    try:
        log.mm.close()
    except (BufferError, ValueError):
        pass
    try:
        os.close(log.fd)
    except OSError:
        pass


class MappedDirtyLog:
    """Guest side: the VMM's memfd mapped, as the arrays GuestPageContents.attach_dirty_log takes."""

    def __init__(self, fd: int, payload: bytes, min_pfns: int) -> None:
        if len(payload) < SET_DIRTY_LOG.size:
            raise ValueError(f"SET_DIRTY_LOG payload needs {SET_DIRTY_LOG.size} bytes, got {len(payload)}")
        max_pfn, log_off, inflight_off, size = SET_DIRTY_LOG.unpack_from(payload)
        real = os.fstat(fd).st_size
        if size != real or size > 1 << 40:
            raise ValueError(f"dirty log memfd is {real} bytes, the request says {size}")
        if max_pfn < min_pfns:
            raise ValueError(f"dirty log covers {max_pfn} PFNs, the guest has {min_pfns}")
        if log_off + max_pfn > size or inflight_off + 8 > size or inflight_off % 8 \
                or inflight_off < log_off + max_pfn and log_off < inflight_off + 8:
            raise ValueError("dirty log offsets do not fit the memfd (or overlap)")
        self.fd = fd
        self.mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.log = np.frombuffer(self.mm, dtype=np.uint8, count=max_pfn, offset=log_off)
        self.inflight = np.frombuffer(self.mm, dtype=np.uint64, count=1, offset=inflight_off)

    def close(self) -> None:
        _close_mapping(self)
