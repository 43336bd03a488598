"""The protocol table (device/virtio/protocols.py) and the discard table
(device/virtio/discard.py) are the one place protocols and discard methods are listed.

(a) every protocol round-trips: the driver's encode, written into real guest RAM and
    put on a real ring, comes back from the device's decode as the same pages; and
    the bytes on the ring are golden: tests/data/wire_golden.json holds, for fixed page
    sets of every wire format, the bytes and descriptors the driver put on the ring
    before the table existed (checked then against its former inline code, byte for
    byte), so a change to an encoder that alters one byte fails here;
(b) the CLI and spec choices are the table's names;
(c) no Python file outside the tables lists the protocol (or discard method) names
    as a tuple/list/set literal.
"""
from __future__ import annotations

import ast
import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device.virtio import wire
from device.virtio.discard import DISCARD_METHOD_NAMES, DISCARD_METHODS, discard_method, discard_runs
from device.virtio.features import F_PAGE_BITMAP, F_PAGE_CHUNKS, PFN_BATCH_MAX, Q_INFLATE, bit
from device.virtio.layout import PAGE_SHIFT, PAGE_SIZE
from device.virtio.protocols import (PROTOCOL_NAMES, PROTOCOLS,
                                     WIRE_FORMAT_NAMES, WIRE_FORMATS, Refusal, accepted_wire_format,
                                     negotiated_wire_format, protocol, protocol_device_features)
from device.rig import DeviceRig
from device.virtio.driver_queue import DriverQueue
from device.virtio.features import Q_DEFLATE
from device.virtio.split_ring import ring_layout
from test_balloon_device import BUF, RING_BASE, balloon_rig

IND = 3 << 20              # the driver queue's indirect tables


class DeviceWithDriverQueue:
    """The shared DeviceRig (device/rig.py, set up as test_balloon_device's balloon_rig)
    with the lab's own DriverQueue as its driver side: these tests pin what the
    driver's encoders put on the ring, indirect tables included, byte for byte."""

    def __init__(self, protocol: str, mib: int, populate_mib: int) -> None:
        self.rig = balloon_rig(lambda **options: DeviceRig(**options), protocol, populate_mib, mib)
        self.dev, self.ram, self.layout = self.rig.device, self.rig.ram, self.rig.layout
        self.q = {}
        for i, qi in enumerate((Q_INFLATE, Q_DEFLATE)):
            lay = ring_layout(RING_BASE + i * 65536, 256)
            self.q[qi] = DriverQueue(self.ram, qi, 256, lay.desc_gpa, lay.avail_gpa, lay.used_gpa, event_idx=False,
                                     indirect=True, kick=lambda: None, indirect_area=(IND + i * 65536, 65536))

    def send(self, qi: int, bufs) -> None:
        q = self.q[qi]
        q.add_buf(bufs, [], "req")
        q.kick_if_needed()
        self.dev.process_queue(qi)
        q.get_used()

    def close(self) -> None:
        self.rig.close()

ROOT = Path(__file__).resolve().parents[1]
HUGE_ORDER = 9
COPY_LIMIT = 16 << 20        # the device's MAX_REQUEST_BYTES


# ======================================================================================
# (a) round trips on a real ring, and the golden bytes
# ======================================================================================
@pytest.fixture(scope="module")
def rigs():
    """A device + ring per protocol; a 3076 MiB guest (RAM up to 3 GiB and 4 MiB above
    the hole), memfd sparse."""
    made = {name: DeviceWithDriverQueue(name, mib=3076, populate_mib=1) for name in PROTOCOL_NAMES}
    yield made
    for r in made.values():
        r.close()


def _on_ring(r: DeviceWithDriverQueue, bufs):
    """Put one request on the inflate ring; the device side pops it as a real chain."""
    q, dq = r.q[Q_INFLATE], r.dev.queues[Q_INFLATE]
    q.add_buf(bufs, [], "req")
    q.publish()
    chain = dq.pop_avail()
    assert chain is not None
    return chain, lambda: (dq.push_used(chain.head, 0), q.get_used())


pfn_sets = st.lists(st.one_of(st.integers(0, 2048), st.integers(0, (3076 << 8) + (1 << 20))),
                    min_size=1, max_size=600, unique=True)


@pytest.mark.parametrize("name", PROTOCOL_NAMES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw_pfns=pfn_sets, blocks=st.lists(st.integers(0, 1400), max_size=3, unique=True),
       batch=st.integers(1, 4096), inflate=st.booleans(), shuffle=st.randoms(use_true_random=False))
def test_encode_decode_round_trip_and_bytes(rigs, name, raw_pfns, blocks, batch, inflate, shuffle):
    r = rigs[name]
    proto = PROTOCOLS[name]
    fmt = proto.wire
    lay = r.layout
    # whole aligned 2 MiB blocks first (the hugepage-aware allocator), then single pages
    whole = np.concatenate([np.arange(b << HUGE_ORDER, (b + 1) << HUGE_ORDER) for b in sorted(blocks)]
                           or [np.zeros(0, np.int64)]).astype(np.int64)
    whole = whole[lay.ram_pfn_mask(whole)] if whole.size else whole
    whole_blocks = whole.size >> HUGE_ORDER
    whole = whole[: whole_blocks << HUGE_ORDER]
    rest = np.array([p for p in raw_pfns if p < lay.max_pfn], dtype=np.int64)
    rest = rest[lay.ram_pfn_mask(rest)] if rest.size else rest
    rest = np.setdiff1d(rest, whole)
    rest = rest[np.array(shuffle.sample(range(rest.size), rest.size), dtype=np.int64)] if rest.size else rest
    pages = np.concatenate((whole, rest))
    if not pages.size:
        return
    batch_pages = min(batch, fmt.max_batch) if fmt.max_batch else batch * 8

    sent, k = [], 0
    for group, page_shift in fmt.unit_groups(pages, whole_blocks << HUGE_ORDER):
        requests = fmt.encode(group, batch_pages=batch_pages, inflate=inflate, req_id_start=k, page_shift=page_shift)
        for request in requests:
            k += 1
            bufs = fmt.place(r.ram, BUF, request.payload) if request.payload is not None else request.descriptors
            chain, done = _on_ring(r, bufs)
            decoded = fmt.decode(chain, max_pfn=lay.max_pfn, copy_limit=COPY_LIMIT)
            done()
            got = decoded.pfns().astype(np.int64) if decoded.runs is None else wire.runs_to_pfns(*decoded.runs)
            if decoded.runs is None:        # the PFN array arrives in the order sent
                np.testing.assert_array_equal(got, request.pages)
            np.testing.assert_array_equal(np.sort(got), np.sort(request.pages))
            assert decoded.ring_bytes == (sum(n for _, n in bufs) if fmt.place else 16 * len(bufs))
            sent.append(request.pages)
    np.testing.assert_array_equal(np.sort(np.concatenate(sent)), np.sort(pages))   # no pfn lost, none added


GOLDEN = json.loads((Path(__file__).parent / "data" / "wire_golden.json").read_text())["cases"]


@pytest.mark.parametrize("case", GOLDEN, ids=lambda c: f"{c['wire_format']}-{len(c['pages'])}p-batch{c['batch_pages']}")
def test_golden_bytes_on_the_ring(rigs, case):
    """The table's encoder puts exactly the golden bytes and descriptors on the ring for
    the golden pages, and the device decodes them back to those pages."""
    fmt = WIRE_FORMATS[case["wire_format"]]
    r = rigs[case["wire_format"]]          # the arm named as its wire format
    pages = np.array(case["pages"], dtype=np.int64)
    got = []
    for group, shift in fmt.unit_groups(pages, case["whole_blocks"] << HUGE_ORDER):
        got += fmt.encode(group, batch_pages=case["batch_pages"], inflate=case["inflate"], req_id_start=len(got),
                          page_shift=shift)
    assert len(got) == len(case["requests"])
    for request, want in zip(got, case["requests"]):
        assert request.pages.tolist() == want["pages"]
        if "bytes" in want:
            bufs = fmt.place(r.ram, BUF, request.payload)
            assert [[g - BUF, n] for g, n in bufs] == want["descriptors"]
            assert bytes(r.ram.view(BUF, sum(n for _, n in bufs))).hex() == want["bytes"]
        else:
            bufs = request.descriptors
            assert np.asarray(bufs).tolist() == want["descriptors"]
        chain, done = _on_ring(r, bufs)
        decoded = fmt.decode(chain, max_pfn=r.layout.max_pfn, copy_limit=COPY_LIMIT)
        done()
        back = decoded.pfns().astype(np.int64) if decoded.runs is None else wire.runs_to_pfns(*decoded.runs)
        assert sorted(back.tolist()) == sorted(want["pages"])


@pytest.mark.parametrize("name", PROTOCOL_NAMES)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw_pfns=pfn_sets)
def test_device_balloons_exactly_the_pages_sent(name, raw_pfns):
    """Through the whole device (its decode and merge policy from the table): the
    pages it marks as ballooned are the pages the driver encoded, in every protocol."""
    r = DeviceWithDriverQueue(name, mib=3076, populate_mib=1)
    try:
        fmt = PROTOCOLS[name].wire
        pages = np.array([p for p in raw_pfns if p < r.layout.max_pfn], dtype=np.int64)
        pages = pages[r.layout.ram_pfn_mask(pages)] if pages.size else pages
        queue_pages = np.flatnonzero(r.dev.ballooned_np == 2)
        pages = np.setdiff1d(pages, queue_pages)
        pages = np.setdiff1d(pages, np.arange(BUF >> PAGE_SHIFT, (BUF >> PAGE_SHIFT) + 16))   # request buffer
        if not pages.size:
            return
        requests = 0
        for group, shift in fmt.unit_groups(pages, 0):
            for request in fmt.encode(group, batch_pages=fmt.default_batch, inflate=True, req_id_start=0,
                                      page_shift=shift):
                bufs = fmt.place(r.ram, BUF, request.payload) if request.payload is not None else request.descriptors
                r.send(Q_INFLATE, bufs)
                requests += 1
        assert set(np.flatnonzero(r.dev.ballooned_np == 1).tolist()) == set(pages.tolist())
        assert not dict(r.dev.errors)
        ctr = r.dev.inflate.snapshot()
        assert ctr["pages"] == pages.size
        runs = wire.pfns_to_runs(pages)[0].size
        # per page for pfn; per run for the others (a run that two requests share: twice)
        if PROTOCOLS[name].wire.name == "pfn" and not PROTOCOLS[name].merge_runs:
            assert ctr["discard_calls"] == pages.size
        else:
            assert runs <= ctr["discard_calls"] <= runs + requests - 1
    finally:
        r.close()


def test_refusals_keep_the_device_reason_codes(rigs):
    """The table's decoders refuse with the reason codes the device counted before."""
    r = rigs["pfn"]
    too_long = 4 * (PFN_BATCH_MAX + 1)
    r.ram.view(BUF, too_long)[:] = bytes(too_long)
    chain, done = _on_ring(r, [(BUF, too_long)])
    with pytest.raises(Refusal) as e:
        PROTOCOLS["pfn"].decode(chain, max_pfn=r.layout.max_pfn, copy_limit=COPY_LIMIT)
    done()
    assert (e.value.reason, e.value.ring_bytes) == ("pfn-array-too-long", 0)
    chain, done = _on_ring(r, [(BUF, 6)])
    with pytest.raises(Refusal) as e:
        PROTOCOLS["pfn"].decode(chain, max_pfn=r.layout.max_pfn, copy_limit=COPY_LIMIT)
    done()
    assert (e.value.reason, e.value.ring_bytes) == ("pfn-pfn-array-len", 6)
    r = rigs["chunks"]
    chain, done = _on_ring(r, [(BUF, 100)])
    with pytest.raises(Refusal) as e:
        PROTOCOLS["chunks"].decode(chain, max_pfn=r.layout.max_pfn, copy_limit=COPY_LIMIT)
    done()
    assert (e.value.reason, e.value.ring_bytes) == ("chunks-unaligned", 16)


# ======================================================================================
# The table itself
# ======================================================================================
def test_table_records():
    assert PROTOCOL_NAMES == ("pfn", "pfn-ranges", "bitmap", "chunks")
    assert WIRE_FORMAT_NAMES == ("pfn", "bitmap", "chunks")
    assert {n: p.wire_format for n, p in PROTOCOLS.items()} == {
        "pfn": "pfn", "pfn-ranges": "pfn", "bitmap": "bitmap", "chunks": "chunks"}
    assert {n: p.feature for n, p in PROTOCOLS.items()} == {
        "pfn": None, "pfn-ranges": None, "bitmap": F_PAGE_BITMAP, "chunks": F_PAGE_CHUNKS}
    assert {n: p.default_batch for n, p in PROTOCOLS.items()} == {
        "pfn": 256, "pfn-ranges": 256, "bitmap": 262144, "chunks": 262144}
    assert [n for n, p in PROTOCOLS.items() if p.merge_runs] == ["pfn-ranges"]
    for p in PROTOCOLS.values():
        assert protocol_device_features(p.name) & bit(F_PAGE_BITMAP) == (bit(F_PAGE_BITMAP) if p.name == "bitmap" else 0)
        assert protocol_device_features(p.name) & bit(F_PAGE_CHUNKS) == (bit(F_PAGE_CHUNKS) if p.name == "chunks" else 0)
    with pytest.raises(ValueError, match="choose from pfn, pfn-ranges, bitmap, chunks"):
        protocol("carrier-pigeon")


def test_format_negotiation_is_the_devices_rule():
    """The driver accepts what it may and the device offers; with the bitmap hint bit on
    top, both sides read the negotiated bits the same way (chunks beat bitmap)."""
    chunks, bitmap = bit(F_PAGE_CHUNKS), bit(F_PAGE_BITMAP)
    assert negotiated_wire_format(0).name == "pfn"
    assert negotiated_wire_format(bitmap).name == "bitmap"
    assert negotiated_wire_format(chunks | bitmap).name == "chunks"
    assert accepted_wire_format("auto", chunks | bitmap).name == "chunks"
    assert accepted_wire_format("bitmap", chunks | bitmap).name == "bitmap"
    assert accepted_wire_format("chunks", bitmap).name == "pfn"
    assert accepted_wire_format("pfn", chunks).name == "pfn"
    for name, fmt in WIRE_FORMATS.items():      # each format is also the name of an arm using it
        assert accepted_wire_format("auto", protocol_device_features(name)) is fmt


def test_discard_table_and_the_one_loop(tmp_path):
    """Both methods free exactly the pieces given, one system call each."""
    from device.virtio.layout import GuestLayout
    from device.virtio.ram import GuestRAM
    assert DISCARD_METHOD_NAMES == ("madvise", "punch-hole")
    with pytest.raises(ValueError, match="unknown discard method"):
        discard_method("shred")
    for name in DISCARD_METHOD_NAMES:
        ram = GuestRAM.create(GuestLayout.pc(64))
        try:
            ram.view(0, 64 * PAGE_SIZE)[:] = b"\x5a" * (64 * PAGE_SIZE)
            discard_runs(ram, name, [0, 8 * PAGE_SIZE], [2 * PAGE_SIZE, PAGE_SIZE])   # per run
            discard_runs(ram, name, [20 * PAGE_SIZE, 30 * PAGE_SIZE], PAGE_SIZE)     # per page
            ram.discard(40 * PAGE_SIZE, 4 * PAGE_SIZE, name)
            holes = np.flatnonzero(~ram.data_page_mask()[:64]).tolist()
            assert holes == [0, 1, 8, 20, 30, 40, 41, 42, 43], (name, DISCARD_METHODS[name].syscall)
        finally:
            ram.close()


# ======================================================================================
# (b) the CLI and the spec offer exactly the table's names
# ======================================================================================
def _argparse_choices(main, argv, option) -> list[str]:
    """The choices an argparse main() offers for `option`, from its own error message."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        main(argv + [option, "no-such-choice"])
    text = err.getvalue()
    assert f"argument {option}: invalid choice" in text, text
    listed = text.split("choose from", 1)[1].strip().rstrip(")").strip()
    return [c.strip().strip("'") for c in listed.split(",")]


def test_cli_and_spec_choices_are_the_tables():
    from device.guest import process
    from device.vmm import process as vmm
    from device.virtio.hint_format import HINT_DESIGNS
    from lab.trials import spec
    from lab.trials.backends import QEMU_BALLOON_ARMS
    from lab.cli.commands import run

    assert _argparse_choices(vmm.main, [], "--protocol") == list(PROTOCOL_NAMES)
    assert _argparse_choices(vmm.main, [], "--discard") == list(DISCARD_METHOD_NAMES)
    assert _argparse_choices(vmm.main, [], "--hint") == list(HINT_DESIGNS)
    assert _argparse_choices(process.main, [], "--wire-format") == ["auto", *WIRE_FORMAT_NAMES]
    assert _argparse_choices(process.main, [], "--hint") == list(HINT_DESIGNS)
    option = next(p for p in run.command.params if p.name == "protocol")
    assert option.metavar == "[" + "|".join(PROTOCOL_NAMES + QEMU_BALLOON_ARMS) + "]"   # the spec checks it
    assert spec.ARMS_BY_KIND["balloon"] == PROTOCOL_NAMES + QEMU_BALLOON_ARMS
    assert spec.BALLOON_ARMS == PROTOCOL_NAMES
    assert spec.DEFAULT_ARMS["balloon"] == PROTOCOL_NAMES
    assert spec.MIGRATE_ARMS == HINT_DESIGNS
    assert spec.DISCARD_METHOD_NAMES == DISCARD_METHOD_NAMES
    discard_field = next(f for f in spec.FIELDS if f.name == "discard")
    assert tuple(discard_field.click_type.choices) == DISCARD_METHOD_NAMES
    assert spec.ExperimentSpec(arms="pfn-ranges").batch_pages_for("pfn-ranges") == PFN_BATCH_MAX
    assert spec.ExperimentSpec(arms="chunks").batch_pages_for("chunks") is None


def test_spec_reads_the_other_owners():
    from device.guest.alloc_policy import ALLOC_POLICIES
    from device.vmm.huge_pages import PARTIAL_TRACKING
    from device.virtio.backing import BACKINGS
    from lab.trials import spec
    assert spec.BACKINGS is BACKINGS
    assert spec.PARTIAL_TRACKING is PARTIAL_TRACKING
    assert spec.ALLOC_POLICIES is ALLOC_POLICIES


# ======================================================================================
# (c) nobody else lists the names
# ======================================================================================
OWNERS = {"device/virtio/protocols.py", "device/virtio/discard.py"}
# Not scanned: the tests (they pin the names on purpose); benchmarks, which pick arms to
# run; scripts/layout_stats.py, whose fixed list is the measuring stick it also applies
# to old commits. The fuzzer is scanned: it reads the table like everyone else.
NOT_SCANNED = ("tests/", "benchmarks/", "scripts/layout_stats.py", ".venv/")
NAME_SETS = {"protocol": set(PROTOCOL_NAMES), "discard method": set(DISCARD_METHOD_NAMES)}


def literal_lists(path: Path) -> list[str]:
    """'line: kind' of every tuple/list/set literal naming two or more protocols (or
    discard methods) in a Python file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            strings = {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
            out += [f"{node.lineno}: {kind}s {sorted(strings & names)}" for kind, names in NAME_SETS.items()
                    if len(strings & names) >= 2]
    return out


def test_no_other_file_lists_the_names():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in OWNERS or rel.startswith(NOT_SCANNED):
            continue
        bad += [f"{rel}:{hit}" for hit in literal_lists(path)]
    assert not bad, "read device/virtio/protocols.py or device/virtio/discard.py instead:\n" + "\n".join(bad)


def test_the_scan_sees_a_list(tmp_path):
    f = tmp_path / "x.py"
    f.write_text('ARMS = ["pfn", "chunks"]\nok = ("pfn",)\nif m in ("madvise", "punch-hole"):\n    pass\n')
    assert literal_lists(f) == ["1: protocols ['chunks', 'pfn']", "3: discard methods ['madvise', 'punch-hole']"]
