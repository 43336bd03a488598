"""The system under test: a virtio-balloon device (the VMM, device/host/) and a guest (device/guest/)
that meet only in what a real VM shares (device/virtio/). docs/ARCHITECTURE.md walks it.

    virtio/                   what both sides share
    host/                     the VMM side
    guest/                    the guest side
"""
