"""The decoder targets (pfn, bitmap, chunks): the wire decoders against the reference decoders.

wire.decode_pfns, wire.decode_bitmap and wire.chunks_to_runs are run on generated and
mutated requests; each result (refusal reason, or the pages / runs decoded) must equal
what fuzz/reference_decoders.py reads from the same bytes. A refusal reason the
format does not know, an accepted request the format refuses, a refused request it
allows, or different pages, is a crash.
"""
from __future__ import annotations

import numpy as np

from device.virtio import wire
from device.virtio.layout import PAGE_SHIFT
from fuzz.cases import Outcome
from fuzz.reference_decoders import merge_spans, ref_bitmap, ref_chunks
from fuzz.time_limit import guarded
from fuzz.wakeups import Wakeups

WIRE_REASONS = {"pfn-array-len", "pfn-range", "truncated-header", "bad-page-shift", "bitmap-len",
                "bitmap-too-large", "beyond-ram", "unaligned", "zero-length", "overflow", "overlap",
                "bad-chunks", "not-ram", "bad-type", "unaligned-start"}


def run_decoder(case: dict, limit_s: float) -> Outcome:
    """One decode of one request, as one wake-up of the VMM makes it (a chain is never
    split), timed against the wake-up bound (fuzz/wakeups.py)."""
    t = case["t"]
    wake = Wakeups()
    check = {"pfn": _check_pfn, "bitmap": _check_bitmap}.get(t, _check_chunks)
    checked, failure, detail = guarded(lambda: check(case, wake), limit_s)
    reason = "ok"
    if checked is not None:
        reason, failure, detail = checked
    if failure is None and wake.failure() is not None:
        failure, detail = wake.failure()
    return Outcome((t, reason), failure, detail)


def _check_pfn(case: dict, wake: Wakeups):
    data, mx = case["data"], case["max_pfn"]
    try:
        with wake.timed(f"decoding a {len(data)}-byte PFN array"):
            got = wire.decode_pfns(data, max_pfn=mx)
    except wire.WireError as e:
        ok_reason = e.reason in WIRE_REASONS
        return e.reason, None if ok_reason else "crash", "" if ok_reason else f"unknown reason {e.reason}"
    ref = np.frombuffer(data[: len(data) // 4 * 4], dtype="<u4")
    if len(data) == 0 or len(data) % 4:
        return "ok", "crash", f"accepted a {len(data)}-byte PFN array"
    if not np.array_equal(got, ref):
        return "ok", "crash", "decoded PFNs differ from the bytes"
    if mx is not None and got.size and int(got.max()) >= mx:
        return "ok", "crash", f"accepted PFN {int(got.max())} >= max_pfn {mx}"
    return "ok", None, ""


def _against_reference(decode, ref_reason: str | None, wake: Wakeups, what: str):
    """Run the device's decoder (timed as one wake-up's work); its refusal must match the
    reference decoder's. Returns (verdict, None) when that settles the case, else (None,
    what it decoded)."""
    try:
        with wake.timed(what):
            decoded = decode()
    except wire.WireError as e:
        if ref_reason is None:
            return (e.reason, "crash", f"refused ({e}) a request the format allows"), None
        return (e.reason, None, ""), None
    if ref_reason is not None:
        return ("ok", "crash", f"accepted a request the format refuses ({ref_reason})"), None
    return None, decoded


def _check_bitmap(case: dict, wake: Wakeups):
    bufs, mx = case["bufs"], case["max_pfn"]
    ref_reason, (rs, rl) = ref_bitmap(b"".join(bufs), mx)
    verdict, decoded = _against_reference(
        lambda: wire.decode_bitmap(bufs, max_pfn=mx, page_shifts=wire.BITMAP_PAGE_SHIFTS), ref_reason, wake,
        f"decoding a {sum(map(len, bufs))}-byte bitmap request")
    if verdict is not None:
        return verdict
    _hdr, starts, lengths = decoded
    if not (np.array_equal(starts, rs) and np.array_equal(lengths, rl)):
        return "ok", "crash", "decoded runs differ from the bitmap's set bits"
    return "ok", None, ""


def _check_chunks(case: dict, wake: Wakeups):
    ch, mx = [tuple(x) for x in case["chunks"]], case["max_pfn"]
    ref_reason, spans = ref_chunks(ch, mx)
    verdict, decoded = _against_reference(lambda: wire.chunks_to_runs(ch, max_pfn=mx, merge=case["merge"]),
                                          ref_reason, wake, f"decoding {len(ch)} chunks")
    if verdict is not None:
        return verdict
    s, ln = decoded
    got = list(zip(s.tolist(), ln.tolist()))
    want = merge_spans(spans) if case["merge"] else [(g >> PAGE_SHIFT, n >> PAGE_SHIFT) for g, n in ch]
    if got != want:
        return "ok", "crash", f"decoded runs {got[:4]} differ from the chunks' {want[:4]}"
    return "ok", None, ""

