"""Clients for the VMM monitor (QMP wire format) and the guest agent (JSON lines).

The monitor client speaks plain QMP, so it drives the lab's VMM and a real QEMU
(`-qmp unix:PATH,server`) alike; asynchronous events are collected, not mistaken
for replies.
"""
from __future__ import annotations

import itertools
import json
import os
import socket
import time
from typing import Any


class MonitorError(RuntimeError):
    """The monitor answered with an error, or went away."""


class _JsonLineClient:
    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        for attempt in range(100):   # the socket file exists between bind() and listen()
            try:
                self.sock.connect(path)
                break
            except ConnectionRefusedError:
                if attempt == 99:
                    raise
                time.sleep(0.01)
        self.buf = b""
        self.ids = itertools.count(1)
        self.events: list[dict] = []

    def _read_obj(self) -> dict:
        while b"\n" not in self.buf:
            try:
                data = self.sock.recv(1 << 20)
            except socket.timeout as e:
                raise MonitorError(f"no answer from {self.path} within {self.sock.gettimeout():.0f} s") from e
            if not data:
                raise MonitorError(f"{self.path}: peer closed the connection")
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def execute(self, name: str, arguments: dict | None = None, timeout: float | None = None) -> Any:
        rid = next(self.ids)
        msg: dict = {"execute": name, "id": rid}
        if arguments:
            msg["arguments"] = arguments
        old = self.sock.gettimeout()
        if timeout is not None:
            self.sock.settimeout(timeout)
        try:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
            while True:
                obj = self._read_obj()
                if "event" in obj:
                    self.events.append(obj)
                    continue
                if obj.get("id") not in (rid, None):
                    continue
                if "error" in obj:
                    err = obj["error"]
                    raise MonitorError(f"{name}: {err.get('class')}: {err.get('desc')}")
                return obj.get("return")
        except (BrokenPipeError, ConnectionResetError) as e:
            raise MonitorError(f"{self.path}: connection lost during {name}: {e}") from e
        finally:
            self.sock.settimeout(old)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class QMPClient(_JsonLineClient):
    def __init__(self, path: str, timeout: float = 60.0) -> None:
        super().__init__(path, timeout)
        greeting = self._read_obj()
        if "QMP" not in greeting:
            raise MonitorError(f"{path} is not a QMP monitor (greeting {greeting!r})")
        self.greeting = greeting
        self.execute("qmp_capabilities")


class AgentClient(_JsonLineClient):
    pass


def wait_for_socket(path: str, timeout: float, alive=lambda: True) -> None:
    """Wait until a unix socket exists and accepts connections (a freshly spawned process)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise MonitorError(f"process died before creating {path}")
        if os.path.exists(path):
            return
        time.sleep(0.02)
    raise MonitorError(f"{path} did not appear within {timeout:.0f} s")
