"""The control protocol against the real device model over a real SEQPACKET socket pair."""
from __future__ import annotations

import os
import socket

import numpy as np
import pytest

from device.virtio import control
from device.virtio.control import Channel, ControlError, Req
from device.virtio.features import (F_PAGE_BITMAP, F_PAGE_CHUNKS, F_STATS_VQ, Q_FREE_PAGE, Q_INFLATE, Q_MISC, S_ACKNOWLEDGE,
                             S_DRIVER, S_DRIVER_OK, S_FEATURES_OK, bit)
from device.virtio.protocols import protocol_device_features
from device.rig import DeviceRig


class DeviceOverControlSocket:
    """The device serving one request at a time from the driver's channel."""

    def __init__(self, protocol: str = "pfn", mib: int = 64) -> None:
        self.rig = DeviceRig(mib=mib, protocol=protocol)      # a device that nothing set up yet
        self.ram, self.dev = self.rig.ram, self.rig.device
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.drv, self.devch = Channel(a), Channel(b)

    def call(self, req: Req, payload: bytes = b"", fds: list[int] | None = None) -> control.Message:
        self.drv.send(req, payload, fds)
        self.dev.handle(self.devch, self.devch.recv())
        return self.drv.recv()

    def result(self, req: Req, payload: bytes = b"", fds: list[int] | None = None) -> tuple[int, str]:
        return control.unpack_result(self.call(req, payload, fds).payload)

    def close(self) -> None:
        self.drv.close()
        self.devch.close()
        self.rig.close()


@pytest.fixture
def pair():
    p = DeviceOverControlSocket()
    yield p
    p.close()


def test_features_offered_by_protocol(pair):
    feats = control.U64.unpack(pair.call(Req.GET_FEATURES).payload)[0]
    assert feats & bit(F_STATS_VQ)
    assert not feats & (bit(F_PAGE_BITMAP) | bit(F_PAGE_CHUNKS))
    assert protocol_device_features("bitmap") & bit(F_PAGE_BITMAP)
    assert protocol_device_features("chunks") & bit(F_PAGE_CHUNKS)


def test_unknown_feature_refused(pair):
    code, reason = pair.result(Req.SET_FEATURES, control.U64.pack(bit(F_PAGE_BITMAP) | bit(40)))
    assert code < 0 and "does not offer" in reason
    assert pair.dev.errors["feature-not-offered"] == 1
    assert pair.dev.driver_features == 0          # nothing half-accepted
    code, _ = pair.result(Req.SET_FEATURES, control.U64.pack(bit(F_STATS_VQ)))
    assert code == 0 and pair.dev.driver_features == bit(F_STATS_VQ)


def test_status_order_enforced(pair):
    code, reason = pair.result(Req.SET_STATUS, control.U32.pack(S_DRIVER_OK | S_ACKNOWLEDGE | S_DRIVER))
    assert code < 0 and "FEATURES_OK" in reason
    assert not pair.dev.status & S_DRIVER_OK


def test_queue_of_unnegotiated_feature_refused(pair):
    pair.result(Req.SET_FEATURES, control.U64.pack(0))
    for q in (Q_FREE_PAGE, Q_MISC):
        code, reason = pair.result(Req.SET_VRING, control.VRING.pack(q, 256, 0x10000, 0x11000, 0x12000))
        assert code < 0 and "not negotiated" in reason
    code, reason = pair.result(Req.SET_VRING, control.VRING.pack(7, 256, 0x10000, 0x11000, 0x12000))
    assert code < 0 and "does not exist" in reason
    code, reason = pair.result(Req.SET_VRING, control.VRING.pack(Q_INFLATE, 100, 0x10000, 0x11000, 0x12000))
    assert code < 0 and "power of two" in reason


def test_ring_outside_ram_fails_activation():
    p = DeviceOverControlSocket(mib=64)
    try:
        p.result(Req.SET_STATUS, control.U32.pack(S_ACKNOWLEDGE | S_DRIVER))
        p.result(Req.SET_FEATURES, control.U64.pack(0))
        p.result(Req.SET_STATUS, control.U32.pack(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK))
        beyond = 64 << 20
        assert p.result(Req.SET_VRING, control.VRING.pack(Q_INFLATE, 256, beyond, beyond + 4096, beyond + 8192))[0] == 0
        code, reason = p.result(Req.SET_STATUS, control.U32.pack(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK))
        assert code < 0 and "cannot activate" in reason
        assert not p.dev.live
    finally:
        p.close()


def test_mem_table_hands_over_the_memfd():
    p = DeviceOverControlSocket(mib=6144)
    try:
        msg = p.call(Req.GET_MEM_TABLE)
        n, _ = control.MEM_TABLE_HEAD.unpack_from(msg.payload)
        regions = [control.REGION.unpack_from(msg.payload, 8 + 24 * i) for i in range(n)]
        assert regions == [(0, 3 << 30, 0), (4 << 30, 3 << 30, 3 << 30)]
        assert len(msg.fds) == 1
        os.pwrite(msg.fds[0], b"x" * 4096, 3 << 30)       # the guest's write is the VMM's memory
        assert bytes(p.ram.view(4 << 30, 4)) == b"xxxx"
        os.close(msg.fds[0])
    finally:
        p.close()


def test_config_space_driver_cannot_set_target(pair):
    pair.dev.set_target_pages(1234)
    code, _ = pair.result(Req.SET_CONFIG, control.CONFIG_ACCESS.pack(0, 8) + control.U32.pack(99) + control.U32.pack(77))
    assert code == 0
    assert pair.dev.config.num_pages == 1234 and pair.dev.config.actual == 77
    raw = pair.call(Req.GET_CONFIG, control.CONFIG_ACCESS.pack(0, 8)).payload[8:]
    assert np.frombuffer(raw, "<u4").tolist() == [1234, 77]
    code, reason = pair.result(Req.SET_CONFIG, control.CONFIG_ACCESS.pack(12, 8) + b"\0" * 8)
    assert code < 0 and "out of range" in reason


def test_malformed_packets(pair):
    pair.drv.sock.send(b"\x01\x00")                                    # truncated header
    with pytest.raises(ControlError, match="truncated"):
        pair.devch.recv()
    pair.drv.sock.send(control.HEADER.pack(1, 1, 50) + b"x")                 # size lies
    with pytest.raises(ControlError, match="header says 50 payload bytes, the packet carries 1"):
        pair.devch.recv()
    code, reason = pair.result(99)
    assert code < 0 and "unknown request" in reason
