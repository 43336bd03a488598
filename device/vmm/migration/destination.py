"""The migration destination: receive guest RAM into this VMM's own memfd.

A VMM started with `--incoming tcp:127.0.0.1:PORT` (PORT 0: any free port, shown by
query-migrate) runs no guest; this thread accepts one connection and applies the
stream (stream.py): data pages are written with pwrite into the memfd (one call
per run of consecutive pages), zero pages are a flag and are not written (a page
that held data here and arrives as zero is punched out, so the memfd only ever
holds what the guest really uses). Everything the source sends is validated; a
malformed stream fails the incoming migration with the reason, never the VMM.
"""
from __future__ import annotations

import logging
import os
import resource
import socket
import threading
import time

import numpy as np

from device.virtio.ram import GuestRAM, process_rss_bytes
from device.virtio.layout import PAGE_SIZE, BadAddress, GuestLayout
from device.vmm.migration import stream
from device.vmm.migration.pages import runs
from device.virtio.page_pattern import fingerprint_memfd

log = logging.getLogger("balloon-lab.migration")


class MigrationDestination(threading.Thread):
    def __init__(self, ram: GuestRAM, uri: str) -> None:
        super().__init__(name="migration-destination", daemon=True)
        self.ram = ram
        self.layout: GuestLayout = ram.layout
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(stream.parse_uri(uri, "--incoming", listen=True))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        self.status = "setup"
        self.error: str | None = None
        self.device_state: dict | None = None
        self.has_data = np.zeros(self.layout.max_pfn, dtype=bool)
        self.flags_buf = bytearray(stream.MAX_PAGES_PER_MESSAGE)
        self.data_buf = bytearray(stream.MAX_PAGES_PER_MESSAGE * PAGE_SIZE)
        self.data_mv = memoryview(self.data_buf)
        self.counters = {"messages": 0, "pages_data": 0, "pages_zero": 0, "pages_punched": 0, "bytes": 0,
                         "pwrite_calls": 0, "rounds": 0}
        self.cpu_s = 0.0
        self.t_first: float | None = None
        self.t_end: float | None = None
        self.finished = threading.Event()

    def run(self) -> None:
        conn = None
        try:
            conn, _ = self.listener.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.status = "active"
            self._receive(conn)
        except Exception as e:
            if self.status != "completed":
                self.status = "failed"
                self.error = f"{type(e).__name__}: {e}"
                log.error("incoming migration failed: %s", self.error)
                if conn is not None:
                    try:
                        stream.send_json(conn, stream.MsgType.ERROR, {"message": self.error})
                    except OSError:
                        pass
        finally:
            if conn is not None:
                conn.close()
            self.listener.close()
            self.finished.set()

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()

    # --- the stream ----------------------------------------------------------------------
    def _receive(self, conn: socket.socket) -> None:
        h, hello = stream.expect(conn, stream.MsgType.HELLO)
        if not isinstance(hello, dict) or hello.get("magic") != stream.MAGIC or hello.get("version") != stream.VERSION:
            raise stream.StreamError(f"not a balloon-lab migration stream of version {stream.VERSION}: {hello!r}")
        if hello.get("page_size") != PAGE_SIZE:
            raise stream.StreamError(f"page size {hello.get('page_size')} differs from {PAGE_SIZE}")
        try:
            theirs = GuestLayout.from_dict(hello["layout"])
        except (KeyError, TypeError, ValueError) as e:
            raise stream.StreamError(f"HELLO carries no valid layout: {e}") from None
        if theirs != self.layout:
            raise stream.StreamError(f"source guest layout {theirs.to_dict()} differs from this VMM's "
                                f"{self.layout.to_dict()} (start the destination with the same --guest-mib)")
        stream.send_json(conn, stream.MsgType.ACK, {"ok": True})
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        self.t_first = time.monotonic()
        while True:
            h = stream.recv_header(conn)
            t = h.type
            if t == stream.MsgType.PAGES:
                self._pages(conn, h)
            elif t == stream.MsgType.ROUND_END:
                stream.recv_json(conn, h)
                self.counters["rounds"] = max(self.counters["rounds"], h.arg)
            elif t == stream.MsgType.DEVICE:
                self.device_state = stream.recv_json(conn, h)
            elif t == stream.MsgType.END:
                ru1 = resource.getrusage(resource.RUSAGE_SELF)
                self.cpu_s = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
                self.t_end = time.monotonic()
                self.status = "completed"
                stream.send_json(conn, stream.MsgType.ACK, self.summary())
            elif t == stream.MsgType.VERIFY:
                fps = fingerprint_memfd(self.ram.fd, self.layout)
                nz = np.flatnonzero(fps)
                stream.send_parts(conn, [stream.header(stream.MsgType.VERIFY_DATA, 0, 8 + 16 * len(nz))]
                             + stream.pack_verify_data(nz, fps[nz]))
            elif t == stream.MsgType.SYNC:
                stream.send_json(conn, stream.MsgType.ACK, {"synced": True})
            elif t == stream.MsgType.ERROR:
                msg = stream.recv_json(conn, h)
                raise stream.StreamError(f"source gave up: {msg.get('message') if isinstance(msg, dict) else msg}")
            elif t == stream.MsgType.BYE:
                return
            else:
                raise stream.StreamError(f"unknown message type {t}")

    def _pages(self, conn: socket.socket, h: stream.Header) -> None:
        if h.length < stream.PAGES_HEAD.size:
            raise stream.StreamError(f"PAGES message of {h.length} bytes is shorter than its header")
        head = stream.recv_payload(conn, stream.PAGES_HEAD.size)
        start, npages, ndata = stream.PAGES_HEAD.unpack(head)
        if not 0 < npages <= stream.MAX_PAGES_PER_MESSAGE or ndata > npages:
            raise stream.StreamError(f"PAGES: {npages} pages / {ndata} data pages (at most {stream.MAX_PAGES_PER_MESSAGE})")
        if h.length != stream.pages_message_len(npages, ndata):
            raise stream.StreamError(f"PAGES length {h.length} does not match {npages} pages with {ndata} data pages")
        try:
            pieces = self.layout.split_runs(start, npages)
        except BadAddress as e:
            raise stream.StreamError(f"PAGES {start:#x}+{npages}: {e}") from None
        if len(pieces) != 1:
            raise stream.StreamError(f"PAGES {start:#x}+{npages} crosses a RAM region edge")
        base = pieces[0][0]
        fmv = memoryview(self.flags_buf)[:npages]
        stream.recv_exact(conn, fmv)
        flags = np.frombuffer(self.flags_buf, dtype=np.uint8, count=npages)
        if (flags > stream.FLAG_DATA).any():
            raise stream.StreamError(f"PAGES {start:#x}: unknown page flag {int(flags.max())}")
        didx = np.flatnonzero(flags == stream.FLAG_DATA)
        if len(didx) != ndata:
            raise stream.StreamError(f"PAGES {start:#x}: header says {ndata} data pages, flags say {len(didx)}")
        stream.recv_exact(conn, self.data_mv[:ndata * PAGE_SIZE])
        pos = 0
        fd = self.ram.fd
        for a, b in zip(*(x.tolist() for x in runs(didx))):
            n = (b - a) * PAGE_SIZE
            src = self.data_mv[pos:pos + n]
            off = base + a * PAGE_SIZE
            done = 0
            while done < n:
                done += os.pwrite(fd, src[done:], off + done)
            self.counters["pwrite_calls"] += 1
            pos += n
        zidx = np.flatnonzero(flags == stream.FLAG_ZERO)
        if len(didx):
            self.has_data[start + didx] = True
        if len(zidx):
            zp = start + zidx
            stale = zidx[self.has_data[zp]]
            if len(stale):          # a page that held data is zero now: drop it (no write of zeros)
                for a, b in zip(*(x.tolist() for x in runs(stale))):
                    self.ram.discard(base + a * PAGE_SIZE, (b - a) * PAGE_SIZE, "punch-hole")
                self.has_data[start + stale] = False
                self.counters["pages_punched"] += len(stale)
        c = self.counters
        c["messages"] += 1
        c["pages_data"] += int(ndata)
        c["pages_zero"] += len(zidx)
        c["bytes"] += stream.HEADER.size + h.length

    # --- reporting ---------------------------------------------------------------------
    def summary(self) -> dict:
        return {"status": self.status, "error": self.error, **self.counters,
                "cpu_s_destination": self.cpu_s,
                "receive_ms": ((self.t_end or time.monotonic()) - self.t_first) * 1000 if self.t_first else None,
                "memfd_bytes": self.ram.allocated_bytes(), "rss_peak_bytes": process_rss_bytes(os.getpid(), "VmHWM"),
                "device_state_received": self.device_state is not None}

    def query(self) -> dict:
        out = {"status": self.status, "x-incoming-port": self.port, "x-balloon-lab": self.summary()}
        if self.error:
            out["error-desc"] = self.error
        return out
