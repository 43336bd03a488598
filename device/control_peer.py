"""The VMM's end of the control socket: replies that never block the event loop.

The guest is untrusted. If the VMM wrote its replies with blocking sends, a guest that
sends requests and never reads the replies would fill the socket and stop the VMM's
single event loop (and with it the monitor). So the VMM's sends are non-blocking: what
the socket does not take now waits in a per-peer output queue, flushed when the socket
is writable. The queue is bounded: once it holds `max_queued` packets the VMM stops
reading that guest's requests (it is throttled: each request gets one reply, so a
guest that does not read cannot make the VMM queue more), counts `control-reply-backlog`
and logs it, and reads again once the guest has drained its replies. docs/BAD_INPUT.md.
"""
from __future__ import annotations

import collections
import logging
import socket

from device.control import FLAG_REPLY, HEADER, MAX_PAYLOAD, VERSION, Channel, ControlError, PeerGone

log = logging.getLogger("balloon-lab.device")

MAX_QUEUED = 64          # replies waiting for a guest that does not read, before it is throttled


class DeviceChannel(Channel):
    """Channel whose send() never blocks: a bounded output queue per peer."""

    def __init__(self, sock: socket.socket, max_queued: int = MAX_QUEUED) -> None:
        super().__init__(sock)
        sock.setblocking(False)
        self.max_queued = max_queued
        self.outq: collections.deque[tuple[bytes, list[int]]] = collections.deque()
        self.queued_peak = 0
        self.throttled = False       # reads stopped until the peer drains its replies
        self.throttle_episodes = 0

    def send(self, req: int, payload: bytes = b"", fds: list[int] | None = None, *, reply: bool = False) -> None:
        if len(payload) > MAX_PAYLOAD:
            raise ControlError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
        flags = VERSION | (FLAG_REPLY if reply else 0)
        # fds are sent as they are now: dup-free, so the caller must keep them open until
        # flushed (the memfd and the dirty log's fd live as long as the VMM's objects).
        self.outq.append((HEADER.pack(int(req), flags, len(payload)) + payload, list(fds or [])))
        self.queued_peak = max(self.queued_peak, len(self.outq))
        self.flush()

    def flush(self) -> None:
        """Send what the socket takes now; PeerGone when the guest is gone."""
        while self.outq:
            data, fds = self.outq[0]
            try:
                if fds:
                    socket.send_fds(self.sock, [data], fds, socket.MSG_DONTWAIT)
                else:
                    self.sock.send(data, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except (BrokenPipeError, ConnectionResetError) as e:
                raise PeerGone(f"control peer went away: {e}") from e
            except OSError as e:          # e.g. an fd closed before its packet left: drop that packet
                log.error("control: dropped a queued packet (request %d): %s", HEADER.unpack_from(data)[0], e)
            self.outq.popleft()

    @property
    def wants_write(self) -> bool:
        return bool(self.outq)

    def may_read(self) -> bool:
        """False while the peer has `max_queued` unread replies (it is throttled); reads
        resume once it has drained half of them. The caller counts each new episode
        (`throttle_episodes` grows)."""
        if self.throttled and len(self.outq) < self.max_queued // 2:
            self.throttled = False
            log.warning("control: the guest read its replies again (%d queued); serving its requests again",
                        len(self.outq))
        elif not self.throttled and len(self.outq) >= self.max_queued:
            self.throttled = True
            self.throttle_episodes += 1
        return not self.throttled
