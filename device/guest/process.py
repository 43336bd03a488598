"""The guest process: guest kernel model, virtio-balloon driver, agent; workloads handed in.

    python -m device.guest.process --control-fd FD --agent SOCK [--wire-format F] [--batch-pages N]
    python -m workloads.guest ...   (the same guest, with the lab's workloads handed in)

Spawned by the VMM with one end of the control socket. It maps guest RAM (the memfd
the VMM sends in GET_MEM_TABLE), builds the buddy allocator over the guest's RAM
PFNs, probes the balloon device, and runs one event loop over the config-change and
stats interrupts (eventfds) and the agent socket. The agent speaks JSON lines, like
qemu-guest-agent, and is how the orchestrator starts workloads, waits for the driver
to reach a target, and asks the guest to verify its memory.
"""
from __future__ import annotations

import faulthandler
import json
import logging
import os
import selectors
import signal
import socket
import sys
import time
from typing import Any, Callable

import numpy as np

from device.virtio import control
from device.guest.balloon_driver import BalloonDriver
from device.guest.buddy import BuddyAllocator
from device.virtio.control import Channel, PeerGone, Req
from device.virtio.features import Q_MISC, Q_STATS
from device.virtio.features import F_REPORTING
from device.guest.hint_driver import FreePageDriver
from device.guest.options import GuestOptions
from device.guest.page_reporting_driver import ReportingDriver
from device.guest.migration_side import GuestChannel, migration_verify
from device.guest.page_contents import GuestPageContents
from device.virtio.ram import GuestRAM, process_rss_bytes
from device.virtio import wire
from device.virtio.layout import PAGE_SHIFT, GuestLayout, Region

log = logging.getLogger("balloon-lab.guest")


def fetch_memory(chan: Channel, backing: str = "4k") -> GuestRAM:
    msg = chan.call(Req.GET_MEM_TABLE)
    n, _ = control.MEM_TABLE_HEAD.unpack_from(msg.payload)
    regions = tuple(Region(*control.REGION.unpack_from(msg.payload, control.MEM_TABLE_HEAD.size + i * control.REGION.size))
                    for i in range(n))
    if len(msg.fds) != 1:
        raise control.ControlError("GET_MEM_TABLE reply carried no memfd")
    return GuestRAM(msg.fds[0], GuestLayout(regions), owner=True, backing=backing)


# What a guest program hands the guest to run workloads with: (name, params, seed) ->
# a workload with prepare(memory) / start(memory) / stop() (workloads/guest.py hands in
# workloads.make_workload; the device never imports the workloads).
MakeWorkload = Callable[[str, dict, int], Any]


class Guest:
    def __init__(self, options: GuestOptions, make_workload: MakeWorkload | None = None) -> None:
        self.options = options
        self.make_workload = make_workload
        # GuestChannel: also serves the requests the VMM starts (SET_DIRTY_LOG for migration)
        self.chan = GuestChannel(socket.socket(fileno=options.control_fd), lambda: getattr(self, "memory", None))
        self.ram = fetch_memory(self.chan, options.backing)
        self.alloc = BuddyAllocator(self.ram.layout)
        self.memory = GuestPageContents(self.ram, self.alloc)
        self.driver = BalloonDriver(self.chan, self.ram, self.alloc, self.memory, options.driver_options())
        self.hints: FreePageDriver | None = None
        self.reporting: ReportingDriver | None = None
        self.alloc.set_oom_notifier(self.driver.deflate_on_oom)
        self.workload = None
        self.sel = selectors.DefaultSelector()
        self.running = True
        self.waiters: list[tuple[float, int, socket.socket, object]] = []
        self.agent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._reports_sent = 0

    # --- agent ------------------------------------------------------------------------------
    def _agent_reply(self, conn: socket.socket, rid, obj: dict) -> None:
        if rid is not None:
            obj["id"] = rid
        try:
            conn.sendall(json.dumps(obj).encode() + b"\n")
        except OSError:
            pass

    def _agent_command(self, conn: socket.socket, line: bytes) -> None:
        rid = None
        try:
            req = json.loads(line)
            rid = req.get("id")
            name = req["execute"]
            args = req.get("arguments") or {}
            handler = getattr(self, "_cmd_" + name.replace("-", "_"), None)
            if handler is None:
                raise ValueError(f"unknown agent command {name!r}")
            result = handler(conn, rid, args)
        except Exception as e:
            log.warning("agent command failed: %s", e)
            self._agent_reply(conn, rid, {"error": {"class": type(e).__name__, "desc": str(e)}})
            return
        if result is not _DEFERRED:
            self._agent_reply(conn, rid, {"return": result})

    def _cmd_ping(self, conn, rid, args) -> dict:
        return {"pid": os.getpid()}

    def _cmd_info(self, conn, rid, args) -> dict:
        return {"pid": os.getpid(), "driver": self.driver.info(), "rss_bytes": process_rss_bytes(os.getpid()),
                "free_pages": self.alloc.free_pages_count, "ram_pages": self.ram.layout.ram_pages}

    def _cmd_workload_prepare(self, conn, rid, args) -> dict:
        if self.make_workload is None:
            raise ValueError("this guest program was started without workloads (run `python -m workloads.guest`, "
                             "which hands them in)")
        self.workload = self.make_workload(args["name"], args.get("params") or {}, int(args.get("seed", 0)))
        summary = self.workload.prepare(self.memory)
        return {"workload": args["name"], "summary": summary}

    def _cmd_workload_retouch(self, conn, rid, args) -> dict:
        if self.workload is None:
            raise ValueError("no workload prepared")
        return self.workload.retouch(self.memory)

    def _cmd_workload_start(self, conn, rid, args) -> dict:
        if self.workload is None:
            raise ValueError("no workload prepared")
        self.workload.start(self.memory)
        return {}

    def _cmd_workload_stop(self, conn, rid, args) -> dict:
        if self.workload is None:
            return {}
        return self.workload.stop() or {}

    def _cmd_wait_target(self, conn, rid, args):
        """Answer once the driver's `actual` equals target_pages (or it failed / timed out)."""
        target = int(args["target_pages"])
        deadline = time.monotonic() + float(args.get("timeout_s", 300))
        self.waiters.append((deadline, target, conn, rid))
        self._check_waiters()
        return _DEFERRED

    def _check_waiters(self) -> None:
        keep = []
        for deadline, target, conn, rid in self.waiters:
            d = self.driver
            if d.actual == target or d.failed or time.monotonic() >= deadline:
                reports = [r.to_json() for r in d.reports[self._reports_sent:]]
                self._reports_sent = len(d.reports)
                err = d.failed
                if err is None and d.actual != target:
                    err = f"timed out waiting for actual={target} pages (actual={d.actual})"
                self._agent_reply(conn, rid, {"return": {"actual": d.actual, "reports": reports, "error": err}})
            else:
                keep.append((deadline, target, conn, rid))
        self.waiters = keep

    def _cmd_verify(self, conn, rid, args) -> dict:
        res = self.memory.verify()
        pfns = self.driver.balloon_pfns()
        import hashlib
        digest = hashlib.blake2b(np.ascontiguousarray(pfns, dtype=np.int64).tobytes(), digest_size=16).hexdigest()
        return {"held_ok": bool(res.ok), "pages_checked": int(res.pages_checked),
                "bad_pfns": [int(x) for x in res.bad_pfns], "balloon_pages": int(pfns.size),
                "balloon_digest": digest, "actual": self.driver.actual}

    def _cmd_retouch_deflated(self, conn, rid, args) -> dict:
        """Write into the pages the last deflate returned, as a guest reusing them would:
        they become backed by the memfd and mapped in this process again (the state the
        balloon found them in). Per run, not per page."""
        pfns = self.driver.last_deflated
        starts, lengths = wire.pfns_to_runs(pfns)
        for s, n in zip(starts.tolist(), lengths.tolist()):
            self.ram.np_view(s << PAGE_SHIFT, n << PAGE_SHIFT).fill(0x5A)
        self.memory.mark_dirty(pfns)
        return {"pages": int(pfns.size), "runs": int(starts.size)}

    def _cmd_migration_verify(self, conn, rid, args) -> dict:
        """After a migration: every held page at the destination (args.dest: a path
        to its memfd, e.g. /proc/PID/fd/N) and here matches the guest's record."""
        dl = self.chan.dirty_log
        return migration_verify(self.memory, str(args["dest"]), dl.log if dl is not None else None)

    def _cmd_hint_info(self, conn, rid, args) -> dict:
        return self.hints.info() if self.hints is not None else {}

    def _cmd_alloc_free(self, conn, rid, args) -> dict:
        """Allocate `mib` MiB, write data into it, free it: a guest that used memory and
        gave it back to its allocator (the host still holds it until something returns it)."""
        n = (int(args["mib"]) << 20) >> PAGE_SHIFT
        pages = self.alloc.alloc_pages(n, notify_oom=False)
        self.memory.touch_stale(pages, int(args.get("seed", 7)))
        return {"pages": int(pages.size), "freed_at": time.time()}

    def _cmd_reporting_info(self, conn, rid, args) -> dict:
        """Free page reporting: the driver's counters and the reported, still free runs."""
        if self.reporting is None:
            return {"negotiated": False}
        starts, lengths = self.reporting.reported_free_runs()
        return {"negotiated": True, **self.reporting.info(),
                "reported_free_runs": {"starts": starts.tolist(), "lengths": lengths.tolist()}}

    def _cmd_shutdown(self, conn, rid, args) -> dict:
        self.running = False
        return {}

    # --- loop ---------------------------------------------------------------------------------
    def run(self) -> None:
        self.driver.bring_up()
        # The agent socket appears only once the device is live: an orchestrator that
        # can connect may rely on every queue and eventfd being set up.
        self.agent.bind(self.options.agent)
        self.agent.listen(4)
        self.hints = FreePageDriver(self.driver, self.memory)
        if self.driver.has(F_REPORTING):
            self.reporting = ReportingDriver(self.driver, self.alloc, self.options.reporting_params())
        if Q_MISC in self.driver.call_fds:
            self.sel.register(self.driver.call_fds[Q_MISC], selectors.EVENT_READ, ("misc", None))
        self.sel.register(self.agent, selectors.EVENT_READ, ("listen", None))
        self.sel.register(self.driver.config_fd, selectors.EVENT_READ, ("config", None))
        if Q_STATS in self.driver.call_fds:
            self.sel.register(self.driver.call_fds[Q_STATS], selectors.EVENT_READ, ("stats", None))
        self.sel.register(self.chan.sock, selectors.EVENT_READ, ("control", None))
        bufs: dict[int, bytearray] = {}
        while self.running:
            due = self.reporting.timeout() if self.reporting is not None else None
            for key, _ in self.sel.select(timeout=0.2 if due is None else min(0.2, due)):
                kind, conn = key.data
                if kind == "config":
                    self.driver.on_config_change()
                    self.hints.on_config_change()
                    self._check_waiters()
                elif kind == "misc":
                    self.hints.on_misc_interrupt()
                elif kind == "stats":
                    self.driver.on_stats_interrupt()
                elif kind == "control":
                    # A request the VMM starts (SET_DIRTY_LOG); PeerGone if it went away.
                    self.chan.serve_readable()
                elif kind == "listen":
                    c, _ = self.agent.accept()
                    bufs[c.fileno()] = bytearray()
                    self.sel.register(c, selectors.EVENT_READ, ("agent", c))
                elif kind == "agent":
                    data = conn.recv(65536)
                    if not data:
                        self.sel.unregister(conn)
                        bufs.pop(conn.fileno(), None)
                        conn.close()
                        continue
                    buf = bufs[conn.fileno()]
                    buf += data
                    while b"\n" in buf:
                        line, _, rest = bytes(buf).partition(b"\n")
                        buf[:] = rest
                        if line.strip():
                            self._agent_command(conn, line)
            self.chan.serve_pending()
            if self.reporting is not None:
                self.reporting.tick()
            self._check_waiters()
        if self.workload is not None:
            self.workload.stop()


_DEFERRED = object()


def main(argv: list[str] | None = None, make_workload: MakeWorkload | None = None,
         prog: str = "device.guest.process") -> int:
    """Run the guest. A guest program that runs workloads hands in `make_workload`
    (workloads/guest.py); without one, the agent refuses workload commands."""
    args = GuestOptions.from_argv(argv, prog)
    logging.basicConfig(level=args.log_level.upper(), format="guest[%(process)d] %(levelname)s %(name)s: %(message)s")
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints every thread's stack
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    guest = Guest(args, make_workload)
    try:
        guest.run()
    except PeerGone as e:
        log.error("%s; guest exits", e)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
