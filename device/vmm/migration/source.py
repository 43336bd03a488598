"""The migration source: pre-copy rounds, free-page hints, stop-and-copy, verification.

Runs in its own thread of the source VMM (like QEMU's migration thread); whatever
touches the device or the control socket runs in the VMM's main loop through the
`port` (see controller.py). One migration:

 1. setup: connect (TCP, 127.0.0.1 only), HELLO/ACK, hand the guest a fresh dirty
    log (SET_DIRTY_LOG) and wait until it is attached: from then on every guest
    write is logged. Then ask for hints: upstream writes a new cmd_id and races the
    first round (as QEMU does, hints clear pages not yet sent); bitmap asks on the
    misc queue and waits for the whole bitmap (up to hint_wait_s), as the seed did.
 2. round 1: every RAM page except those hinted free at the moment its chunk is
    read. Without hints that is every guest page, read with pread (never-touched
    pages read as zeros without being allocated) and sent as data or a zero flag.
    Upstream then writes DONE: the guest takes its blocks back; any reuse is logged.
 3. rounds 2..n: the pages the dirty log shows, until the rest fits the downtime
    limit at the measured rate (or max_rounds).
 4. stop-and-copy: stop the guest (no write half-logged, pause.py), send what is
    dirty plus the virtqueue pages the device writes, the device state, END; the
    destination's ACK ends the downtime.
 5. verification (not timed): the destination sends the fingerprint of every page
    it holds; every page must match the source except pages skipped as hinted and
    never written since (those are free in the guest); the first differing PFNs
    are named.
The guest stays stopped afterwards (QEMU's postmigrate) until `cont`.
"""
from __future__ import annotations

import logging
import os
import resource
import socket
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from device.virtio.ram import GuestRAM, process_rss_bytes
from device.virtio.layout import PAGE_SIZE
from device.vmm.migration import stream
from device.virtio.dirty_log import DirtyLog
from device.vmm.migration.pages import PageScanner
from device.virtio.page_pattern import fingerprint_memfd
from device.vmm.migration.pause import pause_guest, resume_guest
from device.vmm.migration.ratelimit import TokenBucket
from device.vmm.migration.stream import parse_uri

log = logging.getLogger("balloon-lab.migration")


@dataclass
class MigrationParams:
    """QEMU's migrate-set-parameters names where they exist."""

    max_bandwidth: int = 10**10 // 8        # bytes/s (QEMU's unit); 10 Gbit/s
    downtime_limit_ms: float = 300.0        # QEMU's default
    max_rounds: int = 30
    hint_wait_s: float = 2.0                # bitmap: how long to wait for the guest's bitmap
    connect_timeout_s: float = 10.0

    def to_json(self) -> dict:
        return {"max-bandwidth": self.max_bandwidth, "downtime-limit": self.downtime_limit_ms,
                "x-max-rounds": self.max_rounds, "x-hint-wait-ms": self.hint_wait_s * 1000}


@dataclass
class RoundStats:
    round: int
    pages_examined: int = 0
    pages_sent: int = 0        # data pages
    pages_zero: int = 0
    pages_hinted: int = 0      # skipped because hinted free (round 1)
    bytes_sent: int = 0
    bytes_read: int = 0
    ms: float = 0.0
    scan_ms: float = 0.0       # pread + zero detection
    send_ms: float = 0.0       # sendmsg (blocks while the destination is behind)
    throttle_ms: float = 0.0   # sleeping in the token bucket (the link's rate)


@dataclass
class MigrationState:
    status: str = "setup"
    error: str | None = None
    hint: str = "none"
    t_start: float = 0.0
    setup_ms: float = 0.0
    hint_ms: float | None = None
    total_ms: float | None = None
    downtime_ms: float | None = None
    expected_downtime_ms: float | None = None
    converged: bool | None = None
    rounds: list[RoundStats] = field(default_factory=list)
    stop_copy: RoundStats | None = None
    pause_attempts: int = 0
    downtime_parts_ms: dict = field(default_factory=dict)
    pause_ms: float = 0.0
    bytes_sent: int = 0
    pages_hinted_then_dirtied: int = 0
    remaining_pages: int = 0
    rate_slept_s: float = 0.0
    cpu_s_source: float | None = None
    cpu_s_guest: float | None = None
    source_memfd_bytes_before: int = 0
    source_memfd_bytes_after: int = 0
    source_rss_peak_bytes: int = 0
    destination: dict | None = None
    hints: dict | None = None
    verification: dict | None = None


def _proc_cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            st = f.read()
    except FileNotFoundError:
        return 0.0
    fields = st[st.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _self_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class MigrationSource(threading.Thread):
    """One outgoing migration. `port` runs device/control work in the VMM main loop:
    attach_dirty_log(log), start_hints(design), hints_done(design), hint_snapshot(),
    ring_pfns(), device_state(), guest_pid(), hinted (bool array), report_done (Event)."""

    def __init__(self, ram: GuestRAM, port, uri: str, hint: str, params: MigrationParams) -> None:
        super().__init__(name="migration-source", daemon=True)
        self.ram = ram
        self.layout = ram.layout
        self.port = port
        self.addr = parse_uri(uri)
        self.params = params
        self.st = MigrationState(hint=hint)
        self.cancelled = threading.Event()
        self.finished = threading.Event()
        self.paused_pid: int | None = None
        self.hints_released = False
        self.sock: socket.socket | None = None
        self.dirty: DirtyLog | None = None
        max_pfn = self.layout.max_pfn
        self.dst_stale = np.zeros(max_pfn, dtype=bool)   # skipped as hinted, not sent since
        self.ram_mask = self.layout.ram_pfn_mask(np.arange(max_pfn))
        self.bucket = TokenBucket(params.max_bandwidth)
        self.scanner = PageScanner(ram.fd, self.layout)

    # --- the thread ---------------------------------------------------------------------
    def run(self) -> None:
        st = self.st
        st.t_start = time.monotonic()
        st.status = "setup"
        try:
            self._migrate()
        except Exception as e:      # reported on query-migrate; the guest keeps running
            st.status = "cancelled" if self.cancelled.is_set() else "failed"
            st.error = f"{type(e).__name__}: {e}"
            log.error("migration failed: %s", st.error)
            try:
                if self.sock is not None:
                    stream.send_json(self.sock, stream.MsgType.ERROR, {"message": st.error})
            except OSError:
                pass
            if self.paused_pid is not None:
                resume_guest(self.paused_pid)
                self.paused_pid = None
            if st.hint == "upstream" and not self.hints_released:
                try:        # like QEMU's PRECOPY_NOTIFY_CLEANUP: the guest must get its blocks back
                    self.port.hints_done(st.hint)
                except Exception as e2:
                    log.error("could not send DONE to the guest: %s", e2)
        finally:
            if self.sock is not None:
                self.sock.close()
            self.finished.set()

    def cancel(self) -> None:
        self.cancelled.set()

    def _check_cancel(self) -> None:
        if self.cancelled.is_set():
            raise RuntimeError("migration cancelled")

    def _migrate(self) -> None:
        st, p = self.st, self.params
        cpu0 = _self_cpu_s()
        gpid = self.port.guest_pid()
        gcpu0 = _proc_cpu_s(gpid)
        st.source_memfd_bytes_before = self.ram.allocated_bytes()
        self.sock = socket.create_connection(self.addr, timeout=p.connect_timeout_s)
        self.sock.settimeout(None)
        # small control messages (END, SYNC, ACK) must not wait for Nagle / delayed ACK (40 ms)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream.send_json(self.sock, stream.MsgType.HELLO, {"magic": stream.MAGIC, "version": stream.VERSION, "page_size": PAGE_SIZE,
                                                 "layout": self.layout.to_dict(), "hint": st.hint})
        stream.expect(self.sock, stream.MsgType.ACK)
        # dirty logging on before anything is read or hinted
        self.dirty = DirtyLog(self.layout.max_pfn)
        self.port.attach_dirty_log(self.dirty)
        ring_pfns = self.port.ring_pfns()       # fixed once the driver is live: fetched outside the downtime
        st.setup_ms = (time.monotonic() - st.t_start) * 1000
        st.status = "active"
        hinted = self.port.hinted
        if st.hint != "none":
            t_h = time.monotonic()
            self.port.start_hints(st.hint)
            if st.hint == "bitmap":
                if not self.port.report_done.wait(p.hint_wait_s):
                    log.warning("free page bitmap not complete within %.1f s; round 1 uses what arrived", p.hint_wait_s)
            st.hint_ms = (time.monotonic() - t_h) * 1000
        # round 1
        t_send = time.monotonic()
        self._round(1, hinted if st.hint != "none" else None, None)
        if st.hint == "upstream":
            self.port.hints_done(st.hint)
            self.hints_released = True
        st.hints = self.port.hint_snapshot() if st.hint != "none" else None
        # rounds 2..n
        dirty = self.dirty.harvest()
        while True:
            self._check_cancel()
            st.expected_downtime_ms = self._expected_ms(len(dirty), time.monotonic() - t_send)
            st.remaining_pages = len(dirty)
            if st.expected_downtime_ms <= p.downtime_limit_ms:
                st.converged = True
                break
            if len(st.rounds) >= p.max_rounds:
                st.converged = False
                break
            self._round(len(st.rounds) + 1, None, dirty)
            dirty = self.dirty.harvest()
        # drain what the destination has not applied yet, then stop-and-copy
        stream.send_empty(self.sock, stream.MsgType.SYNC)
        stream.expect(self.sock, stream.MsgType.ACK)
        st.status = "device"
        t_stop = time.monotonic()
        pr = pause_guest(gpid, self.dirty.inflight)
        self.paused_pid = gpid
        st.pause_attempts, st.pause_ms = pr.attempts, pr.wait_ns / 1e6
        marks = [("pause", time.monotonic())]
        final = np.union1d(np.union1d(dirty, self.dirty.harvest()), ring_pfns)
        marks.append(("harvest", time.monotonic()))
        st.stop_copy = self._send_pfns(0, final)
        marks.append(("send_pages", time.monotonic()))
        stream.send_json(self.sock, stream.MsgType.DEVICE, self.port.device_state())
        marks.append(("device_state", time.monotonic()))
        stream.send_empty(self.sock, stream.MsgType.END)
        _, ack = stream.expect(self.sock, stream.MsgType.ACK)
        t_end = time.monotonic()
        marks.append(("destination_ack", t_end))
        prev = t_stop
        for name, t in marks:
            st.downtime_parts_ms[name] = (t - prev) * 1000
            prev = t
        st.downtime_ms = (t_end - t_stop) * 1000
        st.total_ms = (t_end - st.t_start) * 1000
        st.remaining_pages = 0
        st.rate_slept_s = self.bucket.slept_s
        st.cpu_s_source = _self_cpu_s() - cpu0
        st.cpu_s_guest = _proc_cpu_s(gpid) - gcpu0
        st.source_memfd_bytes_after = self.ram.allocated_bytes()
        st.source_rss_peak_bytes = process_rss_bytes(os.getpid(), "VmHWM")
        st.destination = ack
        st.status = "completed"
        log.info("migration completed in %.1f ms (downtime %.1f ms, %d rounds)", st.total_ms, st.downtime_ms,
                 len(st.rounds))
        st.verification = self._verify()
        stream.send_empty(self.sock, stream.MsgType.BYE)

    def _expected_ms(self, pages: int, elapsed_s: float) -> float:
        """How long sending `pages` dirty pages would take: at the page rate the last
        round achieved when it was a round of dirty pages (scattered pages cost more
        than the bulk of round 1), else at the byte rate achieved so far, never
        faster than the link."""
        last = self.st.rounds[-1] if self.st.rounds else None
        link_ms = pages * (PAGE_SIZE + 1) / self.params.max_bandwidth * 1000
        if last is not None and last.round > 1 and last.ms > 0 and last.pages_sent + last.pages_zero >= 64:
            return max(link_ms, pages / ((last.pages_sent + last.pages_zero) / last.ms))
        if elapsed_s > 0 and self.st.bytes_sent:
            return max(link_ms, pages * (PAGE_SIZE + 1) / (self.st.bytes_sent / elapsed_s) * 1000)
        return link_ms

    # --- sending -----------------------------------------------------------------------------
    def _round(self, no: int, hinted: np.ndarray | None, pfns: np.ndarray | None) -> RoundStats:
        """Round 1 (pfns None): every RAM page not hinted when its chunk is read.
        Later rounds: the given PFNs."""
        if pfns is not None:
            rs = self._send_pfns(no, pfns)
        else:
            rs = RoundStats(no)
            t0 = time.monotonic()
            total = self.layout.ram_pages
            done = 0
            for c0, c1, off0 in self.scanner.chunks():
                self._check_cancel()
                if hinted is not None:
                    skip = hinted[c0:c1].copy()     # hints keep arriving (upstream): decide now
                    self.dst_stale[c0:c1] = skip
                    n_skip = int(np.count_nonzero(skip))
                    rs.pages_hinted += n_skip
                    sel = ~skip
                else:
                    sel = np.ones(c1 - c0, dtype=bool)
                self._send_chunk(no, c0, off0, sel, rs)
                done += c1 - c0
                self.st.remaining_pages = total - done
            rs.ms = (time.monotonic() - t0) * 1000
        self.st.rounds.append(rs)
        stream.send_json(self.sock, stream.MsgType.ROUND_END, {"round": no, "pages": rs.pages_sent + rs.pages_zero}, arg=no)
        return rs

    def _send_pfns(self, no: int, pfns: np.ndarray) -> RoundStats:
        rs = RoundStats(no)
        t0 = time.monotonic()
        pfns = np.unique(np.asarray(pfns, dtype=np.int64))
        pfns = pfns[(pfns >= 0) & (pfns < self.layout.max_pfn)]
        pfns = pfns[self.ram_mask[pfns]]
        if len(pfns):
            self.st.pages_hinted_then_dirtied += int(np.count_nonzero(self.dst_stale[pfns]))
            self.dst_stale[pfns] = False
            for c0, _c1, off0, sel in self.scanner.chunks_of(pfns):
                self._send_chunk(no, c0, off0, sel, rs)
        rs.ms = (time.monotonic() - t0) * 1000
        return rs

    def _send_chunk(self, no: int, c0: int, off0: int, sel: np.ndarray, rs: RoundStats) -> None:
        t0 = time.perf_counter()
        res = self.scanner.read_chunk(c0, off0, sel)
        t1 = time.perf_counter()
        rs.scan_ms += (t1 - t0) * 1000
        if res is None:
            return
        npages = len(res.flags)
        length = stream.pages_message_len(npages, res.ndata)
        parts = [stream.header(stream.MsgType.PAGES, no, length), stream.PAGES_HEAD.pack(res.start_pfn, npages, res.ndata),
                 res.flags] + res.data
        n = stream.HEADER.size + length
        slept = self.bucket.slept_s
        self.bucket.consume(n)
        t2 = time.perf_counter()
        stream.send_parts(self.sock, parts)
        rs.throttle_ms += (self.bucket.slept_s - slept) * 1000
        rs.send_ms += (time.perf_counter() - t2) * 1000
        rs.pages_examined += res.examined
        rs.pages_sent += res.ndata
        rs.pages_zero += res.nzero
        rs.bytes_sent += n
        rs.bytes_read += res.bytes_read
        self.st.bytes_sent += n

    # --- verification --------------------------------------------------------------------------
    def _verify(self) -> dict:
        """Every page outside the hinted-and-never-rewritten set must have the same
        fingerprint at both ends (holes and zero pages count as 0)."""
        t0 = time.monotonic()
        stream.send_empty(self.sock, stream.MsgType.VERIFY)
        src = fingerprint_memfd(self.ram.fd, self.layout, skip=self.dst_stale)
        _, raw = stream.expect(self.sock, stream.MsgType.VERIFY_DATA)
        pfns, fps = stream.unpack_verify_data(raw)
        dst = np.zeros(self.layout.max_pfn, dtype=np.uint64)
        ok_idx = (pfns >= 0) & (pfns < self.layout.max_pfn)
        dst[pfns[ok_idx]] = fps[ok_idx]
        diff = (src != dst) & ~self.dst_stale
        bad = np.flatnonzero(diff)
        checked = int(np.count_nonzero(self.ram_mask & ~self.dst_stale))
        return {"ok": not len(bad), "pages_compared": checked, "pages_not_compared_hinted_free":
                int(np.count_nonzero(self.dst_stale)), "differing_pages": int(len(bad)),
                "first_differing_pfns": [int(x) for x in bad[:16]],
                "source_data_pages": int(np.count_nonzero(src)), "destination_data_pages": int(np.count_nonzero(dst)),
                "ms": (time.monotonic() - t0) * 1000}

    # --- reporting ---------------------------------------------------------------------------------
    def query(self) -> dict:
        """QEMU's query-migrate shape, plus everything the lab measures under x-balloon-lab."""
        st = self.st
        rounds = st.rounds + ([st.stop_copy] if st.stop_copy else [])
        normal = sum(r.pages_sent for r in rounds)
        zero = sum(r.pages_zero for r in rounds)
        elapsed = st.total_ms if st.total_ms is not None else (time.monotonic() - st.t_start) * 1000
        out = {
            "status": st.status,
            "total-time": int(elapsed),
            "setup-time": int(st.setup_ms),
            "ram": {"transferred": st.bytes_sent, "remaining": st.remaining_pages * PAGE_SIZE,
                    "total": self.layout.ram_bytes, "duplicate": zero, "normal": normal,
                    "normal-bytes": normal * PAGE_SIZE, "dirty-sync-count": self.dirty.harvests if self.dirty else 0,
                    "mbps": st.bytes_sent * 8 / 1e6 / max(elapsed / 1000, 1e-9), "page-size": PAGE_SIZE},
        }
        if st.downtime_ms is not None:
            out["downtime"] = int(round(st.downtime_ms))
        if st.expected_downtime_ms is not None:
            out["expected-downtime"] = int(round(st.expected_downtime_ms))
        if st.error:
            out["error-desc"] = st.error
        out["x-balloon-lab"] = self.details()
        return out

    def details(self) -> dict:
        st = self.st
        rounds = st.rounds + ([st.stop_copy] if st.stop_copy else [])
        return {
            "hint": st.hint, "status": st.status, "error": st.error,
            "total_ms": st.total_ms, "downtime_ms": st.downtime_ms, "setup_ms": st.setup_ms, "hint_ms": st.hint_ms,
            "expected_downtime_ms": st.expected_downtime_ms, "converged": st.converged,
            "rounds": len(st.rounds),
            "bytes_sent": st.bytes_sent,
            "pages_sent": sum(r.pages_sent for r in rounds),
            "pages_zero": sum(r.pages_zero for r in rounds),
            "pages_hinted": st.rounds[0].pages_hinted if st.rounds else 0,
            "pages_examined": sum(r.pages_examined for r in rounds),
            "bytes_read": sum(r.bytes_read for r in rounds),
            "pages_hinted_then_dirtied": st.pages_hinted_then_dirtied,
            "stop_copy_pages": (st.stop_copy.pages_sent + st.stop_copy.pages_zero) if st.stop_copy else None,
            "pause_attempts": st.pause_attempts, "pause_ms": st.pause_ms,
            "downtime_parts_ms": st.downtime_parts_ms,
            "rate_limit_slept_s": st.rate_slept_s,
            "cpu_s_source": st.cpu_s_source, "cpu_s_guest": st.cpu_s_guest,
            "source_memfd_bytes_before": st.source_memfd_bytes_before,
            "source_memfd_bytes_after": st.source_memfd_bytes_after,
            "source_rss_peak_bytes": st.source_rss_peak_bytes,
            "per_round": [r.__dict__ for r in rounds],
            "hints": st.hints, "destination": st.destination, "verification": st.verification,
            "params": self.params.to_json(),
        }
