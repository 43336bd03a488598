"""The VMM process's launch record: every option of `python -m device.vmm.process`, typed,
with its command line (`to_argv`) and its parser (`from_argv`). Every launcher (the
lab's trial, migration and hostile-VM harnesses, the tests) builds one, and
`VMM.__init__` takes one (device/virtio/launch.py derives argv and parser from it).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from device.vmm.huge_pages import PARTIAL_TRACKING
from device.virtio.backing import BACKINGS
from device.virtio.discard import DISCARD_METHOD_NAMES
from device.virtio.hint_format import HINT_DESIGNS
from device.virtio.launch import LaunchRecord, option
from device.virtio.protocols import PROTOCOL_NAMES

PROG = "device.vmm.process"


@dataclass(frozen=True, kw_only=True)
class VmmOptions(LaunchRecord):
    PROG = PROG
    guest_mib: int = option(required=True, help="guest RAM in MiB")
    protocol: str = option("pfn", choices=PROTOCOL_NAMES,
                           help="the balloon protocol the device offers (device/virtio/protocols.py)")
    discard: str = option("madvise", choices=DISCARD_METHOD_NAMES)
    backing: str = option("4k", choices=BACKINGS,
                          help="host pages under guest RAM: 4k memfd, thp (MADV_HUGEPAGE), hugetlb (MFD_HUGETLB)")
    partial_tracking: str = option("full", choices=PARTIAL_TRACKING,
                                   help="huge backings: track every partially ballooned host page (full) or one "
                                        "per request, as QEMU does (qemu)")
    reporting: bool = option(False, help="offer free page reporting (VIRTIO_BALLOON_F_REPORTING, queue 4)")
    monitor: str = option(required=True, help="unix socket path for the QMP-like monitor")
    agent: str = option(required=True, help="unix socket path for the guest agent")
    incoming: str | None = option(None, metavar="tcp:127.0.0.1:PORT",
                                  help="destination mode: no guest, wait for an incoming migration "
                                       "(PORT 0: any free port)")
    hint: str = option("none", choices=HINT_DESIGNS,
                       help="free page hinting design the device offers for migration")
    poll_us: int = option(0, help="after serving an event, busy-poll this long before sleeping (0, the default: "
                                  "always sleep; polling slowed the PFN path here, see docs/BENCHMARKS.md)")
    log_level: str = option("WARNING")
    guest_cmd: str | None = option(None, help="guest program to spawn instead of `python -m device.guest.process` "
                                              "(shell words; it gets --control-fd N --agent PATH and the "
                                              "arguments after --)")
    x_unsealed_ram: bool = option(False, help="hand the guest a memfd whose size is not sealed (tests of the guard "
                                              "against a guest that shrinks guest RAM; never for real use)")
    guest_args: tuple[str, ...] = option((), remainder=True, help="arguments after -- go to the guest")

    def command(self) -> list[str]:
        """The whole command that starts this VMM (this interpreter)."""
        return [sys.executable, "-m", PROG, *self.to_argv()]
