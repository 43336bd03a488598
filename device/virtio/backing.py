"""Guest RAM backings: what kind of host page sits under the memfd.

  4k       plain shmem memfd, 4 KiB host pages (the default)
  thp      shmem memfd whose mappings carry MADV_HUGEPAGE: with the sysfs knob
           /sys/kernel/mm/transparent_hugepage/shmem_enabled at `advise`, every
           2 MiB aligned range the guest touches becomes one 2 MiB page
  hugetlb  MFD_HUGETLB memfd: 2 MiB pages from the hugetlbfs pool
           (/proc/sys/vm/nr_hugepages); mmap reserves the whole guest up front,
           so the pool must hold it before the VMM starts

Why it matters: a huge host page is freed only when all of it is discarded, and the
kernel frees one 2 MiB page far faster than 512 small ones (ENVIRONMENT.md: 1 GiB
discarded in 191 ms with 4 KiB pages, 5.1 ms with THP). The device therefore tracks
ballooned sub-pages per host page (device/vmm/huge_pages.py).

`ensure_backing` changes the two kernel knobs when asked (doctor, the lab before a
trial) and returns one sentence per change, so nothing changes silently; each change
is restored when the process ends (system/knobs.py). scripts/setup.sh is
the one place that sets them for good, when asked to.
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass

from system import knobs

BACKINGS = ("4k", "thp", "hugetlb")
HUGE_PAGE_SHIFT = 21
MFD_HUGETLB = 0x0004
MFD_HUGE_2MB = HUGE_PAGE_SHIFT << 26          # MFD_HUGE_SHIFT = 26
THP_SHMEM_KNOB = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"
NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"
MEMINFO = "/proc/meminfo"
THP_OK_STATES = ("advise", "always", "within_size", "force")


class BackingError(RuntimeError):
    """The host cannot provide this backing now; the message says what to change."""


def check_name(backing: str) -> str:
    if backing not in BACKINGS:
        raise ValueError(f"unknown backing {backing!r}; choose from {', '.join(BACKINGS)}")
    return backing


def host_page_shift(backing: str) -> int:
    """log2 of the host page size under guest RAM for a backing."""
    return 12 if check_name(backing) == "4k" else HUGE_PAGE_SHIFT


def memfd_flags(backing: str) -> int:
    """Extra memfd_create flags for a backing (MFD_HUGETLB accepts MFD_ALLOW_SEALING too)."""
    return MFD_HUGETLB | MFD_HUGE_2MB if check_name(backing) == "hugetlb" else 0


def advise_mapping(mm: mmap.mmap, backing: str) -> None:
    """MADV_HUGEPAGE on a THP-backed mapping: shmem allocates huge pages at fault
    time only for mappings that asked (knob `advise`). Every process that faults
    guest RAM in (the guest) must do it on its own mapping."""
    if backing == "thp":
        mm.madvise(mmap.MADV_HUGEPAGE)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def thp_shmem_state() -> str | None:
    """The bracketed value of shmem_enabled (`never` at boot here), None if absent."""
    raw = _read(THP_SHMEM_KNOB)
    if raw is None:
        return None
    for word in raw.split():
        if word.startswith("["):
            return word.strip("[]")
    return raw


@dataclass(frozen=True)
class HugetlbPool:
    total: int
    free: int
    reserved: int
    page_bytes: int

    @property
    def available(self) -> int:
        """Pages a new mapping can still reserve."""
        return self.free - self.reserved


def hugetlb_pool() -> HugetlbPool:
    vals: dict[str, int] = {}
    for line in (_read(MEMINFO) or "").splitlines():
        k, _, v = line.partition(":")
        if k.startswith("HugePages_") or k == "Hugepagesize":
            vals[k] = int(v.split()[0])
    return HugetlbPool(vals.get("HugePages_Total", 0), vals.get("HugePages_Free", 0),
                       vals.get("HugePages_Rsvd", 0), vals.get("Hugepagesize", 2048) * 1024)


def pages_for(ram_bytes: int) -> int:
    return -(-ram_bytes >> HUGE_PAGE_SHIFT)


def backing_problem(backing: str, ram_bytes: int) -> str | None:
    """Why this host cannot back `ram_bytes` of guest RAM with `backing` now, or None."""
    check_name(backing)
    if backing == "thp":
        st = thp_shmem_state()
        if st is None:
            return f"{THP_SHMEM_KNOB} is missing: the kernel has no shmem THP"
        if st not in THP_OK_STATES:
            return (f"{THP_SHMEM_KNOB} is `{st}`: memfd pages stay 4 KiB "
                    f"(fix: echo advise > {THP_SHMEM_KNOB}, or run setup / doctor --fix)")
    elif backing == "hugetlb":
        pool = hugetlb_pool()
        need = pages_for(ram_bytes)
        if pool.available < need:
            return (f"the hugetlb pool has {pool.available} free 2 MiB pages, a guest of {ram_bytes >> 20} MiB "
                    f"needs {need} (fix: raise {NR_HUGEPAGES} to {pool.total - pool.available + need}, "
                    f"or run the lab as root: it raises the pool for the guest and says so)")
    return None


def ensure_backing(backing: str, ram_bytes: int = 0) -> list[str]:
    """Make the host able to provide `backing` for `ram_bytes` of guest RAM: set the
    THP knob to `advise`, or raise the hugetlb pool by what is missing. Returns one
    sentence per change made (empty: nothing needed). Each change is a hold on the
    knob (system/knobs.py), restored when the process ends or calls
    knobs.restore_all(). BackingError when the change is not possible (not root,
    or the kernel cannot find the huge pages): then nothing stays changed."""
    changes: list[str] = []
    if backing_problem(backing, ram_bytes) is None:
        return changes
    hold = None
    try:
        if backing == "thp":
            hold = knobs.raise_knob(knobs.THP_SHMEM, "advise")
        elif backing == "hugetlb":
            pool = hugetlb_pool()
            hold = knobs.raise_knob(knobs.HUGETLB_POOL, pages_for(ram_bytes) - pool.available,
                                         f"{pages_for(ram_bytes) * pool.page_bytes >> 20} MiB of hugetlb pool "
                                         f"for a {ram_bytes >> 20} MiB guest")
    except knobs.KnobError as e:
        raise BackingError(f"{backing_problem(backing, ram_bytes)}; {e}") from None
    if hold is not None:
        changes.append(hold.change)
    problem = backing_problem(backing, ram_bytes)
    if problem is not None:
        if hold is not None:
            hold.release()
        raise BackingError(problem + ("; changed and restored: " + "; ".join(changes) if changes else ""))
    return changes
