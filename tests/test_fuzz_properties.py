"""Property-based tests (hypothesis) on the hostile-input paths, and the fuzz corpus.

Decoders (wire.py) against the reference decoders in fuzz/reference_decoders.py, written
from the format descriptions; the ring walker and the whole device (inflate, deflate,
stats, free-page hints) over a real memfd with fuzz/oracle.py: nothing but RingError
from the ring, no exception from the device, no page loses its data unless the guest
named it on the inflate queue (SEEK_DATA), no page is hinted free unless the guest
hinted it and it is RAM. Every case in tests/fuzz_corpus/ is replayed, and the oracle
itself is shown to catch a device that discards, hangs or crashes.
"""
from __future__ import annotations

import json
import mmap
import random
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device.virtio import wire
from device.virtio.protocols import PROTOCOL_NAMES
from device.vmm.balloon_device import BalloonDevice
from fuzz import cases, corpus, engine, generators, mutators, targets
from fuzz.cases import Outcome, fuzz_layout
from fuzz.decoder_target import run_decoder
from fuzz.time_limit import hang_timer

CORPUS = Path(__file__).parent / "fuzz_corpus"
REPO = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).with_name("balloon-lab"))
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                             HealthCheck.too_slow])
MAX_PFNS = st.sampled_from([1, 8, 9, 256, 768, 1 << 20, fuzz_layout("pc").max_pfn])


@pytest.fixture(scope="module")
def rig(fuzz_device_target):
    """The device and ring targets over their memfds (tests/conftest.py), logs quiet."""
    engine.quiet()
    return fuzz_device_target


@pytest.fixture(autouse=True)
def alarm():
    with hang_timer():
        yield


def ok(outcome: Outcome) -> None:
    assert outcome.failure is None, f"{outcome.failure}: {outcome.detail}"


# ======================================================================================
# Decoders
# ======================================================================================
@SETTINGS
@given(data=st.binary(max_size=1100), max_pfn=st.none() | MAX_PFNS)
def test_pfn_decoder_accepts_exactly_whole_le32_arrays(data, max_pfn):
    ok(run_decoder({"t": "pfn", "data": data, "max_pfn": max_pfn}, 5.0))


def _header(cmd, shift, start, blen):
    return struct.pack("<HHHHQQQ", cmd, shift, 0, 0, 0, start, blen)


@st.composite
def bitmaps(draw):
    max_pfn = draw(MAX_PFNS)
    bm = draw(st.binary(max_size=200) | st.binary(min_size=1, max_size=200).map(lambda b: b.ljust(300, b"\xff")))
    start = draw(st.integers(0, 2 ** 64 - 1) | st.integers(0, max_pfn + 16) | st.just(max_pfn - len(bm) * 8))
    blen = draw(st.just(len(bm)) | st.integers(0, 2 ** 64 - 1) | st.just((max_pfn + 7) // 8 + 1))
    shift = draw(st.just(12) | st.integers(0, 0xFFFF))
    raw = _header(draw(st.integers(0, 3)), shift, max(0, start), blen) + bm
    raw = raw[:draw(st.integers(0, len(raw)))] if draw(st.booleans()) and draw(st.booleans()) else raw
    cuts = sorted(draw(st.lists(st.integers(0, len(raw)), max_size=4)))
    pieces = [raw[a:b] for a, b in zip([0] + cuts, cuts + [len(raw)])]
    return {"t": "bitmap", "bufs": pieces, "max_pfn": max_pfn}


@SETTINGS
@given(case=bitmaps())
def test_bitmap_decoder_matches_the_format_for_any_header_and_split(case):
    ok(run_decoder(case, 5.0))


@st.composite
def chunk_lists(draw):
    max_pfn = draw(MAX_PFNS)
    page = st.integers(0, max_pfn + 4).map(lambda p: p << 12)
    addr = page | st.integers(0, 2 ** 64 - 1) | st.sampled_from([2 ** 64 - 4096, 2 ** 63])
    ln = st.integers(1, 64).map(lambda n: n << 12) | st.integers(0, 2 ** 32 - 1) | st.just(0)
    return {"t": "chunks", "chunks": draw(st.lists(st.tuples(addr, ln).map(list), max_size=12)),
            "max_pfn": max_pfn, "merge": draw(st.booleans())}


@SETTINGS
@given(case=chunk_lists())
def test_chunks_decoder_matches_the_format(case):
    ok(run_decoder(case, 5.0))


@SETTINGS
@given(pfns=st.lists(st.integers(0, 5000), max_size=400), ppr=st.sampled_from([8, 64, 4096, 1 << 18]))
def test_valid_requests_decode_to_exactly_the_pages_sent(pfns, ppr):
    want = sorted(set(pfns))
    got: list[int] = []
    for raw in wire.encode_bitmap_requests(np.array(pfns, dtype=np.int64), pages_per_request=ppr, cmd=0):
        _h, s, ln = wire.decode_bitmap(raw, max_pfn=5001)
        got += wire.runs_to_pfns(s, ln).tolist()
    assert sorted(got) == want
    s, ln = wire.pfns_to_runs(np.array(pfns, dtype=np.int64))
    chunks = wire.runs_to_chunks(s, ln)
    s2, ln2 = wire.chunks_to_runs(chunks, max_pfn=5001)
    assert wire.runs_to_pfns(s2, ln2).tolist() == want


# ======================================================================================
# Ring and device, through the fuzzer's oracle
# ======================================================================================
@st.composite
def device_cases(draw, target="device"):
    """A generated case, then a few mutations: hypothesis drives the fuzzer's own
    generator and mutator through a seeded Random, so failures shrink to a seed."""
    rng = random.Random(draw(st.integers(0, 2 ** 32 - 1)))
    case = targets.GENERATORS[target](rng)
    for _ in range(draw(st.integers(0, 6))):
        case = targets.MUTATORS[target](case, rng, [])
    return case


@SETTINGS
@given(case=device_cases("ring"))
def test_ring_walker_only_raises_ring_error_and_chains_are_inside_ram(rig, case):
    ok(rig.run_ring(case, 5.0))


@SETTINGS
@given(case=device_cases("device"))
def test_device_never_discards_unnamed_pages_never_raises(rig, case):
    ok(rig.run_device(case, 5.0))


@st.composite
def raw_rings(draw):
    """Ring contents straight from hypothesis (no generator): descriptors, heads, idx."""
    n = draw(st.sampled_from([1, 2, 4, 8]))
    lay = fuzz_layout("mini")
    addr = st.sampled_from([0x8000, 0x8010, 0x9000, 0x40000, 0xFF000, 0x100000, 0x1FF000, 0x200000, 0x2FF000,
                            0x300000, 2 ** 64 - 16]) | st.integers(0, 2 ** 64 - 1)
    desc = st.lists(st.tuples(addr, st.integers(0, 0x2000) | st.integers(0, 2 ** 32 - 1),
                              st.integers(0, 7), st.integers(0, n + 1)).map(list), min_size=n, max_size=n)
    pfn_buf = st.lists(st.integers(0, lay.max_pfn + 4) | st.integers(0, 2 ** 32 - 1), max_size=64).map(
        lambda p: struct.pack(f"<{len(p)}I", *p))
    qs = {0: {"desc": draw(desc), "heads": draw(st.lists(st.integers(0, n), max_size=n)), "last": 0,
              "idx": draw(st.integers(0, n + 1) | st.integers(0, 0xFFFF)), "flags": 0, "event": 0}}
    mem = [[0x8000, draw(pfn_buf)], [0x9000, draw(st.binary(max_size=256))]]
    return {"t": "device", "layout": "mini", "proto": draw(st.sampled_from(PROTOCOL_NAMES)), "qsize": n,
            "hint": "none", "indirect": draw(st.booleans()), "event_idx": draw(st.booleans()), "status": "live",
            "pre": [], "queues": qs, "mem": mem, "kicks": [0, 0]}


@SETTINGS
@given(case=raw_rings())
def test_device_on_raw_hypothesis_rings(rig, case):
    ok(rig.run_device(case, 5.0))


# ======================================================================================
# Free-page hint protocols (queue 3 upstream, queue 5 seed bitmap)
# ======================================================================================
@st.composite
def hint_cases(draw):
    case = draw(device_cases("device"))
    case["hint"] = draw(st.sampled_from(["upstream", "bitmap"]))
    rng = random.Random(draw(st.integers(0, 2 ** 32 - 1)))
    b = generators.CaseBuilder(case, rng)
    b.next_buf = cases.BUF_AREA[0] + 0x20000          # after whatever the case already placed
    for q in case["queues"]:
        b.next_desc[q] = len(case["queues"][q]["heads"])
    q = 3 if case["hint"] == "upstream" else 5
    generators.gen_hints(case, b, rng, fuzz_layout(case["layout"]), q)
    for qd in case["queues"].values():
        qd["idx"] = qd["last"] + len(qd["heads"])
    for _ in range(draw(st.integers(0, 3))):
        case = mutators.mutate_device(case, rng, [])
    return case


@SETTINGS
@given(case=hint_cases())
def test_hints_mark_only_ram_pages_the_guest_hinted(rig, case):
    ok(rig.run_device(case, 5.0))


def test_well_formed_hints_are_taken(rig):
    """Positive control: the hint oracle is not vacuous, well-formed exchanges do hint pages."""
    rng = random.Random(3)
    hinted = 0
    for i in range(60):
        case = generators.gen_device(rng)
        case.update(hint=rng.choice(["upstream", "bitmap"]), queues={}, mem=[], kicks=[], pre=[], status="live")
        b = generators.CaseBuilder(case, rng)
        generators.gen_hints(case, b, rng, fuzz_layout(case["layout"]), 3 if case["hint"] == "upstream" else 5)
        for qd in case["queues"].values():
            qd["idx"] = len(qd["heads"])
        o = rig.run_device(case, 5.0)
        ok(o)
        hinted += o.signature[4]
    assert hinted >= 6          # about a quarter: the generator also sends stale ids and hole pages


# ======================================================================================
# The oracle catches what it must
# ======================================================================================
def _inflate_case(pfns: list[int], proto: str = "pfn") -> dict:
    """One inflate request on the mini layout (RAM pages 0-255 and 512-767)."""
    raw = struct.pack(f"<{len(pfns)}I", *pfns)
    return {"t": "device", "layout": "mini", "proto": proto, "qsize": 4, "hint": "none", "indirect": False,
            "event_idx": False, "status": "live", "pre": [],
            "queues": {0: {"desc": [[0x8000, len(raw), 0, 0]] + [[0, 0, 0, 0] for _ in range(3)], "heads": [0],
                           "last": 0, "idx": 1, "flags": 0, "event": 0}},
            "mem": [[0x8000, raw]], "kicks": [0]}


def test_oracle_passes_a_correct_inflate(rig):
    o = rig.run_device(_inflate_case([0x50, 0x51, 0x90, 600]), 5.0)
    ok(o)
    assert o.signature[7]                            # pages were discarded, and that was fine


def test_oracle_catches_a_discard_of_an_unnamed_page(rig, monkeypatch):
    """A device that, besides its real work, discards a page nobody named (or books one
    into the balloon without discarding it) is caught."""
    case = _inflate_case([0x50, 0x51, 0x90, 600], "pfn-ranges")
    real = BalloonDevice.process_queue

    def discards_too_much(self, index, budget=None):
        real(self, index, budget)
        self.ram.mm.madvise(mmap.MADV_REMOVE, 0x52 << 12, 4096)

    monkeypatch.setattr(BalloonDevice, "process_queue", discards_too_much)
    o = rig.run_device(case, 5.0)
    assert o.failure == "oob-discard" and "pages [82]" in o.detail, o

    def books_too_much(self, index, budget=None):
        real(self, index, budget)
        self.ballooned_np[0x60] = 1

    monkeypatch.setattr(BalloonDevice, "process_queue", books_too_much)
    o = rig.run_device(case, 5.0)
    assert o.failure == "crash" and "ballooned pages [96] the guest never named" in o.detail, o


def test_oracle_catches_a_hang_and_a_crash(rig, monkeypatch):
    case = _inflate_case([0x50])

    def spin(self, chain, ctr, inflate):
        while True:
            pass

    monkeypatch.setattr(BalloonDevice, "_balloon_chain", spin)
    o = rig.run_device(case, 0.3)
    assert o.failure == "hang", o
    monkeypatch.setattr(BalloonDevice, "_balloon_chain", lambda self, chain, ctr, inflate: 1 // 0)
    o = rig.run_device(case, 5.0)
    assert o.failure == "crash" and "device-internal" in o.detail, o


# ======================================================================================
# The corpus: every case found or kept is replayed
# ======================================================================================
def test_corpus_replays_clean():
    cases = corpus.load_corpus(CORPUS)
    assert len(cases) >= 100
    kinds = {c["t"] for c in cases}
    assert kinds == set(targets.TARGETS) | {"control", "migration"}
    bad = engine.replay(cases)
    assert not bad, [(o.failure, o.detail) for _, o in bad[:5]]


def test_found_cases_fail_without_their_fix(monkeypatch):
    """The regression cases are real: with the hint device's RAM check removed again,
    the cases found by the fuzzer fail the way they did before the fix."""
    cases = corpus.load_corpus(CORPUS / "found" / "hint-bitmap-not-ram.jsonl")
    assert cases and not engine.replay(cases)
    import device.vmm.hint_queues as fph
    monkeypatch.setattr(fph.wire, "check_runs_in_ram", lambda *a, **k: None)
    bad = engine.replay(cases)
    assert len(bad) == len(cases)
    assert all(o.failure == "crash" and "hint device marked pages" in o.detail for _, o in bad)


def _watch_the_devices_own_kick_fds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Undo the event loop's old-kick-eventfd fix: QueueKicks watches the device's own kick
    fds again (no duplicates), so a fd the device closed before telling the loop stays in
    epoll while the guest holds its eventfd."""
    from device.vmm.event_loop import EventHandler, QueueKicks

    def rearm(self: QueueKicks) -> None:
        for idx, (fd, _) in list(self.registered.items()):
            if self.device.kick_fds.get(idx) != fd:
                self._drop(idx, fd)
        for idx, fd in self.device.kick_fds.items():
            if idx not in self.registered:
                self.loop.watch(fd, EventHandler(lambda mask, budget, idx=idx, fd=fd: self._ready(idx, fd, budget),
                                                 queue_work=True))
                self.registered[idx] = (fd, fd)

    def drop(self: QueueKicks, idx: int, fd: int) -> None:
        self.loop.unwatch(fd)                 # the device closed it (or will): not ours to close
        del self.registered[idx]

    monkeypatch.setattr(QueueKicks, "rearm", rearm)
    monkeypatch.setattr(QueueKicks, "_drop", drop)


def test_the_runs_unexplained_hang_is_the_old_kick_eventfd_bug(monkeypatch):
    """The one hang of the 1,000,000-execution run (seed 1011) did not replay because its
    chunk ran with the loop's fix undone in the working tree. With that loop again it hangs
    the same way: the guest's old queue-2 kick eventfd, written after a reset, stays in epoll
    under the number the new queue 1 eventfd got, so every wake-up reads queue 1's empty
    eventfd and the loop never goes idle. With the fix the case is served and goes quiet."""
    cases = corpus.load_corpus(CORPUS / "found" / "control-old-kick-eventfd-number-reused.jsonl")
    assert len(cases) == 1 and not engine.replay(cases)
    _watch_the_devices_own_kick_fds(monkeypatch)
    bad = engine.replay(cases)
    assert [(o.failure, o.detail) for _, o in bad] == [("hang", cases[0]["detail_then"].split(": ", 1)[1])]


def test_fuzz_command_json_and_replay(tmp_path):
    out = subprocess.run([CLI, "fuzz", "--execs", "1500", "--seed", "5", "--workers", "2",
                          "--json", "--quiet", "--save-corpus", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["execs"] == 1500 and res["workers"] == 2
    assert (res["crashes"], res["hangs"], res["oob_discards"]) == (0, 0, 0)
    assert sum(res["by_target"].values()) == 1500
    corpus = Path(res["corpus_file"])
    rep = subprocess.run([CLI, "fuzz", "--replay", str(corpus), "--json"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert rep.returncode == 0, rep.stderr
    assert json.loads(rep.stdout)["replayed"] == res["signatures"] or json.loads(rep.stdout)["replayed"] > 0
