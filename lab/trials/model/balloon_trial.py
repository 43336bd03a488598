"""One balloon trial's parameters on the lab's model (the device's VMM and guest as
processes), and the error a trial that cannot produce a trustworthy number raises.
"""
from __future__ import annotations

from dataclasses import dataclass, field


class TrialFailed(RuntimeError):
    """A trial that cannot produce a trustworthy number (a peer died, a check failed)."""

@dataclass
class BalloonTrial:
    protocol: str = "pfn"
    guest_mib: int = 1024
    inflate_mib: int | float = 512       # a float must be a whole number of pages (the spec checks it)
    workload: str = "aged"     # every free page touched once: each discard frees real memory
    workload_params: dict = field(default_factory=dict)
    seed: int = 1
    batch_pages: int | None = None
    discard: str = "madvise"
    backing: str = "4k"                 # host pages under guest RAM: 4k | thp | hugetlb
    partial_tracking: str = "full"      # huge backings: full | qemu (device/host/host_pages.py)
    alloc_policy: str = "linux"         # linux | hugepage-aware (device/guest/alloc_policy.py)
    deflate: bool = True
    timeout_s: float = 600.0        # the runner's wait for the monitor and the agent
    device_timeout_s: float = 30.0  # the guest driver's wait for the device to use a request
    log_level: str = "WARNING"
    init_on_alloc: bool = False     # the guest zeroes what it allocates for the balloon (Linux init_on_alloc)
    # Inflate/deflate cycles in one pair of processes: more samples per process start
    # (`balloon-lab ab` uses them); the workload gives deflated memory its contents back
    # between cycles (Workload.retouch), so each inflate frees as much as the first.
    cycles: int = 1

    def __post_init__(self) -> None:
        if self.inflate_mib <= 0 or self.inflate_mib >= self.guest_mib:
            raise ValueError(f"inflate_mib must be in 1..{self.guest_mib - 1}, got {self.inflate_mib}")
        if self.cycles < 1 or (self.cycles > 1 and not self.deflate):
            raise ValueError(f"cycles must be >= 1, and more than one needs the deflate (got {self.cycles})")
