"""The VMM's monitor: QMP's wire format over a unix stream socket.

Greeting {"QMP": {"version": {"qemu": {...}, "package": ...}, "capabilities": []}},
then `qmp_capabilities`, then {"execute": name, "arguments": {...}, "id": ...} ->
{"return": ...} | {"error": {"class", "desc"}}. Input is a JSON *stream*, as QEMU
parses it: an object is complete at its closing brace, whether or not a newline
follows (qemu.qmp sends none), and several may arrive in one read. Command names,
error classes and descriptions follow QEMU where QEMU has them, so standard QMP
clients (qemu.qmp, qmp-shell) and lab/trials/monitor_client.py drive this VMM and a real
QEMU alike; lab-specific commands carry the `x-` prefix. A handler may answer later
(deferred) by returning a Deferred and completing it.
"""
from __future__ import annotations

import json
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("balloon-lab.monitor")
MAX_LINE = 1 << 20  # longest pending input; QEMU's own limit (MAX_TOKEN_SIZE) is 64 MiB
# The QEMU release whose QMP schema the commands follow (names, arguments, replies,
# events): clients that check the greeting's version see the dialect they speak.
QMP_DIALECT = {"major": 7, "minor": 2, "micro": 0}

# QEMU's error classes (qapi/error.json, QapiErrorClass): nothing else is sent.
GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"
DEVICE_NOT_ACTIVE = "DeviceNotActive"
DEVICE_NOT_FOUND = "DeviceNotFound"
KVM_MISSING_CAP = "KVMMissingCap"
ERROR_CLASSES = (GENERIC_ERROR, COMMAND_NOT_FOUND, DEVICE_NOT_ACTIVE, DEVICE_NOT_FOUND, KVM_MISSING_CAP)
REQUEST_KEYS = frozenset({"execute", "arguments", "id"})


class CommandError(Exception):
    def __init__(self, desc: str, klass: str = GENERIC_ERROR) -> None:
        if klass not in ERROR_CLASSES:
            raise ValueError(f"{klass!r} is not one of QEMU's error classes {ERROR_CLASSES}")
        super().__init__(desc)
        self.desc, self.klass = desc, klass


class JsonStream:
    """Splits a byte stream into top-level JSON values the way QEMU's json-streamer
    does: by bracket depth outside strings, so no delimiter is needed between values.
    Scanning resumes where it stopped, so a value arriving in many reads costs one pass."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self._pos = 0        # next byte to scan
        self._start = -1     # start of the value being scanned (-1: between values)
        self._depth = 0
        self._in_str = False
        self._esc = False

    def feed(self, data: bytes) -> list[bytes]:
        """Append data; return the complete top-level values (as bytes) now available.
        A stray token outside any object is returned on its own, for the caller to refuse."""
        self.buf += data
        out: list[bytes] = []
        buf, i, n = self.buf, self._pos, len(self.buf)
        while i < n:
            c = buf[i]
            if self._start < 0:
                if c in b" \t\r\n":
                    i += 1
                    continue
                self._start = i
                if c not in b"{[":      # a scalar or garbage at the top level: up to the next separator
                    j = i
                    while j < n and buf[j] not in b" \t\r\n{[":
                        j += 1
                    if j == n:          # the token may continue in the next read
                        self._start = -1
                        break
                    out.append(bytes(buf[i:j]))
                    self._start, i = -1, j
                    continue
            if self._in_str:
                if self._esc:
                    self._esc = False
                elif c == 0x5C:     # backslash
                    self._esc = True
                elif c == 0x22:     # quote
                    self._in_str = False
            elif c == 0x22:
                self._in_str = True
            elif c in b"{[":
                self._depth += 1
            elif c in b"}]":
                self._depth -= 1
                if self._depth == 0:
                    out.append(bytes(buf[self._start:i + 1]))
                    self._start = -1
            i += 1
        keep = self._start if self._start >= 0 else i
        del self.buf[:keep]
        self._pos = i - keep
        if self._start >= 0:
            self._start = 0
        return out

    @property
    def pending(self) -> int:
        return len(self.buf)


class Deferred:
    """A reply the VMM will send later (e.g. once fresh guest stats arrived)."""

    def __init__(self) -> None:
        self._send: Callable[[dict], None] | None = None
        self.done = False

    def resolve(self, value: Any) -> None:
        if not self.done and self._send:
            self.done = True
            self._send({"return": value})

    def fail(self, desc: str, klass: str = GENERIC_ERROR) -> None:
        if not self.done and self._send:
            self.done = True
            self._send({"error": {"class": klass, "desc": desc}})


@dataclass
class MonitorConn:
    sock: socket.socket
    stream: JsonStream = field(default_factory=JsonStream)
    negotiated: bool = False


class Monitor:
    def __init__(self, path: str, commands: dict[str, Callable[[dict], Any]], version: str = "balloon-lab") -> None:
        self.commands = commands
        self.version = version  # the greeting's "package": who answers (QEMU puts its distro build here)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(8)
        self.listener.setblocking(False)
        self.conns: dict[int, MonitorConn] = {}
        self._last_event: dict[str, float] = {}
        self._held: dict[str, tuple[dict, float]] = {}  # throttled events waiting for their window
        self.events_dropped = 0

    def accept(self) -> MonitorConn:
        s, _ = self.listener.accept()
        s.setblocking(True)
        conn = MonitorConn(s)
        self.conns[s.fileno()] = conn
        self._send(conn, self.greeting())
        return conn

    def greeting(self) -> dict:
        """QEMU's greeting shape; no capabilities (out-of-band execution is not offered)."""
        return {"QMP": {"version": {"qemu": dict(QMP_DIALECT), "package": self.version}, "capabilities": []}}

    def _send(self, conn: MonitorConn, obj: dict) -> None:
        try:
            conn.sock.sendall(json.dumps(obj).encode() + b"\r\n")
        except OSError:
            self.close(conn)

    def event(self, name: str, data: dict, throttle_s: float = 0.0) -> None:
        """Emit an event to every negotiated client. Events never block the VMM: a
        client that does not read loses events (counted). Throttled events behave as in
        QEMU (BALLOON_CHANGE: at most one a second): the first goes out at once, later
        ones inside the window are held, the newest replacing older, and the held one
        goes out when the window ends (flush_throttled), so the last value is never lost."""
        t = time.time()
        if throttle_s:
            last = self._last_event.get(name, 0.0)
            if t - last < throttle_s:
                self._held[name] = (data, last + throttle_s)
                return
            self._held.pop(name, None)
        self._last_event[name] = t
        self._broadcast(name, data, t)

    def flush_throttled(self) -> None:
        """Send held throttled events whose window has ended (called from the VMM loop, after
        every wake-up: with none held, it returns at once)."""
        if not self._held:
            return
        t = time.time()
        for name, (data, due) in list(self._held.items()):
            if t >= due:
                del self._held[name]
                self._last_event[name] = t
                self._broadcast(name, data, t)

    def _broadcast(self, name: str, data: dict, t: float) -> None:
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
        for value in conn.stream.feed(data):
            self._dispatch(conn, value)
            if conn.sock.fileno() == -1:
                return
        if conn.stream.pending > MAX_LINE:
            self._send(conn, {"error": {"class": GENERIC_ERROR, "desc": "JSON token size limit exceeded"}})
            self.close(conn)

    @staticmethod
    def _check_request(req: Any) -> str | None:
        """QEMU's refusal text for a malformed request (qmp-dispatch.c), or None."""
        if not isinstance(req, dict):
            return "QMP input must be a JSON object"
        for key in req:
            if key not in REQUEST_KEYS:
                return f"QMP input member '{key}' is unexpected"
        if "execute" not in req:
            return "QMP input lacks member 'execute'"
        if not isinstance(req["execute"], str):
            return "QMP input member 'execute' must be a string"
        if "arguments" in req and not isinstance(req["arguments"], dict):
            return "QMP input member 'arguments' must be an object"
        return None

    def _dispatch(self, conn: MonitorConn, text: bytes) -> None:
        try:
            req = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            msg = getattr(e, "msg", str(e))
            self._send(conn, {"error": {"class": GENERIC_ERROR, "desc": f"JSON parse error, {msg.lower()}"}})
            return
        bad = self._check_request(req)
        if bad:
            obj: dict = {"error": {"class": GENERIC_ERROR, "desc": bad}}
            if isinstance(req, dict) and "id" in req:
                obj["id"] = req["id"]
            self._send(conn, obj)
            return
        rid = req.get("id")
        has_id = "id" in req

        def reply(obj: dict) -> None:
            if has_id:
                obj["id"] = rid
            self._send(conn, obj)

        name = req["execute"]
        args = req.get("arguments") or {}
        if name == "qmp_capabilities":
            if conn.negotiated:
                reply({"error": {"class": COMMAND_NOT_FOUND,
                                 "desc": "Capabilities negotiation is already complete, command ignored"}})
                return
            enable = args.get("enable", [])
            if not isinstance(enable, list) or enable:
                what = enable[0] if isinstance(enable, list) else enable
                reply({"error": {"class": GENERIC_ERROR,
                                 "desc": f"Capability '{what}' not available" if isinstance(what, str)
                                 else "Invalid parameter type for 'enable', expected: array"}})
                return
            conn.negotiated = True
            reply({"return": {}})
            return
        if not conn.negotiated:
            reply({"error": {"class": COMMAND_NOT_FOUND,
                             "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}})
            return
        handler = self.commands.get(name)
        if handler is None:
            reply({"error": {"class": COMMAND_NOT_FOUND, "desc": f"The command {name} has not been found"}})
            return
        try:
            result = handler(args)
        except CommandError as e:
            reply({"error": {"class": e.klass, "desc": e.desc}})
            return
        except Exception as e:  # a handler bug must not take the VMM down
            log.exception("monitor command %s failed", name)
            reply({"error": {"class": GENERIC_ERROR, "desc": f"{name} failed: {e}"}})
            return
        if isinstance(result, Deferred):
            result._send = reply
            return
        reply({"return": {} if result is None else result})
