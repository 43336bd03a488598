"""Live migration: the pieces on real memfds and sockets, and small end-to-end migrations
between real VMM processes (GiB-scale runs are in test_migration_slow.py)."""
from __future__ import annotations

import os
import socket
import threading
import time

import numpy as np
import pytest

from device.virtio import control
from device.vmm.balloon_device import BalloonDevice
from device.guest.buddy import BuddyAllocator
from device.virtio.control import Channel, Req
from device.virtio.features import Q_FREE_PAGE
from device.virtio.protocols import protocol_device_features
from device.vmm.hint_queues import HintQueues, mark_runs
from device.guest.page_contents import GuestPageContents
from device.virtio.ram import GuestRAM
from device.virtio.layout import MiB, PAGE_SHIFT, PAGE_SIZE, GuestLayout
from device.vmm.migration import stream
from device.vmm.migration.destination import MigrationDestination
from device.virtio.dirty_log import DirtyLog, MappedDirtyLog
from device.guest.migration_side import GuestChannel, migration_verify
from device.vmm.migration.pages import PageScanner
from device.virtio.page_pattern import fingerprint_memfd, fingerprint_pfns
from device.vmm.migration.ratelimit import TokenBucket
from device.vmm.migration.source import parse_uri
from device.virtio.device_queue import DeviceQueue
from device.virtio.driver_queue import DriverQueue
from device.virtio.split_ring import ring_layout
from lab.trials.model.migrate_runner import MigrateTrial, run_migration


@pytest.fixture
def guest():
    ram = GuestRAM.create(GuestLayout.pc(64))
    alloc = BuddyAllocator(ram.layout)
    mem = GuestPageContents(ram, alloc)
    yield ram, alloc, mem
    mem.close()
    ram.close()


# --- dirty log --------------------------------------------------------------------------------
def test_dirty_log_sees_every_guest_write_and_harvest_clears_it(guest):
    ram, alloc, mem = guest
    dl = DirtyLog(ram.layout.max_pfn)
    mapped = MappedDirtyLog(os.dup(dl.fd), dl.payload(), mem.max_pfn)
    mem.attach_dirty_log(mapped.log, mapped.inflight)
    pfns = alloc.alloc_pages(3000)
    mem.hold("a", pfns, seed=5)
    got = dl.harvest()
    assert np.array_equal(got, np.sort(pfns))
    assert dl.harvest().size == 0
    mem.rewrite(pfns[:10], seed=6)
    assert np.array_equal(dl.harvest(), np.sort(pfns[:10]))
    assert int(dl.inflight[0]) == 0
    dl.mark([1, 2, 10**9])          # device writes; out-of-range PFNs are ignored
    assert dl.harvest().tolist() == [1, 2]
    mem.detach_dirty_log()
    mapped.close()
    dl.close()


def test_mapped_dirty_log_refuses_a_payload_that_does_not_fit(guest):
    ram, alloc, mem = guest
    dl = DirtyLog(ram.layout.max_pfn)
    bad = bytearray(dl.payload())
    bad[24:32] = (dl.size * 2).to_bytes(8, "little")        # memfd size lie
    with pytest.raises(ValueError, match="dirty log memfd"):
        MappedDirtyLog(os.dup(dl.fd), bytes(bad), mem.max_pfn)
    with pytest.raises(ValueError, match="covers"):
        MappedDirtyLog(os.dup(dl.fd), dl.payload(), mem.max_pfn + 1)
    dl.close()


def test_guest_channel_serves_a_vmm_request_that_arrives_during_its_own_call(guest):
    ram, alloc, mem = guest
    vmm_sock, guest_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    vmm, gch = Channel(vmm_sock), GuestChannel(guest_sock, lambda: mem)
    dl = DirtyLog(ram.layout.max_pfn)
    vmm.send(Req.SET_DIRTY_LOG, dl.payload(), [dl.fd])          # the VMM starts a request ...

    def device_side():                                         # ... then answers the guest's own request
        msg = vmm.recv()
        assert msg.req == Req.GET_STATUS and not msg.is_reply
        vmm.send(Req.GET_STATUS, control.U32.pack(7), reply=True)

    th = threading.Thread(target=device_side)
    th.start()
    reply = gch.call(Req.GET_STATUS)
    th.join()
    assert control.U32.unpack(reply.payload)[0] == 7
    assert len(gch.pending) == 1                               # queued, not mistaken for the reply
    gch.serve_pending()
    res = vmm.recv()
    assert res.is_reply and res.req == Req.SET_DIRTY_LOG and control.unpack_result(res.payload)[0] == 0
    mem.hold("x", alloc.alloc_pages(5), seed=1)
    assert len(dl.harvest()) == 5                              # the guest now logs into the VMM's memfd
    vmm.send(Req.GET_FEATURES)                                 # a request the guest does not serve
    gch.serve_readable()
    res = vmm.recv()
    assert control.unpack_result(res.payload)[0] < 0
    mem.detach_dirty_log()
    gch.close()
    vmm.close()
    dl.close()


# --- rate limit, scanning, fingerprints -----------------------------------------------------------
def test_token_bucket_never_sends_faster_than_its_rate():
    tb = TokenBucket(50e6, burst_bytes=1e6)
    t0 = time.monotonic()
    for _ in range(20):
        tb.consume(500_000)          # 10 MB at 50 MB/s with a 1 MB burst: at least 0.18 s
    assert time.monotonic() - t0 >= (10e6 - 1e6) / 50e6 * 0.99
    assert tb.bytes == 10_000_000


def test_scanner_sends_data_and_zero_flags_without_faulting_memory_in(guest):
    ram, alloc, mem = guest
    held = alloc.alloc_range(5000, 100)
    mem.hold("h", held, seed=3)
    zero_data = 6000                       # a page that holds data in the memfd but all zeros
    os.pwrite(ram.fd, bytes(PAGE_SIZE), zero_data * PAGE_SIZE)
    before = ram.allocated_bytes()
    sc = PageScanner(ram.fd, ram.layout, chunk_pages=1024)
    data_pfns, zero = [], 0
    for c0, c1, off in sc.chunks():
        res = sc.read_chunk(c0, off, np.ones(c1 - c0, dtype=bool))
        data_pfns.append(res.data_pfns)
        zero += res.nzero
        assert res.ndata == int(np.count_nonzero(res.flags == stream.FLAG_DATA))
        assert sum(len(memoryview(d).cast("B")) for d in res.data) == res.ndata * PAGE_SIZE
    data_pfns = np.concatenate(data_pfns)
    assert np.array_equal(data_pfns, held)
    assert zero == ram.layout.ram_pages - len(held)
    assert ram.allocated_bytes() == before         # pread of holes allocated nothing


def test_fingerprints_agree_with_guest_memory(guest):
    ram, alloc, mem = guest
    pfns = alloc.alloc_pages(700)
    mem.hold("h", pfns, seed=11)
    fp = fingerprint_memfd(ram.fd, ram.layout)
    sp = np.sort(pfns)
    assert np.array_equal(fp[sp], mem.fingerprints(sp))
    assert np.array_equal(fingerprint_pfns(ram.fd, ram.layout, sp), mem.expected_held(sp))
    assert np.count_nonzero(fp) == len(pfns)


def test_guest_side_verification_names_the_pages_that_differ(guest, tmp_path):
    ram, alloc, mem = guest
    pfns = np.sort(alloc.alloc_pages(400))
    mem.hold("h", pfns, seed=2)
    copy = tmp_path / "dest-ram"
    with open(copy, "wb") as f:
        f.truncate(ram.layout.ram_bytes)
        for off, ln in ram.data_extents():
            f.seek(off)
            f.write(os.pread(ram.fd, ln, off))
    assert migration_verify(mem, str(copy), None)["ok"]
    victim = int(pfns[123])
    with open(copy, "r+b") as f:
        f.seek(victim * PAGE_SIZE + 8)
        f.write(b"\xff")
    res = migration_verify(mem, str(copy), None)
    assert not res["ok"] and res["bad_at_destination"] == 1
    assert res["first_bad_destination_pfns"] == [victim] and res["bad_at_source"] == 0
    dirty = np.zeros(mem.max_pfn, dtype=np.uint8)
    dirty[victim] = 1                                    # rewritten after the switchover: not judged
    res = migration_verify(mem, str(copy), dirty)
    assert res["ok"] and res["skipped_rewritten_after_switchover"] == 1


# --- hint device ------------------------------------------------------------------------------------
def test_mark_runs_matches_a_loop():
    rng = np.random.default_rng(1)
    starts = np.sort(rng.choice(100000, 500, replace=False)).astype(np.int64)
    lens = rng.integers(1, 50, 500).astype(np.int64)
    a = np.zeros(100100, dtype=bool)
    b = np.zeros(100100, dtype=bool)
    mark_runs(a, starts, lens)
    for s, n in zip(starts, lens):
        b[s:s + n] = True
    assert np.array_equal(a, b)


def test_upstream_hints_are_validated_and_only_count_for_the_current_cmd_id(guest):
    ram, alloc, mem = guest
    dev = BalloonDevice(ram, protocol_device_features("pfn"))
    hints = HintQueues(dev)
    base = int(alloc.alloc_block(2)) << PAGE_SHIFT
    rl = ring_layout(base, 16)
    drv = DriverQueue(ram, Q_FREE_PAGE, 16, rl.desc_gpa, rl.avail_gpa, rl.used_gpa, event_idx=False,
                      indirect=False, kick=lambda: None)
    devq = DeviceQueue(ram, Q_FREE_PAGE, 16, rl.desc_gpa, rl.avail_gpa, rl.used_gpa, event_idx=False,
                       indirect=False)
    cmd_gpa = int(alloc.alloc_block(0)) << PAGE_SHIFT
    block = int(alloc.take_free_block(10))

    def serve(out, inn):
        drv.add_buf(out, inn, None)
        drv.publish()
        return hints._free_page_chain(devq.pop_avail())

    serve([], [(block << PAGE_SHIFT, 4 << 20)])            # before any cmd_id: ignored
    assert not hints.hinted.any() and hints.stats["stale_hints"] == 1
    hints.cmd_id = 5
    ram.view(cmd_gpa, 4)[:] = (5).to_bytes(4, "little")
    serve([(cmd_gpa, 4)], [])
    serve([], [((block << PAGE_SHIFT) + 1, 4 << 20)])       # unaligned: refused, nothing marked
    assert dev.errors["hint-unaligned"] == 1 and not hints.hinted.any()
    serve([], [(block << PAGE_SHIFT, 4 << 20)])
    assert hints.hinted[block:block + 1024].all() and int(hints.hinted.sum()) == 1024
    ram.view(cmd_gpa, 4)[:] = bytes(4)                      # STOP from the driver ends the report
    serve([(cmd_gpa, 4)], [])
    assert hints.report_done.is_set()
    serve([(cmd_gpa, 2)], [])                               # a cmd_id buffer must be a le32
    assert dev.errors["hint-cmd-len"] == 1


# --- destination: a hostile or broken stream fails the migration, never the VMM ------------------------
def _hello(sock, layout):
    stream.send_json(sock, stream.MsgType.HELLO, {"magic": stream.MAGIC, "version": stream.VERSION, "page_size": PAGE_SIZE,
                                        "layout": layout.to_dict(), "hint": "none"})


def _pages(sock, start, flags, data=b""):
    flags = np.asarray(flags, dtype=np.uint8)
    ndata = int(np.count_nonzero(flags == stream.FLAG_DATA))
    stream.send_parts(sock, [stream.header(stream.MsgType.PAGES, 1, stream.pages_message_len(len(flags), ndata)),
                        stream.PAGES_HEAD.pack(start, len(flags), ndata), flags.tobytes(), data])


@pytest.fixture
def destination():
    ram = GuestRAM.create(GuestLayout.pc(3076))      # two regions: [0, 3 GiB) and [4 GiB, 4 GiB + 4 MiB)
    dst = MigrationDestination(ram, "tcp:127.0.0.1:0")
    dst.start()
    sock = socket.create_connection(("127.0.0.1", dst.port))
    yield ram, dst, sock
    sock.close()
    dst.finished.wait(10)
    ram.close()


def test_destination_refuses_a_different_layout(destination):
    ram, dst, sock = destination
    _hello(sock, GuestLayout.pc(64))
    with pytest.raises(stream.StreamError, match="layout"):
        stream.expect(sock, stream.MsgType.ACK)
    assert dst.finished.wait(10) and dst.status == "failed" and "layout" in dst.error


@pytest.mark.parametrize("case, reason", [
    ("bad-flag", "unknown page flag"),
    ("ndata", "data pages"),
    ("edge", "not guest RAM"),
])
def test_destination_refuses_malformed_pages(destination, case, reason):
    ram, dst, sock = destination
    _hello(sock, ram.layout)
    stream.expect(sock, stream.MsgType.ACK)
    if case == "bad-flag":
        _pages(sock, 10, [1, 3])
    elif case == "ndata":
        stream.send_parts(sock, [stream.header(stream.MsgType.PAGES, 1, stream.pages_message_len(2, 1)), stream.PAGES_HEAD.pack(10, 2, 1),
                            bytes([1, 1]), bytes(PAGE_SIZE)])
    else:
        _pages(sock, (3 << 30 >> PAGE_SHIFT) - 1, [1, 1])        # last page of region 0 and the hole
    assert dst.finished.wait(10)
    assert dst.status == "failed" and reason in dst.error
    assert ram.allocated_bytes() == 0                              # nothing was written


def test_destination_writes_data_and_punches_a_page_that_became_zero(destination):
    ram, dst, sock = destination
    _hello(sock, ram.layout)
    stream.expect(sock, stream.MsgType.ACK)
    page = np.full(PAGE_SIZE // 8, 0x0123456789ABCDEF, dtype=np.uint64).tobytes()
    hi = (4 << 30) >> PAGE_SHIFT                                   # first page of region 1
    _pages(sock, 100, [2, 0, 2], page + page)
    _pages(sock, hi, [2], page)
    stream.send_empty(sock, stream.MsgType.SYNC)
    stream.expect(sock, stream.MsgType.ACK)
    assert ram.allocated_bytes() == 3 * PAGE_SIZE
    assert os.pread(ram.fd, PAGE_SIZE, (3 << 30)) == page            # region 1 starts at memfd 3 GiB
    _pages(sock, 100, [1])                                         # page 100 is zero now
    stream.send_empty(sock, stream.MsgType.END)
    _, ack = stream.expect(sock, stream.MsgType.ACK)
    assert ack["pages_data"] == 3 and ack["pages_zero"] == 1 and ack["pages_punched"] == 1
    assert ram.allocated_bytes() == 2 * PAGE_SIZE
    assert os.pread(ram.fd, PAGE_SIZE, 100 * PAGE_SIZE) == bytes(PAGE_SIZE)
    stream.send_empty(sock, stream.MsgType.BYE)
    assert dst.finished.wait(10) and dst.status == "completed"


def test_migration_uris_are_loopback_tcp_only():
    assert parse_uri("tcp:127.0.0.1:4444") == ("127.0.0.1", 4444)
    for bad in ("tcp:10.0.0.1:4444", "unix:/tmp/x", "tcp:127.0.0.1:", "tcp:127.0.0.1:99999", 5):
        with pytest.raises(ValueError):
            parse_uri(bad)


# --- end to end (small guests, real processes) -------------------------------------------------------
@pytest.mark.parametrize("hint", ["none", "upstream", "bitmap"])
def test_idle_guest_migrates_verified(hint):
    r = run_migration(MigrateTrial(hint=hint, guest_mib=64, workload="idle", timeout_s=120))
    assert r["verified"], r["verification"]
    assert r["verification"]["guest"]["pages_checked"] == r["workload"]["prepare"]["used_pages"]
    m = r["memory"]
    assert m["source_memfd_bytes_after"] == m["source_memfd_bytes_before"]    # scanning faulted nothing in
    assert m["destination_memfd_peak_bytes"] <= m["guest_touched_bytes"]
    pages = 64 * MiB // PAGE_SIZE
    if hint == "none":
        assert r["pages_examined"] >= pages and r["pages_hinted"] == 0       # every page examined
        assert r["pages_sent"] >= r["workload"]["prepare"]["used_pages"] + r["workload"]["prepare"]["stale_pages"]
    else:
        # the free memory (stale and never touched) was hinted and neither read nor sent
        assert r["pages_hinted"] > r["workload"]["prepare"]["stale_pages"]
        assert r["pages_examined"] + r["pages_hinted"] >= pages
        assert r["pages_sent"] < r["workload"]["prepare"]["used_pages"] + r["workload"]["prepare"]["stale_pages"]


def test_dirty_guest_writing_into_hinted_pages_migrates_verified():
    r = run_migration(MigrateTrial(hint="bitmap", guest_mib=128, workload="dirty",
                                   workload_params={"rate_mib_s": 64.0, "free_write_share": 0.5}, timeout_s=120))
    assert r["verified"], r["verification"]
    assert r["pages_hinted_then_dirtied"] > 0            # pages hinted free were reused, and re-sent
    assert r["verification"]["vmm"]["differing_pages"] == 0
    assert r["downtime_ms"] is not None and r["rounds"] >= 1


def test_scanner_chunks_of_selects_exactly_the_given_pages():
    lay = GuestLayout.pc(3076)
    sc = PageScanner(-1, lay, chunk_pages=1024)
    hi = (4 << 30) >> PAGE_SHIFT
    pfns = np.array([0, 5, 1023, 1024, 700000, hi, hi + 1023], dtype=np.int64)
    got = []
    for c0, c1, off, sel in sc.chunks_of(pfns):
        assert c1 - c0 == len(sel) and c1 - c0 <= 1024
        assert off == lay.pfn_to_offset(np.array([c0]))[0]
        got += (np.flatnonzero(sel) + c0).tolist()
    assert got == pfns.tolist()


def test_a_page_lost_at_the_destination_is_named():
    """A real migration, then one held page damaged in the destination's memfd: the
    guest's check fails and names exactly that page."""
    from lab.trials.model.migrate_runner import MigrationPair, _wait_done
    t = MigrateTrial(hint="bitmap", guest_mib=64, workload="idle", timeout_s=120)
    mp = MigrationPair(t)
    try:
        mp.agent.execute("workload-prepare", {"name": "idle", "params": {}, "seed": 3})
        mp.src_qmp.execute("migrate", {"uri": f"tcp:127.0.0.1:{mp.dst_mig['incoming_port']}"})
        q = _wait_done(mp, 120)
        assert q["status"] == "completed" and q["x-balloon-lab"]["verification"]["ok"]
        assert mp.src_qmp.execute("query-status")["status"] == "postmigrate"
        mp.src_qmp.execute("cont")
        assert mp.src_qmp.execute("query-status")["status"] == "running"
        victim = int(mp.agent.execute("info")["ram_pages"]) // 2
        held = mp.agent.execute("migration-verify", {"dest": mp.dest_ram_path})
        assert held["ok"] and held["pages_checked"] > 0
        fd = os.open(mp.dest_ram_path, os.O_RDWR)
        try:
            prep_victim = next((pfn for pfn in range(victim, victim + 16384)      # a page that arrived as data
                                if os.pread(fd, 8, pfn * PAGE_SIZE) != bytes(8)), None)
            assert prep_victim is not None
            os.pwrite(fd, b"\x00" * PAGE_SIZE, prep_victim * PAGE_SIZE)
        finally:
            os.close(fd)
        res = mp.agent.execute("migration-verify", {"dest": mp.dest_ram_path})
        assert not res["ok"] and res["bad_at_destination"] == 1
        assert res["first_bad_destination_pfns"] == [prep_victim] and res["bad_at_source"] == 0
        with pytest.raises(Exception, match="loopback only"):
            mp.src_qmp.execute("migrate", {"uri": "tcp:10.0.0.1:1"})
    finally:
        mp.close()
