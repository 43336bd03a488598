"""A real VMM whose guest is the hostile raw guest (device/guest/raw_guest.py).

The lab's side of every hostile-guest test, attack and benchmark: start
`python -m device.vmm.process` with the raw guest's trampoline as its guest program,
take over the control socket, and talk to the VMM's monitor. The raw guest itself
stays free of the lab's code; this launcher is the orchestrator.
"""
from __future__ import annotations

import os
import shlex
import socket
import sys
import time
from typing import Any, Mapping

from device.api import RAW_GUEST_MODULE, RawError, RawGuest, VmmOptions
from lab.trials.monitor_client import QMPClient, wait_for_socket
from lab.trials.orphans import remove_scratch, scratch_dir, spawn, wait_or_kill


class HostileVM:
    """A real VMM whose guest is this module: `.guest` (RawGuest), `.qmp` (monitor).
    The VMM's stderr (its log) is kept in a file: `.log()`."""

    def __init__(self, guest_mib: int = 512, protocol: str = "pfn", *, log_level: str = "WARNING",
                 vmm: Mapping[str, Any] | None = None, timeout: float = 20.0) -> None:
        """`vmm`: fields of the VMM's launch record beyond these (backing, reporting, ...)."""
        vmm = dict(vmm or {})
        self.dir = scratch_dir("hostile")
        self.monitor = os.path.join(self.dir, "monitor.sock")
        self.agent = os.path.join(self.dir, "agent.sock")
        self.log_path = os.path.join(self.dir, "vmm.log")
        self._log = open(self.log_path, "wb")
        self.options = VmmOptions(guest_mib=guest_mib, protocol=protocol, monitor=self.monitor, agent=self.agent,
                                  log_level=log_level, guest_cmd=f"{shlex.quote(sys.executable)} -m {RAW_GUEST_MODULE}",
                                  **vmm)
        self.vmm = spawn(self.options.command(), stderr=self._log)
        self.qmp = None
        self.guest: RawGuest | None = None
        try:
            alive = lambda: self.vmm.poll() is None
            wait_for_socket(self.monitor, timeout, alive)
            self.qmp = QMPClient(self.monitor, timeout=timeout)
            wait_for_socket(self.agent, timeout, alive)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            for _ in range(200):
                try:
                    s.connect(self.agent)
                    break
                except ConnectionRefusedError:
                    time.sleep(0.01)
            s.settimeout(timeout)
            _, fds, _, _ = socket.recv_fds(s, 64, 1)
            if len(fds) != 1:
                raise RawError("the trampoline did not hand over the control socket")
            self._tramp = s
            self.guest = RawGuest(socket.socket(fileno=fds[0]), timeout)
            self.info = self.qmp.execute("x-balloon-lab-info")
        except BaseException:              # Ctrl-C and SIGTERM too: nothing left behind
            self.close()
            raise

    def __enter__(self) -> "HostileVM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def alive(self) -> bool:
        return self.vmm.poll() is None

    def counters(self) -> dict:
        return self.qmp.execute("x-balloon-lab-counters")

    def errors(self) -> dict[str, int]:
        return self.counters()["errors"]

    def log(self) -> str:
        self._log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def close(self) -> None:
        if self.guest is not None:
            self.guest.close()
        if self.qmp is not None and self.alive():
            try:
                self.qmp.execute("quit", timeout=5)
            except Exception:
                pass
            self.qmp.close()
        wait_or_kill(self.vmm, 10)
        if getattr(self, "_tramp", None) is not None:
            self._tramp.close()
        self._log.close()
        remove_scratch(self.dir)
