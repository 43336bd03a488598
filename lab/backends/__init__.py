"""Backends an arm can run on: the lab's own VMM + guest model, or real QEMU + Linux.

`backend_of(arm)` is the one dispatch point: arms named `qemu-*` run on the qemu
backend (lab/backends/qemu), every other balloon arm on the lab's model.
"""
from __future__ import annotations

QEMU_ARM_PREFIX = "qemu-"


def is_qemu_arm(arm: str) -> bool:
    return arm.startswith(QEMU_ARM_PREFIX)


def backend_of(arm: str) -> str:
    return "qemu" if is_qemu_arm(arm) else "lab"
