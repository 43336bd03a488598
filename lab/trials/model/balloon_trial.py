"""One balloon trial's parameters on the lab's model (the device's VMM and guest as
processes), and the error a trial that cannot produce a trustworthy number raises.

A trial of an experiment is built from its spec in one place, `BalloonTrial.from_spec`:
the spec (lab/trials/spec.py) has validated every field once, so nothing here checks
them again, and the arm's protocol goes on to the VMM's launch record as it is.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from device.api import MiB, PAGE_SHIFT


class TrialFailed(RuntimeError):
    """A trial that cannot produce a trustworthy number (a peer died, a check failed)."""


def mib_to_pages(mib: int | float) -> int:
    """Guest pages in `mib` MiB (a fractional MiB is a whole number of pages: the spec checks it)."""
    return round(mib * MiB) >> PAGE_SHIFT


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
    partial_tracking: str = "full"      # huge backings: full | qemu (device/vmm/huge_pages.py)
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
        # the spec validated every field a spec has (from_spec); cycles is no spec field
        if self.cycles < 1 or (self.cycles > 1 and not self.deflate):
            raise ValueError(f"cycles must be >= 1, and more than one needs the deflate (got {self.cycles})")

    @classmethod
    def from_spec(cls, spec, arm: str, rnd: int = 0, **overrides) -> "BalloonTrial":
        """Arm `arm`'s trial of round `rnd` under a validated ExperimentSpec (seed
        spec.seed + rnd: every arm of a round sees the same guest layout)."""
        return cls(protocol=arm, guest_mib=spec.guest_mib, inflate_mib=spec.inflate_mib, workload=spec.workload,
                   workload_params=dict(spec.workload_params), seed=spec.seed + rnd,
                   batch_pages=spec.batch_pages_for(arm), discard=spec.discard, backing=spec.backing,
                   partial_tracking=spec.partial_tracking, alloc_policy=spec.alloc_policy,
                   init_on_alloc=spec.guest_init_on_alloc, **overrides)

    @property
    def target_pages(self) -> int:
        """The balloon's size after the inflate, in guest pages."""
        return mib_to_pages(self.inflate_mib)
