"""`balloon-lab bench`: the lab's speed and memory targets, measured side by side in one run.

pfn-madvise   a PFN inflate of N MiB against a bare loop of single-page
              madvise(MADV_REMOVE) calls on the same pages of the same memfd (with the
              guest's mappings in place, as during the inflate): the ratio is what the
              protocol costs on top of its unavoidable system calls (goal: 1.1). The
              ring's floor is measured in the same run (lab/results/ring_cost.py), and the
              inflate's transmit per request is stated against it (goal: 1.5 floors).
idle-memory   a large guest that touched little: host memory (memfd blocks, peak RSS of
              the VMM and the guest) must follow what the guest touched, not its size.
"""
from __future__ import annotations

import json
import sys

import click

from device.api import MiB
from lab.cli.checks import checked, refuse
from lab.results.ring_cost import lab_cost, round_trip_floor
from lab.trials.model.balloon_trial import BalloonTrial, TrialFailed
from lab.trials.model.processes import LabProcesses
from lab.trials.model.ring_floor import FloorFailed, measure_floors
from lab.trials.model.monitor_ops import balloon_op, verify
from lab.trials.spec import BALLOON_ARMS, ExperimentSpec, spec_options

GOAL_RATIO = 1.1              # PFN inflate / bare single-page madvise loop
GOAL_TRANSMIT_FLOORS = 1.5    # transmit per request / the ring's held round-trip floor


def pfn_vs_madvise(guest_mib: int, inflate_mib: int, seed: int) -> dict:
    try:
        floors = measure_floors(guest_mib)
    except FloorFailed as e:
        raise TrialFailed(str(e)) from e
    t = BalloonTrial(protocol="pfn", guest_mib=guest_mib, inflate_mib=inflate_mib, workload="aged", seed=seed)
    lp = LabProcesses(t)
    try:
        lp.agent.execute("workload-prepare", {"name": t.workload, "params": {}, "seed": seed})
        target = t.target_pages
        inflate = balloon_op(lp, "inflate", target, None)
        v1 = verify(lp, target)
        lp.qmp.execute("x-balloon-lab-reset-counters")
        deflate = balloon_op(lp, "deflate", 0, None)
        touched = lp.agent.execute("retouch-deflated")
        bare = lp.qmp.execute("x-balloon-lab-bare-discard")
        lp.check_alive()
    finally:
        lp.close()
    st = inflate["stages_ns"]
    # The least any device that waits for each request reaches in this run: the inflate's
    # discard stage (the kernel's work, batch by batch) and one held round trip per request.
    at_floor_ns = st["discard"] + inflate["requests"] * round_trip_floor(floors.get)
    return {
        "pages": inflate["pages"], "inflate_total_ns": st["total"], "inflate_discard_ns": st["discard"],
        "inflate_stages_ns": st, "verified": v1["ok"],
        "bare_loop_pages": bare["pages"], "bare_loop_populated_pages": bare["populated_before"],
        "bare_loop_ns": bare["ns"], "bare_ns_per_page": bare["ns_per_page"],
        "inflate_ns_per_page": st["total"] / inflate["pages"],
        "ratio": st["total"] / bare["ns"], "goal": GOAL_RATIO,
        "at_floor_ns": at_floor_ns, "ratio_at_floor": at_floor_ns / bare["ns"],
        "floors": floors, "lab_cost": lab_cost(st, inflate["requests"], floors), "requests": inflate["requests"],
        "transmit_goal_floors": GOAL_TRANSMIT_FLOORS,
        "retouched_pages": touched["pages"], "deflate_total_ns": deflate["stages_ns"]["total"],
    }


def idle_memory(guest_mib: int, touched_mib: int, inflate_mib: int, protocol: str, seed: int) -> dict:
    used_share = touched_mib / guest_mib
    t = BalloonTrial(protocol=protocol, guest_mib=guest_mib, inflate_mib=inflate_mib, workload="idle",
                     workload_params={"used_share": used_share, "stale_share": 0.0}, seed=seed)
    lp = LabProcesses(t)
    samples = []

    def sample(when: str) -> None:
        c = lp.qmp.execute("x-balloon-lab-counters")
        samples.append({"when": when, "memfd_bytes": c["memfd_allocated_bytes"],
                        "vmm_rss": c["vmm_rss_bytes"], "guest_rss": c["guest_rss_bytes"],
                        "vmm_rss_peak": c["vmm_rss_peak_bytes"], "guest_rss_peak": c["guest_rss_peak_bytes"]})
    try:
        sample("boot")
        lp.agent.execute("workload-prepare", {"name": "idle", "params": t.workload_params, "seed": seed})
        sample("workload")
        target = t.target_pages
        balloon_op(lp, "inflate", target, None)
        v1 = verify(lp, target)
        sample("inflated")
        balloon_op(lp, "deflate", 0, None)
        v2 = verify(lp, 0)
        sample("deflated")
        lp.check_alive()
    finally:
        lp.close()
    peak_memfd = max(s["memfd_bytes"] for s in samples)
    peak_rss = max(s["vmm_rss_peak"] + s["guest_rss_peak"] for s in samples)
    return {"guest_mib": guest_mib, "touched_mib": touched_mib, "inflate_mib": inflate_mib, "protocol": protocol,
            "samples": samples, "peak_memfd_bytes": peak_memfd, "peak_rss_sum_bytes": peak_rss,
            "memfd_over_touched": peak_memfd / (touched_mib * MiB),
            "rss_over_touched": peak_rss / (touched_mib * MiB), "verified": v1["ok"] and v2["ok"]}


def _checked(guest_mib: int, inflate_mib: int, protocol: str, seed: int, **more) -> None:
    """The experiment parameters, checked by the spec validator `run` and `compare`
    use, before any process starts."""
    checked("bench", lambda: ExperimentSpec(kind="balloon", guest_mib=guest_mib, inflate_mib=inflate_mib,
                                            arms=[protocol], seed=seed, trials=1, warmups=0, **more))


def _given(value: int | float | None, default: int) -> int | float:
    """The option's value or the command's default; a whole float (--inflate-mib 512 parses
    as 512.0, since fractions of whole pages are allowed) back to int."""
    v = default if value is None else value
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _measure(fn, *args) -> dict:
    """Run one benchmark; a failed trial is an error (exit 1), never a figure."""
    try:
        return fn(*args)
    except TrialFailed as e:
        refuse("bench", f"trial failed: {e}", 1)


@click.group("bench")
def command() -> None:
    """Benchmarks of the lab's own speed and memory targets."""


@command.command("pfn-madvise")
@spec_options(only=("guest_mib", "inflate_mib", "seed"), spec_file=False, defaults={"guest_mib": 2048,
                                                                                    "inflate_mib": 1024})
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--real-stack/--no-real-stack", default=True, show_default=True,
              help="Also measure QEMU + a Linux guest the same way (one qemu-pfn inflate, ~30 s under TCG).")
def pfn_madvise_cmd(opt_guest_mib: int | None, opt_inflate_mib: int | None, opt_seed: int | None,
                    as_json: bool, real_stack: bool) -> None:
    """PFN inflate vs a bare single-page madvise loop on the same memfd (goal: ratio <= 1.1)."""
    guest_mib, inflate_mib, seed = _given(opt_guest_mib, 2048), _given(opt_inflate_mib, 1024), _given(opt_seed, 0)
    _checked(guest_mib, inflate_mib, "pfn", seed)
    r = _measure(pfn_vs_madvise, guest_mib, inflate_mib, seed)
    if real_stack:
        r["real_stack"] = _real_stack(guest_mib, inflate_mib, seed)
    if as_json:
        click.echo(json.dumps(r))
    else:
        click.echo(f"PFN inflate of {inflate_mib} MiB ({r['pages']} pages): {r['inflate_total_ns'] / 1e6:.0f} ms "
                   f"({r['inflate_ns_per_page'] / 1e3:.2f} us/page; discard stage {r['inflate_discard_ns'] / 1e6:.0f} ms)")
        click.echo(f"bare loop of {r['bare_loop_pages']} single-page madvise(MADV_REMOVE) on the same memfd: "
                   f"{r['bare_loop_ns'] / 1e6:.0f} ms ({r['bare_ns_per_page'] / 1e3:.2f} us/page, "
                   f"{r['bare_loop_populated_pages']} pages populated before)")
        c, fl = r["lab_cost"], r["floors"]
        click.echo(f"ring's floor, measured now: round trip held {fl['held_round_trip_ns'] / 1e3:.1f} us (eventfd "
                   f"ping-pong, the device side holding each request {fl['hold_ns'] / 1e3:.0f} us as 256 bare "
                   f"discards take, {fl['held_round_trips']} round trips), hot {fl['round_trip_ns'] / 1e3:.1f} us "
                   f"(back to back, {fl['round_trips']}); translate of {fl['translate_pfns']} PFNs "
                   f"{fl['translate_ns'] / 1e3:.1f} us")
        click.echo(f"inflate per request ({r['requests']} requests): transmit {c['transmit_per_request_ns'] / 1e3:.1f} us "
                   f"= {c['transmit_over_floor']:.2f}x the held round trip (goal <= {GOAL_TRANSMIT_FLOORS:g}; "
                   f"{c['transmit_over_hot_floor']:.2f}x the hot one), translate "
                   f"{c['translate_per_request_ns'] / 1e3:.1f} us = {c['translate_over_floor']:.2f}x its floor; the "
                   f"lab's own cost {c['own_ns'] / 1e6:.0f} ms ({100 * c['own_share']:.1f} % of the inflate)")
        click.echo(f"ratio inflate / bare loop: {r['ratio']:.2f} (goal <= {GOAL_RATIO:g})")
        click.echo(f"  at the ring's floor it would be {r['ratio_at_floor']:.2f}: the discard stage "
                   f"({r['inflate_discard_ns'] / 1e6:.0f} ms) and one held round trip per request")
        click.echo(f"  ({(r['at_floor_ns'] - r['inflate_discard_ns']) / 1e6:.0f} ms), the least a device that waits "
                   f"for each request reaches in this run")
        q = r.get("real_stack")
        if q and "error" in q:
            click.echo(f"real stack: not measured ({q['error']})")
        elif q:
            env = q["environment"]
            line = (f"real stack, measured now (QEMU {env['qemu_version']} under {env['qemu_accel']}, guest "
                    f"{env['guest_kernel']}): inflate of {q['pages']} pages {q['inflate_total_ns'] / 1e6:.0f} ms; "
                    f"bare loop of single-page madvise(MADV_DONTNEED) {q['bare_loop_ns'] / 1e6:.0f} ms; "
                    f"ratio {q['ratio']:.2f}")
            if "ratio_to_madvise_kernel" in q:
                line += (f"; {q['ratio_to_madvise_kernel']:.2f}x QEMU's own madvise kernel time "
                         f"({q['madvise_kernel_ns'] / 1e6:.0f} ms, probes)")
            click.echo(line)
    q = r.get("real_stack") or {}
    sys.exit(0 if r["verified"] and ("error" in q or q.get("verified", True)) else 1)


def _real_stack(guest_mib: int, inflate_mib: int, seed: int) -> dict:
    """The real stack's ratio, or {"error": why} when the qemu backend cannot run here."""
    from lab.trials.qemu.bench import real_stack_ratio
    from lab.trials.qemu.trial import QemuTrialFailed
    from lab.trials.probing import open_probes
    session = open_probes(True)
    try:
        return real_stack_ratio(guest_mib, inflate_mib, seed, session)
    except QemuTrialFailed as e:      # said in the output; the lab's own figure stands
        return {"error": str(e)}
    finally:
        if session is not None:
            session.detach()


@command.command("idle-memory")
@spec_options(only=("guest_mib", "inflate_mib", "seed"), spec_file=False, defaults={"guest_mib": 16384})
@click.option("--touched-mib", type=int, default=1024, show_default=True, help="MiB the guest touches.")
@click.option("--protocol", type=click.Choice(BALLOON_ARMS), default="pfn", show_default=True,
              help="The protocol that inflates (a lab protocol: the bench drives the lab's VMM).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def idle_memory_cmd(opt_guest_mib: int | None, opt_inflate_mib: int | None, opt_seed: int | None,
                    touched_mib: int, protocol: str, as_json: bool) -> None:
    """Host memory of a large guest that touched little (memfd blocks and peak RSS)."""
    guest_mib, inflate_mib, seed = _given(opt_guest_mib, 16384), _given(opt_inflate_mib, 512), _given(opt_seed, 0)
    _checked(guest_mib, inflate_mib, protocol, seed)
    if not 1 <= touched_mib <= guest_mib:
        refuse("bench", f"--touched-mib: {touched_mib} is out of range (allowed: integers 1..{guest_mib})")
    r = _measure(idle_memory, guest_mib, touched_mib, inflate_mib, protocol, seed)
    if as_json:
        click.echo(json.dumps(r))
    else:
        for s in r["samples"]:
            click.echo(f"{s['when']:>9}: memfd {s['memfd_bytes'] / MiB:8.0f} MiB   RSS vmm {s['vmm_rss'] / MiB:6.0f} "
                       f"MiB  guest {s['guest_rss'] / MiB:6.0f} MiB   (peaks {s['vmm_rss_peak'] / MiB:.0f} + "
                       f"{s['guest_rss_peak'] / MiB:.0f} MiB)")
        click.echo(f"guest {guest_mib} MiB that touched {touched_mib} MiB: peak memfd "
                   f"{r['memfd_over_touched']:.2f}x touched, peak VMM+guest RSS {r['rss_over_touched']:.2f}x touched")
    sys.exit(0 if r["verified"] else 1)
