"""Backends an arm can run on: the lab's own VMM + guest model, or real QEMU + Linux.

`backend_of(arm)` is the one dispatch point: arms named `qemu-*` run on the qemu
backend (lab/trials/qemu), every other balloon arm on the lab's model.
"""
from __future__ import annotations

QEMU_ARM_PREFIX = "qemu-"
# the real stack's balloon arms (lab/trials/qemu/trial.py QEMU_ARMS says what each is)
QEMU_BALLOON_ARMS = ("qemu-pfn", "qemu-pfn-punch")
# live migration on the real stack: QEMU's own hint designs (the seed's bitmap is lab-only)
QEMU_MIGRATE_ARMS = ("qemu-none", "qemu-upstream")


def is_qemu_arm(arm: str) -> bool:
    return arm.startswith(QEMU_ARM_PREFIX)


def backend_of(arm: str) -> str:
    return "qemu" if is_qemu_arm(arm) else "lab"


def backend_environment(arms) -> dict:
    """Environment fields a run needs because of its backends (the real stack's
    accelerator, QEMU and guest kernel versions); empty for lab-only runs."""
    if not any(is_qemu_arm(a) for a in arms):
        return {}
    from lab.trials.qemu.image import ImageError
    from lab.trials.qemu.process import QemuError
    from lab.trials.qemu.trial import qemu_environment
    try:
        return qemu_environment()
    except (ImageError, QemuError) as e:
        return {"qemu_unusable": str(e)}


def check_qemu_spec(spec) -> None:
    """Refuse, before any trial runs, what the qemu arms cannot honour (ValueError)."""
    qemu = [a for a in spec.arms if is_qemu_arm(a)]
    if not qemu:
        return
    if spec.batch_pages is not None and spec.kind == "balloon":
        raise ValueError("batch_pages: the qemu arms run the Linux driver, whose batch is its own (256 pages)")
    from lab.trials.qemu.workloads import real_workload
    real_workload(spec.workload, dict(spec.workload_params), spec.guest_mib)
