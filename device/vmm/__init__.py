"""The VMM process: guest RAM, the balloon device and its queues, the monitor, migration.

    balloon_device.py         The virtio-balloon device model: config space, inflate/deflate/stats queues.
    balloon_metrics.py        What the balloon device counts, declared once: one documented metric per counter.
    budget.py                 The work one event-loop wake-up may do for the guest's queues, so the monitor keeps answering.
    control_peer.py           The VMM's end of the control socket: replies that never block the event loop.
    event_loop.py             The VMM's one event loop, written once: the VMM runs it, and so does the fuzzer.
    hint_queues.py            Device side of free-page hinting for live migration: queue 3 (upstream) and queue 5 (seed).
    huge_pages.py             Which huge host pages the device may discard (a host page larger than 4 KiB).
    loop_bridge.py            Run closures in the VMM's main loop from another thread, and wait for their results.
    monitor.py                The VMM's monitor: QMP's wire format over a unix stream socket.
    options.py                The VMM's launch record: VmmOptions, its command line and its parser.
    page_reporting_device.py  Device side of free page reporting (VIRTIO_BALLOON_F_REPORTING, feature 5, queue 4).
    process.py                The VMM process: owns guest RAM, serves the balloon device and the monitor.
    ring_floor.py             The ring's floor on this machine: what the lab's own machinery cannot go below.
    migration/                Pre-copy live migration of guest RAM between two VMM processes (DESIGN.md section 5).
"""
