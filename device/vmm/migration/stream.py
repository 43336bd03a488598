"""The migration stream: what travels on the TCP connection from source to destination.

Every message is a 16-byte header {le32 type, le32 arg, le64 length} and `length`
payload bytes. All integers are little-endian.

    HELLO       JSON {magic, version, page_size, layout, hint}: the destination
                refuses a stream whose layout differs from its own RAM
    PAGES       arg = round; payload {le64 start_pfn, le32 npages, le32 ndata},
                then npages flag bytes (0 = not in this message, 1 = zero page,
                2 = data page), then ndata * 4096 bytes: the data pages in PFN order.
                A zero page is a flag, never 4096 bytes (QEMU's RAM_SAVE_FLAG_ZERO).
                One message never crosses a RAM region edge.
    ROUND_END   arg = round; JSON summary of the round (informational)
    DEVICE      JSON device state (config space, features, queue indices, balloon)
    END         no payload: the source sent everything; the destination answers ACK
    ACK         JSON: what the destination received, its CPU time and memory
    VERIFY      no payload: the destination answers VERIFY_DATA
    VERIFY_DATA le64 n, then n le64 PFNs and n le64 fingerprints of every page the
                destination's memfd holds data for
    SYNC        no payload: the destination answers ACK once everything before it is
                applied (the source drains the pipe before it stops the guest, so the
                downtime is the stop-and-copy, not the backlog of the last round)
    ERROR       JSON {message}: either side gives up
    BYE         no payload: the source is done with the connection

Sending uses sendmsg with the page data as separate iovecs (no copy of the data
pages into one buffer); receiving uses recv_into a reused buffer.
"""
from __future__ import annotations

import enum
import json
import socket
import struct
from dataclasses import dataclass

import numpy as np

from device.virtio.layout import PAGE_SIZE

MAGIC = "balloon-lab-migration"
VERSION = 1
HEADER = struct.Struct("<IIQ")
PAGES_HEAD = struct.Struct("<QII")
MAX_PAGES_PER_MESSAGE = 4096            # 16 MiB of data at most per PAGES message
MAX_JSON = 16 << 20
FLAG_SKIP, FLAG_ZERO, FLAG_DATA = 0, 1, 2
IOV_MAX = 1024


class MsgType(enum.IntEnum):
    HELLO = 1
    PAGES = 2
    ROUND_END = 3
    DEVICE = 4
    END = 5
    ACK = 6
    VERIFY = 7
    VERIFY_DATA = 8
    ERROR = 9
    BYE = 10
    SYNC = 11


class StreamError(Exception):
    """The peer broke the stream format, refused it, or went away."""


@dataclass
class Header:
    type: int
    arg: int
    length: int


def pages_message_len(npages: int, ndata: int) -> int:
    return PAGES_HEAD.size + npages + ndata * PAGE_SIZE


# --- sending -----------------------------------------------------------------------------
def send_parts(sock: socket.socket, parts: list) -> int:
    """sendmsg every buffer of `parts` completely (handles partial sends and the
    iovec limit). Returns the bytes sent."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    total = sum(len(v) for v in views)
    i = 0
    while i < len(views):
        n = sock.sendmsg(views[i:i + IOV_MAX])
        while n > 0:
            ln = len(views[i])
            if n >= ln:
                n -= ln
                i += 1
            else:
                views[i] = views[i][n:]
                n = 0
    return total


def header(t: MsgType, arg: int, length: int) -> bytes:
    return HEADER.pack(int(t), arg, length)


def send_json(sock: socket.socket, t: MsgType, obj, arg: int = 0) -> int:
    raw = json.dumps(obj).encode()
    return send_parts(sock, [header(t, arg, len(raw)), raw])


def send_empty(sock: socket.socket, t: MsgType, arg: int = 0) -> int:
    return send_parts(sock, [header(t, arg, 0)])


# --- receiving ----------------------------------------------------------------------------
def recv_exact(sock: socket.socket, mv: memoryview) -> None:
    """Fill `mv` completely from the socket; StreamError if the peer closes early."""
    got, n = 0, len(mv)
    while got < n:
        k = sock.recv_into(mv[got:], n - got)
        if k == 0:
            raise StreamError(f"peer closed the connection {n - got} bytes before the end of a message")
        got += k


def recv_header(sock: socket.socket) -> Header:
    buf = bytearray(HEADER.size)
    recv_exact(sock, memoryview(buf))
    t, arg, length = HEADER.unpack(buf)
    return Header(t, arg, length)


def recv_payload(sock: socket.socket, length: int, limit: int = MAX_JSON) -> bytes:
    if length > limit:
        raise StreamError(f"message of {length} bytes exceeds the limit of {limit}")
    buf = bytearray(length)
    recv_exact(sock, memoryview(buf))
    return bytes(buf)


def recv_json(sock: socket.socket, h: Header):
    raw = recv_payload(sock, h.length)
    try:
        return json.loads(raw)
    except ValueError as e:
        raise StreamError(f"{MsgType(h.type).name} payload is not JSON: {e}") from None


def expect(sock: socket.socket, t: MsgType) -> tuple[Header, object]:
    """Receive one message that must be of type t (ERROR from the peer raises)."""
    h = recv_header(sock)
    if h.type == MsgType.ERROR:
        raise StreamError(f"peer reported an error: {recv_json(sock, h).get('message')}")
    if h.type != t:
        raise StreamError(f"expected {t.name}, got message type {h.type}")
    if t == MsgType.VERIFY_DATA:
        return h, recv_payload(sock, h.length, limit=8 + 16 * (1 << 26))
    return h, (recv_json(sock, h) if h.length else None)


def pack_verify_data(pfns: np.ndarray, fps: np.ndarray) -> list:
    return [struct.pack("<Q", len(pfns)), np.ascontiguousarray(pfns, dtype="<i8"),
            np.ascontiguousarray(fps, dtype="<u8")]


def unpack_verify_data(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    if len(raw) < 8:
        raise StreamError("VERIFY_DATA shorter than its count")
    (n,) = struct.unpack_from("<Q", raw)
    if len(raw) != 8 + 16 * n:
        raise StreamError(f"VERIFY_DATA of {len(raw)} bytes does not hold {n} (pfn, fingerprint) pairs")
    pfns = np.frombuffer(raw, dtype="<i8", count=n, offset=8)
    fps = np.frombuffer(raw, dtype="<u8", count=n, offset=8 + 8 * n)
    return pfns, fps


def parse_uri(uri: str, what: str = "migration URI", listen: bool = False) -> tuple[str, int]:
    """tcp:127.0.0.1:PORT (or tcp:localhost:PORT): the lab migrates over loopback only.
    A listening side (listen=True) may ask for port 0: any free port."""
    if not isinstance(uri, str) or not uri.startswith("tcp:"):
        raise ValueError(f"{what} must be tcp:127.0.0.1:PORT, got {uri!r}")
    host, _, port = uri[4:].rpartition(":")
    if host not in ("127.0.0.1", "localhost"):
        raise ValueError(f"{what} must name 127.0.0.1 (loopback only), got host {host!r}")
    if not port.isdigit() or not (0 if listen else 1) <= int(port) < 65536:
        raise ValueError(f"{what} has no valid port: {uri!r}")
    return "127.0.0.1", int(port)
