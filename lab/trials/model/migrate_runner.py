"""One live-migration trial, end to end, as real processes.

Starts a destination VMM (`--incoming tcp:127.0.0.1:0`, no guest, its own memfd)
and a source VMM with its guest, shapes the guest's memory with a workload, sets
the link rate with `migrate-set-parameters` and starts `migrate` on the source's
monitor exactly as a management tool drives QEMU, polls `query-migrate` until the
migration and its verification are done, then resumes the source guest (`cont`),
stops its workload and lets the guest check every page it holds against the
destination's memfd. While the migration runs a sampler records the host memory
both sides use (memfd pages and anonymous RSS of all three processes).

`verified` is true only when the source's page-by-page comparison with the
destination found no difference outside the pages skipped as hinted free and never
written since, and the guest found every page it holds intact at the destination.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

from device.api import HINT_DESIGNS, PROTOCOLS, GuestOptions, VmmOptions
from system.signals import signals_deferred
from lab.trials.monitor_client import AgentClient, QMPClient, wait_for_socket
from lab.trials.orphans import remove_scratch, scratch_dir, spawn, wait_or_kill
from lab.machine import memory
from lab.trials.model.balloon_trial import TrialFailed
from lab.trials.model.processes import WORKLOAD_GUEST
from workloads import make_workload

HINTS = HINT_DESIGNS   # device/virtio/hint_format.py


@dataclass
class MigrateTrial:
    hint: str = "none"
    guest_mib: int = 8192
    bandwidth_bits: int = 10**10
    workload: str = "idle"
    workload_params: dict = field(default_factory=dict)
    seed: int = 1
    downtime_limit_ms: float = 300.0
    max_rounds: int = 30
    hint_wait_ms: float = 2000.0
    protocol: str = "pfn"
    settle_s: float = 0.0          # let a background workload run this long before migrating
    timeout_s: float = 900.0
    log_level: str = "WARNING"

    def __post_init__(self) -> None:
        if self.hint not in HINTS:
            raise ValueError(f"hint must be one of {', '.join(HINTS)}, got {self.hint!r}")
        if self.bandwidth_bits <= 0:
            raise ValueError(f"bandwidth must be positive, got {self.bandwidth_bits}")
        if self.guest_mib <= 0 or self.guest_mib % 4:
            raise ValueError(f"guest_mib must be a positive multiple of 4, got {self.guest_mib}")


def _status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _memfd_bytes(pid: int, fd: int) -> int:
    try:
        return os.stat(f"/proc/{pid}/fd/{fd}").st_blocks * 512
    except (FileNotFoundError, ProcessLookupError):
        return 0


class MemorySampler(threading.Thread):
    """Peak host memory during the migration: both memfds (guest RAM at the source,
    received RAM at the destination) plus the anonymous RSS of the source VMM, the
    guest and the destination VMM. memfd pages are counted once (not in RSS)."""

    def __init__(self, src: tuple[int, int], dst: tuple[int, int], guest_pid: int, period_s: float = 0.05) -> None:
        super().__init__(daemon=True, name="memory-sampler")
        self.src, self.dst, self.guest = src, dst, guest_pid
        self.period = period_s
        self.stop_ev = threading.Event()
        self.peak = {"source_memfd": 0, "destination_memfd": 0, "source_vmm_anon": 0, "destination_vmm_anon": 0,
                     "guest_anon": 0, "host": 0}
        self.samples = 0

    def sample(self) -> None:
        v = {"source_memfd": _memfd_bytes(*self.src), "destination_memfd": _memfd_bytes(*self.dst),
             "source_vmm_anon": _status_kb(self.src[0], "RssAnon"),
             "destination_vmm_anon": _status_kb(self.dst[0], "RssAnon"), "guest_anon": _status_kb(self.guest, "RssAnon")}
        v["host"] = sum(v.values())
        for k, x in v.items():
            self.peak[k] = max(self.peak[k], x)
        self.samples += 1

    def run(self) -> None:
        while not self.stop_ev.is_set():
            self.sample()
            self.stop_ev.wait(self.period)

    def finish(self) -> dict:
        self.stop_ev.set()
        self.join()
        self.sample()
        return dict(self.peak)


class MigrationPair:
    """Destination VMM, source VMM and its guest, with monitor and agent connections.
    Always torn down: no process outlives the trial."""

    def __init__(self, t: MigrateTrial) -> None:
        self.t = t
        touched = make_workload(t.workload, dict(t.workload_params), seed=t.seed).touched_share()
        try:           # source and destination hold guest RAM at once (lab/machine/memory.py)
            memory.check(memory.balloon_trial_need(t.guest_mib, touched, copies=2),
                         f"migrating a {t.guest_mib} MiB guest with workload {t.workload}")
        except memory.NotEnoughMemory as e:
            raise TrialFailed(str(e)) from None
        self.dir = scratch_dir("mig")
        p = lambda name: os.path.join(self.dir, name)
        vmm = lambda **o: VmmOptions(guest_mib=t.guest_mib, log_level=t.log_level, **o).command()
        guest = GuestOptions(wire_format=PROTOCOLS[t.protocol].wire_format, hint=t.hint, log_level=t.log_level)
        self.procs: list[subprocess.Popen] = []
        self.src_qmp = self.dst_qmp = None
        self.agent = None
        self.guest_pid: int | None = None
        try:
            self.dst = spawn(vmm(monitor=p("dst.sock"), agent=p("dst-agent.sock"), incoming="tcp:127.0.0.1:0",
                                 poll_us=0))
            self.procs.append(self.dst)
            self.src = spawn(vmm(monitor=p("src.sock"), agent=p("agent.sock"), protocol=t.protocol, hint=t.hint,
                                 guest_cmd=WORKLOAD_GUEST, guest_args=tuple(guest.to_argv())))
            self.procs.append(self.src)
            wait_for_socket(p("dst.sock"), 30, lambda: self.dst.poll() is None)
            self.dst_qmp = QMPClient(p("dst.sock"), timeout=t.timeout_s)
            wait_for_socket(p("src.sock"), 30, lambda: self.src.poll() is None)
            self.src_qmp = QMPClient(p("src.sock"), timeout=t.timeout_s)
            wait_for_socket(p("agent.sock"), 60, lambda: self.src.poll() is None)
            self.agent = AgentClient(p("agent.sock"), timeout=t.timeout_s)
            self.src_info = self.src_qmp.execute("x-balloon-lab-info")
            self.src_mig = self.src_qmp.execute("x-balloon-lab-migration-info")
            self.dst_mig = self.dst_qmp.execute("x-balloon-lab-migration-info")
            self.guest_info = self.agent.execute("info")
            self.guest_pid = self.src_info["guest_pid"]
        except BaseException:              # Ctrl-C and SIGTERM too: nothing left behind
            self.close()
            raise

    @property
    def pids(self) -> dict[str, int]:
        return {"source_vmm": self.src.pid, "guest": self.guest_pid, "destination_vmm": self.dst.pid}

    @property
    def dest_ram_path(self) -> str:
        return f"/proc/{self.dst.pid}/fd/{self.dst_mig['ram_fd']}"

    def close(self) -> None:
        """Quit both VMMs, reap them, remove the scratch directory (a second Ctrl-C waits)."""
        with signals_deferred():
            self._close()

    def _close(self) -> None:
        for q in (self.src_qmp, self.dst_qmp):
            try:
                if q is not None:
                    q.execute("quit", timeout=15)
            except Exception:
                pass
        for c in (self.src_qmp, self.dst_qmp, self.agent):
            if c is not None:
                c.close()
        for pr in self.procs:
            wait_or_kill(pr, 20)
        if self.guest_pid:
            try:
                os.kill(self.guest_pid, signal.SIGCONT)
                os.kill(self.guest_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        remove_scratch(self.dir)


def _attach_probes(probes, mp: MigrationPair) -> None:
    probes.attach([pid for pid in mp.pids.values() if pid])
    for q, fd in mp.guest_info["driver"]["kick_fds"].items():
        probes.register_eventfd(mp.guest_pid, fd, int(q), "kick")
    for q, fd in mp.src_info["call_fds"].items():
        probes.register_eventfd(mp.src.pid, fd, int(q), "call")
    for q, fd in mp.src_info["kick_fds"].items():
        probes.register_eventfd(mp.src.pid, fd, int(q), "wakeup")


def _wait_done(mp: MigrationPair, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        q = mp.src_qmp.execute("query-migrate")
        x = q.get("x-balloon-lab") or {}
        if q.get("status") in ("failed", "cancelled"):
            return q
        if q.get("status") == "completed" and x.get("verification") is not None:
            return q
        if mp.src.poll() is not None or mp.dst.poll() is not None:
            raise TrialFailed("a VMM process died during the migration")
        if time.monotonic() > deadline:
            raise TrialFailed(f"migration did not finish within {timeout_s:.0f} s (status {q.get('status')})")
        time.sleep(0.1)     # times are measured inside the source VMM; polling only has to notice the end


def run_migration(t: MigrateTrial, probes=None) -> dict:
    """Run one migration trial; raises TrialFailed when no trustworthy number came out."""
    wall0 = time.perf_counter_ns()
    mp = MigrationPair(t)
    try:
        if probes is not None:
            _attach_probes(probes, mp)
        prep = mp.agent.execute("workload-prepare", {"name": t.workload, "params": t.workload_params,
                                                     "seed": t.seed})
        mp.agent.execute("workload-start")
        if t.settle_s:
            time.sleep(t.settle_s)
        mp.src_qmp.execute("migrate-set-parameters", {
            "max-bandwidth": max(1, t.bandwidth_bits // 8), "downtime-limit": t.downtime_limit_ms,
            "x-max-rounds": t.max_rounds, "x-hint-wait-ms": t.hint_wait_ms})
        sampler = MemorySampler((mp.src.pid, mp.src_mig["ram_fd"]), (mp.dst.pid, mp.dst_mig["ram_fd"]), mp.guest_pid)
        sampler.sample()
        touched = sampler.peak["source_memfd"]
        if probes is not None:
            probes.clear()
        sampler.start()
        mp.src_qmp.execute("migrate", {"uri": f"tcp:127.0.0.1:{mp.dst_mig['incoming_port']}"})
        try:
            q = _wait_done(mp, t.timeout_s)
        finally:
            peaks = sampler.finish()
        reading = probes.read().to_json() if probes is not None else None
        x = q.get("x-balloon-lab") or {}
        if q.get("status") != "completed":
            raise TrialFailed(f"migration {q.get('status')}: {q.get('error-desc') or x.get('error')}")
        dst = mp.dst_qmp.execute("query-migrate")
        mp.src_qmp.execute("cont")
        wl = mp.agent.execute("workload-stop")
        gv = mp.agent.execute("migration-verify", {"dest": mp.dest_ram_path}, timeout=t.timeout_s)
        counters = mp.src_qmp.execute("x-balloon-lab-counters")
        dst_info = mp.dst_qmp.execute("x-balloon-lab-migration-info")
    finally:
        mp.close()
    vv = x.get("verification") or {}
    d = x.get("destination") or {}
    memory = {
        "guest_touched_bytes": touched,
        "source_memfd_bytes_before": x.get("source_memfd_bytes_before"),
        "source_memfd_bytes_after": x.get("source_memfd_bytes_after"),
        "source_memfd_peak_bytes": peaks["source_memfd"],
        "destination_memfd_peak_bytes": peaks["destination_memfd"],
        "destination_memfd_bytes": d.get("memfd_bytes"),
        "source_vmm": {"rss_peak_bytes": x.get("source_rss_peak_bytes"), "anon_peak_bytes": peaks["source_vmm_anon"]},
        "destination_vmm": {"rss_peak_bytes": d.get("rss_peak_bytes"),
                            "anon_peak_bytes": peaks["destination_vmm_anon"]},
        "guest": {"anon_peak_bytes": peaks["guest_anon"]},
        "host_peak_bytes": peaks["host"],
        "samples": sampler.samples,
    }
    verified = bool(vv.get("ok")) and bool(gv.get("ok"))
    errors = dict(counters.get("errors") or {})
    if not verified:        # the stored failed trial names the first differing pages
        errors["verification"] = (
            f"source vs destination: {vv.get('differing_pages')} pages differ, first PFNs "
            f"{vv.get('first_differing_pfns')}; guest's held pages: {gv.get('bad_at_destination')} bad at the "
            f"destination (first {gv.get('first_bad_destination_pfns')}), {gv.get('bad_at_source')} at the source "
            f"(first {gv.get('first_bad_source_pfns')})")
    return {
        "hint": t.hint, "guest_mib": t.guest_mib, "bandwidth_bits": t.bandwidth_bits,
        "workload": {"name": t.workload, "params": t.workload_params, "seed": t.seed,
                     "prepare": prep.get("summary"), "stop": wl},
        "total_ms": x.get("total_ms"), "downtime_ms": x.get("downtime_ms"), "setup_ms": x.get("setup_ms"),
        "hint_ms": x.get("hint_ms"), "expected_downtime_ms": x.get("expected_downtime_ms"),
        "rounds": x.get("rounds"), "converged": x.get("converged"),
        "bytes_sent": x.get("bytes_sent"), "pages_sent": x.get("pages_sent"), "pages_zero": x.get("pages_zero"),
        "wire_gbit_s": x["bytes_sent"] * 8 / (x["total_ms"] * 1e6) if x.get("total_ms") else None,
        "pages_hinted": x.get("pages_hinted"), "pages_examined": x.get("pages_examined"),
        "bytes_read": x.get("bytes_read"), "pages_hinted_then_dirtied": x.get("pages_hinted_then_dirtied"),
        "stop_copy_pages": x.get("stop_copy_pages"), "pause_attempts": x.get("pause_attempts"),
        "downtime_parts_ms": x.get("downtime_parts_ms"),
        "cpu_s_source": x.get("cpu_s_source"), "cpu_s_destination": d.get("cpu_s_destination"),
        "cpu_s_guest": x.get("cpu_s_guest"), "rate_limit_slept_s": x.get("rate_limit_slept_s"),
        "per_round": x.get("per_round"),
        "destination": {k: d.get(k) for k in ("pages_data", "pages_zero", "pages_punched", "pwrite_calls",
                                             "bytes", "receive_ms")},
        "hints": x.get("hints"),
        "memory": memory,
        "verified": verified,
        "verification": {"vmm": vv, "guest": gv},
        "migration_params": x.get("params"),
        "destination_device_state": bool(dst_info.get("device_state")),
        "destination_status": dst.get("status"),
        "errors": errors,
        "probes": reading if reading is not None else {"backend": "none", "reason": "probes off"},
        "trial_wall_ns": time.perf_counter_ns() - wall0,
    }


def run_trial(spec, arm: str, rnd: int = 0, probe_session=None, **overrides) -> dict:
    """lab.trials.experiment's trial function for kind "migrate": arm is the hint design."""
    if spec.kind != "migrate":
        raise ValueError(f"migrate_runner.run_trial runs migrate experiments, not {spec.kind!r}")
    t = MigrateTrial(hint=arm, guest_mib=spec.guest_mib, bandwidth_bits=spec.bandwidth, workload=spec.workload,
                     workload_params=dict(spec.workload_params), seed=spec.seed + rnd, **overrides)
    return run_migration(t, probe_session if spec.probes else None)
