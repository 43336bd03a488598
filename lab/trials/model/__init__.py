"""The lab's model as a backend (arms pfn, pfn-ranges, bitmap, chunks): the device's VMM and guest as real processes, driven over the monitor and the agent.

    attacks.py                Attacks a hostile guest can make on the VMM's event loop, and the monitor's answer time under them.
    balloon_trial.py          One balloon trial's parameters (BalloonTrial), and TrialFailed.
    hostile_vm.py             A real VMM whose guest is the hostile raw guest (device/guest/raw_guest.py).
    migrate_runner.py         One live-migration trial, end to end, as real processes.
    monitor_ops.py            One inflate or deflate through the monitor and the agent; the checks after it.
    processes.py              The VMM + guest pair of one trial as real processes: started, watched, torn down.
    reclaim.py                The `reclaim` experiment: a guest frees memory; how fast, and how much, does the host get back?
    ring_floor.py             The ring's floor, measured for a trial: `python -m device.vmm.ring_floor` in a process.
    runner.py                 One balloon trial, end to end, as real processes.
"""
