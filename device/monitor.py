"""The VMM's monitor: QMP's wire format over a unix stream socket.

Greeting {"QMP": {...}}, then `qmp_capabilities`, then {"execute": name,
"arguments": {...}, "id": ...} -> {"return": ...} | {"error": {"class", "desc"}}.
Command names follow QEMU where QEMU has them, so one client (lab/monitor_client.py)
drives this VMM and a real QEMU alike; lab-specific commands carry the `x-` prefix.
A handler may answer later (deferred) by returning a Deferred and completing it.
"""
from __future__ import annotations

import json
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("balloon-lab.monitor")
MAX_LINE = 1 << 20


class CommandError(Exception):
    def __init__(self, desc: str, klass: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc, self.klass = desc, klass


class Deferred:
    """A reply the VMM will send later (e.g. once fresh guest stats arrived)."""

    def __init__(self) -> None:
        self._send: Callable[[dict], None] | None = None
        self.done = False

    def resolve(self, value: Any) -> None:
        if not self.done and self._send:
            self.done = True
            self._send({"return": value})

    def fail(self, desc: str) -> None:
        if not self.done and self._send:
            self.done = True
            self._send({"error": {"class": "GenericError", "desc": desc}})


@dataclass
class MonitorConn:
    sock: socket.socket
    buf: bytearray = field(default_factory=bytearray)
    negotiated: bool = False


class Monitor:
    def __init__(self, path: str, commands: dict[str, Callable[[dict], Any]], version: str = "balloon-lab") -> None:
        self.commands = commands
        self.version = version
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(8)
        self.listener.setblocking(False)
        self.conns: dict[int, MonitorConn] = {}
        self._last_event: dict[str, float] = {}
        self.events_dropped = 0

    def accept(self) -> MonitorConn:
        s, _ = self.listener.accept()
        s.setblocking(True)
        conn = MonitorConn(s)
        self.conns[s.fileno()] = conn
        self._send(conn, {"QMP": {"version": {"package": self.version}, "capabilities": []}})
        return conn

    def _send(self, conn: MonitorConn, obj: dict) -> None:
        try:
            conn.sock.sendall(json.dumps(obj).encode() + b"\r\n")
        except OSError:
            self.close(conn)

    def event(self, name: str, data: dict, throttle_s: float = 0.0) -> None:
        """Emit an event to every negotiated client. Events never block the VMM: a
        client that does not read loses events (counted), and throttled events (QEMU
        throttles BALLOON_CHANGE to one a second) are dropped inside the window."""
        t = time.time()
        if throttle_s and t - self._last_event.get(name, 0.0) < throttle_s:
            return
        self._last_event[name] = t
        line = json.dumps({"event": name, "data": data,
                           "timestamp": {"seconds": int(t), "microseconds": int((t % 1) * 1e6)}}).encode() + b"\r\n"
        for conn in list(self.conns.values()):
            if conn.negotiated:
                try:
                    conn.sock.send(line, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    self.events_dropped += 1
                except OSError:
                    self.close(conn)

    def close(self, conn: MonitorConn) -> None:
        self.conns.pop(conn.sock.fileno(), None)
        try:
            conn.sock.close()
        except OSError:
            pass

    def readable(self, conn: MonitorConn) -> None:
        try:
            data = conn.sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self.close(conn)
            return
        conn.buf += data
        if len(conn.buf) > MAX_LINE:
            self._send(conn, {"error": {"class": "GenericError", "desc": "command too long"}})
            self.close(conn)
            return
        while b"\n" in conn.buf:
            line, _, rest = bytes(conn.buf).partition(b"\n")
            conn.buf = bytearray(rest)
            if line.strip():
                self._dispatch(conn, line)

    def _dispatch(self, conn: MonitorConn, line: bytes) -> None:
        try:
            req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("execute"), str):
                raise CommandError("expected an object with a string 'execute'")
        except (ValueError, CommandError) as e:
            self._send(conn, {"error": {"class": "GenericError", "desc": f"malformed command: {e}"}})
            return
        rid = req.get("id")

        def reply(obj: dict) -> None:
            if rid is not None:
                obj["id"] = rid
            self._send(conn, obj)

        name = req["execute"]
        args = req.get("arguments") or {}
        if name == "qmp_capabilities":
            conn.negotiated = True
            reply({"return": {}})
            return
        if not conn.negotiated:
            reply({"error": {"class": "CommandNotFound",
                             "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}})
            return
        handler = self.commands.get(name)
        if handler is None:
            reply({"error": {"class": "CommandNotFound", "desc": f"The command {name} has not been found"}})
            return
        try:
            result = handler(args)
        except CommandError as e:
            reply({"error": {"class": e.klass, "desc": e.desc}})
            return
        except Exception as e:  # a handler bug must not take the VMM down
            log.exception("monitor command %s failed", name)
            reply({"error": {"class": "GenericError", "desc": f"{name} failed: {e}"}})
            return
        if isinstance(result, Deferred):
            result._send = reply
            return
        reply({"return": {} if result is None else result})
