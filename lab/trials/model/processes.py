"""The VMM + guest pair of one trial as real processes: started, watched, torn down.

The VMM (`python -m device.vmm.process`) starts its guest; the lab holds the monitor
(QMP) and agent connections, says which peer died or stalled when one does, and
makes the host able to give the trial's backing.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from typing import Any, Mapping

from device.api import PROTOCOLS, GuestOptions, MiB, VmmOptions, hugetlb_pool
from system.signals import signals_deferred
from lab.machine import memory, oom
from lab.trials.model.balloon_trial import BalloonTrial, TrialFailed
from lab.trials.monitor_client import AgentClient, MonitorError, QMPClient, wait_for_socket
from lab.trials.orphans import remove_scratch, scratch_dir, spawn, wait_or_kill
from workloads import GUEST_MODULE, make_workload

# The VMM's guest: the device's guest with the lab's workloads handed in (workloads/guest.py).
WORKLOAD_GUEST = f"{shlex.quote(sys.executable)} -m {GUEST_MODULE}"


class LabProcesses:
    """The VMM + guest pair of one trial, with their monitor and agent connections.
    Always torn down, whatever happens: no process outlives the trial."""

    def __init__(self, t: BalloonTrial, vmm: Mapping[str, Any] | None = None,
                 guest: Mapping[str, Any] | None = None) -> None:
        """`vmm` and `guest`: fields of the VMM's and the guest's launch records to set
        beyond what the trial says (tests: a guest program that dies, reporting on)."""
        self.t = t
        check_memory(t)                    # before anything is started or raised (lab/machine/memory.py)
        self._oom_kills_before = oom.cgroup_oom_kills()
        self.dir = scratch_dir()
        self.monitor_path = os.path.join(self.dir, "monitor.sock")
        self.agent_path = os.path.join(self.dir, "agent.sock")
        announce_backing(t.backing, t.guest_mib)
        self.options = vmm_options(t, self.monitor_path, self.agent_path, guest_options(t, **(guest or {})),
                                   **(vmm or {}))
        # Both children write their logs (and any traceback) to one file: a failure then
        # quotes its last lines; a trial that ends well passes the file on to our stderr.
        self.log_path = os.path.join(self.dir, "children.log")
        self._log_quoted = False
        with open(self.log_path, "wb") as log:
            self.vmm = spawn(self.options.command(), stderr=log)
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
        except BaseException:              # Ctrl-C or SIGTERM while starting: nothing left behind
            self._log_quoted = True        # (the VMM's log of an interrupted start is noise)
            self.close()
            raise

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
            raise TrialFailed(f"VMM process {self.vmm.pid} {self._oom(self.vmm.pid, fate)}")
        try:
            st = self.qmp.execute("x-balloon-lab-info")
        except MonitorError as e:
            raise self.failure("asking the VMM", e) from e
        if st.get("guest_exit"):
            raise TrialFailed(f"guest process {st['guest_pid']} lost: {self._oom(st['guest_pid'], st['guest_exit'])}")

    def _oom(self, pid: int, fate: str) -> str:
        """`fate`, and if the process died of SIGKILL, whether the OOM killer did it (lab/machine/oom.py)."""
        if "SIGKILL" not in fate:
            return fate
        ev = oom.oom_evidence(pid, self._oom_kills_before)
        return f"{fate}: {ev}" if ev else fate

    def failure(self, phase: str, err: BaseException) -> TrialFailed:
        """A TrialFailed that says which peer died or stalled, from the processes' own
        state (exit status, /proc state), not only the symptom the runner saw."""
        parts = []
        gp = getattr(self, "info", {}).get("guest_pid") if hasattr(self, "info") else None
        deadline = time.monotonic() + 1.0      # a peer whose socket just closed may still be exiting
        while True:
            vmm = _proc_fate(self.vmm.pid, self.vmm)
            guest = _proc_fate(gp) if gp else None
            # a guest dies with its VMM (system/signals.py die_with_parent) a moment after it:
            # once the VMM is gone, wait for the guest too, so both are named
            if (guest or (vmm and not gp)) or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        if vmm:
            parts.append(f"VMM process {self.vmm.pid} {self._oom(self.vmm.pid, vmm)}")
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
            parts.append(f"guest process {gp} {self._oom(gp, guest)}")
        msg = f"{phase} failed: " + "; ".join(parts + [f"{type(err).__name__}: {err}"])
        tail = self.log_tail()
        if tail:
            self._log_quoted = True
            msg += "\nlast lines of the VMM and guest logs:\n" + "\n".join("  | " + ln for ln in tail.splitlines())
        return TrialFailed(msg)

    def close(self) -> None:
        """Quit the VMM (and so its guest), reap both, remove the scratch directory. A
        second Ctrl-C or SIGTERM waits until this is done (at most ~15 s: then SIGKILL)."""
        with signals_deferred():
            self._close()

    def _close(self) -> None:
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
        remove_scratch(self.dir)

def check_memory(t: BalloonTrial) -> None:
    """TrialFailed (one line, with the figures) when the host cannot hold this trial now."""
    touched = make_workload(t.workload, dict(t.workload_params), seed=t.seed).touched_share()
    if t.init_on_alloc:                   # the guest zeroes what it hands the balloon: written too
        touched = min(1.0, touched + t.inflate_mib / t.guest_mib)
    pool = hugetlb_pool() if t.backing == "hugetlb" else None
    need = memory.balloon_trial_need(t.guest_mib, touched, backing=t.backing,
                                     huge_pool_free_bytes=pool.available * pool.page_bytes if pool else 0)
    try:
        memory.check(need, f"a {t.guest_mib} MiB guest with workload {t.workload}")
    except memory.NotEnoughMemory as e:
        raise TrialFailed(str(e)) from None


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
    from device.api import BackingError, ensure_backing
    try:
        for change in ensure_backing(backing, guest_mib * MiB):
            print(f"balloon-lab: for --backing {backing}: {change}", file=sys.stderr)
    except BackingError as e:
        raise TrialFailed(f"--backing {backing}: {e}") from e
    _announced.add((backing, guest_mib))

def guest_options(t: BalloonTrial, **fields) -> GuestOptions:
    """The guest's launch record for trial `t`: the driver accepts the wire format of
    the arm's protocol (device/virtio/protocols.py)."""
    return GuestOptions(wire_format=PROTOCOLS[t.protocol].wire_format, batch_pages=t.batch_pages,
                        timeout_s=t.device_timeout_s, backing=t.backing, alloc_policy=t.alloc_policy,
                        init_on_alloc=t.init_on_alloc, log_level=t.log_level, **fields)


def vmm_options(t: BalloonTrial, monitor: str, agent: str, guest: GuestOptions, **fields) -> VmmOptions:
    """The VMM's launch record for trial `t`; its guest is the workload guest with `guest`'s options."""
    return VmmOptions(guest_mib=t.guest_mib, protocol=t.protocol, discard=t.discard, backing=t.backing,
                      partial_tracking=t.partial_tracking, monitor=monitor, agent=agent, log_level=t.log_level,
                      **{"guest_cmd": WORKLOAD_GUEST, "guest_args": tuple(guest.to_argv()), **fields})
