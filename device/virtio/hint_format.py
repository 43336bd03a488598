"""What the guest and the device exchange for free-page hinting (queues 3 and 5).

Both sides read these: the guest's hint driver (device/guest/hint_driver.py) builds
the buffers, the device's hint queues (device/vmm/hint_queues.py) validate them.
The protocol itself is described there.
"""
from __future__ import annotations

import struct

from device.virtio.features import F_FREE_PAGE_HINT, F_PAGE_BITMAP, bit
from device.virtio.layout import PAGE_SIZE

HINT_DESIGNS = ("none", "upstream", "bitmap")
HINT_ORDER = 10
HINT_BLOCK_BYTES = PAGE_SIZE << HINT_ORDER
CMD_GET_FREE_PAGES = 2
BITMAP_FLAG_LAST = 1
MISC_REQUEST = struct.Struct("<HHIQ")      # cmd, page_shift, reserved, req_id
CMD_ID = struct.Struct("<I")


def hint_device_features(design: str) -> int:
    """Feature bits the VMM must offer (on top of its protocol's) for a hint design."""
    if design == "none":
        return 0
    if design == "upstream":
        return bit(F_FREE_PAGE_HINT)
    if design == "bitmap":
        return bit(F_PAGE_BITMAP)
    raise ValueError(f"unknown hint design {design!r}; choose from {', '.join(HINT_DESIGNS)}")
