"""Balloon wire formats: round trips (incl. runs at the 3 GiB hole edges of a 6144 MiB
guest), properties over random PFN sets, and every refusal with its reason code."""
from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device.virtio.layout import GiB, GuestLayout
from device.virtio.wire import (
    BITMAP_HEADER_SIZE,
    MAX_CHUNK_BYTES,
    BitmapHeader,
    WireError,
    bitmap_to_runs,
    check_runs_in_ram,
    chunk_requests,
    chunks_to_runs,
    decode_bitmap,
    decode_pfns,
    encode_bitmap_requests,
    encode_pfns,
    encode_pfns_into,
    pfns_to_runs,
    run_length_hist,
    run_length_pages_hist,
    runs_to_chunk_arrays,
    runs_to_chunks,
    runs_to_pfns,
)

LAYOUT = GuestLayout.pc(6144)  # RAM PFNs [0, 786432) and [1048576, 1835008)
MAX_PFN = LAYOUT.max_pfn
EDGE_LO = (3 * GiB) >> 12  # first hole PFN
EDGE_HI = (4 * GiB) >> 12  # first PFN of the high region


def edge_pfns() -> np.ndarray:
    """Runs that end exactly at the 3 GiB edge and start exactly at 4 GiB, plus
    scattered singles and a long run, all RAM."""
    return np.concatenate([
        np.arange(EDGE_LO - 1000, EDGE_LO), np.arange(EDGE_HI, EDGE_HI + 777),
        np.array([0, 2, 4, 5, 6, EDGE_LO - 2000, MAX_PFN - 1]), np.arange(10_000, 75_000),
    ])


def reason(excinfo) -> str:
    return excinfo.value.reason


ram_pfn_sets = st.lists(
    st.integers(0, EDGE_LO - 1) | st.integers(EDGE_HI, MAX_PFN - 1)
    | st.integers(EDGE_LO - 70, EDGE_LO - 1) | st.integers(EDGE_HI, EDGE_HI + 70),
    max_size=400,
).map(lambda xs: np.array(xs, dtype=np.int64))


def with_runs(pfns: np.ndarray) -> np.ndarray:
    """Widen some PFNs into short runs so sets have real contiguity."""
    if pfns.size == 0:
        return pfns
    ext = np.concatenate([pfns] + [pfns[::k] + k for k in range(1, 9)])
    return ext[LAYOUT.ram_pfn_mask(ext)]


def merged(starts, lengths):
    return pfns_to_runs(runs_to_pfns(starts, lengths))


# --- runs -----------------------------------------------------------------------------------------
def test_runs_basics():
    s, ln = pfns_to_runs([7, 3, 4, 5, 5, 10, 11, 1])
    assert s.tolist() == [1, 3, 7, 10] and ln.tolist() == [1, 3, 1, 2]
    assert runs_to_pfns(s, ln).tolist() == [1, 3, 4, 5, 7, 10, 11]
    e = pfns_to_runs(np.array([], dtype=np.uint32))
    assert e[0].size == 0 and e[1].size == 0 and runs_to_pfns(*e).size == 0
    s, ln = pfns_to_runs(edge_pfns())
    assert (EDGE_LO - 1000, 1000) in zip(s.tolist(), ln.tolist())
    assert (EDGE_HI, 777) in zip(s.tolist(), ln.tolist())


@settings(max_examples=200, deadline=None)
@given(ram_pfn_sets)
def test_runs_property(pfns):
    pfns = with_runs(pfns)
    s, ln = pfns_to_runs(pfns)
    assert np.array_equal(runs_to_pfns(s, ln), np.unique(pfns))
    assert (ln >= 1).all()
    if s.size > 1:
        assert (s[1:] > s[:-1] + ln[:-1]).all()  # sorted, maximal (never adjacent)


def test_run_length_hists():
    ln = np.array([1, 1, 2, 3, 4, 7, 8, 1000, 1024, 262144])
    assert run_length_hist(ln) == {1: 2, 2: 2, 4: 2, 8: 1, 512: 1, 1024: 1, 262144: 1}
    assert run_length_pages_hist(ln) == {1: 2, 2: 5, 4: 11, 8: 8, 512: 1000, 1024: 1024, 262144: 262144}
    assert run_length_hist([]) == {} and run_length_pages_hist([]) == {}
    with pytest.raises(WireError) as e:
        run_length_hist([3, 0])
    assert reason(e) == "bad-runs"


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 1 << 40), min_size=1, max_size=200))
def test_run_length_hist_property(lengths):
    h, p = run_length_hist(lengths), run_length_pages_hist(lengths)
    assert sum(h.values()) == len(lengths) and sum(p.values()) == sum(lengths)
    assert h.keys() == p.keys()
    for b in h:
        inside = [x for x in lengths if b <= x < 2 * b]
        assert b & (b - 1) == 0 and h[b] == len(inside) and p[b] == sum(inside)


# --- pfn format --------------------------------------------------------------------------------------
def test_pfn_round_trip_and_layout():
    pfns = edge_pfns()
    buf = encode_pfns(pfns)
    assert len(buf) == 4 * pfns.size and struct.unpack_from("<I", buf, 4 * 1000)[0] == EDGE_HI
    out = decode_pfns(buf, max_pfn=MAX_PFN)
    assert out.dtype == np.uint32 and np.array_equal(out, pfns)
    # split across buffers, as a chain could carry it
    assert np.array_equal(decode_pfns([buf[:6], memoryview(buf)[6:100], bytearray(buf[100:])]), pfns)
    dst = bytearray(len(buf) + 8)
    assert encode_pfns_into(memoryview(dst), pfns) == len(buf) and bytes(dst[: len(buf)]) == buf


@settings(max_examples=200, deadline=None)
@given(ram_pfn_sets.filter(lambda a: a.size > 0))
def test_pfn_property(pfns):
    assert np.array_equal(decode_pfns(encode_pfns(pfns), max_pfn=MAX_PFN), pfns)


def test_pfn_refusals():
    for bad in ([1 << 32], [-1], [0, 5, 2**40]):
        with pytest.raises(WireError) as e:
            encode_pfns(np.array(bad, dtype=np.int64))
        assert reason(e) == "pfn-range"
    with pytest.raises(WireError) as e:
        encode_pfns(np.array([1.5]))
    assert reason(e) == "bad-type"
    for buf in (b"", b"\0" * 7, [b"\0\0", b"\0"]):
        with pytest.raises(WireError) as e:
            decode_pfns(buf)
        assert reason(e) == "pfn-array-len"
    with pytest.raises(WireError) as e:
        decode_pfns(encode_pfns([1, MAX_PFN]), max_pfn=MAX_PFN)
    assert reason(e) == "beyond-ram"
    with pytest.raises(WireError) as e:
        encode_pfns_into(bytearray(7), [1, 2])
    assert reason(e) == "buffer-small"


# --- bitmap format ----------------------------------------------------------------------------------------
def decode_all(reqs, **kw):
    runs = [decode_bitmap(r, max_pfn=MAX_PFN, **kw)[1:] for r in reqs]
    if not runs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return merged(np.concatenate([s for s, _ in runs]), np.concatenate([ln for _, ln in runs]))


@pytest.mark.parametrize("ppr", [1, 7, 8, 4096, 32768, 1 << 18, 1 << 20, 1 << 21])
def test_bitmap_round_trip_hole_edges(ppr):
    pfns = edge_pfns()
    if ppr < 64:  # thousands of requests per 1000 pages: keep the set small (edges kept)
        pfns = pfns[(pfns < 20_000) | (pfns >= EDGE_LO - 1000)]
    reqs = encode_bitmap_requests(pfns, pages_per_request=ppr, cmd=3, req_id_start=100)
    s, ln = decode_all(reqs)
    es, eln = pfns_to_runs(pfns)
    assert np.array_equal(s, es) and np.array_equal(ln, eln)
    u = np.unique(pfns)
    for k, r in enumerate(reqs):
        h = BitmapHeader.unpack(r)
        assert (h.cmd, h.page_shift, h.flags, h.reserved, h.req_id) == (3, 12, 0, 0, 100 + k)
        in_win = u[(u // ppr) == h.start_pfn // ppr]
        assert h.start_pfn == in_win[0]  # starts at the lowest set PFN of its window
        assert h.bmap_len == len(r) - BITMAP_HEADER_SIZE == (in_win[-1] - in_win[0]) // 8 + 1
        assert r[-1] != 0  # trailing zero bytes trimmed
    assert len(reqs) == np.unique(u // ppr).size  # one per non-empty window, none for empty ones


def test_bitmap_bit_order_and_header_layout():
    [r] = encode_bitmap_requests([100, 101, 108, 115], pages_per_request=4096, cmd=1, req_id_start=9)
    assert r[:BITMAP_HEADER_SIZE] == struct.pack("<HHHHQQQ", 1, 12, 0, 0, 9, 100, 2)
    assert r[BITMAP_HEADER_SIZE:] == bytes([0b00000011, 0b10000001])  # bit i%8 of byte i//8, LSB first
    s, ln = bitmap_to_runs(np.frombuffer(bytes([0b11110000, 0b00000001, 0, 0x80]), np.uint8))
    assert s.tolist() == [4, 31] and ln.tolist() == [5, 1]


bitmaps = st.lists(
    st.sampled_from([b"\0" * 40, b"\xff" * 40, b"\x80", b"\x01", b"\x7f", b"\xfe"]) | st.binary(min_size=1, max_size=30),
    max_size=60,
).map(lambda parts: np.frombuffer(b"".join(parts), dtype=np.uint8))


@settings(max_examples=300, deadline=None)
@given(bitmaps)
def test_bitmap_to_runs_property(b):
    """Every path (small, sparse/dense byte scan, busy fallback) against runs of the
    set-bit positions computed independently."""
    s, ln = bitmap_to_runs(b)
    es, eln = pfns_to_runs(np.flatnonzero(np.unpackbits(b, bitorder="little")))
    assert s.dtype == np.int64 and ln.dtype == np.int64
    assert np.array_equal(s, es) and np.array_equal(ln, eln)


def test_bitmap_split_across_descriptors():
    pfns = edge_pfns()
    reqs = encode_bitmap_requests(pfns, pages_per_request=1 << 20, cmd=0)
    for r in reqs:
        whole = decode_bitmap(r, max_pfn=MAX_PFN)
        for cuts in ([32], [5], [17, 33, 40], [31, 32, 33]):
            cuts = [c for c in cuts if c < len(r)]
            parts = [r[a:b] for a, b in zip([0] + cuts, cuts + [len(r)])]
            h, s, ln = decode_bitmap([memoryview(p) for p in parts], max_pfn=MAX_PFN)
            assert h == whole[0] and np.array_equal(s, whole[1]) and np.array_equal(ln, whole[2])


@settings(max_examples=150, deadline=None)
@given(ram_pfn_sets, st.sampled_from([8, 64, 1000, 4096, 32768, 1 << 20]))
def test_bitmap_property(pfns, ppr):
    pfns = with_runs(pfns)
    s, ln = decode_all(encode_bitmap_requests(pfns, pages_per_request=ppr, cmd=0))
    es, eln = pfns_to_runs(pfns)
    assert np.array_equal(s, es) and np.array_equal(ln, eln)


def hdr(start=0, bmap_len=1, page_shift=12) -> bytes:
    return BitmapHeader(0, page_shift, 0, 0, 1, start, bmap_len).pack()


def test_bitmap_refusals():
    cases = [
        (hdr()[:31], "truncated-header"),
        ([hdr()[:10], hdr()[10:20]], "truncated-header"),
        (b"", "truncated-header"),
        (hdr(page_shift=21) + b"\1", "bad-page-shift"),
        (hdr(bmap_len=2) + b"\1", "bitmap-len"),
        (hdr(bmap_len=1) + b"\1\0", "bitmap-len"),
        (hdr(bmap_len=(MAX_PFN + 7) // 8 + 1), "bitmap-too-large"),
        (hdr(bmap_len=1 << 63), "bitmap-too-large"),
        (hdr(start=MAX_PFN - 3, bmap_len=1) + b"\x10", "beyond-ram"),  # bit 4 -> PFN MAX_PFN+1
        (hdr(start=MAX_PFN - 3, bmap_len=1) + b"\x08", "beyond-ram"),  # bit 3 -> PFN MAX_PFN
        (hdr(start=(1 << 64) - 1, bmap_len=1) + b"\x01", "beyond-ram"),
    ]
    for buf, why in cases:
        with pytest.raises(WireError) as e:
            decode_bitmap(buf, max_pfn=MAX_PFN)
        assert reason(e) == why, (buf, str(e.value))
    # bits beyond max_pfn that are clear are fine; the last RAM PFN is fine
    h, s, ln = decode_bitmap(hdr(start=MAX_PFN - 3, bmap_len=1) + b"\x07", max_pfn=MAX_PFN)
    assert s.tolist() == [MAX_PFN - 3] and ln.tolist() == [3]
    with pytest.raises(WireError) as e:
        decode_bitmap(hdr(page_shift=12) + b"\1", max_pfn=MAX_PFN, expected_page_shift=21)
    assert reason(e) == "bad-page-shift"
    # an empty bitmap is a request for no pages
    h, s, ln = decode_bitmap(hdr(bmap_len=0), max_pfn=MAX_PFN)
    assert s.size == 0 and h.bmap_len == 0


# --- chunks format ---------------------------------------------------------------------------------------------
def test_chunks_round_trip_hole_edges():
    s, ln = pfns_to_runs(edge_pfns())
    chunks = runs_to_chunks(s, ln)
    assert ((EDGE_LO - 1000) << 12, 1000 << 12) in chunks and (4 * GiB, 777 << 12) in chunks
    assert all(isinstance(g, int) and isinstance(n, int) for g, n in chunks)
    cs, cl = chunks_to_runs(chunks, max_pfn=MAX_PFN)
    assert np.array_equal(cs, s) and np.array_equal(cl, ln)
    check_runs_in_ram(cs, cl, LAYOUT)
    # the same via the array form a DescChain hands over
    g, n = runs_to_chunk_arrays(s, ln)
    cs2, cl2 = chunks_to_runs(np.column_stack((g, n)).astype(np.uint64), max_pfn=MAX_PFN)
    assert np.array_equal(cs2, s) and np.array_equal(cl2, ln)


def test_chunks_merge_adjacent_and_split_long():
    # sent adjacent and out of order: merged into one run unless merge=False
    chunks = [(0x3000, 0x2000), (0x1000, 0x2000), (0x10000, 0x1000)]
    s, ln = chunks_to_runs(chunks, max_pfn=MAX_PFN)
    assert s.tolist() == [1, 16] and ln.tolist() == [4, 1]
    s, ln = chunks_to_runs(chunks, max_pfn=MAX_PFN, merge=False)
    assert s.tolist() == [3, 1, 16] and ln.tolist() == [2, 2, 1]
    # a run longer than one descriptor can carry is split into <= MAX_CHUNK_BYTES pieces
    big = 3 * (MAX_CHUNK_BYTES >> 12) + 5
    chunks = runs_to_chunks([7], [big])
    assert [n for _, n in chunks] == [MAX_CHUNK_BYTES] * 3 + [5 << 12]
    assert chunks[1][0] == (7 << 12) + MAX_CHUNK_BYTES
    s, ln = chunks_to_runs(chunks, max_pfn=1 << 30)
    assert s.tolist() == [7] and ln.tolist() == [big]
    small = runs_to_chunks([0, 100], [10, 3], max_chunk_bytes=4 << 12)
    assert small == [(0, 4 << 12), (4 << 12, 4 << 12), (8 << 12, 2 << 12), (100 << 12, 3 << 12)]


@settings(max_examples=200, deadline=None)
@given(ram_pfn_sets, st.integers(1, 64))
def test_chunks_property(pfns, max_pages):
    pfns = with_runs(pfns)
    s, ln = pfns_to_runs(pfns)
    chunks = runs_to_chunks(s, ln, max_chunk_bytes=max_pages << 12)
    assert all(0 < n <= max_pages << 12 for _, n in chunks)
    rng = np.random.default_rng(len(chunks))
    shuffled = [chunks[i] for i in rng.permutation(len(chunks))]
    cs, cl = chunks_to_runs(shuffled, max_pfn=MAX_PFN)
    assert np.array_equal(cs, s) and np.array_equal(cl, ln)


def test_chunk_refusals():
    cases = [
        ([(0x1000, 0)], "zero-length"),
        ([(0x1001, 0x1000)], "unaligned"),
        ([(0x1000, 0x1800)], "unaligned"),
        ([((1 << 64) - 0x1000, 0x2000)], "overflow"),
        ([(MAX_PFN << 12, 0x1000)], "beyond-ram"),
        ([((MAX_PFN - 1) << 12, 0x2000)], "beyond-ram"),
        ([(0x1000, 0x3000), (0x3000, 0x1000)], "overlap"),
        ([(0x5000, 0x1000), (0x5000, 0x1000)], "overlap"),
        ([(-4096, 4096)], "bad-chunks"),
        ([(1 << 64, 4096)], "bad-chunks"),
        (np.array([[-4096, 4096]]), "bad-chunks"),
        (np.array([1, 2, 3]), "bad-chunks"),
    ]
    for chunks, why in cases:
        with pytest.raises(WireError) as e:
            chunks_to_runs(chunks, max_pfn=MAX_PFN)
        assert reason(e) == why, (chunks, str(e.value))
    s, ln = chunks_to_runs([((MAX_PFN - 1) << 12, 0x1000)], max_pfn=MAX_PFN)  # last RAM page is fine
    assert s.tolist() == [MAX_PFN - 1]
    assert chunks_to_runs([], max_pfn=MAX_PFN)[0].size == 0


def test_check_runs_in_ram():
    check_runs_in_ram([EDGE_LO - 10, EDGE_HI, MAX_PFN - 1], [10, 5, 1], LAYOUT)
    for s, ln in (([EDGE_LO - 10], [11]), ([EDGE_LO + 5], [1]), ([EDGE_HI - 1], [2]), ([MAX_PFN - 1], [2]),
                  ([5], [0])):
        with pytest.raises(WireError) as e:
            check_runs_in_ram(s, ln, LAYOUT)
        assert reason(e) == "not-ram"


def test_chunk_requests():
    nb = np.array([4096] * 1000 + [3 << 30, 2 << 30, 4096], dtype=np.int64)
    reqs = chunk_requests(np.zeros(nb.size), nb, max_chunks=256)
    assert reqs[0] == (0, 256) and reqs[-1][1] == nb.size
    assert all(b > a for a, b in reqs) and all(reqs[k][1] == reqs[k + 1][0] for k in range(len(reqs) - 1))
    assert all(b - a <= 256 and nb[a:b].sum() <= 1 << 32 for a, b in reqs)
    assert not any(a <= 1000 and 1001 < b for a, b in reqs)  # 3 GiB + 2 GiB may not share a request
    with pytest.raises(WireError) as e:
        chunk_requests(np.zeros(1), np.array([(1 << 32) + 4096]), max_chunks=4)
    assert reason(e) == "too-long"


def test_gib_scale_round_trip():
    """1 GiB of fragmented pages (262144 PFNs, every third page missing): all three
    formats round-trip; this would take minutes with a Python loop per page."""
    all_pfns = np.arange(EDGE_LO - 300_000, EDGE_LO)
    pfns = np.concatenate([all_pfns[all_pfns % 3 != 0], np.arange(EDGE_HI, EDGE_HI + 62_144)])
    es, eln = pfns_to_runs(pfns)
    assert np.array_equal(decode_pfns(encode_pfns(pfns)), pfns)
    s, ln = decode_all(encode_bitmap_requests(pfns, pages_per_request=32768, cmd=0))
    assert np.array_equal(s, es) and np.array_equal(ln, eln)
    cs, cl = chunks_to_runs(np.column_stack(runs_to_chunk_arrays(es, eln)), max_pfn=MAX_PFN)
    assert np.array_equal(cs, es) and np.array_equal(cl, eln)
    assert run_length_hist(eln) == {2: 100_000, 32768: 1}
