"""Which accelerator the real guest runs under: KVM when a real boot works, else TCG.

`/dev/kvm` existing is not enough (seen: a nested host without vmx/svm in its CPU
flags exposes /dev/kvm, and a KVM guest then aborts or hangs at boot). So KVM is
chosen only after a real boot of the lab's guest under it answered within a bounded
time; the outcome is remembered for the process and recorded with every trial.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

KVM_PROBE_TIMEOUT_S = 25.0
_choice: "AccelChoice | None" = None


@dataclass(frozen=True)
class AccelChoice:
    accel: str      # kvm | tcg
    reason: str     # why: what was tried and what happened


def _cpu_has_virt() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return "vmx" in flags or "svm" in flags
    except OSError:
        pass
    return False


def choose_accel(image, force: str | None = None) -> AccelChoice:
    """KVM if a real boot under it works here, else TCG (cached per process).
    BALLOON_LAB_QEMU_ACCEL=tcg|kvm forces a choice (a forced kvm that fails is an error)."""
    global _choice
    force = force or os.environ.get("BALLOON_LAB_QEMU_ACCEL")
    if force in ("tcg", "kvm"):
        return AccelChoice(force, f"forced by BALLOON_LAB_QEMU_ACCEL={force}")
    if _choice is not None:
        return _choice
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        _choice = AccelChoice("tcg", "no usable /dev/kvm")
    elif not _cpu_has_virt():
        _choice = AccelChoice("tcg", "/dev/kvm exists but the CPU flags show no vmx/svm (KVM guests do not boot)")
    else:
        _choice = _try_kvm(image)
    return _choice


def _try_kvm(image) -> AccelChoice:
    from lab.trials.qemu.process import QemuConfig, QemuError, QemuProcess
    try:
        q = QemuProcess(QemuConfig(guest_mib=256, accel="kvm", trace=False, boot_timeout_s=KVM_PROBE_TIMEOUT_S),
                        image)
    except QemuError as e:
        return AccelChoice("tcg", f"a KVM boot failed ({str(e).splitlines()[0][:160]}); TCG used")
    q.close()
    return AccelChoice("kvm", f"a KVM boot of the lab guest answered within {KVM_PROBE_TIMEOUT_S:.0f} s")
