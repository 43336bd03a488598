"""The guest process's launch record: every option of `python -m device.guest.process`
(and of any guest program built on it, e.g. workloads/guest.py), typed, with its
command line (`to_argv`) and its parser (`from_argv`). The VMM adds --control-fd and
--agent when it spawns the guest; a launcher builds the rest and hands it to the VMM
as its guest_args (device/virtio/launch.py derives argv and parser from the record).
"""
from __future__ import annotations

from dataclasses import dataclass

from device.guest.alloc_policy import ALLOC_POLICIES
from device.guest.balloon_driver import DriverOptions
from device.guest.page_reporting_driver import ReportingParams
from device.virtio.backing import BACKINGS
from device.virtio.hint_format import HINT_DESIGNS
from device.virtio.launch import LaunchRecord, option
from device.virtio.protocols import WIRE_FORMAT_NAMES

PROG = "device.guest.process"
_REPORTING = ReportingParams()
_DRIVER = DriverOptions()


@dataclass(frozen=True, kw_only=True)
class GuestOptions(LaunchRecord):
    PROG = PROG
    control_fd: int | None = option(None, required=True, help="the guest's end of the control socket (the VMM's)")
    agent: str | None = option(None, required=True, help="unix socket path the guest agent listens on")
    wire_format: str = option("auto", choices=("auto",) + WIRE_FORMAT_NAMES,
                              help="the wire format the driver accepts if the device offers it: auto (the "
                                   "device's) or one of device/virtio/protocols.py's wire formats")
    batch_pages: int | None = option(None, help="pages per request (default: the wire format's own)")
    timeout_s: float = option(_DRIVER.timeout_s, flag="--timeout", help="the driver's wait for the device to use a request (s)")
    halt_poll_us: int = option(_DRIVER.halt_poll_us, help="poll for used buffers this long before sleeping (like KVM halt polling)")
    hint: str = option("none", choices=HINT_DESIGNS,
                       help="free page hinting design the driver negotiates (for migration)")
    backing: str = option("4k", choices=BACKINGS,
                          help="guest RAM backing (thp: the guest's mapping asks for huge pages too)")
    alloc_policy: str = option("linux", choices=ALLOC_POLICIES,
                               help="pages the balloon takes: linux (order-0) or hugepage-aware (whole 2 MiB "
                                    "blocks first)")
    reporting: bool = option(False, help="negotiate free page reporting if offered")
    reporting_order: int = option(_REPORTING.order, help="smallest block order reported")
    reporting_capacity: int = option(_REPORTING.capacity, help="blocks per report request")
    reporting_delay_ms: int = option(int(_REPORTING.delay_s * 1000), help="delay between a free and the reporting pass")
    init_on_alloc: bool = option(False, negatable=True,
                                 help="zero each page allocated for the balloon, as Linux's init_on_alloc")
    log_level: str = option("WARNING")

    def driver_options(self) -> DriverOptions:
        """What the balloon driver takes of these options."""
        return DriverOptions(wire_format=self.wire_format, batch_pages=self.batch_pages, timeout_s=self.timeout_s,
                             halt_poll_us=self.halt_poll_us, hint=self.hint, alloc_policy=self.alloc_policy,
                             reporting=self.reporting, init_on_alloc=self.init_on_alloc)

    def reporting_params(self) -> ReportingParams:
        """What the free page reporting driver takes of these options."""
        return ReportingParams(order=self.reporting_order, capacity=self.reporting_capacity,
                               delay_s=self.reporting_delay_ms / 1000)
