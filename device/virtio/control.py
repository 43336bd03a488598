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
import select
import socket
import struct
from dataclasses import dataclass, field

HEADER = struct.Struct("<III")
VERSION = 0x1
FLAG_REPLY = 0x4
MAX_PAYLOAD = 4096
MAX_FDS = 8
# Receive buffer: larger than any packet a unix socket can carry by default (the peer's
# send buffer, 208 KiB), so an oversized packet is reported with its real size.
RECV_BUFFER = 1 << 19


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
        self._rbuf: bytearray | None = None

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
        """One packet, validated. PeerGone when the peer hung up; ControlError (nothing
        consumed but this packet, its fds closed) when the packet is malformed."""
        if self._rbuf is None:
            self._rbuf = bytearray(RECV_BUFFER)
        try:
            n, anc, msg_flags, _ = self.sock.recvmsg_into([self._rbuf], socket.CMSG_SPACE(MAX_FDS * 4))
        except ConnectionResetError as e:
            raise PeerGone(f"control peer went away: {e}") from e
        fds = _fds_of(anc)
        if n == 0 and self._hung_up():
            _close(fds)
            raise PeerGone("control peer closed the socket")
        data = self._rbuf
        if msg_flags & socket.MSG_TRUNC:
            _close(fds)
            raise ControlError(f"control packet of more than {RECV_BUFFER} bytes (limit: a {HEADER.size}-byte "
                               f"header and {MAX_PAYLOAD} payload bytes)")
        if n < HEADER.size:
            _close(fds)
            raise ControlError(f"truncated control packet: {n} bytes, shorter than the {HEADER.size}-byte header"
                               + (" (an empty packet)" if n == 0 else ""))
        req, flags, size = HEADER.unpack_from(data)
        if flags & 0x3 != VERSION:
            _close(fds)
            raise ControlError(f"unsupported control protocol version {flags & 0x3}")
        carried = n - HEADER.size
        if carried > MAX_PAYLOAD:
            _close(fds)
            raise ControlError(f"control packet carries {carried} payload bytes, more than the {MAX_PAYLOAD}-byte "
                               f"limit (its header says {size})")
        if size != carried:
            _close(fds)
            raise ControlError(f"control header says {size} payload bytes, the packet carries {carried}")
        return Message(req, flags, bytes(data[HEADER.size:n]), fds)

    def _hung_up(self) -> bool:
        """A 0-byte read is either the peer's hang-up or an empty packet (SOCK_SEQPACKET
        delivers those): only a hang-up leaves the socket in POLLHUP/POLLRDHUP."""
        p = select.poll()
        p.register(self.sock, select.POLLIN | select.POLLRDHUP)
        return any(ev & (select.POLLHUP | select.POLLRDHUP | select.POLLERR) for _, ev in p.poll(0))

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


def _fds_of(ancdata) -> list[int]:
    """The file descriptors of SCM_RIGHTS ancillary data (a truncated last one dropped)."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(struct.unpack(f"{len(data) // 4}i", data[: len(data) - len(data) % 4]))
    return fds


def _close(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
