"""Live migration on the real stack: a source and a destination QEMU on loopback.

The destination starts with `-incoming defer` and listens on an ephemeral port
(`migrate-incoming tcp:127.0.0.1:0`, the port read back from query-migrate); the
source boots the guest, runs the real-guest workload, gets `migrate-set-parameters
max-bandwidth` (and downtime-limit) and `migrate`, exactly as a management tool
drives QEMU. The `upstream` arm gives both sides `virtio-balloon,free-page-hint=on`
with an iothread: QEMU then asks the guest's driver for free pages at the start of
the migration and skips them in the first round. Totals, downtime and bytes come
from the source's query-migrate; verification from the guest on the destination
(the checksum of its kept data, computed there and compared with the source's).
"""
from __future__ import annotations

import time

from lab.trials.qemu.agent import AgentError
from lab.trials.qemu.process import QemuConfig, QemuError, QemuProcess
from lab.trials.qemu.trial import QemuTrialFailed, backend_ready
from lab.trials.qemu.workloads import real_workload
from lab.trials.monitor_client import MonitorError

QEMU_HINTS = ("none", "upstream")   # the seed's bitmap design exists only in the lab's model
POLL_S = 0.01


def run_qemu_migration(hint: str, guest_mib: int, bandwidth_bits: int, workload: str, workload_params: dict,
                       downtime_limit_ms: float = 300.0, timeout_s: float = 900.0, probes=None,
                       kernel_args: str = "") -> dict:
    """One migration of the real guest; raises QemuTrialFailed, never returns half a result."""
    if hint not in QEMU_HINTS:
        raise QemuTrialFailed(f"hint {hint!r} has no real-stack counterpart (QEMU implements: "
                              f"{', '.join(QEMU_HINTS)})")
    wall0 = time.perf_counter_ns()
    image, env = backend_ready()
    wl = real_workload(workload, workload_params, guest_mib)
    accel = env["qemu_accel"]
    hinted = hint == "upstream"
    src = dst = None
    phase = "starting the source"
    try:
        src = QemuProcess(QemuConfig(guest_mib=guest_mib, accel=accel, free_page_hint=hinted, trace=False,
                                     kernel_args=kernel_args), image)
        phase = "workload"
        wl_out = src.agent.run(wl.command(), timeout=timeout_s)
        kept = src.agent.run("/bin/sh /lab/workload.sh checksum", timeout=120)[-1]
        phase = "starting the destination"
        dst = QemuProcess(QemuConfig(guest_mib=guest_mib, accel=accel, free_page_hint=hinted, trace=False,
                                     kernel_args=kernel_args, incoming="defer"), image)
        dst.qmp.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        port = _listening_port(dst)
        if probes is not None:
            probes.attach([src.pid, dst.pid])
            probes.clear()
        phase = "migrating"
        src.qmp.execute("migrate-set-parameters", {"max-bandwidth": bandwidth_bits // 8,
                                                   "downtime-limit": int(downtime_limit_ms)})
        rss_src0 = src.rss_bytes()
        t0 = time.perf_counter_ns()
        src.qmp.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        info = _wait_migrated(src, dst, timeout_s)
        wall = time.perf_counter_ns() - t0
        reading = probes.read().to_json() if probes is not None else None
        phase = "verifying on the destination"
        status = _wait_running(dst, 60)
        agent = dst.attach_agent(timeout=30)
        after = agent.run("/bin/sh /lab/workload.sh checksum", timeout=120, alive=dst.guest_up)[-1]
        rss = {"source_before": rss_src0, "source": src.rss_bytes(), "destination": dst.rss_bytes()}
    except (MonitorError, AgentError, QemuError, OSError) as e:
        crash = dst.guest_crash() if dst is not None and phase == "verifying on the destination" else None
        if crash is not None:        # the real stack's outcome, not the lab's: say so first
            raise QemuTrialFailed(f"the guest crashed on the destination after the migration completed "
                                  f"({'free-page hinting on' if hinted else 'no hinting'}): {crash.describe()}; "
                                  f"the agent: {e} (docs/REAL_STACK.md, 'A destination guest that crashes')") from e
        why = "".join(q.why_dead() for q in (src, dst) if q is not None)
        raise QemuTrialFailed(f"{phase} failed: {e}{why}") from e
    finally:
        for q in (src, dst):
            if q is not None:
                q.close()
    ram = info.get("ram") or {}
    checks = {"migration_completed": info.get("status") == "completed",
              "destination_running": status == "running",
              "kept_data_intact": after == kept}
    page = ram.get("page-size", 4096)
    return {
        "hint": hint, "backend": "qemu", "guest_mib": guest_mib, "bandwidth_bits": bandwidth_bits,
        "workload": {"name": workload, "params": workload_params, "real": {"command": wl.command(), "output": wl_out}},
        "environment": env,
        "total_ms": info.get("total-time"), "downtime_ms": info.get("downtime"), "setup_ms": info.get("setup-time"),
        "bytes_sent": ram.get("transferred"), "pages_sent": ram.get("normal"), "pages_zero": ram.get("duplicate"),
        "pages_skipped": ram.get("skipped"), "rounds": ram.get("dirty-sync-count"),
        "ram_total_bytes": ram.get("total"), "page_size": page,
        "wall_ns": wall, "rss_bytes": rss,
        "verification": {"ok": all(checks.values()), "checks": checks, "kept_sha256": after},
        "verified": all(checks.values()),
        "probes": reading if reading is not None else {"backend": "none", "reason": "probes off"},
        "trial_wall_ns": time.perf_counter_ns() - wall0,
    }


def _listening_port(dst: QemuProcess) -> int:
    """The port the destination's `migrate-incoming tcp:127.0.0.1:0` bound."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for addr in dst.qmp.execute("query-migrate").get("socket-address") or []:
            if addr.get("type") == "inet" and addr.get("port") not in (None, "0"):
                return int(addr["port"])
        time.sleep(0.02)
    raise QemuError("the destination QEMU did not report its listening port")


def _wait_migrated(src: QemuProcess, dst: QemuProcess, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = src.qmp.execute("query-migrate")
        st = info.get("status")
        if st == "completed":
            return info
        if st in ("failed", "cancelled"):
            raise QemuError(f"migration {st}: {info.get('error-desc', '')}")
        if time.monotonic() > deadline or not src.alive() or not dst.alive():
            raise QemuError(f"migration did not complete within {timeout:.0f} s (status {st})")
        time.sleep(POLL_S)


def _wait_running(dst: QemuProcess, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        st = dst.qmp.execute("query-status").get("status")
        if st == "running" or time.monotonic() > deadline:
            return st
        time.sleep(0.05)


def run_qemu_migrate_trial(spec, arm: str, probe_session=None, downtime_limit_ms: float = 300.0,
                           guest_append: str = "") -> dict:
    """lab.trials.experiment's trial function for the qemu migrate arms (qemu-none, qemu-upstream)."""
    return run_qemu_migration(arm.removeprefix("qemu-"), spec.guest_mib, spec.bandwidth, spec.workload,
                              dict(spec.workload_params), downtime_limit_ms=downtime_limit_ms,
                              probes=probe_session if spec.probes else None, kernel_args=guest_append)
