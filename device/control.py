"""The control plane between guest (driver) and VMM (device): vhost-user in spirit.

A unix SOCK_SEQPACKET socket carries one message per packet: a 12-byte header
{le32 request, le32 flags, le32 size} and `size` bytes of payload; file descriptors
(memfd, eventfds) travel as SCM_RIGHTS ancillary data. Every request gets exactly
one reply (flags has REPLY set) so the driver can never race the device's state.
docs/PROTOCOL.md is the normative description; keep the two in step.
"""
from __future__ import annotations

import enum
import os
import socket
import struct
from dataclasses import dataclass, field

HEADER = struct.Struct("<III")
VERSION = 0x1
FLAG_REPLY = 0x4
MAX_PAYLOAD = 4096
MAX_FDS = 8


class Req(enum.IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    GET_MEM_TABLE = 3
    GET_CONFIG = 4
    SET_CONFIG = 5
    SET_VRING = 6
    SET_VRING_KICK = 7
    SET_VRING_CALL = 8
    SET_CONFIG_CALL = 9
    SET_STATUS = 10
    GET_STATUS = 11
    RESET = 12
    SET_DIRTY_LOG = 13


# Payload layouts
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
RESULT = struct.Struct("<q")          # 0 ok, negative errno on refusal; utf-8 reason follows
CONFIG_ACCESS = struct.Struct("<II")  # offset, size (+ data for SET_CONFIG / GET_CONFIG reply)
VRING = struct.Struct("<IIQQQ")       # index, size, desc GPA, avail GPA, used GPA
REGION = struct.Struct("<QQQ")        # gpa, size, memfd offset
MEM_TABLE_HEAD = struct.Struct("<II")  # nregions, reserved


class ControlError(Exception):
    """The peer broke the control protocol, refused a request, or went away."""


class PeerGone(ControlError):
    """The other end closed the socket or died."""


@dataclass
class Message:
    req: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)


class Channel:
    """One end of the control socket."""

    def __init__(self, sock: socket.socket) -> None:
        if sock.type != socket.SOCK_SEQPACKET:
            raise ValueError("control channel must be a SOCK_SEQPACKET socket")
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, req: int, payload: bytes = b"", fds: list[int] | None = None, *, reply: bool = False) -> None:
        if len(payload) > MAX_PAYLOAD:
            raise ControlError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
        flags = VERSION | (FLAG_REPLY if reply else 0)
        data = HEADER.pack(int(req), flags, len(payload)) + payload
        try:
            if fds:
                socket.send_fds(self.sock, [data], fds)
            else:
                self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as e:
            raise PeerGone(f"control peer went away: {e}") from e

    def recv(self) -> Message:
        try:
            data, fds, msg_flags, _ = socket.recv_fds(self.sock, HEADER.size + MAX_PAYLOAD + 1, MAX_FDS)
        except ConnectionResetError as e:
            raise PeerGone(f"control peer went away: {e}") from e
        if not data:
            for fd in fds:
                os.close(fd)
            raise PeerGone("control peer closed the socket")
        if len(data) < HEADER.size:
            _close(fds)
            raise ControlError(f"truncated control header ({len(data)} bytes)")
        req, flags, size = HEADER.unpack_from(data)
        if flags & 0x3 != VERSION:
            _close(fds)
            raise ControlError(f"unsupported control protocol version {flags & 0x3}")
        if size != len(data) - HEADER.size or size > MAX_PAYLOAD:
            _close(fds)
            raise ControlError(f"control payload size {size} does not match the {len(data) - HEADER.size} bytes received")
        return Message(req, flags, bytes(data[HEADER.size:]), list(fds))

    # --- driver-side convenience: request, then wait for its reply ---------------------
    def call(self, req: Req, payload: bytes = b"", fds: list[int] | None = None) -> Message:
        self.send(req, payload, fds)
        msg = self.recv()
        if not msg.is_reply or msg.req != req:
            _close(msg.fds)
            raise ControlError(f"expected reply to {req.name}, got request {msg.req} flags {msg.flags:#x}")
        return msg

    def call_result(self, req: Req, payload: bytes = b"", fds: list[int] | None = None) -> None:
        """Send a request whose reply is a RESULT; raise ControlError with the device's reason on refusal."""
        msg = self.call(req, payload, fds)
        code, reason = unpack_result(msg.payload)
        if code != 0:
            raise ControlError(f"device refused {req.name}: {reason} (errno {-code})")

    def reply_result(self, req: int, code: int = 0, reason: str = "") -> None:
        self.send(req, pack_result(code, reason), reply=True)

    def close(self) -> None:
        self.sock.close()


def pack_result(code: int, reason: str = "") -> bytes:
    return RESULT.pack(code) + reason.encode()[: MAX_PAYLOAD - RESULT.size]


def unpack_result(payload: bytes) -> tuple[int, str]:
    if len(payload) < RESULT.size:
        raise ControlError("truncated result reply")
    return RESULT.unpack_from(payload)[0], payload[RESULT.size:].decode(errors="replace")


def _close(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
