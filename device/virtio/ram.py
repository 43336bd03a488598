"""Guest RAM: one memfd shared by the VMM and the guest process.

The VMM creates the memfd (sparse: an idle guest costs no host memory), both sides
map all of it MAP_SHARED. Discarding ballooned memory is a real system call on the
VMM's mapping: madvise(MADV_REMOVE) frees the memfd pages for every mapping, or
fallocate(PUNCH_HOLE|KEEP_SIZE) as the alternative. What was freed is measured from
the memfd itself (fstat st_blocks, SEEK_DATA/SEEK_HOLE), never from bookkeeping.
Scans of guest RAM go through pread into a reused buffer so untouched memory is
never faulted in (ENVIRONMENT.md).
"""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
from typing import Iterator

import numpy as np

from device.virtio.backing import advise_mapping, host_page_shift, memfd_flags
from device.virtio.discard import discard_runs
from device.virtio.layout import PAGE_SHIFT, PAGE_SIZE, GuestLayout

# The seals QEMU puts on a memfd backend before sharing it: nobody (the guest holds the
# fd too) can shrink or grow it, and nobody can change the seals. Without them a guest
# could ftruncate guest RAM and the VMM's next touch of its mapping would die of SIGBUS.
SIZE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL

def seal_size(fd: int) -> None:
    """Seal a memfd's size (F_SEAL_SHRINK, F_SEAL_GROW, then F_SEAL_SEAL) before handing it
    to another process. The memfd must have been created with MFD_ALLOW_SEALING and sized."""
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL)


def size_sealed(fd: int) -> bool:
    """True when nobody can resize the memfd any more."""
    try:
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SIZE_SEALS == SIZE_SEALS
    except OSError:
        return False


class GuestRAM:
    """The memfd and a MAP_SHARED mapping of all of it."""

    def __init__(self, fd: int, layout: GuestLayout, *, owner: bool = False, backing: str = "4k") -> None:
        self.fd = fd
        self.layout = layout
        self.size = layout.ram_bytes
        self.owner = owner
        self.backing = backing
        self.host_page_shift = host_page_shift(backing)
        self.mm = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        advise_mapping(self.mm, backing)
        # A byte view of the whole mapping: slicing is zero-copy, touching faults in.
        self.mem = memoryview(self.mm)

    @classmethod
    def create(cls, layout: GuestLayout, name: str = "balloon-lab-guest-ram", backing: str = "4k", *,
               seal: bool = True) -> "GuestRAM":
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | memfd_flags(backing))
        os.ftruncate(fd, layout.ram_bytes)
        if seal:
            seal_size(fd)
        return cls(fd, layout, owner=True, backing=backing)

    def close(self) -> None:
        try:
            self.mem.release()
        except Exception:
            pass
        try:
            self.mm.close()
        except Exception:
            pass
        if self.owner:
            try:
                os.close(self.fd)
            except OSError:
                pass

    def intact(self) -> bool:
        """False when the memfd is now shorter than the mapping: touching the mapping
        past the end would raise SIGBUS. Cannot happen to a sealed memfd; checked
        before the device touches guest RAM so an unsealed one cannot kill the VMM."""
        return os.fstat(self.fd).st_size >= self.size

    # --- access by guest-physical address (validated) ------------------------------
    def view(self, gpa: int, length: int) -> memoryview:
        """Zero-copy view of guest-physical [gpa, gpa+length); BadAddress if not RAM."""
        off = self.layout.translate(gpa, length)
        return self.mem[off : off + length]

    def np_view(self, gpa: int, length: int, dtype=np.uint8) -> np.ndarray:
        return np.frombuffer(self.view(gpa, length), dtype=dtype)

    def page_view(self, pfn: int) -> memoryview:
        return self.view(pfn << PAGE_SHIFT, PAGE_SIZE)

    # --- discard ------------------------------------------------------------------
    def discard(self, offset: int, length: int, method: str = "madvise") -> None:
        """One system call freeing memfd [offset, offset+length) (device/virtio/discard.py)."""
        discard_runs(self, method, (offset,), (length,))

    # --- what the memfd really holds ------------------------------------------------
    def allocated_bytes(self) -> int:
        """Bytes of memory the memfd really holds (st_blocks * 512)."""
        return os.fstat(self.fd).st_blocks * 512

    def data_extents(self) -> Iterator[tuple[int, int]]:
        """(offset, length) of every range of the memfd that holds data, from the
        kernel's SEEK_DATA/SEEK_HOLE: an oracle independent of the lab's bookkeeping."""
        yield from memfd_data_extents(self.fd, self.size)

    def data_page_mask(self) -> np.ndarray:
        """Boolean per memfd page: True where the kernel says the page holds data."""
        mask = np.zeros(self.size >> PAGE_SHIFT, dtype=bool)
        for off, ln in self.data_extents():
            mask[off >> PAGE_SHIFT : (off + ln + PAGE_SIZE - 1) >> PAGE_SHIFT] = True
        return mask

    def host_pages_with_data(self, host_pages: np.ndarray) -> np.ndarray:
        """Bool per given host page (memfd offset >> host_page_shift): does the kernel
        hold data for it? SEEK_DATA where the file system answers it; hugetlbfs does
        not (it calls the whole file data), so there each page is read with pread,
        which allocates nothing for a hole and reads zeros from it: a discarded
        hugetlb page is one that reads as all zeros."""
        hp = np.asarray(host_pages, dtype=np.int64)
        shift = self.host_page_shift
        if self.backing != "hugetlb":
            per = 1 << (shift - PAGE_SHIFT)
            mask = self.data_page_mask()
            return mask.reshape(-1, per)[hp].any(axis=1) if hp.size else np.zeros(0, bool)
        out = np.zeros(hp.size, dtype=bool)
        buf = bytearray(1 << shift)
        for i, h in enumerate(hp.tolist()):        # per host page: a verification pass, not a hot path
            n = os.preadv(self.fd, [buf], h << shift)
            out[i] = n > 0 and bool(np.frombuffer(buf, dtype=np.uint64)[: n // 8].any())
        return out

    # --- scans that never fault untouched memory in ---------------------------------
    def scan(self, chunk_bytes: int = 64 << 20) -> Iterator[tuple[int, memoryview]]:
        """Yield (memfd_offset, bytes) over the data extents only, read with pread into
        one reused buffer: holes are skipped, nothing is faulted into the mappings."""
        buf = bytearray(chunk_bytes)
        mv = memoryview(buf)
        for off, ln in self.data_extents():
            pos, end = off, off + ln
            while pos < end:
                n = os.preadv(self.fd, [mv[: min(chunk_bytes, end - pos)]], pos)
                if n <= 0:
                    break
                yield pos, mv[:n]
                pos += n


def memfd_data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        end = min(end, size)
        if end <= start:
            return
        yield start, end - start
        pos = end


def process_rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """Resident set of a process (VmRSS, includes shared memfd pages it has mapped);
    field="VmHWM" gives its peak."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
