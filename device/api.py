"""The device's API for the lab: every name lab/ and reports/ may import of the device,
in one place (tests/test_import_rules.py reads `__all__` and refuses any other import
of device/ from them; docs/ARCHITECTURE.md says why each group is here).

The lab starts the VMM and the guest as processes (`python -m device.vmm.process`, whose
guest is `python -m workloads.guest`) and talks to them over the monitor and agent
sockets. What it imports is what it needs to offer choices, launch the processes,
read metric declarations, check the host, and play the hostile raw guest. Everything
else in device/ is an internal; the fuzzer and the benchmarks use more of it on
purpose (white-box, like the tests), and stand outside this rule.
"""
from __future__ import annotations

# The tables the lab offers choices from.
from device.guest.alloc_policy import ALLOC_POLICIES
from device.guest.page_reporting_driver import ReportingParams
from device.vmm.huge_pages import PARTIAL_TRACKING
from device.virtio.backing import BACKINGS
from device.virtio.discard import DISCARD_METHOD_NAMES
from device.virtio.hint_format import HINT_DESIGNS
from device.virtio.protocols import PROTOCOL_NAMES, PROTOCOLS, max_batch_of

# The processes' launch records: what `python -m device.vmm.process` and its guest take.
from device.guest.options import GuestOptions
from device.vmm.options import VmmOptions

# The metric declarations the lab reads kinds, units, directions and docs from.
from device.guest.balloon_driver import DRIVER_OP_METRICS
from device.vmm.balloon_metrics import DEVICE_METRICS, DEVICE_OP_METRICS
from device.vmm.huge_pages import HOST_PAGE_METRICS
from device.virtio.metric_decl import (COUNTER, EXACT, GAUGE, HIGHER, LOWER, TIMING, ZERO, Metric, MetricSet,
                                       UndeclaredMetric, declared_by)
from device.virtio.queue_metrics import DEVICE_QUEUE_METRICS
from device.virtio.transport import REFUSAL_METRICS

# The host checks `balloon-lab doctor` runs, and the backing a trial asks the host for.
from device.virtio.backing import (MFD_HUGE_2MB, MFD_HUGETLB, NR_HUGEPAGES, THP_SHMEM_KNOB, BackingError,
                                   advise_mapping, backing_problem, ensure_backing, hugetlb_pool, thp_shmem_state)
from device.virtio.discard import punch_hole

# Units.
from device.virtio.layout import GiB, MiB, PAGE_SHIFT, PAGE_SIZE

# The hostile raw guest the lab's attacks play (lab/trials/model/hostile_vm.py starts it).
from device.guest.raw_guest import F_INDIRECT, F_NEXT, RAW_GUEST_MODULE, RawError, RawGuest

__all__ = [
    "ALLOC_POLICIES", "ReportingParams", "PARTIAL_TRACKING", "BACKINGS", "DISCARD_METHOD_NAMES", "HINT_DESIGNS",
    "PROTOCOL_NAMES", "PROTOCOLS", "max_batch_of",
    "GuestOptions", "VmmOptions",
    "DRIVER_OP_METRICS", "DEVICE_METRICS", "DEVICE_OP_METRICS", "HOST_PAGE_METRICS", "COUNTER", "GAUGE", "TIMING",
    "EXACT", "HIGHER", "LOWER", "ZERO",
    "Metric", "MetricSet", "UndeclaredMetric", "declared_by", "DEVICE_QUEUE_METRICS", "REFUSAL_METRICS",
    "MFD_HUGE_2MB", "MFD_HUGETLB", "NR_HUGEPAGES", "THP_SHMEM_KNOB", "BackingError", "advise_mapping",
    "backing_problem", "ensure_backing", "hugetlb_pool", "thp_shmem_state", "punch_hole",
    "GiB", "MiB", "PAGE_SHIFT", "PAGE_SIZE",
    "F_INDIRECT", "F_NEXT", "RAW_GUEST_MODULE", "RawError", "RawGuest",
]
