"""Does a trial fit in the memory the machine has now? Checked before it starts.

A guest's RAM is a memfd the host backs page by page as the guest writes it, and this
machine has no swap: a trial that writes more than the host can give does not fail,
it walks free memory down into the OOM killer, which may kill anyone's process (the
machine is shared). So before a trial's processes start, what it will touch is added
up and compared with what the host can give:

- the guest RAM the workload writes: its `touched_share()` of guest RAM (workloads/),
  all of it for a real Linux guest (arms qemu-*: the kernel zeroes what the balloon
  allocates); backed by the hugetlb pool instead with `--backing hugetlb`, where the
  part of the guest the free pool does not cover is taken from memory when the lab
  raises the pool;
- the VMM's and the guest process's own memory, PROCESS_ALLOWANCE: measured here at
  40-48 MiB (anonymous RSS of both, guests of 1, 4 and 16 GiB at rest), with room for
  the peaks of inflate and verify;
- how many copies run at once: one for a balloon trial (its twins run one after the
  other, each reaped before the next starts, so the twin adds nothing to the peak),
  two for a migration (source and destination each hold guest RAM).

What the host can give is MemAvailable (/proc/meminfo), or less if the lab runs in a
memory cgroup with a limit (v2 memory.max, v1 memory.limit_in_bytes: what is left
under the limit), minus a margin: MARGIN_SHARE of MemTotal, at least MIN_MARGIN. A
trial that does not fit is refused in one line that gives the figures;
`--ignore-memory-check` goes ahead anyway.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

MiB = 1 << 20
GiB = 1 << 30
PROCESS_ALLOWANCE = 256 * MiB      # VMM + guest process (measured 40-48 MiB at rest; see above)
MIN_MARGIN = 1 * GiB
MARGIN_SHARE = 0.05
IGNORE_OPTION = "--ignore-memory-check"

_enabled = True


def set_enabled(on: bool) -> None:
    """`--ignore-memory-check`: trials of this process go ahead whatever they need."""
    global _enabled
    _enabled = on


class NotEnoughMemory(RuntimeError):
    """A trial the host cannot hold now; the message is one line with the figures."""


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


@dataclass
class Need:
    """What one trial will make the host back, part by part."""

    parts: list[tuple[str, int]] = field(default_factory=list)

    def add(self, what: str, nbytes: int) -> "Need":
        if nbytes > 0:
            self.parts.append((what, int(nbytes)))
        return self

    @property
    def total(self) -> int:
        return sum(n for _, n in self.parts)

    def describe(self) -> str:
        return " + ".join(f"{what}: {_gib(n)}" for what, n in self.parts)


@dataclass(frozen=True)
class Room:
    """What the host can give now, and where the figure comes from."""

    available: int
    source: str
    margin: int


def meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, _, v = line.partition(":")
            parts = v.split()
            if parts:
                out[k] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def _cgroup_room() -> tuple[int, str, int] | None:
    """(bytes left under the memory limit of this process's cgroup (v2 or v1), where the
    figure comes from, the limit), or None when there is no limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    best: tuple[int, str, int] | None = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":                                         # v2
            d = Path("/sys/fs/cgroup") / path.lstrip("/")
            files = ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):                      # v1
            d = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        try:
            limit_s, usage_s = ((d / f).read_text().strip() for f in files)
        except OSError:
            continue
        if limit_s == "max" or int(limit_s) >= 1 << 60:
            continue
        left = int(limit_s) - int(usage_s)
        if best is None or left < best[0]:
            best = (left, f"the memory cgroup {path}'s limit {_gib(int(limit_s))} less its use {_gib(int(usage_s))}",
                    int(limit_s))
    return best


def room() -> Room:
    """MemAvailable with its margin, or what is left under a tighter cgroup limit with a
    margin of MARGIN_SHARE of that limit."""
    info = meminfo()
    cg = _cgroup_room()
    if cg is not None and cg[0] < info.get("MemAvailable", 0):
        left, source, limit = cg
        return Room(left, source, int(MARGIN_SHARE * limit))
    return Room(info.get("MemAvailable", 0), "MemAvailable",
                max(MIN_MARGIN, int(MARGIN_SHARE * info.get("MemTotal", 0))))


def balloon_trial_need(guest_mib: int, touched_share: float, *, backing: str = "4k", real_guest: bool = False,
                       copies: int = 1, huge_pool_free_bytes: int = 0) -> Need:
    """What a trial of a `guest_mib` guest makes the host back (see the module doc)."""
    guest = guest_mib * MiB
    touched = guest if real_guest else int(min(1.0, max(0.0, touched_share)) * guest)
    need = Need()
    for k in range(copies):
        who = "" if copies == 1 else (" (source)", " (destination)")[min(k, 1)]
        if backing == "hugetlb":
            need.add(f"hugetlb pool beyond its free pages{who}", guest - huge_pool_free_bytes)
            huge_pool_free_bytes = max(0, huge_pool_free_bytes - guest)
        else:
            what = "guest RAM, all written by a Linux guest" if real_guest else \
                f"guest RAM the workload writes, {100 * touched / guest:.0f} % of it"
            need.add(what + who, touched)
        need.add(f"{'QEMU' if real_guest else 'VMM and guest processes'}{who}", PROCESS_ALLOWANCE)
    return need


def check(need: Need, what: str) -> None:
    """NotEnoughMemory (one line, with the figures) unless `need` fits with the margin,
    or the check is off (--ignore-memory-check)."""
    if not _enabled:
        return
    r = room()
    if need.total + r.margin <= r.available:
        return
    raise NotEnoughMemory(
        f"not enough memory for {what}: it would make the host back {_gib(need.total)} ({need.describe()}); "
        f"{r.source} is {_gib(r.available)}, of which {_gib(r.margin)} is kept free; use a smaller --guest-mib, "
        f"or {IGNORE_OPTION} to go ahead anyway")
