"""What both sides of the virtio boundary share: nothing here imports device/vmm or device/guest.

    backing.py                Guest RAM backings: what kind of host page sits under the memfd.
    control.py                The control plane between guest (driver) and VMM (device): vhost-user in spirit.
    device_queue.py           The device (VMM) side of one split virtqueue: DeviceQueue and the chains it hands out.
    dirty_log.py              The dirty log: one byte per guest PFN in shared memory, marked by every guest write.
    discard.py                How the VMM frees ballooned guest RAM, declared once: the discard methods and the one loop.
    driver_queue.py           The driver (guest) side of one split virtqueue: DriverQueue.
    features.py               virtio-balloon constants: feature bits, device status, config space, stats tags, queues.
    hint_format.py            What the guest and the device exchange for free-page hinting (queues 3 and 5).
    launch.py                 A process's launch record written once: its argv and its parser, derived from one dataclass.
    layout.py                 Guest-physical memory layout of a PC-like guest, and address translation.
    metric_decl.py            Metric declarations: each counter, timing and gauge declared once, with its kind,
    page_pattern.py           The pattern every kept guest page carries, and its fingerprint: shared by both sides.
    protocols.py              The balloon protocols the lab compares, declared once: every other place reads this table.
    queue_metrics.py          Declared counters of the split virtqueue, both ends (device/virtio/driver_queue.py, device_queue.py).
    ram.py                    Guest RAM: one memfd shared by the VMM and the guest process.
    split_ring.py             The split ring of virtio 1.2 section 2.7: its layout, its structs, its rules.
    stage.py                  Stage timing with the USDT stage markers, written once: `with stage("encode", rep):`.
    transport.py              Device side of the control plane: the virtio transport a device sits behind.
    wire.py                   Balloon inflate/deflate wire formats (DESIGN.md section 4), all little-endian.
"""
