"""The host side of the real guest's agent: shell commands over the second serial port.

The guest's /lab/agent.sh reads "ID COMMAND" lines on ttyS1 and answers with the
command's output then "@@END ID STATUS". QEMU exposes ttyS1 as a unix socket
(`-serial unix:PATH,server=on,wait=off`), so no network or virtio-serial is needed.
"""
from __future__ import annotations

import itertools
import socket
import time


class AgentError(RuntimeError):
    """The guest agent did not answer, or a command failed."""


class GuestAgent:
    def __init__(self, path: str, timeout: float, alive=lambda: True, booting: bool = True) -> None:
        """Connect; with `booting`, wait for the agent's @@READY line (a guest that
        arrived by migration printed it long ago, on the source's port)."""
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline or not alive():
                    raise AgentError(f"guest serial socket {path} never accepted a connection") from None
                time.sleep(0.05)
        self.buf = b""
        self.ids = itertools.count(1)
        self.ready = self._until(lambda line: line.startswith("@@READY"), deadline, alive)[-1] if booting else ""

    @property
    def kernel_release(self) -> str:
        return self.ready.split()[1]

    @property
    def balloon_driver(self) -> str:
        return self.ready.split()[2]

    def _until(self, done, deadline: float, alive) -> list[str]:
        lines: list[str] = []
        while True:
            while b"\n" in self.buf:
                raw, _, self.buf = self.buf.partition(b"\n")
                line = raw.decode(errors="replace").rstrip("\r")
                lines.append(line)
                if done(line):
                    return lines
            left = deadline - time.monotonic()
            if left <= 0 or not alive():
                why = ("did not answer within the timeout" if left <= 0
                       else "stopped (QEMU exited or its kernel crashed)")
                raise AgentError(f"the guest {why}; last output: {lines[-3:]!r}")
            self.sock.settimeout(min(left, 1.0))
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                raise AgentError("the guest's serial port closed (guest stopped or QEMU died)")
            self.buf += data

    def run(self, command: str, timeout: float = 300.0, alive=lambda: True) -> list[str]:
        """Run one shell command in the guest; its output lines. Raises on a non-zero status."""
        rid = next(self.ids)
        self.sock.sendall(f"{rid} {command}\n".encode())
        lines = self._until(lambda line: line.startswith(f"@@END {rid} "), time.monotonic() + timeout, alive)
        status = int(lines[-1].split()[2])
        if status != 0:
            raise AgentError(f"guest command {command!r} exited with {status}: {lines[:-1][-5:]!r}")
        return lines[:-1]

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
