"""One trial's result as text: what `balloon-lab run` prints, for a lab arm and a qemu arm.

Both backends' results are read through one skeleton: a title, the verification, the
ring's counts, each operation's total time, the host memory freed, what the probes saw
and what the device refused. Where one backend measures something the other cannot
(the lab's wire format, stage breakdown and host pages; QEMU's trace, guest kernel and
guest-side checks) the line says it in that backend's words.
"""
from __future__ import annotations

from typing import Any, Mapping

from lab.results.ring_cost import round_trip_floor
from lab.trials.backends import is_qemu_arm
from lab.trials.qemu.side_by_side import arm_title
from probes.costs import cost_lines, foreign_line
from fmt.text_width import fold
from fmt.numbers import fmt_count, fmt_fixed

STAGES = ("alloc", "encode", "transmit", "translate", "discard")
RING_COUNTS = ("pages", "requests", "kicks", "interrupts")


def format_result(r: Mapping[str, Any]) -> str:
    """`balloon-lab run` in text form, for a result of either backend."""
    qemu = is_qemu_arm(r["protocol"])
    verified = f"  verified: {'yes' if r['verified'] else 'NO'}"
    counts = "  ".join(f"{k} {fmt_count(r[k])}" for k in RING_COUNTS)
    if qemu:
        checks = r["verification"]["after_inflate"]["checks"]
        lines = [_qemu_title(r),
                 verified + "  " + "  ".join(f"{k}={'ok' if v else 'FAILED'}" for k, v in checks.items()),
                 f"  from QEMU's trace: {counts}"]
        lines += [_operation_line(op, st, qemu) for op in ("inflate", "deflate") if (st := r["stages_ns"].get(op))]
        freed = r.get("memfd_freed_bytes", r["rss_bytes"]["freed"])
        lines.append(f"  host memory freed by the inflate: {_mib(freed)} "
                     f"({'memfd blocks' if 'memfd_freed_bytes' in r else 'QEMU RSS'})")
    else:
        bad = (r["verification"].get("workload") or {}).get("must_be_zero")
        if bad:
            verified += f"  (the workload: {', '.join(bad)}, must be 0)"
        lines = [_lab_title(r), verified, f"  {counts}",
                 f"  discard calls {fmt_count(r['discard_calls'])}  runs {fmt_count(r['runs'])}  "
                 f"translations {fmt_count(r['translations'])}",
                 f"  memfd freed {_mib(r['memfd_freed_bytes'])}"]
        hp = r.get("host_pages")
        if hp:
            lines.append(f"  backing {r['backing']}: {hp['host_page_bytes'] >> 20} MiB host pages, "
                         f"{fmt_count(hp['discarded_host_pages'])} discarded, {fmt_count(hp['whole_not_discarded'])} "
                         f"whole but kept, {fmt_count(hp['partial_host_pages'])} partial ({hp['mode']} tracking, "
                         f"allocation {r['alloc_policy']})")
        lines += [_operation_line(op, st, qemu) for op, st in r["stages_ns"].items()]
        lines += [_lab_cost_line(op, c, r["floors"]) for op, c in (r.get("lab_cost") or {}).items() if c]
    lines.append(_probes_line(r.get("probes") or {}, qemu))
    lines += _probe_cost_lines(r)
    if r["errors"]:
        lines.append(f"  device refused: {r['errors']}")
    return fold("\n".join(lines))


def _lab_cost_line(op: str, c: Mapping[str, float], floors: Mapping[str, float]) -> str:
    """The operation's transmit and translate against the floors measured with the trial
    (lab/results/ring_cost.py): what the lab itself spent, beyond what the protocol needs."""
    rt = round_trip_floor(floors.get)
    held = (f"held round trip {rt / 1e3:.1f} us (hot {floors['round_trip_ns'] / 1e3:.1f})"
            if floors.get("held_round_trip_ns") else f"round trip {rt / 1e3:.1f} us")
    return (f"  {op} against the ring's floor ({held}, translate "
            f"{floors['translate_ns'] / 1e3:.1f} us, measured now): transmit "
            f"{c['transmit_per_request_ns'] / 1e3:.1f} us/request = {c['transmit_over_floor']:.2f}x, translate "
            f"{c['translate_per_request_ns'] / 1e3:.1f} us/request = {c['translate_over_floor']:.2f}x; the lab's "
            f"own cost {_ms(c['own_ns'])} ({100 * c['own_share']:.1f} %)")


def _lab_title(r: Mapping[str, Any]) -> str:
    return (f"protocol {r['protocol']} ({r['wire_format']} wire format, {r['batch_pages']} pages/request), "
            f"guest {r['guest_mib']} MiB, inflate {r['inflate_mib']} MiB, workload {r['workload']['name']}")


def _qemu_title(r: Mapping[str, Any]) -> str:
    env = r["environment"]
    return (f"{arm_title(r['protocol'], env)}: guest kernel {env['guest_kernel']}, {r['memory_backend']} RAM, "
            f"guest {r['guest_mib']} MiB, inflate {r['inflate_mib']} MiB, workload {r['workload']['name']} "
            f"({r['workload']['real']['command'].split('workload.sh ')[-1]})")


def _operation_line(op: str, st: Mapping[str, int], qemu: bool) -> str:
    """One operation's total; the lab splits it into its stages, QEMU's is host wall time
    (and the kernel's discard time when the probes saw it)."""
    line = f"  {op}: total {_ms(st['total'])}"
    if qemu:
        extra = f", discard (kernel, from the probes) {_ms(st['discard'])}" if "discard" in st else ""
        return line + f" (host wall, `balloon` to query-balloon){extra}"
    tot = st["total"] or 1
    return line + " = " + "  ".join(f"{k} {_ms(st[k])} ({100 * st[k] / tot:.1f} %)" for k in STAGES)


def _probes_line(p: Mapping[str, Any], qemu: bool) -> str:
    if p.get("backend") != "bcc":
        return f"  probes: none ({p.get('reason', 'unavailable')})"
    kns = p.get("madvise_kernel_ns")
    kernel = "not timed (opt-in: --extra-probes syscall-time)" if kns is None else _ms(kns)
    if qemu:
        return (f"  probes (bcc, QEMU pid): madvise calls {fmt_count(p.get('madvise_calls'))} ({p.get('advice')}), "
                f"bytes {fmt_count(p.get('madvise_bytes'))}, kernel {kernel}; "
                f"fallocate calls {fmt_count(p.get('fallocate_calls'))}")
    return (f"  probes (bcc): madvise calls {fmt_count(p.get('madvise_calls'))}, kernel time {kernel}, "
            f"kicks {fmt_count(p.get('kicks'))}, interrupts {fmt_count(p.get('interrupts'))}, "
            f"page faults {fmt_count(p.get('page_faults'))}")


def _probe_cost_lines(r: Mapping[str, Any]) -> list[str]:
    """How much of the inflate's time is the probes: their measured cost (probes/costs.py)."""
    p = r.get("probes") or {}
    cost = p.get("probe_cost_ms")
    if p.get("backend") != "bcc":
        return []
    if cost is None:
        return [f"  probe cost: not measured ({p.get('missing', {}).get('bpf_stats', 'no bpf_stats')})"]
    total = r["stages_ns"]["inflate"]["total"] / 1e6
    return ([f"  probe cost in the inflate: {cost:.1f} ms of its {total:.1f} ms ({100 * cost / total:.1f} %), "
             f"measured (each BPF program's run time from bpf_stats, every process's runs: an upper bound; "
             f"the syscall hook and the USDT trap calibrated at load); the timings above include it:"]
            + ["    " + line for line in cost_lines(p.get("programs") or {}, total, docs=False)]
            + ([f"    {line}"] if (line := foreign_line(p.get("foreign_bpf"))) else []))


def _ms(ns: float) -> str:
    return f"{fmt_fixed(ns / 1e6)} ms"


def _mib(n: float) -> str:
    return f"{fmt_fixed(n / 2**20)} MiB"
