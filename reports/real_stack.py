"""The report's "Real stack" section: the lab's arms beside QEMU + a Linux guest.

Only for runs with a qemu arm. One column per arm, the real stack's named with the
accelerator and QEMU version it ran under; every cell a median of this run's trials
(figures from the probes on the QEMU pid and from QEMU's trace events), plus the
share of trials whose real-guest verification passed and why kicks may differ.
"""
from __future__ import annotations

from reports.data import ReportData
from fmt.numbers import esc, fmt_bytes, fmt_ns, sig
from reports.section_parts import Section, chip, note, table


def _cell(d: ReportData, arm: str, metric, unit: str) -> tuple[str, float | None]:
    for m in (metric,) if isinstance(metric, str) else metric:
        v = d.median(arm, m)
        if v is not None:
            if unit == " ms":
                return fmt_ns(v), v
            if unit == " MiB":
                return fmt_bytes(v), v
            return sig(v) if v < 1e6 else f"{v:,.0f}", v
    return '<span class="muted">–</span>', None


def real_stack_section(d: ReportData) -> Section | None:
    qemu = [a for a in d.arms if d.is_qemu_arm(a)]
    if not qemu and not any(d.is_qemu_arm(a) for a in d.scheduled_arms):
        return None
    env = d.run.environment
    if not qemu:
        return Section("real-stack", "Real stack (QEMU + Linux)",
                       note("The qemu arms of this run have no verified trial: see the failed trials under "
                            "Environment."), missing=["real-stack: no verified qemu trial"])
    header = ["per inflate (median)"] + [chip(a, d.colors) + (f'<br><span class="ci">{esc(d.arm_title(a, env))}</span>'
                                                             if d.is_qemu_arm(a) else "") for a in d.arms]
    rows, differs = [], False
    for label, metric, _scale, unit in d.REAL_STACK_ROWS:
        cells = [_cell(d, a, metric, unit) for a in d.arms]
        if all(v is None for _, v in cells):
            continue
        if label in ("kicks", "interrupts") and len({v for _, v in cells}) > 1:
            differs = True
        rows.append([esc(label)] + [c for c, _ in cells])
    body = [note(f"The real stack ran in this run: QEMU {esc(env.get('qemu_version', '?'))} under "
                 f"<b>{esc(env.get('qemu_accel', '?'))}</b> ({esc(env.get('qemu_accel_reason', ''))}), guest kernel "
                 f"{esc(env.get('guest_kernel', '?'))} with its own virtio_balloon driver. Its madvise and fallocate "
                 "figures come from the same eBPF probes attached to the QEMU process; pages, requests, kicks and "
                 "interrupts from QEMU's own trace events; totals are host wall time from the QMP "
                 "<code>balloon</code> command until <code>query-balloon</code> reports the target. Guest-side "
                 "stages are not measured on the real stack (under TCG the guest's time is emulated)."),
            table(header, rows, "real-stack")]
    if differs:
        body.append(note(esc(d.EVENT_IDX_NOTE)))
    checks = []
    for a in qemu:
        n = d.n_trials(a)
        checks.append(f"{chip(a, d.colors)}: {n} verified trial(s): query-balloon reached the target, the guest's "
                      "MemTotal moved by the ballooned size, QEMU handled every page, the kept data's checksum "
                      "matched before and after")
    body.append(note("; ".join(checks) + "."))
    return Section("real-stack", "Real stack (QEMU + Linux)", "".join(body))
