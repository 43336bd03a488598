"""virtio-balloon constants: feature bits, device status, config space, stats tags, queues.

Values follow the virtio 1.2 spec and Linux's include/uapi/linux/virtio_balloon.h;
PAGE_BITMAP (50) and PAGE_CHUNKS (51) are the lab's private bits for the seed's
protocols, in the device-specific feature range.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

# --- feature bits ---------------------------------------------------------------------
F_MUST_TELL_HOST = 0
F_STATS_VQ = 1
F_DEFLATE_ON_OOM = 2
F_FREE_PAGE_HINT = 3
F_PAGE_POISON = 4
F_REPORTING = 5
F_RING_INDIRECT_DESC = 28
F_RING_EVENT_IDX = 29
F_VERSION_1 = 32
F_PAGE_BITMAP = 50
F_PAGE_CHUNKS = 51

FEATURE_NAMES = {
    F_MUST_TELL_HOST: "MUST_TELL_HOST",
    F_STATS_VQ: "STATS_VQ",
    F_DEFLATE_ON_OOM: "DEFLATE_ON_OOM",
    F_FREE_PAGE_HINT: "FREE_PAGE_HINT",
    F_PAGE_POISON: "PAGE_POISON",
    F_REPORTING: "REPORTING",
    F_RING_INDIRECT_DESC: "RING_INDIRECT_DESC",
    F_RING_EVENT_IDX: "RING_EVENT_IDX",
    F_VERSION_1: "VERSION_1",
    F_PAGE_BITMAP: "PAGE_BITMAP",
    F_PAGE_CHUNKS: "PAGE_CHUNKS",
}


def bit(n: int) -> int:
    return 1 << n


def feature_names(mask: int) -> list[str]:
    return [name for b, name in sorted(FEATURE_NAMES.items()) if mask & bit(b)]


# --- device status (virtio 1.2 section 2.1) ---------------------------------------------
S_ACKNOWLEDGE = 1
S_DRIVER = 2
S_DRIVER_OK = 4
S_FEATURES_OK = 8
S_NEEDS_RESET = 64
S_FAILED = 128

# --- queues, by fixed index (DESIGN.md section 4) ---------------------------------------
Q_INFLATE, Q_DEFLATE, Q_STATS, Q_FREE_PAGE, Q_REPORTING, Q_MISC = range(6)
QUEUE_NAMES = ("inflate", "deflate", "stats", "free-page", "reporting", "misc")
# which feature a queue needs (None: always present)
QUEUE_FEATURE = {Q_INFLATE: None, Q_DEFLATE: None, Q_STATS: F_STATS_VQ, Q_FREE_PAGE: F_FREE_PAGE_HINT,
                 Q_REPORTING: F_REPORTING, Q_MISC: F_PAGE_BITMAP}

# --- config space: le32 num_pages, actual, free_page_hint_cmd_id, poison_val ------------
CONFIG = struct.Struct("<IIII")
CFG_NUM_PAGES, CFG_ACTUAL, CFG_FREE_PAGE_HINT_CMD_ID, CFG_POISON_VAL = 0, 4, 8, 12
CONFIG_SIZE = CONFIG.size
FREE_PAGE_HINT_CMD_ID_STOP = 0
FREE_PAGE_HINT_CMD_ID_DONE = 1
FREE_PAGE_HINT_CMD_ID_MIN = 2

# --- stats queue: {le16 tag, le64 val}, Linux tags 0-15 (6.12 adds 10-15) ---------------
STAT_ENTRY = struct.Struct("<HQ")
STAT_TAGS = (
    "swap-in", "swap-out", "major-faults", "minor-faults", "free-memory", "total-memory",
    "available-memory", "disk-caches", "hugetlb-allocations", "hugetlb-failures",
    "oom-kills", "alloc-stalls", "async-scans", "direct-scans", "async-reclaims", "direct-reclaims",
)
# QEMU's qom-get guest-stats names, for the tags QEMU knows
QEMU_STAT_NAMES = (
    "stat-swap-in", "stat-swap-out", "stat-major-faults", "stat-minor-faults", "stat-free-memory",
    "stat-total-memory", "stat-available-memory", "stat-disk-caches", "stat-htlb-pgalloc",
    "stat-htlb-pgfail", "stat-oom-kills", "stat-alloc-stalls", "stat-async-scans",
    "stat-direct-scans", "stat-async-reclaims", "stat-direct-reclaims",
)


@dataclass
class BalloonConfig:
    num_pages: int = 0
    actual: int = 0
    free_page_hint_cmd_id: int = 0
    poison_val: int = 0

    def pack(self) -> bytes:
        return CONFIG.pack(self.num_pages, self.actual, self.free_page_hint_cmd_id, self.poison_val)

    @classmethod
    def unpack(cls, raw: bytes) -> "BalloonConfig":
        return cls(*CONFIG.unpack(raw))


# --- the PFN wire format's limit (the protocols themselves: device/virtio/protocols.py) ---
PFN_BATCH_MAX = 256  # VIRTIO_BALLOON_ARRAY_PFNS_MAX in Linux
