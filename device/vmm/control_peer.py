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
import errno
import logging
import selectors
import socket
from typing import Callable

from device.virtio.control import FLAG_REPLY, HEADER, MAX_PAYLOAD, VERSION, Channel, ControlError, Message, PeerGone

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
        if self.throttled and len(self.outq) <= self.max_queued // 2:
            self.throttled = False
            log.warning("control: the guest read its replies again (%d queued); serving its requests again",
                        len(self.outq))
        elif not self.throttled and len(self.outq) >= self.max_queued:
            self.throttled = True
            self.throttle_episodes += 1
        return not self.throttled


class ControlService:
    """What the VMM's event loop does with the control socket, in one place (the VMM
    and the control-plane fuzzer both drive it): on an event, flush queued replies and
    serve at most one request; afterwards, say which events to wait for next."""

    def __init__(self, chan: DeviceChannel, device, on_reply: Callable[[Message], bool],
                 on_gone: Callable[[str], None]) -> None:
        self.chan = chan
        self.device = device          # a VirtioTransport: handle(), refuse()
        self.on_reply = on_reply      # True when a message answered a request the VMM sent
        self.on_gone = on_gone        # the guest hung up or died
        self.mask = selectors.EVENT_READ

    def on_event(self, mask: int) -> None:
        """The socket is writable (flush queued replies) and/or readable (serve one
        request). Never blocks: a guest that does not read its replies is throttled."""
        ch = self.chan
        try:
            if mask & selectors.EVENT_WRITE:
                ch.flush()
            if not mask & selectors.EVENT_READ or not ch.may_read():
                return
            msg = ch.recv()
        except BlockingIOError:
            return
        except PeerGone as e:
            self.on_gone(str(e))
            return
        except ControlError as e:
            self.device.refuse("control-malformed", str(e))
            return
        if self.on_reply(msg):        # the guest answered a VMM request
            return
        try:
            self.device.handle(ch, msg)
        except PeerGone as e:
            self.on_gone(str(e))
        except Exception as e:  # a bug in the lab's own code: count it, answer, keep the VMM up
            log.exception("internal error serving control request %d", msg.req)
            self.device.refuse("control-internal", f"request {msg.req}: {type(e).__name__}: {e}")
            try:
                ch.reply_result(msg.req, -errno.EIO, f"internal error: {type(e).__name__}")
            except ControlError as e2:
                self.on_gone(str(e2))

    def wanted(self) -> int:
        """The events to wait for now: readable unless the guest is throttled (counted
        and logged once per episode as `control-reply-backlog`), writable while replies wait."""
        ch = self.chan
        episodes = ch.throttle_episodes
        readable = ch.may_read()
        if ch.throttle_episodes != episodes:
            self.device.refuse("control-reply-backlog",
                               f"the guest left {len(ch.outq)} replies unread; its requests are not read "
                               f"until it reads them")
        return (selectors.EVENT_READ if readable else 0) | (selectors.EVENT_WRITE if ch.wants_write else 0)
