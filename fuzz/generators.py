"""Well-formed cases, with a few hostile values mixed in, for the ring and decoder targets.

Each generator takes a seeded Random and returns a case (fuzz/cases.py): a device
case is one to three requests on the inflate, deflate, stats and hint queues,
encoded by this module's own encoder (not wire.py: the device must not be checked
against its own code), sometimes split across descriptors or put in an indirect
table; the pages named are mostly fill pages with some edges, hole and out-of-range
PFNs. fuzz/mutators.py then breaks them.
"""
from __future__ import annotations

import random
import struct

import numpy as np

from device.guest.raw_guest import F_INDIRECT, F_NEXT, F_WRITE
from device.virtio.hint_format import CMD_GET_FREE_PAGES, HINT_DESIGNS
from device.virtio.layout import PAGE_SHIFT
from device.virtio.protocols import PROTOCOL_NAMES, PROTOCOLS
from fuzz.cases import (BUF_AREA, HINT_DONE, HINT_REQUEST, HINT_START, LAYOUT_WEIGHTS, LAYOUTS,
                        STATS_POLL, U64_MAX, FuzzLayout, fuzz_layout)


def interesting_u64(rng: random.Random, fl: FuzzLayout) -> int:
    r = rng.random()
    if r < 0.4:
        return rng.choice(fl.interesting_pfns()) << PAGE_SHIFT
    if r < 0.6:
        return rng.choice([0, 1, 0xFFF, 0x1000, 0x1001, (1 << 31), (1 << 32) - 1, 1 << 32, (1 << 63) - 1,
                           1 << 63, U64_MAX, U64_MAX - 0xFFF, U64_MAX - 0x1FFF, (3 << 30), (4 << 30) - 0x1000])
    if r < 0.8:
        a, n = rng.choice(fl.fill)
        return a + rng.randrange(n)
    return rng.getrandbits(64)


def interesting_len(rng: random.Random) -> int:
    return rng.choice([0, 1, 2, 3, 4, 5, 8, 15, 16, 17, 31, 32, 33, 0x1000, 0x1001, 0xFFF, 0x2000, 0x10000,
                       (1 << 31), (1 << 32) - 1, (1 << 32) - 0x1000, rng.getrandbits(32), rng.randrange(64)])


def pick_pfns(rng: random.Random, fl: FuzzLayout) -> list[int]:
    """A mostly-valid page set with a few hostile ones: runs, scattered pages, edges, hole, beyond."""
    out: list[int] = []
    for _ in range(rng.choice([1, 1, 2, 3, 4])):
        kind = rng.random()
        if kind < 0.45:
            s, n = rng.choice(fl.data_pfns())
            start = s + rng.randrange(n)
            ln = min(rng.choice([1, 2, 3, 8, 17, 64, 200]), s + n - start)
            out.extend(range(start, start + ln))
        elif kind < 0.7:
            s, n = rng.choice(fl.data_pfns())
            out.extend(s + rng.randrange(n) for _ in range(rng.randrange(1, 12)))
        elif kind < 0.9:
            out.append(rng.choice(fl.interesting_pfns()))
        else:
            out.append(rng.randrange(fl.max_pfn + 64))
    rng.shuffle(out)
    if rng.random() < 0.2 and out:
        out.append(rng.choice(out))               # a duplicate
    return out[:300]


class CaseBuilder:
    """Lays chains into a case: buffers in BUF_AREA, descriptors, avail heads."""

    def __init__(self, case: dict, rng: random.Random) -> None:
        self.case, self.rng = case, rng
        self.next_buf = BUF_AREA[0]
        self.next_desc: dict[int, int] = {}

    def buf(self, data: bytes, align: int = 16) -> int:
        g = (self.next_buf + align - 1) & ~(align - 1)
        if g + len(data) > BUF_AREA[1]:
            g = BUF_AREA[0]
        self.case["mem"].append([g, data])
        self.next_buf = g + len(data)
        return g

    def queue(self, q: int) -> dict:
        qs = self.case["queues"]
        if q not in qs:
            n = self.case["qsize"]
            qs[q] = {"desc": [[0, 0, 0, 0] for _ in range(n)], "heads": [], "last": 0, "idx": None,
                     "flags": 0, "event": 0}
            self.next_desc[q] = 0
        return qs[q]

    def chain(self, q: int, bufs: list[tuple[int, int, bool]], indirect: bool) -> None:
        qd = self.queue(q)
        n = self.case["qsize"]
        d = self.next_desc[q]
        if indirect and len(bufs) > 0:
            tbl = b"".join(struct.pack("<QIHH", a, ln, (F_WRITE if w else 0) | (F_NEXT if k + 1 < len(bufs) else 0),
                                       k + 1 if k + 1 < len(bufs) else 0)
                           for k, (a, ln, w) in enumerate(bufs))
            g = self.buf(tbl, 16)
            qd["desc"][d % n] = [g, len(tbl), F_INDIRECT, 0]
            qd["heads"].append(d % n)
            self.next_desc[q] = d + 1
            return
        head = d % n
        for k, (a, ln, w) in enumerate(bufs):
            last = k + 1 == len(bufs)
            qd["desc"][(d + k) % n] = [a, ln, (F_WRITE if w else 0) | (0 if last else F_NEXT), (d + k + 1) % n]
        qd["heads"].append(head)
        self.next_desc[q] = d + max(1, len(bufs))


def encode_request(protocol: str, pfns: list[int], rng: random.Random, b: CaseBuilder, deflate: bool
                   ) -> list[tuple[int, int, bool]]:
    """Buffers of one request in the protocol's wire format (this module's own encoder;
    which format an arm puts on the ring is the protocols table's)."""
    protocol = PROTOCOLS[protocol].wire.name
    if protocol == "pfn":
        raw = struct.pack(f"<{len(pfns)}I", *[p & 0xFFFFFFFF for p in pfns])
        g = b.buf(raw, 4)
        return _split(g, len(raw), rng)
    if protocol == "bitmap":
        if pfns:
            lo = max(0, min(pfns) - rng.choice([0, 0, 0, 1, 7, 8, 64]))
            span = max(pfns) - lo + 1
        else:
            lo, span = 0, 0
        span = min(span, 1 << 16)
        bits = np.zeros(((span + 7) // 8) * 8, dtype=np.uint8)
        for p in pfns:
            if 0 <= p - lo < span:
                bits[p - lo] = 1
        bm = np.packbits(bits, bitorder="little").tobytes()
        if rng.random() < 0.2:
            bm += bytes(rng.randrange(1, 9))           # trailing zero bytes
        shift = 12
        if rng.random() < 0.2:           # whole 2 MiB blocks, one bit each (page_shift 21)
            shift, lo = 21, lo >> 9 << 9
            blocks = sorted({(p - lo) >> 9 for p in pfns if p >= lo})
            bits = np.zeros(((blocks[-1] + 8) // 8 * 8) if blocks else 0, dtype=np.uint8)
            bits[blocks] = 1
            bm = np.packbits(bits, bitorder="little").tobytes()
        hdr = struct.pack("<HHHHQQQ", 1 if deflate else 0, shift, 0, 0, rng.randrange(1 << 16), lo, len(bm))
        g = b.buf(hdr + bm, 8)
        return _split(g, len(hdr) + len(bm), rng, first=32 if rng.random() < 0.6 else None)
    # chunks: one descriptor per run of contiguous pages
    runs: list[list[int]] = []
    for p in sorted(set(pfns)):
        if runs and runs[-1][0] + runs[-1][1] == p:
            runs[-1][1] += 1
        else:
            runs.append([p, 1])
    if rng.random() < 0.3:
        rng.shuffle(runs)
    return [(s << PAGE_SHIFT, n << PAGE_SHIFT, False) for s, n in runs]


def _split(g: int, n: int, rng: random.Random, first: int | None = None) -> list[tuple[int, int, bool]]:
    """One buffer, or the same bytes split across several descriptors."""
    cuts = set()
    if first is not None and first < n:
        cuts.add(first)
    if rng.random() < 0.3 and n > 1:
        cuts.update(rng.randrange(1, n) for _ in range(rng.randrange(1, 4)))
    pts = [0] + sorted(cuts) + [n]
    return [(g + a, c - a, False) for a, c in zip(pts, pts[1:]) if c > a] or [(g, n, False)]


def gen_hints(case: dict, b: CaseBuilder, rng: random.Random, fl: FuzzLayout, q: int) -> None:
    """A free-page-hint exchange as device/vmm/hint_queues.py describes it, mostly well formed."""
    if q == 3:          # upstream: the VMM asks (cmd_id 2), the guest sends cmd_id, blocks, STOP
        b.chain(3, [(b.buf(struct.pack("<I", rng.choice([2, 2, 2, 1, 3]))), 4, False)], False)
        for _ in range(rng.randrange(1, 4)):
            s, n = rng.choice(fl.data_pfns())
            start = s + rng.randrange(n)
            ln = rng.choice([1, 2, 16, 64])
            b.chain(3, [(start << PAGE_SHIFT, ln << PAGE_SHIFT, True)], False)
        b.chain(3, [(b.buf(struct.pack("<I", 0)), 4, False)], False)
        qd = case["queues"][3]
        case["kicks"] += [HINT_START, [3, len(qd["heads"])]] + ([HINT_DONE] if rng.random() < 0.5 else [])
        return
    # seed bitmap: the guest posts a request buffer, the VMM fills and returns it, the
    # guest answers with bitmaps (cmd 2, req_id 1, LAST on the final one)
    b.chain(5, [(b.buf(bytes(16)), 16, True)], False)
    case["kicks"] += [[5, 1], HINT_REQUEST]
    pfns = pick_pfns(rng, fl)
    bufs = encode_request("bitmap", pfns, rng, b, False)
    hdr = b.case["mem"][-1]         # the response's header + bitmap, as encode_request wrote it
    data = bytearray(hdr[1])
    struct.pack_into("<H", data, 0, CMD_GET_FREE_PAGES)
    struct.pack_into("<H", data, 4, 1 if rng.random() < 0.8 else 0)       # flags: LAST
    struct.pack_into("<Q", data, 8, rng.choice([1, 1, 1, 0, 2]))           # req_id
    hdr[1] = bytes(data)
    b.chain(5, bufs, case["indirect"] and rng.random() < 0.3)
    case["kicks"].append([5, len(case["queues"][5]["heads"])])


def gen_device(rng: random.Random) -> dict:
    lname = rng.choices(LAYOUTS, LAYOUT_WEIGHTS)[0]
    fl = fuzz_layout(lname)
    case = {"t": "device", "layout": lname, "proto": rng.choice(PROTOCOL_NAMES), "qsize": rng.choice([1, 2, 4, 8, 8, 16]),
            "hint": rng.choices(HINT_DESIGNS, (0.6, 0.2, 0.2))[0],
            "indirect": rng.random() < 0.8, "event_idx": rng.random() < 0.5, "status": "live",
            "pre": [], "queues": {}, "mem": [], "kicks": []}
    b = CaseBuilder(case, rng)
    for _ in range(rng.choice([1, 1, 2, 3])):
        r = rng.random()
        hint_q = {"upstream": 3, "bitmap": 5}.get(case["hint"])
        if r < 0.5:
            q, deflate = 0, False
        elif r < 0.7:
            q, deflate = 1, True
        elif r < 0.8:
            q, deflate = 2, False
        else:
            q, deflate = hint_q if hint_q is not None and rng.random() < 0.8 else rng.choice([3, 5]), False
        if q == 2:
            raw = b"".join(struct.pack("<HQ", rng.randrange(18), rng.getrandbits(64)) for _ in range(rng.randrange(1, 17)))
            b.chain(2, [(b.buf(raw, 2), len(raw), False)], False)
            case["kicks"] += [2] + ([STATS_POLL] if rng.random() < 0.5 else [])
            continue
        if q in (3, 5):
            gen_hints(case, b, rng, fl, q)
            continue
        pfns = pick_pfns(rng, fl)
        if deflate:
            case["pre"].extend(p for p in pfns if rng.random() < 0.8)
        bufs = encode_request(case["proto"], pfns, rng, b, deflate)
        ind = case["indirect"] and (len(bufs) > case["qsize"] or rng.random() < 0.3)
        if len(bufs) > case["qsize"] and not ind:
            bufs = bufs[:case["qsize"]]
        b.chain(q, bufs, ind)
        case["kicks"].append(q)
    for qd in case["queues"].values():
        qd["idx"] = len(qd["heads"])
    return case


# --- decoder targets ---------------------------------------------------------------------
def gen_pfn(rng: random.Random) -> dict:
    fl = fuzz_layout(rng.choice(LAYOUTS))
    p = pick_pfns(rng, fl)
    data = struct.pack(f"<{len(p)}I", *[x & 0xFFFFFFFF for x in p])
    return {"t": "pfn", "data": data, "max_pfn": rng.choice([None, fl.max_pfn])}


def gen_bitmap(rng: random.Random) -> dict:
    fl = fuzz_layout(rng.choice(LAYOUTS))
    b = CaseBuilder({"mem": [], "queues": {}, "qsize": 1}, rng)
    bufs = encode_request("bitmap", pick_pfns(rng, fl), rng, b, False)
    data = b.case["mem"][0][1]
    pieces = [data[a - bufs[0][0]: a - bufs[0][0] + ln] for a, ln, _ in bufs]
    return {"t": "bitmap", "bufs": pieces, "max_pfn": fl.max_pfn}


def gen_chunks(rng: random.Random) -> dict:
    fl = fuzz_layout(rng.choice(LAYOUTS))
    b = CaseBuilder({"mem": [], "queues": {}, "qsize": 1}, rng)
    bufs = encode_request("chunks", pick_pfns(rng, fl), rng, b, False)
    return {"t": "chunks", "chunks": [[a, ln] for a, ln, _ in bufs], "max_pfn": fl.max_pfn, "merge": rng.random() < 0.7}


def gen_ring(rng: random.Random) -> dict:
    c = gen_device(rng)
    c["t"] = "ring"
    c["layout"] = "mini" if c["layout"] == "pc" else c["layout"]
    c["max_chain"] = rng.choice([None, None, 1, 2, 3, 8, 64])
    return c

