"""The VMM process: owns guest RAM, serves the balloon device and the monitor.

    python -m device.vmm.process --guest-mib N --protocol P --monitor SOCK --agent SOCK [...]

It creates guest RAM as one memfd, spawns the guest process with one end of a
SOCK_SEQPACKET control socket, and runs one event loop over: the monitor socket,
the control socket, and each queue's kick eventfd (every kick is a real write(2) by
the guest and a real read(2) here). A guest that dies or breaks the protocol is
reported on the monitor; the VMM itself keeps running until `quit`.

Wiring, all of it here: the device gets a DeviceListener (kick fds changed: the loop
re-registers them; `actual` changed: BALLOON_CHANGE on the monitor); each owner of a
queue beyond 0-2 registers it on the device (the migration controller queues 3 and 5,
free page reporting queue 4); the migration controller gets MigrationHandles, never
the VMM; and the loop maps each fd it waits on to its handler in one table
(EventLoop.handlers, device/vmm/event_loop.py, filled only by watch/unwatch; the
fuzzer drives the same loop code).
"""
from __future__ import annotations

import faulthandler
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from device.vmm.balloon_device import BalloonDevice
from device.vmm.budget import WorkBudget
from device.vmm.event_loop import ControlWatch, EventHandler, EventLoop, QueueKicks
from device.vmm.control_peer import ControlService, DeviceChannel
from device.virtio.discard import discard_runs
from device.virtio.features import QEMU_STAT_NAMES, STAT_TAGS
from device.virtio.protocols import PROTOCOLS, protocol_device_features
from device.virtio.hint_format import hint_device_features
from device.virtio.backing import backing_problem
from device.virtio.ram import GuestRAM, process_rss_bytes
from system.signals import die_with_parent
from device.vmm.loop_bridge import LoopBridge
from device.vmm.page_reporting_device import ReportingDevice, reporting_device_features
from device.virtio.layout import PAGE_SHIFT, GuestLayout
from device.virtio.transport import DeviceListener
from device.vmm.migration.controller import MigrationController, MigrationHandles
from device.vmm.monitor import CommandError, Deferred, Monitor
from device.vmm.options import VmmOptions

log = logging.getLogger("balloon-lab.vmm")


class VMM:
    def __init__(self, options: VmmOptions) -> None:
        self.options = options
        self.layout = GuestLayout.pc(options.guest_mib)
        problem = backing_problem(options.backing, self.layout.ram_bytes)
        if problem is not None:
            raise SystemExit(f"vmm: cannot back guest RAM with {options.backing}: {problem}")
        self.ram = GuestRAM.create(self.layout, backing=options.backing, seal=not options.x_unsealed_ram)
        self.device = BalloonDevice(self.ram, protocol_device_features(options.protocol)
                                    | hint_device_features(options.hint)
                                    | reporting_device_features(options.reporting),
                                    merge_runs=PROTOCOLS[options.protocol].merge_runs, discard=options.discard,
                                    partial_tracking=options.partial_tracking,
                                    listener=DeviceListener(kick_fds_changed=lambda: self.kicks.rearm(),
                                                            actual_changed=self._actual_changed))
        self.loop = EventLoop()                      # fd -> handler, one wake-up at a time (event_loop.py)
        self.kicks = QueueKicks(self.loop, self.device)
        self.running = True
        self.guest: subprocess.Popen | None = None
        self.guest_exit: str | None = None
        self.chan: DeviceChannel | None = None
        self.control: ControlService | None = None
        self.control_watch: ControlWatch | None = None
        self._deadlines: list[tuple[float, Deferred, object]] = []
        self._reaped_at = 0.0                        # when _reap_guest last asked waitpid
        self.bridge = LoopBridge()                   # other threads run closures in this loop
        # migrate/query-migrate, --incoming, hint queues 3 and 5
        self.migration = MigrationController(self._migration_handles(), incoming=options.incoming,
                                             hint=options.hint)
        self.reporting = ReportingDevice(self.device)   # queue 4
        self.reporting.register_queues(self.device.register_queue)
        self.monitor = Monitor(options.monitor, {**self._commands(), **self.migration.commands()},
                               version="balloon-lab vmm")
        self.loop.watch(self.monitor.listener, EventHandler(self._serve_listener))
        self.loop.watch(self.bridge.fd, EventHandler(lambda mask, budget: self.bridge.run_pending()))

    def _migration_handles(self) -> MigrationHandles:
        """What the migration controller may use of this VMM (and nothing else)."""
        return MigrationHandles(
            ram=self.ram, device=self.device, register_queue=self.device.register_queue,
            run_in_loop=self.bridge.call,
            control_channel=lambda: self.chan,
            guest_pid=lambda: self.guest.pid if self.guest else None,
            guest_exit=lambda: self.guest_exit,
            guest_running=lambda: (self.guest is not None and self.guest_exit is None
                                   and self.guest.poll() is None))

    def _serve_listener(self, mask: int, budget: WorkBudget) -> None:
        conn = self.monitor.accept()
        if conn.sock.fileno() != -1:
            self.loop.watch(conn.sock, EventHandler(lambda mask, budget: self._serve_monitor(conn)))

    def _serve_monitor(self, conn) -> None:
        self.monitor.readable(conn)
        if conn.sock.fileno() == -1 or conn.sock.fileno() not in self.monitor.conns:
            self.loop.unwatch(conn.sock)

    # --- guest process -----------------------------------------------------------------
    def spawn_guest(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # --guest-cmd replaces the guest program (e.g. the hostile test client device/guest/raw_guest.py);
        # it gets the same --control-fd/--agent arguments and the arguments after `--`.
        o = self.options
        prog = shlex.split(o.guest_cmd) if o.guest_cmd else [sys.executable, "-m", "device.guest.process"]
        cmd = prog + ["--control-fd", str(theirs.fileno()), "--agent", o.agent] + list(o.guest_args)
        # the guest dies with its VMM (PR_SET_PDEATHSIG): a guest busy in a workload would not
        # notice the hang-up and go on filling host memory alone
        self.guest = subprocess.Popen(cmd, pass_fds=(theirs.fileno(),), preexec_fn=die_with_parent)
        theirs.close()
        self.chan = DeviceChannel(mine)
        self.control = ControlService(self.chan, self.device, self.migration.on_control_reply, self._guest_gone)
        self.control_watch = ControlWatch(self.loop, self.chan, self.control)
        log.info("guest process %d started", self.guest.pid)

    def _guest_gone(self, why: str) -> None:
        if self.chan is None:
            return
        code = self.guest.poll() if self.guest else None
        if code is None and self.guest:
            try:
                code = self.guest.wait(timeout=2)
            except subprocess.TimeoutExpired:
                code = None
        status = ("still running" if code is None else
                  f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}")
        self.guest_exit = f"{why}; {status}"
        log.error("guest process lost: %s", self.guest_exit)
        self.control_watch.detach()
        self.chan.close()
        self.chan = None
        self.control_watch = None
        self.kicks.clear()
        self.monitor.event("GUEST_LOST", {"reason": self.guest_exit})

    def _actual_changed(self, actual: int) -> None:
        self.monitor.event("BALLOON_CHANGE", {"actual": self.layout.ram_bytes - (actual << PAGE_SHIFT)},
                           throttle_s=1.0)

    # --- the monitor's commands ------------------------------------------------------------
    def _commands(self) -> dict:
        return {
            "balloon": self._cmd_balloon,
            "query-balloon": self._cmd_query_balloon,
            "qom-get": self._cmd_qom_get,
            "query-status": lambda a: {"running": self.guest_exit is None, "status":
                                       "running" if self.guest_exit is None else "guest-lost"},
            "quit": self._cmd_quit,
            "x-balloon-lab-info": self._cmd_info,
            "x-balloon-lab-counters": lambda a: self._counters(),
            "x-balloon-lab-reset-counters": lambda a: self.device.reset_counters(),
            "x-balloon-lab-verify": lambda a: self.device.verify_discarded(),
            "x-balloon-lab-bare-discard": self._cmd_bare_discard,
            "x-balloon-lab-memfd": lambda a: {"allocated_bytes": self.ram.allocated_bytes(),
                                              "reporting": self.reporting.counters()},
            "x-balloon-lab-check-free-runs": lambda a: self.reporting.check_runs_hold_no_data(a),
        }

    def _cmd_balloon(self, args: dict) -> None:
        value = args.get("value")
        if not isinstance(value, int) or isinstance(value, bool):
            raise CommandError("Parameter 'value' expects an integer (target guest memory in bytes)")
        if value <= 0 or value > self.layout.ram_bytes:
            raise CommandError(f"Parameter 'value' must be in 1..{self.layout.ram_bytes} bytes")
        self._device_exists()
        # As QEMU: taken as soon as the device exists; a driver still coming up reads the
        # target when it does (BalloonDevice.set_target_pages, BalloonDriver.bring_up).
        self.device.set_target_pages((self.layout.ram_bytes - value) >> PAGE_SHIFT)

    def _device_exists(self) -> None:
        """QEMU refuses `balloon` and `query-balloon` only without a balloon device; here
        the device goes with its guest, so only a lost guest is refused."""
        if self.guest_exit is not None:
            raise CommandError("No balloon device has been activated", "DeviceNotActive")

    def _cmd_query_balloon(self, args: dict) -> dict:
        self._device_exists()
        return {"actual": self.layout.ram_bytes - (self.device.config.actual << PAGE_SHIFT)}

    def _cmd_qom_get(self, args: dict):
        prop = args.get("property")
        if prop == "guest-stats-polling-interval":
            return 0
        if prop != "guest-stats":
            raise CommandError(f"Property '{prop}' not found")

        def answer() -> dict:
            stats = {QEMU_STAT_NAMES[i]: self.device.stats.get(t, -1) for i, t in enumerate(STAT_TAGS)}
            return {"stats": stats, "last-update": int(self.device.stats_updated)}

        if not self.device.request_stats():
            return answer()
        d = Deferred()
        self.device.stats_waiters.append(lambda: d.resolve(answer()))
        self._deadlines.append((time.monotonic() + 2.0, d, answer))
        return d

    def _cmd_bare_discard(self, args: dict) -> dict:
        """The benchmark baseline: one madvise(MADV_REMOVE) per page, in a bare loop,
        over the pages the last deflates returned (re-touched by the guest), on this
        same memfd and mapping: the PFN path's discard with no protocol around it."""
        pfns = self.device.deflate.pfns()
        if pfns.size == 0:
            raise CommandError("no deflated pages recorded: inflate, deflate and re-touch first")
        offs = np.sort(self.layout.pfn_to_offset(pfns)).tolist()   # ascending, as inflate requests are
        populated = int(self.ram.data_page_mask()[self.layout.pfn_to_offset(pfns) >> PAGE_SHIFT].sum())
        t0 = time.perf_counter_ns()
        # per page on purpose: this is the bare per-page syscall cost
        discard_runs(self.ram, "madvise", offs, 1 << PAGE_SHIFT)
        ns = time.perf_counter_ns() - t0
        return {"pages": len(offs), "populated_before": populated, "ns": ns, "ns_per_page": ns / len(offs)}

    def _cmd_quit(self, args: dict) -> None:
        self.running = False

    def _cmd_info(self, args: dict) -> dict:
        return {
            "vmm_pid": os.getpid(),
            "guest_pid": self.guest.pid if self.guest else None,
            "guest_exit": self.guest_exit,
            "protocol": self.options.protocol,
            "discard": self.options.discard,
            "backing": self.options.backing,
            "partial_tracking": self.options.partial_tracking,
            "layout": self.layout.to_dict(),
            "ram_bytes": self.layout.ram_bytes,
            "features": self.device.driver_features,
            "kick_fds": {str(i): fd for i, fd in self.device.kick_fds.items()},
            "call_fds": {str(i): fd for i, fd in self.device.call_fds.items()},
            "config_call_fd": self.device.config_call_fd,
        }

    def _counters(self) -> dict:
        c = self.device.counters()
        c["device_wakeups"] = self.kicks.reads
        c["loop"] = {"max_wakeup_cpu_ms": round(self.loop.max_wakeup_cpu_s * 1e3, 3),
                     "wakeups_over_10ms_cpu": self.loop.wakeups_over_10ms}
        c["vmm_rss_bytes"] = process_rss_bytes(os.getpid())
        alive = self.guest is not None and self.guest_exit is None
        c["guest_rss_bytes"] = process_rss_bytes(self.guest.pid) if alive else 0
        c["vmm_rss_peak_bytes"] = process_rss_bytes(os.getpid(), "VmHWM")
        c["guest_rss_peak_bytes"] = process_rss_bytes(self.guest.pid, "VmHWM") if alive else 0
        return c

    # --- the loop -------------------------------------------------------------------------
    def run(self) -> None:
        if self.migration.incoming:
            self.migration.start_incoming()     # destination: no guest, RAM arrives over TCP
        else:
            self.spawn_guest()
        poll_ns = self.options.poll_us * 1000
        busy_until = 0
        while self.running:
            # Adaptive busy polling, like QEMU's aio polling and vhost's busyloop: right
            # after serving something, poll without sleeping for a while, since waking a
            # sleeping (v)CPU costs far more than a short poll.
            now = time.perf_counter_ns()
            served = self.loop.wakeup(0 if now < busy_until else 0.2)   # monitor first, queues last
            if served and poll_ns:
                busy_until = time.perf_counter_ns() + poll_ns
            if self._deadlines:
                self._expire_deadlines()
            self.monitor.flush_throttled()
            if self.control_watch is not None:
                self.control_watch.update()
            self._reap_guest(idle=not served)
        self.shutdown()

    def _reap_guest(self, idle: bool) -> None:
        """Notice a guest process that exited without closing the control socket (its
        hang-up is the usual sign). waitpid on every wake-up cost a system call per
        request on the PFN path: asked when the loop was idle or 0.1 s after the last time."""
        now = time.monotonic()
        if not idle and now - self._reaped_at < 0.1:
            return
        self._reaped_at = now
        if self.guest and self.guest_exit is None and self.guest.poll() is not None:
            self._guest_gone("guest process exited")

    def _expire_deadlines(self) -> None:
        now = time.monotonic()
        keep = []
        for deadline, d, fallback in self._deadlines:
            if d.done:
                continue
            if now >= deadline:
                d.resolve(fallback())       # stale stats, as QEMU returns between polls
            else:
                keep.append((deadline, d, fallback))
        self._deadlines = keep

    def shutdown(self) -> None:
        self.migration.shutdown()
        if self.guest and self.guest.poll() is None:
            self.guest.terminate()
            try:
                self.guest.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.guest.kill()
                self.guest.wait()
        for conn in list(self.monitor.conns.values()):
            self.monitor.close(conn)
        self.monitor.listener.close()
        try:
            os.unlink(self.options.monitor)
        except OSError:
            pass
        self.ram.close()


def main(argv: list[str] | None = None) -> int:
    args = VmmOptions.from_argv(argv, description=__doc__.splitlines()[0])
    logging.basicConfig(level=args.log_level.upper(), format="vmm[%(process)d] %(levelname)s %(name)s: %(message)s")
    faulthandler.enable()                   # a fatal signal (SIGBUS, SIGSEGV) still leaves a traceback in the log
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints every thread's stack
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(SystemExit(143)))
    vmm = VMM(args)
    try:
        vmm.run()
    except SystemExit:
        vmm.shutdown()
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
