"""How the VMM frees ballooned guest RAM, declared once: the discard methods and the one loop.

A discard is a real system call on guest RAM's memfd, so what it frees is freed for
every mapping (the guest's too) and shows in the memfd's st_blocks:

  madvise     madvise(MADV_REMOVE) on the VMM's mapping (QEMU's choice for a shared
              memfd: ram_block_discard_range)
  punch-hole  fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) on the memfd

`discard_runs` is the only loop that makes these calls; the balloon device, GuestRAM,
the VMM's bare per-page baseline and `ResidentPages` (the lab's bare discards outside a
guest: the probes' hook calibration, the ring floor's hold, benchmarks) all go through it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from dataclasses import dataclass
from typing import Callable, Sequence

from device.virtio.layout import PAGE_SIZE

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)    # Linux 5.14; Python 3.11 lacks the name

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.fallocate.restype = ctypes.c_int


def punch_hole(fd: int, offset: int, length: int) -> None:
    """fallocate(PUNCH_HOLE|KEEP_SIZE): free the file's blocks in the range."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"fallocate(PUNCH_HOLE) failed: {os.strerror(e)}")


def _madvise_remove(ram, offsets: Sequence[int], lengths: Sequence[int] | int) -> None:
    madvise, remove = ram.mm.madvise, mmap.MADV_REMOVE
    if isinstance(lengths, int):
        for off in offsets:
            madvise(remove, off, lengths)
    else:
        for off, ln in zip(offsets, lengths):
            madvise(remove, off, ln)


def _punch_holes(ram, offsets: Sequence[int], lengths: Sequence[int] | int) -> None:
    fd = ram.fd
    for off, ln in zip(offsets, lengths if not isinstance(lengths, int) else [lengths] * len(offsets)):
        punch_hole(fd, off, ln)


@dataclass(frozen=True)
class DiscardMethod:
    """One way of freeing pieces of guest RAM's memfd: `free(ram, offsets, lengths)`
    makes one system call per piece."""

    name: str
    syscall: str
    free: Callable[..., None]


DISCARD_METHODS: dict[str, DiscardMethod] = {m.name: m for m in (
    DiscardMethod("madvise", "madvise(MADV_REMOVE)", _madvise_remove),
    DiscardMethod("punch-hole", "fallocate(PUNCH_HOLE|KEEP_SIZE)", _punch_holes),
)}
DISCARD_METHOD_NAMES: tuple[str, ...] = tuple(DISCARD_METHODS)    # the first is the default


def discard_method(name: str) -> DiscardMethod:
    """The method called `name`; ValueError naming the choices otherwise."""
    try:
        return DISCARD_METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown discard method {name!r}; choose from {DISCARD_METHOD_NAMES}") from None


def discard_runs(ram, method: str, offsets: Sequence[int], lengths: Sequence[int] | int) -> None:
    """Free memfd [offset, offset + length) for each piece, one system call per piece,
    in order. `lengths` an int: every piece is that long. The PFN protocol passes one
    page per piece on purpose: one madvise per page is that protocol's real, measured
    cost (as in QEMU), not something to batch away here. `ram` is a GuestRAM (its
    mapping `mm` and memfd `fd`)."""
    discard_method(method).free(ram, offsets, lengths)


class ResidentPages:
    """A memfd of `pages` pages mapped in this process: the pfn arm's discard with no
    guest and no protocol around it. `populate()` makes every page resident (one
    MADV_POPULATE_WRITE); `discard_each(n)` frees the first n page by page through
    `discard_runs`, the device's own loop. Use it as a context manager (the memfd is
    closed on leaving)."""

    def __init__(self, pages: int, name: str = "balloon-lab-resident") -> None:
        self.pages = pages
        self.fd = os.memfd_create(name)
        try:
            os.ftruncate(self.fd, pages * PAGE_SIZE)
            self.mm = mmap.mmap(self.fd, pages * PAGE_SIZE)
        except BaseException:
            os.close(self.fd)
            raise

    def populate(self) -> None:
        self.mm.madvise(MADV_POPULATE_WRITE, 0, self.pages * PAGE_SIZE)

    def discard_each(self, n: int | None = None) -> None:
        # per page on purpose: this is the bare per-page syscall cost
        discard_runs(self, "madvise", range(0, (self.pages if n is None else n) * PAGE_SIZE, PAGE_SIZE), PAGE_SIZE)

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)

    def __enter__(self) -> "ResidentPages":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
