"""One balloon trial on the real stack: QEMU + the Debian cloud kernel's virtio_balloon.

Boots the guest, runs the real-guest counterpart of the spec's workload, inflates to
the target with QMP `balloon` exactly as a management tool does, verifies, deflates,
verifies, and quits. The result has the lab trial's shape where the same quantity
exists, and only figures with a real source:
- probes (BCC, attached to the QEMU pid): madvise/fallocate calls, bytes, kernel time;
  `discard_calls` counts the ballooning discards among them (MADV_DONTNEED/REMOVE and
  fallocate PUNCH_HOLE); `stages_ns.*.discard` is their kernel time;
- QEMU's trace (trace.py): pages handled, requests, kicks, interrupts per queue;
- QEMU's RSS and, with the memfd backend, the memfd's allocated blocks;
- `stages_ns.*.total`: host wall time from the `balloon` command until query-balloon
  reports the target. Guest-side stages (alloc, encode, transmit) are not measured:
  under TCG the guest's time is emulated and would not transfer.
Verified means: query-balloon reached the target, the guest's MemTotal moved by exactly
the ballooned size, QEMU handled exactly that many pages, and the checksum of the data
the guest keeps is the same before and after each operation.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from lab.trials.qemu.accel import choose_accel
from lab.trials.qemu.agent import AgentError
from lab.trials.qemu.image import ImageError, build_image
from lab.trials.qemu.process import QemuConfig, QemuError, QemuProcess, qemu_version, wait_balloon
from lab.trials.qemu.trace import TraceReader, settled_window
from lab.trials.qemu.workloads import real_workload
from lab.trials.monitor_client import MonitorError
from lab.trials.probing import probe_summary

PAGE = 4096
MIB = 1 << 20
INFLATE_QUEUE, DEFLATE_QUEUE = 0, 1
# arm -> guest RAM backing: QEMU's default anonymous memory discards with
# madvise(MADV_DONTNEED); a shared memfd makes QEMU punch holes (fallocate) first
QEMU_ARMS = {"qemu-pfn": "anonymous", "qemu-pfn-punch": "memfd"}
DISCARD_ADVICE = ("MADV_DONTNEED", "MADV_REMOVE")


class QemuTrialFailed(RuntimeError):
    """A real-stack trial that cannot produce a trustworthy number."""


@dataclass
class QemuBalloonTrial:
    arm: str = "qemu-pfn"
    guest_mib: int = 1024
    inflate_mib: int | float = 512
    workload: str = "aged"
    workload_params: dict = field(default_factory=dict)
    seed: int = 0
    deflate: bool = True
    timeout_s: float = 600.0

    @classmethod
    def from_spec(cls, spec, arm: str, **overrides) -> "QemuBalloonTrial":
        """Arm `arm`'s trial under a validated ExperimentSpec (the spec has refused, once,
        what the real stack cannot do: lab/trials/backends.py check_qemu_spec)."""
        return cls(arm=arm, guest_mib=spec.guest_mib, inflate_mib=spec.inflate_mib, workload=spec.workload,
                   workload_params=dict(spec.workload_params), seed=spec.seed, **overrides)


def qemu_environment(image=None) -> dict:
    """Accelerator (and why), QEMU version and guest kernel: stored with runs and trials."""
    image = image or build_image()
    choice = choose_accel(image)
    return {"qemu_accel": choice.accel, "qemu_accel_reason": choice.reason, "qemu_version": qemu_version(),
            "guest_kernel": image.kernel_version}


def backend_ready():
    """(guest image, environment) of the qemu backend; QemuTrialFailed when it cannot run here."""
    try:
        image = build_image()
        return image, qemu_environment(image)
    except (ImageError, QemuError) as e:
        raise QemuTrialFailed(f"the qemu backend is not usable here: {e}") from e


def run_qemu_trial(spec, arm: str, probe_session=None) -> dict:
    """lab.trials.experiment's trial function for qemu arms."""
    return run_qemu_balloon(QemuBalloonTrial.from_spec(spec, arm), probe_session if spec.probes else None)


def _meminfo(q: QemuProcess) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split("=") for line in q.agent.run("/bin/sh /lab/workload.sh meminfo"))}


def _checksum(q: QemuProcess) -> str:
    return q.agent.run("/bin/sh /lab/workload.sh checksum", timeout=120)[-1]


def _discard_calls(reading: dict | None) -> int | None:
    if not reading or reading.get("backend") != "bcc":
        return None
    adv = reading.get("advice") or {}
    modes = reading.get("fallocate_modes") or {}
    return sum(adv.get(a, 0) for a in DISCARD_ADVICE) + sum(n for m, n in modes.items() if "PUNCH_HOLE" in m)


def _kernel_ns(reading: dict | None) -> int | None:
    """The discard calls' kernel time: measured only with the opt-in syscall-time probe."""
    if not reading or reading.get("backend") != "bcc" or reading.get("madvise_kernel_ns") is None:
        return None
    return reading["madvise_kernel_ns"] + (reading.get("fallocate_kernel_ns") or 0)


def balloon_op(q: QemuProcess, reader: TraceReader, probes, kind: str, target_pages: int, pages_moved: int,
               timeout: float) -> dict:
    """One inflate or deflate to `target_pages`, seen from QEMU's side."""
    ram = q.cfg.guest_mib * MIB
    reader.mark()
    rss0, memfd0 = q.rss_bytes(), q.memfd_allocated_bytes()
    if probes is not None:
        probes.clear()
    t0 = time.perf_counter_ns()
    q.qmp.execute("balloon", {"value": ram - target_pages * PAGE})
    wait_balloon(q.qmp, ram - target_pages * PAGE, timeout, q.alive)
    wall = time.perf_counter_ns() - t0
    reading = probes.read().to_json() if probes is not None else None
    w = settled_window(reader, pages_moved)
    rss1, memfd1 = q.rss_bytes(), q.memfd_allocated_bytes()
    queue = w.queue(INFLATE_QUEUE if kind == "inflate" else DEFLATE_QUEUE)
    out = {
        "target_pages": target_pages, "actual": (ram - q.qmp.execute("query-balloon")["actual"]) // PAGE,   # pages in the balloon
        "wall_ns": wall, "pages": w.pages, "requests": queue.requests, "kicks": queue.kicks,
        "interrupts": queue.interrupts, "trace_unmapped_events": w.unknown_vq,
        "rss_bytes": {"qemu_before": rss0, "qemu": rss1, "freed": rss0 - rss1},   # gauges: QEMU's VmRSS
        "stages_ns": {"total": wall},
        "probes": reading,
    }
    if w.device_span_ns is not None:
        out["device_span_ns"] = w.device_span_ns
    calls = _discard_calls(reading)
    if calls is not None:
        out["discard_calls"] = calls
        kernel = _kernel_ns(reading)
        if kind == "inflate" and kernel is not None:   # on deflate QEMU's calls are MADV_WILLNEED hints
            out["stages_ns"]["discard"] = kernel
    if memfd0 is not None and memfd1 is not None:
        out["memfd_bytes_before"], out["memfd_bytes_after"] = memfd0, memfd1
    return out


def _verify(q: QemuProcess, op: dict, kept: str, mem0: dict, moved: int, ballooned: int) -> dict:
    mem = _meminfo(q)
    now = _checksum(q)
    checks = {
        "balloon_reached_target": op["actual"] == op["target_pages"],
        "guest_memtotal_moved_by_balloon": (mem0["MemTotal"] - mem["MemTotal"]) * 1024 == ballooned * PAGE,
        "qemu_handled_every_page": op["pages"] == moved,
        "kept_data_intact": now == kept,
    }
    return {"ok": all(checks.values()), "checks": checks, "kept_sha256": now,
            "guest_memtotal_kib": mem["MemTotal"]}


def run_qemu_balloon(t: QemuBalloonTrial, probes=None) -> dict:
    """Run one real-stack trial; raises QemuTrialFailed, never returns a half result."""
    wall0 = time.perf_counter_ns()
    image, env = backend_ready()
    wl = real_workload(t.workload, t.workload_params, t.guest_mib)
    cfg = QemuConfig(guest_mib=t.guest_mib, accel=env["qemu_accel"], memory=QEMU_ARMS[t.arm])
    try:
        q = QemuProcess(cfg, image)
    except QemuError as e:
        raise QemuTrialFailed(str(e)) from e
    phase = "setting up"
    try:
        boot_ns = time.perf_counter_ns() - wall0
        if probes is not None:
            probes.attach([q.pid])
        reader = TraceReader(q.trace_path)
        phase = "workload"
        tw = time.perf_counter_ns()
        wl_out = q.agent.run(wl.command(), timeout=t.timeout_s)
        workload_ns = time.perf_counter_ns() - tw
        kept = _checksum(q)
        mem0 = _meminfo(q)
        target = round(t.inflate_mib * MIB) // PAGE
        phase = "inflate"
        inflate = balloon_op(q, reader, probes, "inflate", target, target, t.timeout_s)
        v_inflate = _verify(q, inflate, kept, mem0, target, target)
        deflate = v_deflate = None
        if t.deflate:
            phase = "deflate"
            deflate = balloon_op(q, reader, probes, "deflate", 0, target, t.timeout_s)
            v_deflate = _verify(q, deflate, kept, mem0, target, 0)
        pid = q.pid
    except (MonitorError, AgentError, QemuError, OSError) as e:
        raise QemuTrialFailed(f"{phase} failed: {e}{q.why_dead()}") from e
    finally:
        q.close()
    stages = {"inflate": inflate.pop("stages_ns")}
    readings = {"inflate": inflate.pop("probes")}
    if deflate is not None:
        stages["deflate"] = deflate.pop("stages_ns")
        readings["deflate"] = deflate.pop("probes")
    verified = v_inflate["ok"] and (v_deflate is None or v_deflate["ok"])
    result = {
        "protocol": t.arm, "backend": "qemu", "guest_mib": t.guest_mib, "inflate_mib": t.inflate_mib,
        "pids": {"qemu": pid},
        "workload": {"name": t.workload, "params": t.workload_params, "seed": t.seed,
                     "real": {"command": wl.command(), "output": wl_out}},
        "wire_format": "pfn", "memory_backend": cfg.memory, "environment": env,
        **inflate,
        "stages_ns": stages,
        "deflate": deflate,
        "verification": {"after_inflate": v_inflate, "after_deflate": v_deflate},
        "verified": bool(verified),
        "errors": {},
        "probes": probe_summary(readings, probes),
        "boot_ns": boot_ns, "workload_ns": workload_ns,
        "trial_wall_ns": time.perf_counter_ns() - wall0,
    }
    if "memfd_bytes_before" in inflate:
        result["memfd_freed_bytes"] = inflate["memfd_bytes_before"] - inflate["memfd_bytes_after"]
    return result
