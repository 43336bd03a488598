"""The lab's arms beside the real stack's, on the counters both measure (text form).

Used by `compare` and `show` when a run has qemu arms: every figure is a median of
this run's trials (exact counters are equal in every trial), the qemu arms named with
the accelerator and QEMU version they ran under.
"""
from __future__ import annotations

from typing import Any, Mapping

from lab.trials.backends import is_qemu_arm
from fmt.columns import format_columns
from fmt.text_width import fold
from fmt.numbers import fmt_count, sig

ROWS = (  # (label, metric or alternatives (first present wins), scale, unit)
    ("pages", "pages", 1, ""),
    ("requests", "requests", 1, ""),
    ("kicks", "kicks", 1, ""),
    ("interrupts", "interrupts", 1, ""),
    ("madvise calls", "probes.madvise_calls", 1, ""),
    ("madvise bytes", "probes.madvise_bytes", 1, ""),
    ("fallocate calls", "probes.fallocate_calls", 1, ""),
    ("madvise kernel time", "probes.madvise_kernel_ns", 1e-6, " ms"),
    ("inflate total", "stages_ns.inflate.total", 1e-6, " ms"),
    ("deflate total", "stages_ns.deflate.total", 1e-6, " ms"),
    ("host memory freed", ("memfd_freed_bytes", "rss_bytes.freed"), 1 / (1 << 20), " MiB"),
)

EVENT_IDX_NOTE = (
    "kicks/interrupts differ: both sides negotiate VIRTIO_RING_F_EVENT_IDX, which lets a side skip a "
    "notification while the other is still working. The lab's device thread keeps polling its ring after a "
    "kick, so the driver's later requests need no kick; QEMU under TCG handles a kick synchronously inside "
    "the guest's notify write and re-arms notification before the guest adds the next request, so every "
    "request is kicked, and each completion raises an interrupt because the Linux driver waits for every "
    "request before sending the next.")


def arm_title(arm: str, env: Mapping[str, Any]) -> str:
    """`qemu-pfn (QEMU 7.2.22, tcg)` for a qemu arm, the arm itself otherwise."""
    if not is_qemu_arm(arm):
        return arm
    return f"{arm} (QEMU {env.get('qemu_version', '?')}, {env.get('qemu_accel', '?')})"


def _summary(comp, arm: str, metric):
    for m in (metric,) if isinstance(metric, str) else metric:
        s = comp.summary(arm, m)
        if s is not None:
            return s
    return None


def side_by_side(comp, env: Mapping[str, Any]) -> str:
    """The text table, or "" when no arm runs on the real stack."""
    if not any(is_qemu_arm(a) for a in comp.arms):
        return ""
    real = [arm_title(a, env) for a in comp.arms if is_qemu_arm(a)]
    rows, kicks = [], {}
    for label, metric, scale, unit in ROWS:
        cells = []
        for a in comp.arms:
            s = _summary(comp, a, metric)
            if metric == "kicks" or metric == "interrupts":
                kicks.setdefault(metric, set()).add(None if s is None else s.median)
            cells.append("-" if s is None else fmt_count(s.median) if scale == 1 else f"{sig(s.median * scale)}{unit}")
        if any(c != "-" for c in cells):
            rows.append((label, *cells))
    lines = [fold(f"the lab beside the real stack (inflate; medians of this run; {'; '.join(real)}):"),
             format_columns(("", *comp.arms), rows, right=set(range(1, len(comp.arms) + 1)))]
    if any(len(v) > 1 for v in kicks.values()):
        lines.append(fold("note: " + EVENT_IDX_NOTE))
    return "\n".join(lines)

