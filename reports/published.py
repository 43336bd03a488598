"""The published figures the lab reproduces (from ../shared/SEED.md), as data.

They are printed beside the lab's own numbers, never mixed into the statistics: they
come from other machines (a real 8 GiB KVM guest in 2016-2018), so only shapes and
ratios (which stage dominates, how much faster) are comparable, not milliseconds.
"""
from __future__ import annotations

from dataclasses import dataclass, field

GIB = 1 << 30


@dataclass(frozen=True)
class PublishedInflate:
    """One published inflate measurement: 7 GiB of an idle 8 GiB guest."""

    arm: str                     # the lab arm it corresponds to
    label: str
    total_ms: float
    inflated_bytes: int
    source: str
    shares: dict[str, float] = field(default_factory=dict)  # stage -> fraction of total (PFN path only)
    faster_than_pfn: float | None = None  # as published (0.85 = "85 % faster")

    @property
    def ms_per_gib(self) -> float:
        return self.total_ms / (self.inflated_bytes / GIB)


# A published migration time is judged against a run only when the run's guest is within
# this factor of the published guest's size, with the same workload: migration time
# does not scale linearly with guest size (zero pages, hints), so other sizes only show
# the figure for reference.
COMPARABLE_SIZE_FACTOR = 2.0


@dataclass(frozen=True)
class PublishedMigration:
    label: str
    guest: str
    arm_times_ms: dict[str, float]  # lab arm -> total migration time
    source: str
    guest_mib: int = 8192           # the published guest's RAM ("8 GB" guests: 8 GiB)
    workload: str = "idle"          # the lab's workload that matches it ("" when none does)

    def comparable(self, guest_mib: int, workload: str) -> bool:
        """Whether a run of this guest size and workload may be judged against the figure."""
        ratio = guest_mib / self.guest_mib
        return workload == self.workload and 1 / COMPARABLE_SIZE_FACTOR <= ratio <= COMPARABLE_SIZE_FACTOR


INFLATE: tuple[PublishedInflate, ...] = (
    PublishedInflate(
        arm="pfn", label="PFN path", total_ms=4126.0, inflated_bytes=7 * GIB,
        source="VIRTIO_BALLOON_F_SG patch v12 (2017)",
        # "allocating pages 6.5 %, sending PFNs 68.3 %, address translation 6.1 %, madvise 19 %";
        # the series has no separate encode stage: building the PFN array is inside its stages.
        shares={"alloc": 0.065, "transmit": 0.683, "translate": 0.061, "discard": 0.19}),
    PublishedInflate(arm="bitmap", label="page bitmap (v3)", total_ms=590.0, inflated_bytes=7 * GIB,
                     source="v3 patch 4/7 commit message (2016)", faster_than_pfn=0.85),
    PublishedInflate(arm="chunks", label="SG chunks", total_ms=491.0, inflated_bytes=7 * GIB,
                     source="VIRTIO_BALLOON_F_SG patch v12 (2017)", faster_than_pfn=0.88),
)

INFLATE_CLAIM = "inflate/deflate about 85 % faster with bitmaps (cover letter, v2/v3)"

MIGRATION: tuple[PublishedMigration, ...] = (
    PublishedMigration(label="seed bitmap hints, idle 8 GiB guest, 10 Gbit/s", guest="8 GB idle",
                       arm_times_ms={"none": 2000.0, "bitmap": 500.0},
                       source="cover letter, v2/v3 (2016; \"about 2 s -> about 500 ms\")"),
    PublishedMigration(label="FREE_PAGE_HINT, idle 8 GiB guest", guest="8 GB idle",
                       arm_times_ms={"none": 2970.0, "upstream": 620.0},
                       source="FREE_PAGE_HINT v37 cover letter (2018)"),
    PublishedMigration(label="FREE_PAGE_HINT, 8 GiB guest running make -j4", guest="8 GB make -j4",
                       arm_times_ms={"none": 4502.0, "upstream": 2273.0},
                       source="FREE_PAGE_HINT v37 cover letter (2018)", workload=""),
    PublishedMigration(label="FREE_PAGE_HINT, idle 128 GiB guest (400 ms downtime limit)", guest="128 GB idle",
                       arm_times_ms={"none": 41651.0, "upstream": 5294.0},
                       source="FREE_PAGE_HINT v37 cover letter (2018)", guest_mib=131072),
)
