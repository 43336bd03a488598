"""The real stack as a backend (arms qemu-*): QEMU and the Debian cloud kernel's virtio_balloon in a busybox guest.

    accel.py                  Which accelerator the real guest runs under: KVM when a real boot works, else TCG.
    agent.py                  The host side of the real guest's agent: shell commands over the second serial port.
    bench.py                  `bench pfn-madvise`'s real-stack figure, measured in the same run.
    health.py                 The doctor's check of the qemu backend: a real boot and a real inflate, not a version probe.
    image.py                  The real guest's boot image: the installed Debian cloud kernel and a busybox initramfs.
    migrate.py                Live migration on the real stack: a source and a destination QEMU on loopback.
    process.py                One QEMU process running the lab's real guest: command line, QMP, agent, teardown.
    side_by_side.py           The lab's arms beside the real stack's, on the counters both measure (text form).
    trace.py                  QEMU's own view of the balloon: its trace events (log backend, `-trace NAME -D FILE`).
    trial.py                  One balloon trial on the real stack: QEMU + the Debian cloud kernel's virtio_balloon.
    workloads.py              The lab's workloads on the real guest: what each becomes in busybox (guest/workload.sh).
"""
