"""One balloon trial, end to end, as real processes.

Starts a VMM (which starts its guest), attaches the probes to both pids, shapes the
guest's memory with a workload, inflates to the target through the monitor's
`balloon` command exactly as a management tool would drive QEMU, verifies, deflates,
verifies, and shuts everything down. The result is one JSON-able dict (the
`balloon-lab run --json` object). `verified` is true only when every check passed:
kept pages hash the same, ballooned pages hold no data in the memfd (the kernel's
SEEK_DATA view), the device's and the driver's balloon agree, and `actual` reached
the target.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from device.virtio.layout import MiB, PAGE_SHIFT
from device.virtio.protocols import PROTOCOLS
from lab.backends import is_qemu_arm
from lab import twins
from lab.monitor_client import AgentClient, MonitorError, QMPClient, wait_for_socket
from lab.orphans import die_with_parent, wait_or_kill
from lab.probe_summary import probe_summary as _probe_summary
from lab.ring_cost import FloorFailed, lab_cost, measure_floors
from lab.trial_result import OpResult, TrialResult



class TrialFailed(RuntimeError):
    """A trial that cannot produce a trustworthy number (a peer died, a check failed)."""


@dataclass
class BalloonTrial:
    protocol: str = "pfn"
    guest_mib: int = 1024
    inflate_mib: int | float = 512       # a float must be a whole number of pages (the spec checks it)
    workload: str = "aged"     # every free page touched once: each discard frees real memory
    workload_params: dict = field(default_factory=dict)
    seed: int = 1
    batch_pages: int | None = None
    discard: str = "madvise"
    backing: str = "4k"                 # host pages under guest RAM: 4k | thp | hugetlb
    partial_tracking: str = "full"      # huge backings: full | qemu (device/host/host_pages.py)
    alloc_policy: str = "linux"         # linux | hugepage-aware (device/guest/alloc_policy.py)
    deflate: bool = True
    timeout_s: float = 600.0        # the runner's wait for the monitor and the agent
    device_timeout_s: float = 30.0  # the guest driver's wait for the device to use a request
    log_level: str = "WARNING"
    init_on_alloc: bool = False     # the guest zeroes what it allocates for the balloon (Linux init_on_alloc)

    def __post_init__(self) -> None:
        if self.inflate_mib <= 0 or self.inflate_mib >= self.guest_mib:
            raise ValueError(f"inflate_mib must be in 1..{self.guest_mib - 1}, got {self.inflate_mib}")


class LabProcesses:
    """The VMM + guest pair of one trial, with their monitor and agent connections.
    Always torn down, whatever happens: no process outlives the trial."""

    def __init__(self, t: BalloonTrial, extra_vmm_args: list[str] | None = None,
                 extra_guest_args: list[str] | None = None) -> None:
        self.t = t
        self.dir = tempfile.mkdtemp(prefix="balloon-lab-")
        self.monitor_path = os.path.join(self.dir, "monitor.sock")
        self.agent_path = os.path.join(self.dir, "agent.sock")
        announce_backing(t.backing, t.guest_mib)
        guest_args = ["--protocol", _driver_protocol(t.protocol), "--log-level", t.log_level,
                      "--timeout", str(t.device_timeout_s), "--backing", t.backing,
                      "--alloc-policy", t.alloc_policy] + list(extra_guest_args or [])
        if t.batch_pages is not None:
            guest_args += ["--batch-pages", str(t.batch_pages)]
        if t.init_on_alloc:
            guest_args.append("--init-on-alloc")
        cmd = [sys.executable, "-m", "device.host.vmm", "--guest-mib", str(t.guest_mib), "--protocol", t.protocol,
               "--discard", t.discard, "--backing", t.backing, "--partial-tracking", t.partial_tracking,
               "--monitor", self.monitor_path, "--agent", self.agent_path,
               "--log-level", t.log_level] + (extra_vmm_args or []) + ["--"] + guest_args
        # Both children write their logs (and any traceback) to one file: a failure then
        # quotes its last lines; a trial that ends well passes the file on to our stderr.
        self.log_path = os.path.join(self.dir, "children.log")
        self._log_quoted = False
        with open(self.log_path, "wb") as log:
            self.vmm = subprocess.Popen(cmd, stderr=log, preexec_fn=die_with_parent)
        self.qmp: QMPClient | None = None
        self.agent: AgentClient | None = None
        try:
            wait_for_socket(self.monitor_path, 30, lambda: self.vmm.poll() is None)
            self.qmp = QMPClient(self.monitor_path, timeout=t.timeout_s)
            wait_for_socket(self.agent_path, 60, self._both_alive)
            self.agent = AgentClient(self.agent_path, timeout=t.timeout_s)
            self.info = self.qmp.execute("x-balloon-lab-info")
            self.guest_info = self.agent.execute("info")
        except Exception as e:
            err = self.failure("starting the VMM and its guest", e)
            self.close()
            raise err from e

    def _both_alive(self) -> bool:
        """The VMM runs and has not lost its guest (asked at most every 0.1 s): a guest
        that dies at start is reported at once, not after the agent socket's timeout."""
        if self.vmm.poll() is not None:
            return False
        now = time.monotonic()
        if now - getattr(self, "_asked", 0.0) < 0.1 or self.qmp is None:
            return True
        self._asked = now
        try:
            return not self.qmp.execute("x-balloon-lab-info", timeout=5).get("guest_exit")
        except MonitorError:
            return False

    def log_tail(self, lines: int = 12) -> str:
        """The children's last log lines (tracebacks included), for failure messages."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - 16384))
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    @property
    def pids(self) -> dict[str, int]:
        return {"vmm": self.vmm.pid, "guest": self.info["guest_pid"]}

    def check_alive(self) -> None:
        fate = _proc_fate(self.vmm.pid, self.vmm)
        if fate:
            raise TrialFailed(f"VMM process {self.vmm.pid} {fate}")
        try:
            st = self.qmp.execute("x-balloon-lab-info")
        except MonitorError as e:
            raise self.failure("asking the VMM", e) from e
        if st.get("guest_exit"):
            raise TrialFailed(f"guest process {st['guest_pid']} lost: {st['guest_exit']}")

    def failure(self, phase: str, err: BaseException) -> TrialFailed:
        """A TrialFailed that says which peer died or stalled, from the processes' own
        state (exit status, /proc state), not only the symptom the runner saw."""
        parts = []
        gp = getattr(self, "info", {}).get("guest_pid") if hasattr(self, "info") else None
        deadline = time.monotonic() + 1.0      # a peer whose socket just closed may still be exiting
        while True:
            vmm = _proc_fate(self.vmm.pid, self.vmm)
            guest = _proc_fate(gp) if gp else None
            if vmm or guest or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        if vmm:
            parts.append(f"VMM process {self.vmm.pid} {vmm}")
        if guest and not vmm and self.qmp is not None:
            try:                             # the VMM reaps its guest: it knows how it ended
                why, until = None, time.monotonic() + 2.0
                while why is None and time.monotonic() < until:
                    why = self.qmp.execute("x-balloon-lab-info", timeout=5).get("guest_exit")
                    if why is None:
                        time.sleep(0.05)
                guest = f"{guest} ({why})" if why else guest
            except MonitorError:
                pass
        if guest:
            parts.append(f"guest process {gp} {guest}")
        msg = f"{phase} failed: " + "; ".join(parts + [f"{type(err).__name__}: {err}"])
        tail = self.log_tail()
        if tail:
            self._log_quoted = True
            msg += "\nlast lines of the VMM and guest logs:\n" + "\n".join("  | " + ln for ln in tail.splitlines())
        return TrialFailed(msg)

    def close(self) -> None:
        stalled = _proc_fate(self.vmm.pid, self.vmm)    # dead or stopped: no `quit` to wait for
        try:
            if self.qmp is not None and not stalled:
                self.qmp.execute("quit", timeout=min(10.0, self.t.timeout_s))
        except Exception:
            pass
        if stalled and self.vmm.poll() is None:
            self.vmm.kill()
        gp = getattr(self, "info", {}).get("guest_pid") if hasattr(self, "info") else None
        if gp and _proc_fate(gp):              # a stopped guest would hold up the VMM's shutdown
            try:
                os.kill(gp, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for c in (self.qmp, self.agent):
            if c is not None:
                c.close()
        wait_or_kill(self.vmm, 15)
        gp = getattr(self, "info", {}).get("guest_pid") if hasattr(self, "info") else None
        if gp:
            try:
                os.kill(gp, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not self._log_quoted:            # warnings of a trial that went well still reach the user
            tail = self.log_tail(200)
            if tail:
                print(tail, file=sys.stderr)
        shutil.rmtree(self.dir, ignore_errors=True)


def _proc_fate(pid: int, popen: subprocess.Popen | None = None) -> str | None:
    """How a peer process is doing, or None if it is running: died (with its exit status
    or signal), a zombie, or stopped (SIGSTOP: it will never answer)."""
    state = _proc_state(pid)
    if popen is not None:
        rc = popen.poll()
        if rc is None and state in (None, "Z", "X"):      # exiting right now: reap it for its status
            try:
                rc = popen.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
        if rc is not None:
            return f"died (killed by {signal.Signals(-rc).name})" if rc < 0 else f"exited with status {rc}"
    if state in (None, "Z", "X"):
        return "died"
    if state in ("T", "t"):
        return "is stopped (SIGSTOP or a debugger): it cannot answer"
    return None


def _proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


_announced: set[tuple[str, int]] = set()


def announce_backing(backing: str, guest_mib: int) -> None:
    """Make the host able to give this backing (THP knob, hugetlb pool) and say on
    stderr what was changed; a host that cannot is a TrialFailed naming the fix."""
    if (backing, guest_mib) in _announced:
        return
    from device.virtio.backing import BackingError, ensure_backing
    try:
        for change in ensure_backing(backing, guest_mib * MiB):
            print(f"balloon-lab: for --backing {backing}: {change}", file=sys.stderr)
    except BackingError as e:
        raise TrialFailed(f"--backing {backing}: {e}") from e
    _announced.add((backing, guest_mib))


def _driver_protocol(protocol: str) -> str:
    """The guest driver's --protocol for an arm: its wire format (device/virtio/protocols.py)."""
    return PROTOCOLS[protocol].wire_format


def _stages(guest_rep: dict, dev_before: dict, dev_after: dict, kind: str) -> dict:
    """The SG series' breakdown: transmit is the guest's wait minus the device's own work."""
    d0, d1 = dev_before[kind], dev_after[kind]
    translate = d1["translate_ns"] - d0["translate_ns"]
    discard = d1["discard_ns"] - d0["discard_ns"]
    return {
        "alloc": guest_rep["alloc_ns"],
        "encode": guest_rep["encode_ns"],
        "transmit": max(0, guest_rep["wait_ns"] + guest_rep["config_ns"] - translate - discard),
        "translate": translate,
        "discard": discard,
        "total": guest_rep["total_ns"],
    }


def _merge_reports(reports: list[dict], kind: str) -> dict:
    keys = ("pages", "requests", "kicks", "interrupts", "bytes_on_ring", "descriptors",
            "alloc_ns", "encode_ns", "wait_ns", "config_ns", "total_ns", "short_pages", "alloc_calls",
            "config_writes")
    mine = [r for r in reports if r["kind"] == kind]
    out = {k: sum(r[k] for r in mine) for k in keys}
    out["errors"] = [r["error"] for r in mine if r.get("error")]
    return out


def _delta(after: dict, before: dict, keys: tuple[str, ...]) -> dict:
    return {k: after[k] - before[k] for k in keys}


def _hist_delta(after: dict, before: dict) -> dict:
    out = {k: v - before.get(k, 0) for k, v in after.items()}
    return {k: v for k, v in out.items() if v}


def balloon_op(lp: LabProcesses, kind: str, target_pages: int, probes) -> dict:
    """Drive one inflate or deflate through the monitor and collect both sides' view."""
    t = lp.t
    ram = lp.info["ram_bytes"]
    dev0 = lp.qmp.execute("x-balloon-lab-counters")
    if probes is not None:
        probes.clear()
    t0 = time.perf_counter_ns()
    lp.qmp.execute("balloon", {"value": ram - (target_pages << PAGE_SHIFT)})
    res = lp.agent.execute("wait-target", {"target_pages": target_pages, "timeout_s": t.timeout_s},
                           timeout=t.timeout_s + min(30.0, t.timeout_s))
    wall = time.perf_counter_ns() - t0
    reading = probes.read().to_json() if probes is not None else None
    if res.get("error"):
        try:
            lp.check_alive()
        except TrialFailed as e:
            raise TrialFailed(f"{kind} did not complete: {e}; the guest reported: {res['error']}") from e
        raise TrialFailed(f"{kind} did not complete: {res['error']}")
    dev1 = lp.qmp.execute("x-balloon-lab-counters")
    g = _merge_reports(res["reports"], kind)
    if g["errors"]:
        raise TrialFailed(f"{kind} failed in the guest: {g['errors'][0]}")
    keys = ("requests", "pages", "discard_calls", "translations", "bytes_on_ring", "descriptors",
            "refused_pages", "runs")
    dev = _delta(dev1[kind], dev0[kind], keys)
    return {
        "kind": kind, "target_pages": target_pages, "actual": res["actual"], "wall_ns": wall,
        "pages": g["pages"], "requests": g["requests"], "kicks": g["kicks"], "interrupts": g["interrupts"],
        "bytes_on_ring": g["bytes_on_ring"], "descriptors": g["descriptors"],
        "alloc_calls": g["alloc_calls"], "config_writes": g["config_writes"],
        "discard_calls": dev["discard_calls"], "translations": dev["translations"], "runs": dev["runs"],
        "device_requests": dev["requests"], "device_pages": dev["pages"], "refused_pages": dev["refused_pages"],
        "run_length_hist": _hist_delta(dev1[kind]["run_length_hist"], dev0[kind]["run_length_hist"]),
        "run_length_pages_hist": _hist_delta(dev1[kind]["run_length_pages_hist"],
                                             dev0[kind]["run_length_pages_hist"]),
        "stages_ns": _stages(g, dev0, dev1, kind),
        "device_wakeups": dev1["device_wakeups"] - dev0["device_wakeups"],
        "device_calls": sum(q["calls"] for q in dev1["queues"].values())
                        - sum(q["calls"] for q in dev0["queues"].values()),
        "budget_yields": dev1.get("budget_yields", 0) - dev0.get("budget_yields", 0),
        "device_errors": {k: v - dev0["errors"].get(k, 0) for k, v in dev1["errors"].items()
                          if v - dev0["errors"].get(k, 0)},
        "memfd_bytes_before": dev0["memfd_allocated_bytes"], "memfd_bytes_after": dev1["memfd_allocated_bytes"],
        "host_pages": dev1.get("host_pages"),
        "rss_bytes": {"vmm": dev1["vmm_rss_bytes"], "guest": dev1["guest_rss_bytes"]},
        "probes": reading,
    }


def verify(lp: LabProcesses, target_pages: int) -> dict:
    g = lp.agent.execute("verify")
    d = lp.qmp.execute("x-balloon-lab-verify")
    checks = {
        "kept_pages_intact": g["held_ok"],
        "balloon_gone_from_memfd": d["ballooned_with_data"] == 0,
        "device_and_driver_agree": g["balloon_digest"] == d["ballooned_digest"]
                                    and g["balloon_pages"] == d["ballooned_pages"],
        "actual_is_target": g["actual"] == target_pages,
    }
    huge = {k: d[k] for k in ("host_page_bytes", "whole_host_pages", "whole_with_data", "partial_host_pages")
            if k in d}
    return {"ok": all(checks.values()), "checks": checks, "kept_pages_checked": g["pages_checked"], **huge,
            "bad_kept_pfns": g["bad_pfns"], "ballooned_with_data": d["ballooned_with_data"],
            "balloon_pages": g["balloon_pages"]}


def attach_probes(probes, lp: LabProcesses) -> None:
    """Attach the probes to both processes and tell them which eventfds are which:
    guest writes on kick fds are kicks, VMM reads of them device wake-ups; VMM writes on
    call fds are interrupts, guest reads of them interrupt handling."""
    probes.attach(list(lp.pids.values()))
    guest, vmm = lp.pids["guest"], lp.pids["vmm"]
    drv = lp.guest_info["driver"]
    for q, fd in drv["kick_fds"].items():
        probes.register_eventfd(guest, fd, int(q), "kick")
    for q, fd in drv["call_fds"].items():
        probes.register_eventfd(guest, fd, int(q), "call")
    for q, fd in lp.info["kick_fds"].items():
        probes.register_eventfd(vmm, fd, int(q), "kick")
    for q, fd in lp.info["call_fds"].items():
        probes.register_eventfd(vmm, fd, int(q), "call")
    if lp.info.get("config_call_fd") is not None:
        probes.register_eventfd(vmm, lp.info["config_call_fd"], 0, "config")
        probes.register_eventfd(guest, drv["config_fd"], 0, "config")


def run_balloon(t: BalloonTrial, probes=None, on_started=None) -> dict:
    """Run one trial: its result as stored (TrialResult.to_json(), the `balloon-lab run
    --json` object); raises TrialFailed (never returns a half-measured result)."""
    return run_balloon_trial(t, probes, on_started).to_json()


def run_balloon_trial(t: BalloonTrial, probes=None, on_started=None) -> TrialResult:
    """Run one trial; raises TrialFailed (never returns a half-measured result). The
    ring's floor is measured first, before the trial's processes start (lab/ring_cost.py)."""
    try:
        floors = measure_floors(t.guest_mib)
    except FloorFailed as e:
        raise TrialFailed(str(e)) from e
    wall0 = time.perf_counter_ns()
    try:
        lp = LabProcesses(t)
    except (MonitorError, OSError) as e:
        raise TrialFailed(f"starting the VMM and its guest failed: {type(e).__name__}: {e}") from e
    phase = "setting up"
    try:
        if on_started is not None:
            on_started(lp)
        if probes is not None:
            attach_probes(probes, lp)
        phase = "workload-prepare"
        prep = lp.agent.execute("workload-prepare", {"name": t.workload, "params": t.workload_params,
                                                     "seed": t.seed})
        lp.agent.execute("workload-start")
        target = round(t.inflate_mib * MiB) >> PAGE_SHIFT
        phase = "inflate"
        inflate = balloon_op(lp, "inflate", target, probes)
        v_inflate = verify(lp, target)
        freed = inflate["memfd_bytes_before"] - inflate["memfd_bytes_after"]
        deflate = v_deflate = None
        if t.deflate:
            phase = "deflate"
            deflate = balloon_op(lp, "deflate", 0, probes)
            v_deflate = verify(lp, 0)
        phase = "finishing"
        wl = lp.agent.execute("workload-stop")
        pids = lp.pids
        final = lp.qmp.execute("x-balloon-lab-counters")
        lp.check_alive()
    except (MonitorError, OSError) as e:     # a peer died or stalled: say which, never a half result
        raise lp.failure(phase, e) from e
    finally:
        lp.close()
    verified = v_inflate["ok"] and (v_deflate is None or v_deflate["ok"])
    # The top level is the inflate (the operation the protocols are compared on);
    # `deflate` holds the same fields for the way back. No number appears twice
    # (lab/trial_result.py: stage times and probe readings have their own fields).
    ops = {k: v for k, v in (("inflate", inflate), ("deflate", deflate)) if v is not None}
    driver = lp.guest_info["driver"]
    return TrialResult(
        protocol=t.protocol, guest_mib=t.guest_mib, inflate_mib=t.inflate_mib, pids=pids,
        workload={"name": t.workload, "params": t.workload_params, "seed": t.seed,
                  "prepare": prep.get("summary"), "stop": wl},
        wire_format=driver["wire_format"], batch_pages=driver["batch_pages"],
        discard=t.discard, guest_init_on_alloc=t.init_on_alloc,
        backing=t.backing, partial_tracking=t.partial_tracking, alloc_policy=t.alloc_policy,
        inflate=_op_result(inflate), deflate=_op_result(deflate) if deflate is not None else None,
        memfd_freed_bytes=freed,
        stages_ns={k: op["stages_ns"] for k, op in ops.items()},
        floors=floors,
        lab_cost={k: lab_cost(op["stages_ns"], op["requests"], floors) for k, op in ops.items()},
        verification={"after_inflate": v_inflate, "after_deflate": v_deflate},
        verified=bool(verified),
        errors=final["errors"],
        probes=_probe_summary({k: op["probes"] for k, op in ops.items()}, probes),
        trial_wall_ns=time.perf_counter_ns() - wall0,
    )


def _op_result(op: dict) -> OpResult:
    """balloon_op's dict as the trial result holds it: its stage times and probe
    reading go to the trial's `stages_ns` and `probes`, `kind` is where it sits."""
    return OpResult.from_json({k: v for k, v in op.items() if k not in ("kind", "stages_ns", "probes")})


def run_trial(spec, arm: str, probe_session=None, rnd: int = 0) -> dict:
    """lab.experiment's trial function: one balloon trial of `arm` under an ExperimentSpec.

    Round `rnd` uses seed spec.seed + rnd (every arm of a round sees the same guest
    layout, rounds differ). With probes on and spec.twins, the trial is a twin pair
    (lab.twins): timings from an unprobed twin, counts from the probed one. A trial
    of an arm scheduled without probes runs with every BPF program detached."""
    if spec.kind != "balloon":
        raise ValueError(f"run_trial runs balloon experiments, not {spec.kind!r}")
    if is_qemu_arm(arm):                  # the one dispatch point: arm -> backend
        from lab.backends.qemu.trial import run_qemu_trial

        def run_one(session):
            return run_qemu_trial(spec, arm, session)
    else:
        batch = spec.batch_pages_for(arm)
        if arm == "bitmap" and spec.bitmap_pages_per_request is not None:
            batch = spec.bitmap_pages_per_request
        t = BalloonTrial(protocol=arm, guest_mib=spec.guest_mib, inflate_mib=spec.inflate_mib,
                         workload=spec.workload, workload_params=dict(spec.workload_params), seed=spec.seed + rnd,
                         batch_pages=batch, discard=spec.discard, backing=spec.backing,
                         partial_tracking=spec.partial_tracking, alloc_policy=spec.alloc_policy,
                         init_on_alloc=spec.guest_init_on_alloc)

        def run_one(session):
            return run_balloon(t, session)
    active = probe_session is not None and getattr(probe_session, "active", False)
    if not spec.probes:
        with twins.probes_detached(probe_session):
            return run_one(None)
    if active and getattr(spec, "twins", False):
        return twins.run_twins(run_one, probe_session, rnd)
    return run_one(probe_session)


def trial_fn(probe_session=None):
    """run_experiment's trial function for balloon specs, with this probe session."""
    return lambda spec, arm, rnd: run_trial(spec, arm, probe_session, rnd)
