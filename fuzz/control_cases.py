"""Control-plane cases: message sequences a hostile guest sends on the control socket.

A case is the negotiated protocol and hint design, the reply queue's depth, and its
steps: `msg` (a request, any code, any payload and size field, fds of any kind),
`raw` bytes, `serve` / `read` (the loop and the guest take turns), `flood` (requests
while replies pile up), `kick`, `inflate`, `setup` (the start-up sequence applied
directly) and `hup`. fuzz/control_target.py runs them.
"""
from __future__ import annotations

import random
import struct

from device.guest.raw_guest import RingAddrs
from device.virtio import control
from device.virtio.hint_format import HINT_DESIGNS
from device.virtio.protocols import PROTOCOL_NAMES, protocol_device_features
from device.virtio.hint_format import hint_device_features
from device.virtio.layout import GuestLayout, Region
from fuzz.regions import RamRegion, RegionTable

KiB256 = 256 << 10
FD_KINDS = ("eventfd", "memfd", "pipe", "socket", "devnull")
RING0 = 0x10000                   # where `inflate` steps put queue 0's ring (size 8) ...
REQ_BUF = 0x12000                 # ... and their request
LOW = 0x20000                     # rings and buffers the guest writes live below this
PATTERN = 0xA5                    # every other byte of guest RAM (names no RAM page in any format)
QUEUE_GPAS = (0x1000, 0x3000, 0x5000, 0x7000, 0x9000, 0xB000, RING0, KiB256 - 0x100, 2 * KiB256,
              3 * KiB256 - 0x1000, 0x4000_0000_0000)
STATUS_VALUES = (0, 1, 3, 11, 15, 4, 8, 64, 128, 0xFF, 0x10F)


REGIONS = ((0, KiB256, 0), (2 * KiB256, KiB256, KiB256))   # (gpa, size, memfd offset)


def layout() -> GuestLayout:
    """256 KiB of RAM, a 256 KiB hole, 256 KiB of RAM: small, with a hole to aim at (the
    device's table of it)."""
    return GuestLayout(tuple(Region(g, n, o) for g, n, o in REGIONS))


def regions() -> RegionTable:
    """The same guest in the fuzzer's own table (fuzz/regions.py), for the guest's writes
    and the oracle."""
    return RegionTable(tuple(RamRegion(g, n, o) for g, n, o in REGIONS))


def _payload(rng: random.Random, req: int) -> bytes:
    """A plausible payload for `req`, often slightly wrong."""
    r = rng.random()
    if r < 0.08:
        return bytes(rng.choice([0, 1, 3, 11, 4095, 4096, 4097, 4200]) * [0])[:0] + \
            rng.randbytes(rng.choice([0, 1, 3, 11, 4095, 4096, 4097, 4200]))
    if req == control.Req.SET_FEATURES:
        feats = protocol_device_features(rng.choice(PROTOCOL_NAMES)) | hint_device_features(rng.choice(HINT_DESIGNS))
        return control.U64.pack(feats if r < 0.8 else rng.getrandbits(64))
    if req == control.Req.SET_STATUS:
        return control.U32.pack(rng.choice(STATUS_VALUES))
    if req in (control.Req.GET_CONFIG, control.Req.SET_CONFIG):
        off, size = rng.choice([(4, 4), (0, 16), (12, 4), (12, 8), (16, 0), (0, 0), (rng.randrange(20), rng.randrange(20))])
        data = b"" if req == control.Req.GET_CONFIG else rng.randbytes(size if rng.random() < 0.8 else rng.randrange(24))
        return control.CONFIG_ACCESS.pack(off, size) + data
    if req == control.Req.SET_VRING:
        q = rng.choice([0, 1, 2, 3, 5, 4, 6, 7])
        size = rng.choice([8, 8, 1, 2, 256, 32768, 0, 3, 65536])
        base = rng.choice(QUEUE_GPAS)
        a = RingAddrs.at(base, max(size, 1)) if size and not size & (size - 1) and size <= 32768 else \
            RingAddrs(size, base, base + 16 * 8, base + 0x100)
        return control.VRING.pack(q, size, a.desc, a.avail, a.used)
    if req in (control.Req.SET_VRING_KICK, control.Req.SET_VRING_CALL):
        return control.U32.pack(rng.choice([0, 1, 2, 3, 5, 6, 1 << 31]))
    if req == control.Req.SET_DIRTY_LOG:
        return struct.pack("<QQQQ", 768, 4096, 0, 8192)
    return b"" if r < 0.9 else rng.randbytes(rng.randrange(16))


def _fds_for(rng: random.Random, req: int) -> list[str]:
    takes = req in (control.Req.SET_VRING_KICK, control.Req.SET_VRING_CALL, control.Req.SET_CONFIG_CALL, control.Req.SET_DIRTY_LOG)
    if takes and rng.random() < 0.85:
        return ["eventfd"] if req != control.Req.SET_DIRTY_LOG else ["memfd"]
    if rng.random() < 0.1:
        return [rng.choice(FD_KINDS) for _ in range(rng.choice([1, 2, 8]))]
    return []


def _msg(rng: random.Random, req: int | None = None) -> list:
    if req is None:
        req = rng.choice(list(range(1, 14)) + [0, 14, 99, 0xFFFFFFFF])
    payload = _payload(rng, req)
    flags = control.VERSION
    if rng.random() < 0.05:
        flags = rng.choice([0, 2, 3, control.VERSION | control.FLAG_REPLY, 0xFFFFFFFF])
    size = None if rng.random() < 0.93 else rng.choice([0, len(payload) + 1, max(0, len(payload) - 1), 4097, 1 << 31])
    return ["msg", req, flags, size, payload.hex(), _fds_for(rng, req)]


def ring_base(q: int) -> int:
    return RING0 if q == 0 else 0x1000 + 0x2000 * q


def _setup_steps(rng: random.Random, queues: list[int]) -> list[list]:
    """A valid start-up sequence (docs/PROTOCOL.md), so executions reach DRIVER_OK."""
    R = control.Req
    st = [["msg", R.SET_STATUS, 1, None, control.U32.pack(3).hex(), []],
          ["msg", R.SET_FEATURES, 1, None, "@offered", []],
          ["msg", R.SET_STATUS, 1, None, control.U32.pack(11).hex(), []],
          ["msg", R.SET_CONFIG_CALL, 1, None, "", ["eventfd"]]]
    for q in queues:
        a = RingAddrs.at(ring_base(q), 8)
        st += [["msg", R.SET_VRING, 1, None, control.VRING.pack(q, 8, a.desc, a.avail, a.used).hex(), []],
               ["msg", R.SET_VRING_KICK, 1, None, control.U32.pack(q).hex(), ["eventfd"]],
               ["msg", R.SET_VRING_CALL, 1, None, control.U32.pack(q).hex(), ["eventfd"]]]
    st.append(["msg", R.SET_STATUS, 1, None, control.U32.pack(15).hex(), []])
    return st


def control_step(rng: random.Random) -> list:
    r = rng.random()
    if r < 0.45:
        return _msg(rng)
    if r < 0.55:
        return ["raw", rng.randbytes(rng.choice([0, 1, 11, 12, 13, 100, 4108, 4109, 4609, 9000])).hex()]
    if r < 0.65:
        return ["serve", rng.choice([1, 2, 5, 20])]
    if r < 0.75:
        return ["read", rng.choice([0, 1, 5, 1000])]
    if r < 0.82:
        return ["flood", rng.choice([10, 40, 100])]            # requests, replies left unread
    if r < 0.90:
        return ["kick", rng.choice([0, 1, 2, 3, 5])]
    if r < 0.97:
        return ["inflate", sorted(rng.sample(range(0, 200), rng.choice([1, 2, 16])))]
    return ["hup"]


def gen_control(rng: random.Random) -> dict:
    queues = rng.choice([[0, 1], [0, 1, 2], [0], [0, 1, 2, 3, 5]])
    r = rng.random()
    steps = [["setup", queues]] if r < 0.7 else _setup_steps(rng, queues) if r < 0.85 else []
    steps += [control_step(rng) for _ in range(rng.choice([1, 2, 4, 8, 16]))]
    return {"t": "control", "proto": rng.choice(PROTOCOL_NAMES), "hint": rng.choice(HINT_DESIGNS),
            "max_queued": rng.choice([1, 2, 8, 64]), "steps": steps}


def copy_steps(steps: list[list]) -> list[list]:
    """Copy a case's steps (each a list; a msg step's fd kinds too): a cheap deep copy."""
    return [[*st[:5], list(st[5])] if st[0] == "msg" else list(st) for st in steps]


def mutate_control(case: dict, rng: random.Random, pool: list[dict]) -> dict:
    c = dict(case, steps=copy_steps(case["steps"]))
    steps = c["steps"]
    for _ in range(rng.choice([1, 1, 2, 4])):
        r = rng.random()
        if r < 0.3 or not steps:
            steps.insert(rng.randrange(len(steps) + 1), control_step(rng))
        elif r < 0.45:
            del steps[rng.randrange(len(steps))]
        elif r < 0.6:
            i, j = rng.randrange(len(steps)), rng.randrange(len(steps))
            steps[i], steps[j] = steps[j], steps[i]
        elif r < 0.75:
            s = steps[rng.randrange(len(steps))]
            if s[0] == "msg" and s[4] != "@offered":
                b = bytearray(bytes.fromhex(s[4]))
                if b:
                    b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
                s[4] = bytes(b).hex()
        elif r < 0.85 and pool:
            other = rng.choice(pool)["steps"]
            if other:
                k = rng.randrange(len(other))
                steps[rng.randrange(len(steps) + 1):0] = copy_steps(other[k:k + rng.choice([1, 3, 8])])
        else:
            c["max_queued"] = rng.choice([1, 2, 8, 64])
    del steps[200:]
    return c

