"""The balloon protocols the lab compares, declared once: every other place reads this table.

Two levels, because the lab compares more protocols than there are wire formats:

- a **wire format** (WireFormat: pfn, bitmap, chunks) is what travels on the
  inflate/deflate rings. The feature bit the driver and device negotiate selects it
  (none for pfn); the driver's `--protocol` names it, and a trial's result records it
  as `wire_format`. It brings the driver's `encode` (a pass of pages -> requests), the
  device's `decode` (one chain -> PFNs or runs).
- a **protocol** (BalloonProtocol: pfn, pfn-ranges, bitmap, chunks) is an arm of an
  experiment: a wire format plus what the device does with it. pfn-ranges is the PFN
  wire format with the device merging each request's PFNs into runs first
  (BalloonDevice._balloon_chain), as Firecracker and crosvm do: one translation and
  one discard per run instead of per page.

The byte-level codecs are device/virtio/wire.py's; this module only binds them to
the driver's and the device's request shapes. It imports nothing but device/virtio,
because the guest (encode) and the host (decode) both read it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol

import numpy as np

from device.virtio import wire
from device.virtio.features import (F_DEFLATE_ON_OOM, F_FREE_PAGE_HINT, F_MUST_TELL_HOST, F_PAGE_BITMAP,
                                    F_PAGE_CHUNKS, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_STATS_VQ,
                                    F_VERSION_1, PFN_BATCH_MAX, bit)
from device.virtio.layout import PAGE_SHIFT, PAGE_SIZE

RANGE_BATCH = 262144            # pages per bitmap/chunks request (1 GiB) unless the user gives a batch
MAX_CHUNKS_PER_REQUEST = 4096   # descriptors in one chunks request (indirect table of 64 KiB)
DRIVER_CHUNK_BYTES = 1 << 30    # the driver splits runs longer than this (wire.MAX_CHUNK_BYTES is what a descriptor can carry)
HUGE_BLOCK_SHIFT = wire.BITMAP_PAGE_SHIFTS[-1]   # bitmap page_shift naming whole 2 MiB blocks
# What the VMM offers for every protocol; the protocol's own bit comes on top.
BASE_DEVICE_FEATURES = (bit(F_MUST_TELL_HOST) | bit(F_STATS_VQ) | bit(F_DEFLATE_ON_OOM) | bit(F_FREE_PAGE_HINT)
                        | bit(F_RING_INDIRECT_DESC) | bit(F_RING_EVENT_IDX) | bit(F_VERSION_1))


# ======================================================================================
# What the driver and the device exchange with a wire format
# ======================================================================================
@dataclass(slots=True)
class WireRequest:
    """One request the driver sends: the pages it covers (the balloon's bookkeeping)
    and either a payload the driver writes into its request buffer (pfn, bitmap) or
    the descriptors themselves (chunks: each one is a run of the ballooned pages)."""

    pages: np.ndarray
    payload: Any = None
    descriptors: Any = None


_LE32 = np.dtype("<u4")


@dataclass(slots=True)
class DecodedRequest:
    """What the device read from one chain: `ring_bytes` (what the request put on the
    ring, for the counters) and either the PFNs (pfn, in request order) or the runs."""

    ring_bytes: int
    pfn_bytes: bytes | None = None       # pfn: the le32 PFN array, a private copy of the request
    runs: tuple[np.ndarray, np.ndarray] | None = None

    def pfns(self) -> np.ndarray:
        """The PFN array as uint32, in request order (a view of pfn_bytes)."""
        return np.frombuffer(self.pfn_bytes, _LE32)


class Refusal(Exception):
    """A request the device refuses: `reason` and `message` are what it counts and
    logs (BalloonDevice.refuse); `ring_bytes` what the request had put on the ring."""

    def __init__(self, reason: str, message: str, ring_bytes: int = 0) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.ring_bytes = ring_bytes


class Chain(Protocol):
    """The part of a validated descriptor chain (device/virtio/device_queue.py's DescChain)
    a decoder reads."""

    elements: list
    readable_bytes: int

    def readable(self) -> list[memoryview]: ...

    def gather(self, limit: int) -> bytes: ...

    def single_readable(self) -> bytes | None: ...


@dataclass(frozen=True)
class WireFormat:
    """How a batch of pages travels on the inflate/deflate rings.

    encode (driver): (pages, *, batch_pages, inflate, req_id_start, page_shift) ->
    [WireRequest]; decode (device): (chain, *, max_pfn, copy_limit) -> DecodedRequest,
    or Refusal. encodes_whole_pass and place keep the encode stage (and its USDT
    markers) where each format always had it: bitmap and chunks encode a whole pass
    in one stage; pfn and bitmap write each request into the buffer in a stage of its own."""

    name: str
    feature: int | None          # the feature bit that selects it; None: the format without one
    priority: int                # negotiated together, the highest wins (chunks over a hint's bitmap bit)
    default_batch: int           # pages per request when the user gives none
    max_batch: int | None        # the format's own limit on pages per request
    encodes_whole_pass: bool     # the driver encodes a pass at once (one encode stage); False: per request
    names_huge_blocks: bool      # whole 2 MiB blocks are encoded apart, one bit each (page_shift 21)
    encode: Callable[..., list[WireRequest]]
    place: Callable[[Any, int, Any], list] | None   # payload -> request buffer -> descriptors; None: no buffer
    request_buffer_bytes: Callable[[int], int]      # the driver's request buffer for a batch (0: none)
    decode: Callable[..., DecodedRequest]
    doc: str

    def unit_groups(self, pages: np.ndarray, whole_pages: int) -> list[tuple[np.ndarray, int]]:
        """The pass's pages in the groups the driver encodes separately, each with its
        page_shift: pages[:whole_pages] are whole aligned 2 MiB blocks."""
        if not self.names_huge_blocks:
            return [(pages, PAGE_SHIFT)]
        groups = [(pages[:whole_pages], HUGE_BLOCK_SHIFT)] if whole_pages else []
        return groups + ([(pages[whole_pages:], PAGE_SHIFT)] if pages.size > whole_pages else [])


@dataclass(frozen=True)
class BalloonProtocol:
    """One arm of a balloon experiment: a wire format and the device's merge policy."""

    name: str
    wire: WireFormat
    merge_runs: bool             # the device merges a PFN request's pages into runs first
    doc: str

    @property
    def feature(self) -> int | None:
        return self.wire.feature

    @property
    def wire_format(self) -> str:
        """The driver's name for the format (device.guest.process --protocol)."""
        return self.wire.name

    @property
    def default_batch(self) -> int:
        return self.wire.default_batch

    @property
    def max_batch(self) -> int | None:
        return self.wire.max_batch

    @property
    def encode(self) -> Callable[..., list[WireRequest]]:
        return self.wire.encode

    @property
    def decode(self) -> Callable[..., DecodedRequest]:
        return self.wire.decode

    def device_features(self) -> int:
        """Features the VMM offers for this arm: the wire format's bit on the base set."""
        return BASE_DEVICE_FEATURES | (bit(self.feature) if self.feature is not None else 0)



# ======================================================================================
# pfn: le32 PFN arrays, at most 256 per request, written as the driver goes
# ======================================================================================
def _encode_pfns(pages: np.ndarray, *, batch_pages: int, **_: Any) -> list[WireRequest]:
    """Cut the pass into requests of batch_pages; each is written when sent (place)."""
    return [WireRequest(part, part) for part in (pages[i:i + batch_pages] for i in range(0, pages.size, batch_pages))]



def _place_pfns(ram, gpa: int, pfns: np.ndarray) -> list[tuple[int, int]]:
    nbytes = 4 * pfns.size
    ram.np_view(gpa, nbytes, _LE32)[:] = pfns
    return [(gpa, nbytes)]


def _decode_pfns(chain: Chain, *, max_pfn: int, copy_limit: int) -> DecodedRequest:
    """The PFN array, copied off the ring as the guest wrote it (its length checked):
    the device checks each PFN (RAM, balloon state, named twice) in its translate
    stage. The usual request, one buffer (Linux's pfns array), is one slice copied: no
    numpy here, since this runs on the request's round trip, cache-cold after the last
    request's discards, where numpy's first call costs 5 us (docs/BENCHMARKS.md)."""
    if chain.readable_bytes > 4 * PFN_BATCH_MAX:     # refuse before copying anything
        raise Refusal("pfn-array-too-long", f"{chain.readable_bytes} bytes of PFNs in one request "
                                            f"(max {PFN_BATCH_MAX} PFNs)")
    raw = chain.single_readable()
    if raw is not None and not len(raw) % 4:
        return DecodedRequest(len(raw), pfn_bytes=raw)
    raw = chain.gather(copy_limit)
    try:
        pfns = wire.decode_pfns(raw)
    except wire.WireError as e:
        raise Refusal(f"pfn-{e.reason}", str(e), len(raw)) from None
    if len(pfns) > PFN_BATCH_MAX:
        raise Refusal("pfn-array-too-long", f"{len(pfns)} PFNs in one request (max {PFN_BATCH_MAX})", len(raw))
    return DecodedRequest(len(raw), pfn_bytes=raw)


# ======================================================================================
# bitmap (the seed's): header + bitmap, split across the descriptors of one chain
# ======================================================================================
def _encode_bitmaps(pages: np.ndarray, *, batch_pages: int, inflate: bool, req_id_start: int,
                    page_shift: int = PAGE_SHIFT) -> list[WireRequest]:
    """Bitmap requests for `pages`; with page_shift > 12 they are whole aligned blocks
    of 2**(page_shift - 12) pages and each bit names one block."""
    unit = page_shift - PAGE_SHIFT
    sorted_pages = np.sort(pages)
    units = sorted_pages[:: 1 << unit] >> unit
    per_req = max(1, batch_pages >> unit)
    reqs = wire.encode_bitmap_requests(units, pages_per_request=per_req, page_shift=page_shift,
                                       cmd=0 if inflate else 1, req_id_start=req_id_start)
    # the pages each request covers: encode_bitmap_requests windows are aligned
    win = (sorted_pages >> unit) // per_req
    parts = np.split(sorted_pages, np.flatnonzero(np.diff(win)) + 1)
    return [WireRequest(part, raw) for raw, part in zip(reqs, parts)]


def _place_bitmap(ram, gpa: int, raw: bytes) -> list[tuple[int, int]]:
    ram.view(gpa, len(raw))[:] = raw
    # Header in its own descriptor, bitmap split per page: the seed's v3 SG bitmaps.
    return [(gpa, 32)] + [(gpa + off, min(PAGE_SIZE, len(raw) - off)) for off in range(32, len(raw), PAGE_SIZE)]


def _decode_bitmap(chain: Chain, *, max_pfn: int, copy_limit: int) -> DecodedRequest:
    bufs = chain.readable()
    total = sum(len(b) for b in bufs)
    limit = min(copy_limit, wire.BITMAP_HEADER_SIZE + (max_pfn + 7) // 8)
    if total > limit:    # refused before copying: no bitmap of this guest is that long
        raise Refusal("bitmap-bitmap-too-large", f"bitmap request of {total} bytes; a guest of "
                                                 f"{max_pfn} PFNs needs at most {limit}")
    try:
        _hdr, starts, lengths = wire.decode_bitmap(bufs, max_pfn=max_pfn, page_shifts=wire.BITMAP_PAGE_SHIFTS)
    except wire.WireError as e:
        raise Refusal(f"bitmap-{e.reason}", str(e), total) from None
    return DecodedRequest(total, runs=(starts, lengths))


# ======================================================================================
# chunks: one (GPA, length) descriptor per run of the ballooned pages themselves
# ======================================================================================
def _encode_chunks(pages: np.ndarray, **_: Any) -> list[WireRequest]:
    starts, lengths = wire.pfns_to_runs(np.sort(pages))
    gpas, nbytes = wire.runs_to_chunk_arrays(starts, lengths, max_chunk_bytes=DRIVER_CHUNK_BYTES)
    spans = wire.chunk_requests(gpas, nbytes, max_chunks=MAX_CHUNKS_PER_REQUEST)
    # the pages each request covers (bookkeeping for the balloon), inside encode as for bitmap
    return [WireRequest(wire.runs_to_pfns(gpas[i:j] >> PAGE_SHIFT, nbytes[i:j] >> PAGE_SHIFT),
                        descriptors=np.column_stack((gpas[i:j], nbytes[i:j]))) for i, j in spans]


def _decode_chunks(chain: Chain, *, max_pfn: int, copy_limit: int) -> DecodedRequest:
    ring_bytes = 16 * len(chain.elements)
    try:
        runs = wire.chunks_to_runs([(e[0], e[1]) for e in chain.elements], max_pfn=max_pfn)
    except wire.WireError as e:
        raise Refusal(f"chunks-{e.reason}", str(e), ring_bytes) from None
    return DecodedRequest(ring_bytes, runs=runs)


# ======================================================================================
# The table
# ======================================================================================
PFN_WIRE = WireFormat(
    name="pfn", feature=None, priority=0, default_batch=PFN_BATCH_MAX, max_batch=PFN_BATCH_MAX,
    encodes_whole_pass=False, names_huge_blocks=False, encode=_encode_pfns, place=_place_pfns,
    request_buffer_bytes=lambda batch: 4 * PFN_BATCH_MAX, decode=_decode_pfns,
    doc="le32 PFN arrays, at most 256 per request (Linux's VIRTIO_BALLOON_ARRAY_PFNS_MAX)")
BITMAP_WIRE = WireFormat(
    name="bitmap", feature=F_PAGE_BITMAP, priority=1, default_batch=RANGE_BATCH, max_batch=None,
    encodes_whole_pass=True, names_huge_blocks=True, encode=_encode_bitmaps, place=_place_bitmap,
    request_buffer_bytes=lambda batch: wire.BITMAP_HEADER_SIZE + -(-batch // 8), decode=_decode_bitmap,
    doc="the seed's 32-byte header + bitmap, header and each bitmap page in their own descriptor")
CHUNKS_WIRE = WireFormat(
    name="chunks", feature=F_PAGE_CHUNKS, priority=2, default_batch=RANGE_BATCH, max_batch=None,
    encodes_whole_pass=True, names_huge_blocks=False, encode=_encode_chunks, place=None,
    request_buffer_bytes=lambda batch: 0, decode=_decode_chunks,
    doc="one (GPA, length) descriptor per run of ballooned pages, indirect when long")

WIRE_FORMATS: dict[str, WireFormat] = {f.name: f for f in (PFN_WIRE, BITMAP_WIRE, CHUNKS_WIRE)}

PROTOCOLS: dict[str, BalloonProtocol] = {p.name: p for p in (
    BalloonProtocol("pfn", PFN_WIRE, merge_runs=False,
                    doc="the upstream baseline: per page, one translation and one discard, as QEMU"),
    BalloonProtocol("pfn-ranges", PFN_WIRE, merge_runs=True,
                    doc="PFN arrays; the device merges each request into runs (Firecracker, crosvm)"),
    BalloonProtocol("bitmap", BITMAP_WIRE, merge_runs=False, doc="the 2016 seed's page bitmaps"),
    BalloonProtocol("chunks", CHUNKS_WIRE, merge_runs=False, doc="the 2017 scatter-gather series"),
)}
PROTOCOL_NAMES: tuple[str, ...] = tuple(PROTOCOLS)       # the first is the default baseline
WIRE_FORMAT_NAMES: tuple[str, ...] = tuple(WIRE_FORMATS)
_BY_PRIORITY = sorted(WIRE_FORMATS.values(), key=lambda f: -f.priority)


def protocol(name: str) -> BalloonProtocol:
    """The protocol called `name`; ValueError naming the choices otherwise."""
    try:
        return PROTOCOLS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown protocol {name!r}; choose from {', '.join(PROTOCOL_NAMES)}") from None


def protocol_device_features(name: str) -> int:
    """Features the VMM offers for an arm: the wire format is chosen by feature bit,
    pfn-ranges is the PFN wire format with a device-side merge policy."""
    return protocol(name).device_features()


def negotiated_wire_format(features: int) -> WireFormat:
    """The wire format negotiated features select, the device's and the driver's rule
    alike: the highest-priority format whose bit is set, else pfn. (The bitmap hint
    design negotiates PAGE_BITMAP, so inflates are then bitmaps too; chunks still win.)"""
    for fmt in _BY_PRIORITY:
        if fmt.feature is None or features >> fmt.feature & 1:
            return fmt
    raise AssertionError("the table has no format without a feature bit")


def accepted_wire_format(wanted: str, offered: int) -> WireFormat:
    """The driver's choice at negotiation: the highest-priority format the device
    offers that `wanted` allows ('auto': any), else pfn (which needs no bit)."""
    for fmt in _BY_PRIORITY:
        if fmt.feature is None or (wanted in ("auto", fmt.name) and offered >> fmt.feature & 1):
            return fmt
    raise AssertionError("the table has no format without a feature bit")


def max_batch_of(names: Iterable[str]) -> int | None:
    """The smallest per-request page limit among the named arms (None: no limit;
    names outside the table, such as the real-stack arms, have none)."""
    limits = [PROTOCOLS[n].max_batch for n in names if n in PROTOCOLS and PROTOCOLS[n].max_batch is not None]
    return min(limits) if limits else None
