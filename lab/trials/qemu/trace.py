"""QEMU's own view of the balloon: its trace events (log backend, `-trace NAME -D FILE`).

Debian's QEMU has no USDT notes, but its log trace backend writes one line per event.
Per virtqueue this gives, from QEMU's side:
- requests: `virtqueue_pop` (one per request the device takes off the ring),
- kicks: `virtio_queue_notify` (the guest's notify write; traced on the MMIO path
  QEMU takes under TCG; under KVM with ioeventfd a kick reaches the device through
  an eventfd instead and is not traced),
- interrupts: `virtio_notify` / `virtio_notify_irqfd` (emitted only when QEMU does
  notify, i.e. after the EVENT_IDX check),
- pages: `virtio_balloon_handle_output` (one per page QEMU handles, with its GPA).
Queue pointers are mapped to queue indexes from `virtio_queue_notify` lines (they
carry both); the balloon is the guest's only virtio device (`-nodefaults`).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

_LINE = re.compile(r"^(?:\d+@(\d+)\.(\d+):)?(\w+) (.*)$")
_NOTIFY = re.compile(r"vdev (\S+) n (\d+) vq (\S+)")
_VQ = re.compile(r"vq (\S+)")
_TARGET = re.compile(r"num_pages: (-?\d+)")


@dataclass
class QueueCounts:
    requests: int = 0
    kicks: int = 0
    interrupts: int = 0


@dataclass
class TraceWindow:
    """What the trace saw between two marks."""

    queues: dict[int, QueueCounts] = field(default_factory=dict)
    pages: int = 0                 # virtio_balloon_handle_output lines
    first_page_us: int | None = None
    last_page_us: int | None = None
    targets: list[int] = field(default_factory=list)   # num_pages of virtio_balloon_to_target
    unknown_vq: int = 0            # events on a queue never seen in a notify line

    def queue(self, n: int) -> QueueCounts:
        return self.queues.setdefault(n, QueueCounts())

    @property
    def device_span_ns(self) -> int | None:
        """From the first to the last page QEMU handled (the device's busy span)."""
        if self.first_page_us is None or self.last_page_us is None:
            return None
        return (self.last_page_us - self.first_page_us) * 1000


class TraceReader:
    """Reads a QEMU trace log incrementally; window() counts events since the last mark."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.offset = 0
        self.vq_index: dict[str, int] = {}
        self.partial = b""

    def mark(self) -> None:
        """Start a new window at the current end of the log."""
        self.read_window()

    def read_window(self) -> TraceWindow:
        w = TraceWindow()
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return w
        self.offset += len(data)
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        for raw in lines:
            self._count(raw.decode(errors="replace"), w)
        return w

    def _count(self, line: str, w: TraceWindow) -> None:
        m = _LINE.match(line)
        if not m:
            return
        sec, usec, event, rest = m.groups()
        if event == "virtio_balloon_handle_output":
            w.pages += 1
            if sec is not None:
                ts = int(sec) * 1_000_000 + int(usec)
                if w.first_page_us is None:
                    w.first_page_us = ts
                w.last_page_us = ts
        elif event == "virtqueue_pop":
            self._on_vq(rest, w, "requests")
        elif event == "virtio_queue_notify":
            n = _NOTIFY.search(rest)
            if n:
                self.vq_index[n.group(3)] = int(n.group(2))
                w.queue(int(n.group(2))).kicks += 1
        elif event in ("virtio_notify", "virtio_notify_irqfd"):
            self._on_vq(rest, w, "interrupts")
        elif event == "virtio_balloon_to_target":
            t = _TARGET.search(rest)
            if t:
                w.targets.append(int(t.group(1)))

    def _on_vq(self, rest: str, w: TraceWindow, what: str) -> None:
        m = _VQ.search(rest)
        if not m or m.group(1) not in self.vq_index:
            w.unknown_vq += 1
            return
        q = w.queue(self.vq_index[m.group(1)])
        setattr(q, what, getattr(q, what) + 1)


def settled_window(reader: TraceReader, expect_pages: int, timeout: float = 5.0) -> TraceWindow:
    """The window of one balloon operation, read until it holds `expect_pages` page
    lines or stops growing (QEMU flushes its log per event; a short wait covers the
    last request's lines racing with the guest's `actual` update)."""
    total = reader.read_window()
    deadline = time.monotonic() + timeout
    while total.pages < expect_pages and time.monotonic() < deadline:
        time.sleep(0.05)
        _merge(total, reader.read_window())
    return total


def _merge(into: TraceWindow, more: TraceWindow) -> None:
    for n, q in more.queues.items():
        t = into.queue(n)
        t.requests += q.requests
        t.kicks += q.kicks
        t.interrupts += q.interrupts
    into.pages += more.pages
    if more.first_page_us is not None and into.first_page_us is None:
        into.first_page_us = more.first_page_us
    if more.last_page_us is not None:
        into.last_page_us = more.last_page_us
    into.targets += more.targets
    into.unknown_vq += more.unknown_vq
