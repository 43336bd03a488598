"""Pre-copy live migration of guest RAM between two VMM processes (DESIGN.md section 5).

    stream.py       the wire format on the TCP connection (one header, typed messages)
    ratelimit.py    the sender's token bucket (the link's bandwidth)
    pages.py        pread-based page scanning and zero-page detection
    pause.py        stopping the guest for stop-and-copy without a half-logged write
    source.py       the source side: rounds, hints, stop-and-copy, verification
    destination.py  the destination side: receive into its own memfd with pwrite
    controller.py   the VMM glue: monitor commands, narrow handles, the hint queues

Shared with the guest, in device/virtio/: dirty_log.py (the dirty bitmap the guest's
write paths mark, KVM's dirty log) and page_pattern.py (the pages' fingerprints); the
guest's half is device/guest/migration_side.py.
"""
