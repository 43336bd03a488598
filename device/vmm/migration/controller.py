"""Migration inside the VMM process: monitor commands, the source's port, the hint device.

The VMM's event loop owns the device, the virtqueues and the control socket; the
migration runs in a thread (source.py / destination.py). Whatever the migration
thread needs from the loop's side (the config write that asks for hints, sending
SET_DIRTY_LOG and waiting for its reply, a snapshot of the device state, the ring
addresses) it asks for through `run_in_loop` (the VMM's LoopBridge,
device/vmm/loop_bridge.py): the closure runs in the main loop, the thread waits for
its result. The controller sees its VMM only through MigrationHandles, which vmm.py
builds; vmm.py also routes replies to VMM-initiated control requests to
on_control_reply() and merges the commands into the monitor's. The controller owns
the hint queues (3 and 5) and registers them on the device.

Monitor commands (QEMU's names): migrate {uri}, query-migrate, migrate-set-parameters
{max-bandwidth (bytes/s), downtime-limit (ms), x-max-rounds, x-hint-wait-ms},
query-migrate-parameters, migrate_cancel, cont (resume the source guest after a
completed migration, as QEMU's `cont`), and x-balloon-lab-migration-info (pids,
the memfd's fd number, the incoming port: what the lab's verification needs).
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from device.virtio.control import Message, Req, unpack_result
from device.vmm.balloon_device import BalloonDevice, ChainHandler
from device.vmm.control_peer import DeviceChannel
from device.vmm.hint_queues import HintQueues
from device.vmm.migration.destination import MigrationDestination
from device.virtio.dirty_log import DirtyLog
from device.vmm.migration.pause import resume_guest
from device.vmm.migration.source import MigrationParams, MigrationSource
from device.vmm.monitor import CommandError
from device.virtio.ram import GuestRAM

log = logging.getLogger("balloon-lab.migration")


@dataclass(frozen=True)
class MigrationHandles:
    """Exactly what the migration controller uses of its VMM; vmm.py builds it. The
    callables are asked at the moment of use: the guest and its control socket come
    and go while the VMM runs."""

    ram: GuestRAM                                   # the source reads it, the destination fills it
    device: BalloonDevice                           # its state and ring pages migrate; the hint queues live on it
    register_queue: Callable[[int, ChainHandler], None]   # BalloonDevice.register_queue: where the hint queues go
    run_in_loop: Callable[[Callable[[], Any]], Any]  # run a closure in the VMM's main loop and wait (LoopBridge.call)
    control_channel: Callable[[], DeviceChannel | None]   # the control socket to the guest, None once it is gone
    guest_pid: Callable[[], int | None]             # the guest process the VMM spawned, None if none (a destination)
    guest_exit: Callable[[], str | None]            # why the guest was lost, None while it was not
    guest_running: Callable[[], bool]               # spawned, not lost, and not exited (Popen.poll) right now


class _Port:
    """What the source thread may ask of the VMM (each call runs in the main loop)."""

    def __init__(self, ctl: "MigrationController") -> None:
        self.ctl = ctl
        self.handles = ctl.handles
        self.hints = ctl.hints
        self.hinted = ctl.hints.hinted
        self.report_done = ctl.hints.report_done

    def guest_pid(self) -> int:
        if not self.handles.guest_running():
            raise RuntimeError("the source has no running guest")
        return self.handles.guest_pid()

    def attach_dirty_log(self, dl: DirtyLog, timeout: float = 30.0) -> None:
        """Hand the guest the dirty log (SET_DIRTY_LOG) and wait for its answer; the
        controller keeps the log to mark what the hint queues write."""
        self.ctl.dirty_log = dl
        done = threading.Event()
        box: list = [None]

        def send() -> None:
            chan = self.handles.control_channel()
            if chan is None:
                raise RuntimeError("the guest's control socket is gone")
            self.ctl.expect_reply(Req.SET_DIRTY_LOG, lambda msg: (box.__setitem__(0, msg), done.set()))
            chan.send(Req.SET_DIRTY_LOG, dl.payload(), [dl.fd])

        self.ctl.run_in_loop(send)
        if not done.wait(timeout):
            raise TimeoutError("the guest did not answer SET_DIRTY_LOG")
        code, reason = unpack_result(box[0].payload)
        if code != 0:
            raise RuntimeError(f"the guest refused the dirty log: {reason} (errno {-code})")

    def start_hints(self, design: str) -> None:
        def go() -> None:
            self.hints.reset()
            if design == "upstream":
                self.hints.start_upstream()
            elif design == "bitmap":
                self.hints.request_bitmap()
            else:
                raise ValueError(f"unknown hint design {design!r}")
        self.ctl.run_in_loop(go)

    def hints_done(self, design: str) -> None:
        if design == "upstream":
            self.ctl.run_in_loop(self.hints.done_upstream)

    def hint_snapshot(self) -> dict:
        return self.ctl.run_in_loop(self.hints.snapshot)

    def ring_pfns(self) -> np.ndarray:
        """Pages of every vring the device knows: the device writes the used rings
        (QEMU marks those pages dirty when it does), so they go in stop-and-copy."""
        def collect() -> np.ndarray:
            parts = [v.pages() for v in self.handles.device.vrings.values()]
            pf = np.concatenate(parts) if parts else np.zeros(0, np.int64)
            return np.unique(pf[self.handles.ram.layout.ram_pfn_mask(pf)])
        return self.ctl.run_in_loop(collect)

    def device_state(self) -> dict:
        def snap() -> dict:
            d = self.handles.device
            ball = np.flatnonzero(d.ballooned_np == 1)      # 1: in the balloon (2 marks queue memory)
            from device.virtio.wire import pfns_to_runs
            starts, lens = pfns_to_runs(ball) if len(ball) else (ball, ball)
            return {"config": {"num_pages": d.config.num_pages, "actual": d.config.actual,
                               "free_page_hint_cmd_id": d.config.free_page_hint_cmd_id,
                               "poison_val": d.config.poison_val},
                    "device_features": d.device_features, "driver_features": d.driver_features, "status": d.status,
                    "queues": {str(i): {"size": v.size, "desc": v.desc_gpa, "avail": v.avail_gpa, "used": v.used_gpa,
                                        **(d.queues[i].state() if i in d.queues else {})}
                               for i, v in d.vrings.items()},
                    "ballooned_runs": [starts.tolist(), lens.tolist()]}
        return self.ctl.run_in_loop(snap)


class MigrationController:
    """migrate / query-migrate / --incoming of one VMM, which it sees only through
    `handles`; `incoming` (tcp:127.0.0.1:PORT) makes it a destination, `hint` is the
    free page hinting design the device offers (none, upstream, bitmap)."""

    def __init__(self, handles: MigrationHandles, *, incoming: str | None = None, hint: str = "none") -> None:
        self.handles = handles
        self.run_in_loop = handles.run_in_loop
        self.incoming_uri: str | None = incoming
        self.hint = hint
        self.hints = HintQueues(handles.device, mark_dirty=self._mark_dirty)
        self.hints.register_queues(handles.register_queue)
        self.params = MigrationParams()
        self.source: MigrationSource | None = None
        self.dest: MigrationDestination | None = None
        self.dirty_log: DirtyLog | None = None
        self._replies: list[tuple[int, Callable[[Message], None]]] = []
        if self.incoming_uri is not None:
            self.dest = MigrationDestination(handles.ram, self.incoming_uri)

    @property
    def incoming(self) -> bool:
        return self.dest is not None

    @property
    def paused(self) -> bool:
        """The source guest is stopped after a completed migration (QEMU's postmigrate)."""
        return self.source is not None and self.source.paused_pid is not None and self.source.st.status == "completed"

    def start_incoming(self) -> None:
        assert self.dest is not None
        self.dest.start()
        log.info("waiting for an incoming migration on 127.0.0.1:%d", self.dest.port)

    def _mark_dirty(self, pfns: np.ndarray) -> None:
        if self.dirty_log is not None:
            self.dirty_log.mark(pfns)

    # --- replies to VMM-initiated control requests ------------------------------------------
    def expect_reply(self, req: Req, cb: Callable[[Message], None]) -> None:
        self._replies.append((int(req), cb))

    def on_control_reply(self, msg: Message) -> bool:
        """True when msg answered a request the VMM sent (the VMM must not refuse it)."""
        if not msg.is_reply or not self._replies or self._replies[0][0] != msg.req:
            return False
        _, cb = self._replies.pop(0)
        cb(msg)
        return True

    # --- monitor commands -------------------------------------------------------------------------
    def commands(self) -> dict:
        cmds = {
            "migrate": self._cmd_migrate,
            "query-migrate": self._cmd_query_migrate,
            "migrate-set-parameters": self._cmd_set_parameters,
            "query-migrate-parameters": lambda a: self.params.to_json(),
            "migrate_cancel": self._cmd_cancel,
            "cont": self._cmd_cont,
            "x-balloon-lab-migration-info": self._cmd_info,
        }
        cmds["query-status"] = self._cmd_query_status
        return cmds

    def _cmd_query_status(self, args: dict) -> dict:
        if self.incoming:
            st = self.dest.status
            return {"running": False, "status": "inmigrate" if st != "completed" else "paused"}
        if self.paused:
            return {"running": False, "status": "postmigrate"}
        if self.source is not None and self.source.st.status == "device":
            return {"running": False, "status": "finish-migrate"}
        ok = self.handles.guest_exit() is None
        return {"running": ok, "status": "running" if ok else "guest-lost"}

    def _cmd_migrate(self, args: dict) -> None:
        if self.incoming:
            raise CommandError("this VMM is waiting for an incoming migration")
        uri = args.get("uri")
        if self.source is not None and not self.source.finished.is_set():
            raise CommandError("There's a migration process in progress", "GenericError")
        if self.paused:
            raise CommandError("the guest was already migrated away (use cont first)")
        if self.handles.guest_pid() is None or self.handles.guest_exit() is not None:
            raise CommandError("no running guest to migrate", "DeviceNotActive")
        if self.hint == "upstream" and not self.hints.upstream_ready:
            raise CommandError("hint design upstream: the driver did not negotiate FREE_PAGE_HINT")
        if self.hint == "bitmap" and not self.hints.bitmap_ready:
            raise CommandError("hint design bitmap: the driver did not negotiate PAGE_BITMAP or posted no "
                               "misc request buffer")
        if self.dirty_log is not None:
            self.dirty_log.close()
            self.dirty_log = None
        port = _Port(self)
        try:
            src = MigrationSource(self.handles.ram, port, uri, self.hint, self.params)
        except ValueError as e:
            raise CommandError(str(e)) from None
        self.source = src
        src.start()

    def _cmd_query_migrate(self, args: dict) -> dict:
        if self.dest is not None:
            return self.dest.query()
        if self.source is None:
            return {}
        return self.source.query()

    def _cmd_set_parameters(self, args: dict) -> None:
        p = self.params
        new = dict(max_bandwidth=p.max_bandwidth, downtime_limit_ms=p.downtime_limit_ms,
                   max_rounds=p.max_rounds, hint_wait_s=p.hint_wait_s)
        spec = {"max-bandwidth": ("max_bandwidth", int, 1), "downtime-limit": ("downtime_limit_ms", float, 0),
                "x-max-rounds": ("max_rounds", int, 1), "x-hint-wait-ms": ("hint_wait_s", float, 0)}
        for k, v in args.items():
            if k not in spec:
                raise CommandError(f"Parameter '{k}' is unexpected (known: {', '.join(spec)})")
            name, tp, lo = spec[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (tp is int and not isinstance(v, int)) \
                    or v < lo:
                raise CommandError(f"Parameter '{k}' expects a {'integer' if tp is int else 'number'} >= {lo}")
            new[name] = tp(v) / 1000 if k == "x-hint-wait-ms" else tp(v)
        if self.source is not None and not self.source.finished.is_set():
            raise CommandError("cannot change parameters while a migration runs")
        self.params = MigrationParams(**new)

    def _cmd_cancel(self, args: dict) -> None:
        if self.source is not None:
            self.source.cancel()

    def _cmd_cont(self, args: dict) -> None:
        if self.incoming:
            raise CommandError("the destination runs no guest in the lab (its RAM is only checked)")
        src = self.source
        if src is not None and src.paused_pid is not None and src.st.status == "completed":
            resume_guest(src.paused_pid)
            src.paused_pid = None

    def _cmd_info(self, args: dict) -> dict:
        ram = self.handles.ram
        return {"pid": os.getpid(), "ram_fd": ram.fd, "ram_bytes": ram.layout.ram_bytes,
                "incoming": self.incoming, "incoming_port": self.dest.port if self.dest else None,
                "hint": self.hint, "guest_pid": self.handles.guest_pid(),
                "paused": self.paused, "ram_allocated_bytes": ram.allocated_bytes(),
                "device_state": self.dest.device_state if self.dest else None,
                "hint_device": self.hints.snapshot()}

    # --- teardown ---------------------------------------------------------------------------------
    def shutdown(self) -> None:
        if self.source is not None:
            self.source.cancel()
        if self.source is not None and self.source.paused_pid is not None:
            resume_guest(self.source.paused_pid)       # a stopped guest would not see SIGTERM
        if self.dest is not None:
            self.dest.close()

