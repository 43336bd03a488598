"""Device side of the control plane: the virtio transport a device sits behind.

Serves the requests of docs/PROTOCOL.md: feature negotiation, the memory table,
config space, vring set-up, eventfds and device status. Everything the guest sends
is validated here before the device model sees it; a refusal is a RESULT with a
negative errno and a reason, counted and logged, never an exception that kills
the VMM.
"""
from __future__ import annotations

import errno
import logging
import os
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from device.virtio import control
from device.virtio.control import Channel, Message, Req
from device.virtio.features import (CONFIG_SIZE, QUEUE_FEATURE, QUEUE_NAMES, S_ACKNOWLEDGE, S_DRIVER,
                             S_DRIVER_OK, S_FAILED, S_FEATURES_OK, S_NEEDS_RESET, bit, feature_names)
from device.virtio.ram import GuestRAM, size_sealed
from device.virtio.layout import BadAddress
from device.virtio.device_queue import DeviceQueue
from device.virtio.metric_decl import COUNTER, Metric, MetricSet
from device.virtio.split_ring import RingError, RingLayout

log = logging.getLogger("balloon-lab.device")

MAX_QUEUE_SIZE = 32768

# VirtioTransport.errors: one counter per refusal reason ("pfn-not-ram", "ring-desc-loop",
# ...; docs/BAD_INPUT.md lists each with its message and whether it sets NEEDS_RESET).
REFUSAL_METRICS = MetricSet("device/virtio/transport.py REFUSAL_METRICS", [
    Metric("*", COUNTER, "", "pieces of guest input refused for this reason (docs/BAD_INPUT.md)"),
])


def _ignore(*_args) -> None:
    pass


@dataclass(frozen=True)
class DeviceListener:
    """What a device tells the one who runs it, given at construction: the VMM passes
    its own (its event loop re-registers kick eventfds, its monitor emits
    BALLOON_CHANGE); tests and the fuzzer pass none. Both are called from the thread
    that serves the control request, the VMM's main loop."""

    # SET_VRING_KICK installed or replaced a queue's kick eventfd, or a reset closed them
    # all: device.kick_fds is the new set of fds to wait on.
    kick_fds_changed: Callable[[], None] = _ignore
    # The driver wrote the config space (balloon: `actual`, pages in the balloon); called on
    # every write, with the value after it, changed or not.
    actual_changed: Callable[[int], None] = _ignore


_notify_failures = 0


def notify(fd: int | None, what: str, queue: int | None = None) -> None:
    """One eventfd notification (a real write(2)); a broken fd is logged, never fatal.
    Rate-limited like refusals: a guest can make every write fail (it may write
    0xfffffffffffffffe into its own eventfd) and must not flood the VMM's log. `what`
    names the eventfd, "%d" standing for `queue` (formatted only for the log: a call
    is on every request's round trip)."""
    global _notify_failures
    if fd is not None:
        try:
            os.eventfd_write(fd, 1)
        except OSError as e:
            _notify_failures += 1
            if _notify_failures <= 20 or _notify_failures % 10000 == 0:
                log.warning("%s write failed (%d so far): %s", what % queue if queue is not None else what,
                            _notify_failures, e)


class VirtioTransport:
    """Per-device transport state; subclasses implement config semantics and queues."""

    NUM_QUEUES = 6

    def __init__(self, ram: GuestRAM, device_features: int, listener: DeviceListener | None = None) -> None:
        self.ram = ram
        self.listener = listener if listener is not None else DeviceListener()
        self.device_features = device_features
        self.driver_features = 0
        self.status = 0
        self.vrings: dict[int, RingLayout] = {}
        self.queues: dict[int, DeviceQueue] = {}
        self.kick_fds: dict[int, int] = {}
        self.call_fds: dict[int, int] = {}
        self.config_call_fd: int | None = None
        self.dirty_log_fd: int | None = None
        self.errors: Counter[str] = Counter()
        # A memfd whose size is sealed cannot shrink under the mapping (guest_ram.seal_size).
        self._ram_sealed = size_sealed(ram.fd)

    # --- errors ------------------------------------------------------------------------
    def refuse(self, reason: str, message: str) -> None:
        """Count and log one refused piece of guest input (never raises)."""
        self.errors[reason] += 1
        if self.errors[reason] <= 20 or self.errors[reason] % 10000 == 0:
            log.warning("refused guest input [%s] (%d so far): %s", reason, self.errors[reason], message)

    def needs_reset(self, reason: str, message: str) -> None:
        """The spec's answer to a broken ring: stop using the device until reset."""
        self.refuse(reason, message)
        if not self.status & S_NEEDS_RESET:
            self.status |= S_NEEDS_RESET
            log.error("device NEEDS_RESET: %s", message)
            self.signal_config()

    def has(self, feature: int) -> bool:
        return bool(self.driver_features & bit(feature))

    @property
    def live(self) -> bool:
        """DRIVER_OK and neither NEEDS_RESET nor FAILED, and guest RAM still whole: every
        path that touches the rings asks this first, so an unsealed memfd that the guest
        shrank becomes NEEDS_RESET here instead of a SIGBUS in the VMM."""
        if not self.status & S_DRIVER_OK or self.status & (S_NEEDS_RESET | S_FAILED):
            return False
        return self._ram_sealed or self._ram_intact()

    def _ram_intact(self) -> bool:
        try:
            size = os.fstat(self.ram.fd).st_size
        except OSError as e:
            size, why = -1, str(e)
        else:
            why = f"{size} bytes"
        if size >= self.ram.size:
            return True
        self.needs_reset("ram-resized", f"the guest RAM memfd is now {why}, the device maps {self.ram.size}: "
                                        f"guest RAM is not touched until the driver resets")
        return False

    # --- notifications -----------------------------------------------------------------
    def signal_call(self, index: int) -> None:
        notify(self.call_fds.get(index), "call eventfd of queue %d", index)

    def signal_config(self) -> None:
        notify(self.config_call_fd, "config eventfd")

    # --- the control requests ------------------------------------------------------------
    def handle(self, ch: Channel, msg: Message) -> None:
        """Serve one control request and send its reply. Closes fds the request does not keep."""
        if msg.is_reply:
            control._close(msg.fds)
            self.refuse("control-unexpected-reply", f"unexpected reply message {msg.req}")
            return
        try:
            req = Req(msg.req)
        except ValueError:
            control._close(msg.fds)
            self.refuse("control-unknown-request", f"unknown control request {msg.req}")
            ch.reply_result(msg.req, -errno.ENOSYS, f"unknown request {msg.req}")
            return
        handler = getattr(self, f"_req_{req.name.lower()}")
        if msg.fds and req not in _TAKES_FD:
            # fds on a request that takes none would pile up in the VMM until it runs out
            control._close(msg.fds)
            self.refuse("control-unexpected-fd", f"{req.name} carried {len(msg.fds)} file descriptor(s); closed them")
            msg.fds = []
        try:
            handler(ch, req, msg)
        except _Refused as e:
            control._close(msg.fds)
            self.refuse(e.reason, f"{req.name}: {e.message}")
            ch.reply_result(req, -e.err, e.message)

    def _payload(self, msg: Message, st, what: str) -> tuple:
        if len(msg.payload) < st.size:
            raise _Refused("control-truncated", errno.EINVAL, f"{what} needs {st.size} payload bytes, got {len(msg.payload)}")
        return st.unpack_from(msg.payload)

    def _one_fd(self, msg: Message) -> int:
        if len(msg.fds) != 1:
            raise _Refused("control-fd", errno.EBADF, f"expected exactly one file descriptor, got {len(msg.fds)}")
        fd = msg.fds[0]
        # Only an eventfd: the VMM polls kick fds (epoll refuses regular files) and writes
        # call fds (a full pipe, or a blocking eventfd at its maximum, would block it).
        try:
            kind = os.readlink(f"/proc/self/fd/{fd}")
        except OSError as e:
            kind = f"unreadable ({e.strerror})"
        if kind != "anon_inode:[eventfd]":
            raise _Refused("control-fd-not-eventfd", errno.EINVAL, f"expected an eventfd, got {kind}")
        os.set_blocking(fd, False)
        return fd

    def _req_get_features(self, ch: Channel, req: Req, msg: Message) -> None:
        ch.send(req, control.U64.pack(self.device_features), reply=True)

    def _req_set_features(self, ch: Channel, req: Req, msg: Message) -> None:
        (features,) = self._payload(msg, control.U64, "SET_FEATURES")
        if self.status & S_FEATURES_OK:
            raise _Refused("features-after-ok", errno.EBUSY, "features cannot change after FEATURES_OK")
        unknown = features & ~self.device_features
        if unknown:
            raise _Refused("feature-not-offered", errno.EINVAL,
                           f"driver accepted features the device does not offer: {unknown:#x} {feature_names(unknown)}")
        self.driver_features = features
        log.info("features negotiated: %s", ", ".join(feature_names(features)))
        ch.reply_result(req)

    def _req_get_mem_table(self, ch: Channel, req: Req, msg: Message) -> None:
        regions = self.ram.layout.regions
        payload = control.MEM_TABLE_HEAD.pack(len(regions), 0) + b"".join(
            control.REGION.pack(r.gpa, r.size, r.offset) for r in regions)
        ch.send(req, payload, [self.ram.fd], reply=True)

    def _req_get_config(self, ch: Channel, req: Req, msg: Message) -> None:
        off, size = self._payload(msg, control.CONFIG_ACCESS, "GET_CONFIG")
        if off + size > CONFIG_SIZE:
            raise _Refused("config-range", errno.EINVAL, f"config read {off}+{size} beyond {CONFIG_SIZE} bytes")
        ch.send(req, control.CONFIG_ACCESS.pack(off, size) + self.read_config()[off:off + size], reply=True)

    def _req_set_config(self, ch: Channel, req: Req, msg: Message) -> None:
        off, size = self._payload(msg, control.CONFIG_ACCESS, "SET_CONFIG")
        data = msg.payload[control.CONFIG_ACCESS.size:]
        if off + size > CONFIG_SIZE:
            raise _Refused("config-range", errno.EINVAL, f"config write {off}+{size} is out of range (beyond {CONFIG_SIZE} bytes)")
        if len(data) != size:
            raise _Refused("control-truncated", errno.EINVAL,
                           f"SET_CONFIG says {size} data bytes, the request carries {len(data)}")
        self.write_config(off, data)
        ch.reply_result(req)

    def _req_set_vring(self, ch: Channel, req: Req, msg: Message) -> None:
        index, size, desc, avail, used = self._payload(msg, control.VRING, "SET_VRING")
        self._check_queue_index(index)
        if self.status & S_DRIVER_OK:
            raise _Refused("vring-after-driver-ok", errno.EBUSY, "queues cannot be set up after DRIVER_OK")
        if size == 0 or size & (size - 1) or size > MAX_QUEUE_SIZE:
            raise _Refused("vring-size", errno.EINVAL, f"queue size {size} is not a power of two <= {MAX_QUEUE_SIZE}")
        self.vrings[index] = RingLayout(size, desc, avail, used)
        ch.reply_result(req)

    def _req_set_vring_kick(self, ch: Channel, req: Req, msg: Message) -> None:
        self._set_queue_fd(msg, self.kick_fds, "SET_VRING_KICK")
        self.listener.kick_fds_changed()
        ch.reply_result(req)

    def _req_set_vring_call(self, ch: Channel, req: Req, msg: Message) -> None:
        self._set_queue_fd(msg, self.call_fds, "SET_VRING_CALL")
        ch.reply_result(req)

    def _set_queue_fd(self, msg: Message, table: dict[int, int], what: str) -> None:
        """Install a queue's eventfd (replacing and closing any earlier one)."""
        (index,) = self._payload(msg, control.U32, what)
        self._check_queue_index(index)
        fd = self._one_fd(msg)
        old = table.pop(index, None)
        if old is not None:
            os.close(old)
        table[index] = fd

    def _req_set_config_call(self, ch: Channel, req: Req, msg: Message) -> None:
        fd = self._one_fd(msg)
        if self.config_call_fd is not None:
            os.close(self.config_call_fd)
        self.config_call_fd = fd
        ch.reply_result(req)

    def _req_set_dirty_log(self, ch: Channel, req: Req, msg: Message) -> None:
        # The VMM hands the dirty log to the guest, never the other way round.
        raise _Refused("control-direction", errno.EPERM, "SET_DIRTY_LOG is sent by the VMM, not the guest")

    def _req_set_status(self, ch: Channel, req: Req, msg: Message) -> None:
        (status,) = self._payload(msg, control.U32, "SET_STATUS")
        status &= 0xFF
        if status == 0:
            self.reset()
            ch.reply_result(req)
            return
        if status & S_FEATURES_OK and not self.status & S_FEATURES_OK:
            if not status & (S_ACKNOWLEDGE | S_DRIVER):
                raise _Refused("status-order", errno.EINVAL, "FEATURES_OK before ACKNOWLEDGE|DRIVER")
        if status & S_DRIVER_OK and not self.status & S_DRIVER_OK:
            if not status & S_FEATURES_OK:
                raise _Refused("status-order", errno.EINVAL, "DRIVER_OK without FEATURES_OK")
            try:
                self.activate()
            except (RingError, BadAddress, ValueError) as e:
                self.status |= S_FAILED
                raise _Refused("activate", errno.EINVAL, f"cannot activate: {e}") from e
        self.status = (self.status & S_NEEDS_RESET) | status
        ch.reply_result(req)

    def _req_get_status(self, ch: Channel, req: Req, msg: Message) -> None:
        ch.send(req, control.U32.pack(self.status), reply=True)

    def _req_reset(self, ch: Channel, req: Req, msg: Message) -> None:
        self.reset()
        ch.reply_result(req)

    def _check_queue_index(self, index: int) -> None:
        if index >= self.NUM_QUEUES:
            raise _Refused("queue-index", errno.EINVAL, f"queue {index} does not exist")
        need = QUEUE_FEATURE.get(index)
        if need is not None and not self.has(need):
            raise _Refused("queue-not-negotiated", errno.EINVAL,
                           f"queue {index} ({QUEUE_NAMES[index]}) needs a feature that was not negotiated")

    # --- lifecycle ---------------------------------------------------------------------
    def activate(self) -> None:
        """DRIVER_OK: build the device-side queues; the ring addresses are validated here."""
        event_idx = self.has(29)
        indirect = self.has(28)
        for index, v in sorted(self.vrings.items()):
            self.queues[index] = DeviceQueue(self.ram, index, v.size, v.desc_gpa, v.avail_gpa, v.used_gpa,
                                             event_idx=event_idx, indirect=indirect)
        log.info("device live: queues %s", [QUEUE_NAMES[i] for i in sorted(self.queues)])

    def reset(self) -> None:
        self.status = 0
        self.driver_features = 0
        self.vrings.clear()
        self.queues.clear()
        for fds in (self.kick_fds, self.call_fds):
            for fd in fds.values():
                os.close(fd)
            fds.clear()
        if self.config_call_fd is not None:
            os.close(self.config_call_fd)
            self.config_call_fd = None
        self.listener.kick_fds_changed()
        self.on_reset()

    # --- for subclasses --------------------------------------------------------------------
    def read_config(self) -> bytes:
        raise NotImplementedError

    def write_config(self, offset: int, data: bytes) -> None:
        raise NotImplementedError

    def on_reset(self) -> None:
        pass


_TAKES_FD = (Req.SET_VRING_KICK, Req.SET_VRING_CALL, Req.SET_CONFIG_CALL)


class _Refused(Exception):
    def __init__(self, reason: str, err: int, message: str) -> None:
        super().__init__(message)
        self.reason, self.err, self.message = reason, err, message
