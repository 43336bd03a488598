"""One QEMU process running the lab's real guest: command line, QMP, agent, teardown.

QEMU gets its QMP monitor and the guest agent's serial port as unix sockets in a
private temporary directory, its trace events (`-trace NAME`, log backend) in a file
there (`-D`), and `-accel kvm` only when a real KVM boot was seen to work on this
machine (accel.py), else TCG. Guest RAM is QEMU's default anonymous memory, or a
shared memfd (`memory-backend-memfd,share=on`), which makes QEMU discard ballooned
pages with fallocate(PUNCH_HOLE) as the lab's own VMM does.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field

from lab.machine import memory
from lab.trials.qemu.agent import AgentError, GuestAgent
from lab.trials.qemu.guest_crash import GuestCrash, read_crash
from lab.trials.qemu.image import GuestImage
from lab.trials.monitor_client import MonitorError, QMPClient, wait_for_socket
from lab.trials.orphans import remove_scratch, scratch_dir, spawn, wait_or_kill

QEMU = "qemu-system-x86_64"
TRACE_EVENTS = ("virtqueue_pop", "virtio_queue_notify", "virtio_notify", "virtio_notify_irqfd",
                "virtio_balloon_handle_output", "virtio_balloon_to_target")
class QemuError(RuntimeError):
    """QEMU or its guest could not be started or driven; the message says which."""


@dataclass
class QemuConfig:
    guest_mib: int
    accel: str = "tcg"
    memory: str = "anonymous"           # anonymous | memfd (share=on)
    smp: int = 1
    trace: bool = True
    free_page_hint: bool = False        # virtio-balloon free-page-hint=on with its iothread
    incoming: str | None = None         # "tcp:127.0.0.1:PORT": a migration destination
    boot_timeout_s: float = 120.0
    extra_args: list[str] = field(default_factory=list)
    kernel_args: str = ""               # appended to the guest kernel's command line


def qemu_version(binary: str = QEMU) -> str:
    """'7.2.22' from `qemu-system-x86_64 --version`."""
    if not shutil.which(binary):
        raise QemuError(f"{binary} is not installed; install it with: apt-get install qemu-system-x86")
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
    m = re.search(r"version (\S+)", out)
    return m.group(1) if m else out.strip().splitlines()[0]


def command_line(cfg: QemuConfig, image: GuestImage, d: str) -> list[str]:
    cmd = [QEMU, "-accel", cfg.accel, "-m", str(cfg.guest_mib), "-smp", str(cfg.smp),
           "-nographic", "-nodefaults", "-no-reboot", "-cpu", "host" if cfg.accel == "kvm" else "qemu64",
           "-kernel", image.kernel, "-initrd", image.initrd,
           "-append", ("console=ttyS0 quiet panic=-1 " + cfg.kernel_args).strip(),
           "-serial", f"file:{d}/console.log",
           "-serial", f"unix:{d}/agent.sock,server=on,wait=off",
           "-qmp", f"unix:{d}/qmp.sock,server=on,wait=off",
           "-pidfile", f"{d}/qemu.pid", "-msg", "timestamp=on"]
    if cfg.memory == "memfd":
        cmd += ["-object", f"memory-backend-memfd,id=ram0,size={cfg.guest_mib}M,share=on",
                "-machine", "memory-backend=ram0"]
    balloon = "virtio-balloon-pci,id=balloon0"
    if cfg.free_page_hint:
        cmd += ["-object", "iothread,id=iothread0"]
        balloon += ",free-page-hint=on,iothread=iothread0"
    cmd += ["-device", balloon]
    if cfg.trace:
        cmd += ["-D", f"{d}/trace.log"]
        for ev in TRACE_EVENTS:
            cmd += ["-trace", ev]
    if cfg.incoming:
        cmd += ["-incoming", cfg.incoming]
    return cmd + cfg.extra_args


class QemuProcess:
    """A running QEMU with its QMP client and (unless it is an incoming migration
    destination) its booted guest's agent. Always torn down by close()."""

    def __init__(self, cfg: QemuConfig, image: GuestImage) -> None:
        self.cfg, self.image = cfg, image
        try:           # a Linux guest writes all its RAM sooner or later (lab/machine/memory.py)
            memory.check(memory.balloon_trial_need(cfg.guest_mib, 1.0, real_guest=True),
                         f"QEMU with a {cfg.guest_mib} MiB Linux guest")
        except memory.NotEnoughMemory as e:
            raise QemuError(str(e)) from None
        self.dir = scratch_dir("qemu")
        self.trace_path = os.path.join(self.dir, "trace.log")
        self.console_path = os.path.join(self.dir, "console.log")
        self.proc = spawn(command_line(cfg, image, self.dir), stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.qmp: QMPClient | None = None
        self.agent: GuestAgent | None = None
        try:
            wait_for_socket(os.path.join(self.dir, "qmp.sock"), 30, self.alive)
            self.qmp = QMPClient(os.path.join(self.dir, "qmp.sock"), timeout=60)
            if cfg.incoming is None:
                self.agent = GuestAgent(os.path.join(self.dir, "agent.sock"), cfg.boot_timeout_s, self.alive)
        except (MonitorError, AgentError, OSError) as e:
            why = self.why_dead()
            self.close()
            raise QemuError(f"QEMU ({cfg.accel}) did not boot the guest: {e}{why}") from e
        except BaseException:              # Ctrl-C or SIGTERM while it boots: nothing left behind
            self.close()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def why_dead(self) -> str:
        if self.alive():
            crash = self.guest_crash()
            if crash is not None:
                return f"; the guest's kernel crashed: {crash.describe()}"
            return f"; console tail: {self.console_tail()!r}"
        err = self.proc.stderr.read().decode(errors="replace").strip() if self.proc.stderr else ""
        return f"; QEMU exited with status {self.proc.returncode}: {err[-500:]}"

    def console_tail(self, n: int = 400) -> str:
        """The guest console's last bytes (a kernel panic's last lines end up in trial errors)."""
        try:
            with open(self.console_path, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def guest_up(self) -> bool:
        """QEMU runs and its guest's kernel has not oopsed: worth waiting for the agent."""
        return self.alive() and self.guest_crash() is None

    def guest_crash(self) -> GuestCrash | None:
        """The guest kernel's first oops on this QEMU's console, if it had one."""
        return read_crash(self.console_tail(1 << 20))

    def attach_agent(self, timeout: float | None = None) -> GuestAgent:
        """The agent of a guest that arrived by migration (its serial port is this QEMU's)."""
        self.agent = GuestAgent(os.path.join(self.dir, "agent.sock"), timeout or self.cfg.boot_timeout_s,
                                self.guest_up, booting=False)
        return self.agent

    def rss_bytes(self) -> int:
        """QEMU's resident set (anonymous + file + shmem), from /proc."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise QemuError(f"no VmRSS for QEMU pid {self.pid}")

    def memfd_allocated_bytes(self) -> int | None:
        """Allocated bytes of the guest-RAM memfd (memfd backend only), via /proc/PID/fd
        (QEMU names it after its backend type)."""
        if self.cfg.memory != "memfd":
            return None
        fd_dir = f"/proc/{self.pid}/fd"
        for fd in os.listdir(fd_dir):
            try:
                if os.readlink(f"{fd_dir}/{fd}").startswith("/memfd:memory-backend-memfd"):
                    return os.stat(f"{fd_dir}/{fd}").st_blocks * 512
            except OSError:
                continue
        return None

    def close(self) -> None:
        try:
            if self.qmp is not None and self.alive():
                self.qmp.execute("quit", timeout=10)
        except (MonitorError, OSError):
            pass
        for c in (self.qmp, self.agent):
            if c is not None:
                c.close()
        wait_or_kill(self.proc, 10)
        if self.proc.stderr:
            self.proc.stderr.close()
        remove_scratch(self.dir)


def wait_balloon(qmp: QMPClient, target_bytes: int, timeout: float, alive) -> int:
    """Poll query-balloon until `actual` equals target_bytes; returns ns waited.
    BALLOON_CHANGE events are rate-limited to one a second by QEMU, so polling
    (every 2 ms) is what resolves the end of an inflate to a few ms."""
    t0 = time.perf_counter_ns()
    deadline = time.monotonic() + timeout
    while True:
        actual = qmp.execute("query-balloon")["actual"]
        if actual == target_bytes:
            return time.perf_counter_ns() - t0
        if time.monotonic() > deadline or not alive():
            raise QemuError(f"balloon did not reach {target_bytes} bytes (actual {actual}) within {timeout:.0f} s")
        time.sleep(0.002)
