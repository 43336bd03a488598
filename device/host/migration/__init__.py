"""Pre-copy live migration of guest RAM between two VMM processes (DESIGN.md section 5).

    stream.py       the wire format on the TCP connection (one header, typed messages)
    ratelimit.py    the sender's token bucket (the link's bandwidth)
    dirty_log.py    the shared dirty bitmap the guest's write paths mark (KVM's dirty log)
    pages.py        pread-based page scanning, zero-page detection and fingerprints
    pause.py        stopping the guest for stop-and-copy without a half-logged write
    source.py       the source side: rounds, hints, stop-and-copy, verification
    destination.py  the destination side: receive into its own memfd with pwrite
    controller.py   the VMM glue: monitor commands, the main-loop bridge, hint devices
    guest_side.py   the guest's half: VMM-initiated control requests, its own verification
"""
