"""The guest's half of migration: requests the VMM starts, and the guest's own check.

The control socket was request (guest) / reply (VMM) only. Migration needs the
other direction: the VMM hands the guest its dirty log (SET_DIRTY_LOG, 13). So the
guest's Channel becomes GuestChannel: a VMM request that arrives while the guest
waits for a reply of its own is queued, not mistaken for that reply, and served
from the guest's event loop (serve_readable / serve_pending). Every VMM request
gets exactly one RESULT reply, as every guest request does.

SET_DIRTY_LOG (VMM -> guest): payload {le64 max_pfn, le64 log_offset,
le64 inflight_offset, le64 memfd_size} with the log's memfd; an empty payload
without fd detaches the log. See dirty_log.py for the layout.

migration_verify: after the switchover the guest checks, for every page it holds
in use, that the destination's memfd (opened through /proc/<pid>/fd/<n>) holds
exactly what it must (its expected fingerprint from GuestPageContents's record) and that
its own RAM does too. Pages the guest rewrote after the switchover (marked in the
dirty log, which the source cleared while the guest was stopped) are left out and
counted.
"""
from __future__ import annotations

import collections
import errno
import logging
import os
import select
import threading

import numpy as np

from device.virtio import control
from device.virtio.control import Channel, ControlError, Message, Req
from device.guest.page_contents import GuestPageContents
from device.virtio.dirty_log import MappedDirtyLog
from device.virtio.page_pattern import fingerprint_pfns

log = logging.getLogger("balloon-lab.guest")


class GuestChannel(Channel):
    """The guest's control channel, able to serve requests the VMM starts."""

    def __init__(self, sock, memory_getter=None) -> None:
        super().__init__(sock)
        self.pending: collections.deque[Message] = collections.deque()
        self.lock = threading.RLock()
        self.memory_getter = memory_getter
        self.dirty_log: MappedDirtyLog | None = None
        self.served = 0

    def call(self, req: Req, payload: bytes = b"", fds: list[int] | None = None) -> Message:
        with self.lock:
            self.send(req, payload, fds)
            while True:
                msg = self.recv()
                if not msg.is_reply:
                    self.pending.append(msg)        # a VMM request: served from the loop
                    continue
                if msg.req != req:
                    control._close(msg.fds)
                    raise ControlError(f"expected reply to {req.name}, got reply to {msg.req}")
                return msg

    def serve_readable(self) -> None:
        """The socket is readable: read one message (if another thread did not take
        it meanwhile) and serve it. PeerGone when the VMM closed the socket."""
        with self.lock:
            if not select.select([self.sock], [], [], 0)[0]:
                return
            msg = self.recv()
            if msg.is_reply:
                control._close(msg.fds)
                log.warning("control: unexpected reply to request %d from the VMM", msg.req)
                return
            self.pending.append(msg)
        self.serve_pending()

    def serve_pending(self) -> None:
        while self.pending:
            msg = self.pending.popleft()
            code, reason = self._handle(msg)
            with self.lock:
                self.reply_result(msg.req, code, reason)
            self.served += 1

    def _handle(self, msg: Message) -> tuple[int, str]:
        if msg.req != Req.SET_DIRTY_LOG:
            control._close(msg.fds)
            return -errno.ENOSYS, f"the guest serves no request {msg.req} from the VMM"
        mem: GuestPageContents | None = self.memory_getter() if self.memory_getter else None
        if mem is None:
            control._close(msg.fds)
            return -errno.EAGAIN, "guest memory not ready"
        if not msg.payload and not msg.fds:
            mem.detach_dirty_log()
            if self.dirty_log is not None:
                self.dirty_log.close()
                self.dirty_log = None
            return 0, "detached"
        if len(msg.fds) != 1:
            control._close(msg.fds)
            return -errno.EBADF, f"SET_DIRTY_LOG needs exactly one memfd, got {len(msg.fds)}"
        try:
            dl = MappedDirtyLog(msg.fds[0], msg.payload, mem.max_pfn)
            mem.attach_dirty_log(dl.log, dl.inflight)
        except (ValueError, OSError) as e:
            control._close(msg.fds)
            return -errno.EINVAL, f"SET_DIRTY_LOG refused: {e}"
        old, self.dirty_log = self.dirty_log, dl
        if old is not None:
            old.close()
        log.info("dirty log attached (%d PFNs)", len(dl.log))
        return 0, ""


def migration_verify(memory: GuestPageContents, dest_path: str, dirty: np.ndarray | None) -> dict:
    """Compare every held page at the destination and at the source with what the
    guest's record says it must hold. `dirty`: the attached dirty log (pages set
    there were rewritten after the switchover and are skipped)."""
    fd = os.open(dest_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size != memory.layout.ram_bytes:
            raise ValueError(f"{dest_path} is {os.fstat(fd).st_size} bytes, guest RAM is {memory.layout.ram_bytes}")
        with memory.lock:          # no rewrite races the check
            pfns = memory.held_pfns()
            rewritten = dirty[pfns] != 0 if dirty is not None else np.zeros(len(pfns), dtype=bool)
            pfns = pfns[~rewritten]
            expected = memory.expected_held(pfns)
            src = memory.fingerprints(pfns)
            dst = fingerprint_pfns(fd, memory.layout, pfns)
    finally:
        os.close(fd)
    bad_dst = np.flatnonzero(dst != expected)
    bad_src = np.flatnonzero(src != expected)
    return {"ok": not len(bad_dst) and not len(bad_src), "pages_checked": int(len(pfns)),
            "skipped_rewritten_after_switchover": int(rewritten.sum()),
            "bad_at_destination": int(len(bad_dst)), "bad_at_source": int(len(bad_src)),
            "first_bad_destination_pfns": [int(x) for x in pfns[bad_dst[:16]]],
            "first_bad_source_pfns": [int(x) for x in pfns[bad_src[:16]]],
            "destination_zero_pages": int(np.count_nonzero(dst[bad_dst] == 0))}
