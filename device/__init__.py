"""The system under test: a virtio-balloon device (the VMM, device/vmm/) and a guest (device/guest/)
that meet only in what a real VM shares (device/virtio/). docs/ARCHITECTURE.md walks it.

    virtio/                   what both sides share
    vmm/                      the VMM side (its process: vmm/process.py)
    guest/                    the guest side
"""
