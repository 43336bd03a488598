"""`balloon-lab run`: one trial of one protocol, printed as text or one JSON object."""
from __future__ import annotations

import json
import sys

import click

from device.features import PROTOCOLS
from lab.backends import QEMU_BALLOON_ARMS, is_qemu_arm
from lab.runner import BalloonTrial, TrialFailed, run_balloon
from lab.spec import ALLOC_POLICIES, BACKINGS, PARTIAL_TRACKING, SpecError, check_mib


def workload_params(workload: str, items: tuple[str, ...]) -> dict:
    from workloads import parse_params
    try:
        return parse_params(workload, list(items))
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--param")


def open_probes(enabled: bool):
    """A probe session, or None when probes are off. Degrades (backend none) without eBPF."""
    if not enabled:
        return None
    from probes.session import ProbeSession
    return ProbeSession(enabled=True)


def format_result(r: dict) -> str:
    lines = [f"protocol {r['protocol']} ({r['wire_format']} wire format, {r['batch_pages']} pages/request), "
             f"guest {r['guest_mib']} MiB, inflate {r['inflate_mib']} MiB, workload {r['workload']['name']}",
             f"  verified: {'yes' if r['verified'] else 'NO'}",
             f"  pages {r['pages']}  requests {r['requests']}  kicks {r['kicks']}  interrupts {r['interrupts']}",
             f"  discard calls {r['discard_calls']}  runs {r['runs']}  translations {r['translations']}",
             f"  memfd freed {r['memfd_freed_bytes'] / 2**20:.1f} MiB"]
    hp = r.get("host_pages")
    if hp:
        lines.append(f"  backing {r['backing']}: {hp['host_page_bytes'] >> 20} MiB host pages, "
                     f"{hp['discarded_host_pages']} discarded, {hp['whole_not_discarded']} whole but kept, "
                     f"{hp['partial_host_pages']} partial ({hp['mode']} tracking, allocation {r['alloc_policy']})")
    for op, st in r["stages_ns"].items():
        tot = st["total"] or 1
        parts = "  ".join(f"{k} {st[k] / 1e6:.1f} ms ({100 * st[k] / tot:.1f} %)"
                          for k in ("alloc", "encode", "transmit", "translate", "discard"))
        lines.append(f"  {op}: total {st['total'] / 1e6:.1f} ms = {parts}")
    p = r.get("probes") or {}
    if p.get("backend") == "bcc":
        lines.append(f"  probes (bcc): madvise calls {p.get('madvise_calls')}, kernel time "
                     f"{p.get('madvise_kernel_ns', 0) / 1e6:.1f} ms, kicks {p.get('kicks')}, "
                     f"interrupts {p.get('interrupts')}, page faults {p.get('page_faults')}")
    else:
        lines.append(f"  probes: none ({p.get('reason', 'unavailable')})")
    if r["errors"]:
        lines.append(f"  device refused: {r['errors']}")
    return "\n".join(lines)


@click.command("run")
@click.option("--protocol", type=click.Choice(PROTOCOLS + QEMU_BALLOON_ARMS), default="pfn", show_default=True,
              help="a lab protocol, or a real-stack arm (QEMU + Linux guest)")
@click.option("--guest-mib", type=int, default=1024, show_default=True)
@click.option("--inflate-mib", type=float, default=512, show_default=True,
              help="MiB to inflate by; fractions of whole 4 KiB pages allowed (100.5)")
@click.option("--workload", default="aged", show_default=True, help="aged, idle, hog, fragment, churn, dirty")
@click.option("--workload-param", "--param", "params", multiple=True, metavar="KEY=VALUE",
              help="workload parameter (repeatable)")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--batch-pages", type=int, default=None, help="pages per request (default: 256 for pfn, 1 GiB for ranges)")
@click.option("--discard", type=click.Choice(("madvise", "punch-hole")), default="madvise", show_default=True)
@click.option("--backing", type=click.Choice(BACKINGS), default="4k", show_default=True,
              help="host pages under guest RAM")
@click.option("--partial-tracking", type=click.Choice(PARTIAL_TRACKING), default="full", show_default=True,
              help="huge backings: every partial host page (full) or one per request (qemu)")
@click.option("--alloc-policy", type=click.Choice(ALLOC_POLICIES), default="linux", show_default=True,
              help="pages the balloon takes")
@click.option("--no-deflate", is_flag=True, help="inflate only")
@click.option("--guest-init-on-alloc/--no-guest-init-on-alloc", "init_on_alloc", default=False, show_default=True,
              help="the lab's guest zeroes each page it allocates for the balloon (Linux init_on_alloc)")
@click.option("--probes/--no-probes", default=True, show_default=True, help="attach the BCC probes")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def command(protocol, guest_mib, inflate_mib, workload, params, seed, batch_pages, discard, backing,
            partial_tracking, alloc_policy, no_deflate, init_on_alloc, probes, as_json) -> None:
    """Start a VMM and its guest, inflate, verify, deflate, verify, and print the result."""
    try:
        inflate_mib = check_mib("inflate_mib", inflate_mib, 0, guest_mib)
    except SpecError as e:
        raise click.UsageError(str(e))
    if is_qemu_arm(protocol):
        run_qemu(protocol, guest_mib, inflate_mib, workload, params, seed, batch_pages, no_deflate, probes, as_json)
    try:
        trial = BalloonTrial(protocol=protocol, guest_mib=guest_mib, inflate_mib=inflate_mib, workload=workload,
                             workload_params=workload_params(workload, params), seed=seed, batch_pages=batch_pages,
                             discard=discard, deflate=not no_deflate, backing=backing,
                             partial_tracking=partial_tracking, alloc_policy=alloc_policy,
                             init_on_alloc=init_on_alloc)
    except ValueError as e:
        raise click.UsageError(str(e))
    run_and_print(run_balloon, trial, TrialFailed, format_result, probes, as_json)


def run_and_print(run_fn, trial, failure: type[Exception], fmt, probes: bool, as_json: bool) -> None:
    """Run one trial with the probes, print it (text or JSON) and exit 0 only if verified."""
    session = open_probes(probes)
    try:
        result = run_fn(trial, session)
    except failure as e:
        click.echo(f"balloon-lab run: trial failed: {e}", err=True)
        sys.exit(1)
    finally:
        if session is not None:
            session.detach()
    click.echo(json.dumps(result) if as_json else fmt(result))
    sys.exit(0 if result["verified"] else 1)


def run_qemu(arm, guest_mib, inflate_mib, workload, params, seed, batch_pages, no_deflate, probes, as_json) -> None:
    """`run --protocol qemu-*`: one trial on the real stack (exits)."""
    from lab.backends.qemu.side_by_side import format_qemu_result
    from lab.backends.qemu.trial import QemuBalloonTrial, QemuTrialFailed, run_qemu_balloon
    if batch_pages is not None:
        raise click.UsageError("--batch-pages: the qemu arms run the Linux driver, whose batch is its own")
    try:
        trial = QemuBalloonTrial(arm=arm, guest_mib=guest_mib, inflate_mib=inflate_mib, workload=workload,
                                 workload_params=workload_params(workload, params), seed=seed,
                                 deflate=not no_deflate)
    except ValueError as e:
        raise click.UsageError(str(e))
    run_and_print(run_qemu_balloon, trial, QemuTrialFailed, format_qemu_result, probes, as_json)
