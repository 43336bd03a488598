"""Mutations of ring, device and decoder cases: what a hostile guest changes in a valid request.

Descriptor fields (addresses at region edges, in the hole, past RAM; lengths around
page and le32 limits; every flag combination; next pointers out of range), loops,
avail heads and indices (relative to last_avail, near the 16-bit wrap), request
bytes, protocol, status and features, pre-ballooned pages, and queues spliced in from
other cases of the pool. Decoder cases get bytes, page_shift values, splits and
max_pfn changed.
"""
from __future__ import annotations

import random
import struct

from device.guest.raw_guest import F_INDIRECT, F_NEXT, F_WRITE
from device.virtio.layout import PAGE_SHIFT
from device.virtio.hint_format import HINT_DESIGNS
from device.virtio.protocols import PROTOCOL_NAMES
from fuzz.cases import QUEUES, U64_MAX, VMM_STEPS, FuzzLayout, copy_case, fuzz_layout
from fuzz.generators import interesting_len, interesting_u64, pick_pfns

PAGE_SHIFTS = (0, 11, 12, 13, 20, 21, 22, 63, 0xFFFF)   # what mutations put in a bitmap header


def mutate_bytes(rng: random.Random, data: bytes, fl: FuzzLayout) -> bytes:
    b = bytearray(data)
    op = rng.randrange(8)
    if not b or op == 0:
        b += rng.randbytes(rng.randrange(1, 9))
    elif op == 1:
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    elif op == 2:
        i = rng.randrange(len(b))
        b[i] = rng.choice([0, 1, 0x7F, 0x80, 0xFF])
    elif op == 3:
        del b[rng.randrange(len(b)):]
    elif op == 4 and len(b) >= 8:
        i = rng.randrange(len(b) - 7) & ~7 if rng.random() < 0.7 else rng.randrange(len(b) - 7)
        v = rng.choice([interesting_u64(rng, fl) >> PAGE_SHIFT, interesting_u64(rng, fl), fl.max_pfn,
                        (fl.max_pfn + 7) // 8, (fl.max_pfn + 7) // 8 + 1, len(b) - 32, len(b) - 31])
        struct.pack_into("<Q", b, i, v & U64_MAX)
    elif op == 5 and len(b) >= 4:
        i = rng.randrange(len(b) - 3) & ~3
        struct.pack_into("<I", b, i, rng.choice(fl.interesting_pfns()) & 0xFFFFFFFF)
    elif op == 6 and len(b) >= 2:
        i = rng.randrange(len(b) - 1) & ~1
        struct.pack_into("<H", b, i, rng.choice([0, 1, 11, 12, 13, 16, 0xFFFF]))
    else:
        i = rng.randrange(len(b) + 1)
        b[i:i] = rng.randbytes(rng.randrange(1, 16))
    return bytes(b)


def mutate_device(case: dict, rng: random.Random, pool: list[dict]) -> dict:
    c = copy_case(case)
    fl = fuzz_layout(c["layout"])
    for _ in range(rng.choice([1, 1, 2, 3, 4])):
        op = rng.randrange(14)
        qs = c["queues"]
        if not qs:
            qs[0] = {"desc": [[0, 0, 0, 0] for _ in range(c["qsize"])], "heads": [0], "last": 0, "idx": 1,
                     "flags": 0, "event": 0}
            c["kicks"].append(0)
        q = rng.choice(list(qs))
        qd = qs[q]
        n = c["qsize"]
        if op <= 2:                               # one descriptor field
            i = rng.randrange(n)
            f = rng.randrange(4)
            if f == 0:
                qd["desc"][i][0] = interesting_u64(rng, fl) if rng.random() < 0.7 else qd["desc"][i][0] ^ (1 << rng.randrange(64))
            elif f == 1:
                qd["desc"][i][1] = interesting_len(rng)
            elif f == 2:
                qd["desc"][i][2] = rng.choice([0, F_NEXT, F_WRITE, F_INDIRECT, F_NEXT | F_WRITE, F_NEXT | F_INDIRECT,
                                               F_INDIRECT | F_WRITE, rng.getrandbits(16)])
            else:
                qd["desc"][i][3] = rng.choice([0, i, (i + 1) % n, rng.randrange(n), n, n + 1, 0xFFFF, rng.getrandbits(16)])
        elif op == 3:                             # a loop
            i, j = rng.randrange(n), rng.randrange(n)
            qd["desc"][i][2] |= F_NEXT
            qd["desc"][i][3] = j
            qd["desc"][j][2] |= F_NEXT
            qd["desc"][j][3] = i
        elif op == 4:                             # avail heads
            if qd["heads"] and rng.random() < 0.5:
                qd["heads"][rng.randrange(len(qd["heads"]))] = rng.choice([0, n - 1, n, rng.getrandbits(16)])
            else:
                qd["heads"].append(rng.randrange(n))
        elif op == 5:                             # avail idx relative to last
            qd["idx"] = (qd["last"] + rng.choice([0, 1, 2, n, n + 1, 0x8000, 0xFFFF, rng.getrandbits(16)])) & 0xFFFF
        elif op == 6:                             # start near the 16-bit wrap
            pend = ((qd["idx"] if qd["idx"] is not None else len(qd["heads"])) - qd["last"]) & 0xFFFF
            qd["last"] = rng.choice([0xFFFF, 0xFFFE, 0xFFF0, rng.getrandbits(16)])
            qd["idx"] = (qd["last"] + pend) & 0xFFFF
        elif op <= 9 and c["mem"]:                # request bytes
            w = rng.choice(c["mem"])
            w[1] = mutate_bytes(rng, w[1], fl)
        elif op == 10:
            c["proto"] = rng.choice(PROTOCOL_NAMES)
        elif op == 11:
            r = rng.random()
            if r < 0.3:
                k = rng.choice(QUEUES + VMM_STEPS)
                c["kicks"].insert(rng.randrange(len(c["kicks"]) + 1),
                                  [k, rng.randrange(1 << 16)] if k >= 0 and rng.random() < 0.2 else k)
            elif r < 0.5 and c["kicks"]:
                c["kicks"].pop(rng.randrange(len(c["kicks"])))
            elif r < 0.7:
                c["status"] = rng.choice(["live", "no-driver-ok", "needs-reset", "live", "live"])
            elif r < 0.78:
                c["hint"] = rng.choice(HINT_DESIGNS)
            elif r < 0.85:
                c["indirect"] = not c["indirect"]
            else:
                c["event_idx"] = not c["event_idx"]
        elif op == 12:                            # pages in the balloon before the exec
            c["pre"] = [p for p in pick_pfns(rng, fl)] if rng.random() < 0.7 else []
        else:                                     # splice a queue from another case of the pool
            other = rng.choice(pool) if pool else None
            if other is not None and other.get("t") == "device" and other["queues"] and other["qsize"] == n \
                    and other["layout"] == c["layout"]:
                oq = rng.choice(list(other["queues"]))
                o2 = copy_case(other)
                qs[oq] = o2["queues"][oq]
                c["mem"] += o2["mem"]
                c["kicks"] += [k for k in o2["kicks"] if (k[0] if isinstance(k, list) else k) == oq]
        for qd2 in qs.values():
            if qd2["idx"] is None:
                qd2["idx"] = len(qd2["heads"])
    c["mem"] = c["mem"][-24:]
    return c


def mutate_decoder(case: dict, rng: random.Random, pool: list[dict]) -> dict:
    c = copy_case(case)
    fl = fuzz_layout("mini")
    for _ in range(rng.choice([1, 1, 2, 3])):
        if c["t"] == "pfn":
            c["data"] = mutate_bytes(rng, c["data"], fl)
            if rng.random() < 0.1:
                c["max_pfn"] = rng.choice([None, 0, 1, 768, 256, 1 << 20])
        elif c["t"] == "bitmap":
            r = rng.random()
            if r < 0.1:                  # page_shift values, at byte 2 of the joined request
                joined = bytearray(b"".join(c["bufs"]))
                if len(joined) >= 4:
                    joined[2:4] = struct.pack("<H", rng.choice(PAGE_SHIFTS))
                c["bufs"] = [bytes(joined)]
            elif r < 0.7 and c["bufs"]:
                k = rng.randrange(len(c["bufs"]))
                c["bufs"][k] = mutate_bytes(rng, c["bufs"][k], fl)
            elif r < 0.85:
                joined = b"".join(c["bufs"])
                if joined:
                    cut = rng.randrange(len(joined) + 1)
                    c["bufs"] = [joined[:cut], joined[cut:]]
            else:
                c["max_pfn"] = rng.choice([1, 8, 9, 256, 768, 1049600, c["max_pfn"]])
        else:
            ch = c["chunks"]
            r = rng.random()
            if r < 0.5 and ch:
                k = rng.randrange(len(ch))
                if rng.random() < 0.5:
                    ch[k][0] = interesting_u64(rng, fl)
                else:
                    ch[k][1] = rng.choice([0, 0x1000, 0x2000, 0xFFF, 0x1001, (1 << 32) - 0x1000, interesting_u64(rng, fl)])
            elif r < 0.7 and ch:
                ch.append(list(rng.choice(ch)))               # an overlap
            elif r < 0.8:
                ch.append([interesting_u64(rng, fl), interesting_len(rng)])
            elif r < 0.9:
                c["merge"] = not c["merge"]
            else:
                c["max_pfn"] = rng.choice([1, 256, 768, 1049600])
    return c

