"""The lab's workloads on the real guest: what each becomes in busybox (guest/workload.sh).

The lab's guest model places data page by page; a real Linux guest only lets a
workload allocate and free memory, so each lab workload maps to "keep K MiB of random
data in tmpfs (checksummed before and after every balloon operation) and allocate S
MiB more, then delete it". docs/WORKLOADS.md explains where the two differ.
"""
from __future__ import annotations

from dataclasses import dataclass

# lab workload -> its real-guest counterpart; the others have none yet
REAL_WORKLOADS = ("idle", "aged")


@dataclass(frozen=True)
class RealWorkload:
    name: str
    keep_mib: int       # kept in tmpfs, checksummed
    stale: str          # MiB allocated then freed, or "rest" (all the guest has available)

    def command(self) -> str:
        return f"/bin/sh /lab/workload.sh fill {self.keep_mib} {self.stale}"


def real_workload(name: str, params: dict, guest_mib: int) -> RealWorkload:
    """The real-guest workload of a lab workload; ValueError for one without a counterpart."""
    if name not in REAL_WORKLOADS:
        raise ValueError(f"workload {name!r} has no real-guest counterpart for the qemu arms "
                         f"(they run: {', '.join(REAL_WORKLOADS)}; see docs/WORKLOADS.md)")
    known = {"idle": {"used_share", "stale_share", "regions", "stale_regions"},
             "aged": {"used_share", "regions"}}[name]
    extra = set(params) - known
    if extra:
        raise ValueError(f"workload {name!r} has no parameter {sorted(extra)[0]!r}")
    used = float(params.get("used_share", 0.05))
    keep = int(used * guest_mib)
    if name == "idle":
        return RealWorkload(name, keep, str(int(float(params.get("stale_share", 0.20)) * guest_mib)))
    return RealWorkload(name, keep, "rest")
