"""Migration fuzzer: a guest that turns hostile while the VMM migrates it.

Built on the control-plane fuzzer's session (fuzz/control_target.py: the real
DeviceChannel, ControlService, BalloonDevice, HintQueues, eventfds and memfd, one
event-loop wake-up at a time), with the steps of a live migration in between the
guest's: the VMM hands the guest a dirty log (SET_DIRTY_LOG over the control socket,
a real sealed memfd, device/virtio/dirty_log.py), asks for free-page hints
(upstream: a new cmd_id; bitmap: a request on the misc queue), snapshots the hinted
pages for round 1, harvests the dirty log, says STOP or DONE. The guest meanwhile:
hints pages (any range, any bitmap, stale or current cmd_id / req_id) and then writes
them, writes pages with or without their dirty mark, scribbles over the log and its
inflight word, tries to shrink the log's memfd, sends SET_DIRTY_LOG itself, answers
the VMM's request late, twice, with a refusal, or never, and stops mid-round (every
later guest step is skipped, the VMM's steps go on).

Oracle, on top of the control fuzzer's (crash, hang = a wake-up over the CPU bound,
no page discarded that no inflate request named, per memfd SEEK_DATA):
  * the device marks as hinted only pages a hint named (a queue-3 buffer's range or
    a set bit of a queue-5 bitmap the guest wrote) that are RAM;
  * a page the guest wrote after round 1 read it, with its mark in the log, is in a
    later harvest, unless the guest itself scribbled over the log: a hinted page
    that is written again is never lost by the VMM's side;
  * the dirty log's memfd cannot be resized by the guest (its size is sealed).
"""
from __future__ import annotations

import errno
import mmap
import os
import random
import struct

import numpy as np

from device.virtio import control
from device.virtio.protocols import WIRE_FORMAT_NAMES
from device.virtio.dirty_log import LOG_OFFSET, DirtyLog
from fuzz.control_cases import LOW, control_step, copy_steps, layout
from fuzz.control_target import ControlWorkerState, run_control

Q_HINT, Q_MISC = 3, 5
HINT_BUF = 0x14000               # where the guest writes cmd_id buffers and bitmaps
MISC_REQ_BUF = 0x16000           # the misc queue's request buffer (the device writes into it)
VMM_STEPS = ("attach", "hint-start", "hint-request", "hint-stop", "hint-done", "round1", "harvest", "detach")


def _hint_step(rng: random.Random, max_pfn: int) -> list:
    r = rng.random()
    if r < 0.25:
        return ["cmd-id", rng.choice(["current", "stale", "stop", "random"])]
    if r < 0.5:
        start = rng.randrange(0, max_pfn + 8) if rng.random() < 0.3 else rng.choice([32, 40, 128, 140, 180])
        n = rng.choice([1, 2, 16, 0])
        return ["hint", [[start << 12 | rng.choice([0, 0, 0, 1]), n << 12]
                         for _ in range(rng.choice([1, 2, 3]))]]
    if r < 0.6:
        return ["misc-buffer", rng.choice([16, 16, 8, 0])]
    return ["bitmap", rng.randrange(0, max_pfn + 8), rng.randbytes(rng.choice([1, 4, 24])).hex(),
            rng.choice(["awaited", "stale", "random"]), rng.choice([0, 1])]


def _guest_step(rng: random.Random, max_pfn: int) -> list:
    r = rng.random()
    if r < 0.45:
        return _hint_step(rng, max_pfn)
    if r < 0.65:
        return ["write", sorted(rng.sample(range(max_pfn), rng.choice([1, 3]))), rng.random() < 0.85]
    if r < 0.72:
        return ["answer", rng.choice([0, 0, -errno.EINVAL]), rng.choice([1, 1, 2])]
    if r < 0.77:
        return ["scribble", rng.randrange(max_pfn + 16), rng.choice([0, 1, 2, 0xFF])]
    if r < 0.81:
        return ["shrink-log"]
    if r < 0.85:
        return ["stop"]
    if r < 0.9:
        return ["msg", control.Req.SET_DIRTY_LOG, control.VERSION, None, struct.pack("<QQQQ", 192, 4096, 0, 8192).hex(), ["memfd"]]
    return ["kick", rng.choice([Q_HINT, Q_MISC, 0])]


def gen_migration(rng: random.Random) -> dict:
    hint = rng.choice(["upstream", "bitmap", "upstream", "bitmap", "none"])
    queues = [0, 1, Q_HINT, Q_MISC]
    steps: list[list] = [["setup", queues]]
    max_pfn = layout().max_pfn
    plan = ["attach", ["answer", 0, 1], ["misc-buffer", 16], "hint-start", "hint-request", ["cmd-id", "current"]] + \
        [None] * rng.choice([1, 3, 6]) + ["round1"] + [None] * rng.choice([1, 2]) + ["harvest", "hint-done", "harvest"]
    for p in plan:
        if isinstance(p, list):
            steps.append(p)
        elif p is not None:
            steps.append([p])
        else:
            steps.append(_guest_step(rng, max_pfn) if rng.random() < 0.8 else [rng.choice(VMM_STEPS)])
    return {"t": "migration", "proto": rng.choice(WIRE_FORMAT_NAMES), "hint": hint,
            "max_queued": rng.choice([2, 8, 64]), "steps": steps}


def mutate_migration(case: dict, rng: random.Random, pool: list[dict]) -> dict:
    c = dict(case, steps=copy_steps(case["steps"]))
    steps = c["steps"]
    max_pfn = layout().max_pfn
    for _ in range(rng.choice([1, 2, 3])):
        r = rng.random()
        if r < 0.35:
            steps.insert(rng.randrange(1, len(steps) + 1), _guest_step(rng, max_pfn))
        elif r < 0.5:
            steps.insert(rng.randrange(1, len(steps) + 1), [rng.choice(VMM_STEPS)])
        elif r < 0.65 and len(steps) > 2:
            del steps[rng.randrange(1, len(steps))]
        elif r < 0.8 and len(steps) > 2:
            i, j = rng.randrange(1, len(steps)), rng.randrange(1, len(steps))
            steps[i], steps[j] = steps[j], steps[i]
        elif r < 0.9:
            steps.insert(rng.randrange(1, len(steps) + 1), control_step(rng))     # any control-plane step
        else:
            c["hint"] = rng.choice(["upstream", "bitmap", "none"])
    del steps[120:]
    return c


class MigrationSteps:
    """The migration's steps and checks, plugged into fuzz.control_target.run_control."""

    def __init__(self) -> None:
        self.log: DirtyLog | None = None
        self.guest_log: mmap.mmap | None = None       # the guest's mapping of the log it was given
        self.guest_log_fd: int | None = None
        self.stopped = False                           # the guest stopped answering mid-round
        self.round1: np.ndarray | None = None          # hinted when round 1 read the pages
        self.harvested: set[int] = set()
        self.marked_after_round1: set[int] = set()
        self.scribbled = False
        self.hint_bound: set[int] = set()
        self.failure: tuple[str, str] | None = None

    # --- steps ----------------------------------------------------------------------------
    def step(self, step: list, ctx: dict) -> bool:
        kind = step[0]
        wakeup = ctx["wakeup"]
        if kind in VMM_STEPS:
            with ctx["wake"].timed(f"the VMM's migration step {kind}"):   # the VMM runs it in its loop
                self._vmm(kind, ctx)
            wakeup(f"after the VMM's migration step {kind}")
            return True
        guest_kinds = {"cmd-id", "hint", "misc-buffer", "bitmap", "write", "answer", "scribble", "shrink-log",
                       "stop", "msg", "raw", "flood", "read", "kick", "inflate", "hup"}
        if kind == "stop":
            self.stopped = True
            return True
        if self.stopped and kind in guest_kinds:
            return True                                # a stopped guest does nothing more
        if kind in ("cmd-id", "hint", "misc-buffer", "bitmap"):
            self._guest(step, ctx)
            wakeup(f"the guest's {kind}")
            return True
        return self._guest(step, ctx)

    def _guest(self, step: list, ctx: dict) -> bool:
        kind = step[0]
        guest, hints, wakeup = ctx["guest"], ctx["hints"], ctx["wakeup"]
        if kind == "cmd-id":
            cid = {"current": hints.cmd_id, "stale": max(hints.cmd_id - 1, 0), "stop": 0,
                   "random": random.Random(len(self.harvested)).getrandbits(32)}[step[1]]
            guest.write(HINT_BUF, struct.pack("<I", cid))
            guest.post(Q_HINT, [(HINT_BUF, 4, False)])
            return True
        if kind == "hint":
            bufs = [(g, ln, True) for g, ln in step[1]]     # hint buffers are device-writable (inbufs)
            if guest.post(Q_HINT, bufs):
                for g, ln in step[1]:
                    self.hint_bound.update(range(g >> 12, (g + ln + 4095) >> 12))
            return True
        if kind == "misc-buffer":
            guest.post(Q_MISC, [(MISC_REQ_BUF, step[1], True)])
            return True
        if kind == "bitmap":
            _, start, bits_hex, which, last = step
            req_id = {"awaited": hints.awaiting or 0, "stale": max(hints.req_id - 1, 0),
                      "random": 0xDEADBEEF}[which]
            bits = bytes.fromhex(bits_hex)
            raw = struct.pack("<HHHHQQQ", 2, 12, last, 0, req_id, start, len(bits)) + bits
            if guest.post(Q_MISC, [(HINT_BUF, len(raw), False)]):
                guest.write(HINT_BUF, raw)
                b = np.unpackbits(np.frombuffer(bits, dtype=np.uint8), bitorder="little")
                self.hint_bound.update((np.flatnonzero(b) + start).tolist())
            return True
        if kind == "write":
            _, pfns, mark = step
            for pfn in pfns:
                off = ctx["state"].regions.gpa_to_offset(pfn << 12, 8)     # the fuzzer's own table
                if off is None:
                    continue
                if off < LOW:
                    continue                           # rings and requests: not the guest's data
                ctx["state"].ram.mem[off:off + 8] = struct.pack("<Q", 0x5A5A0000 + pfn)
                if mark and self.guest_log is not None and pfn < len(self.guest_log) - LOG_OFFSET:
                    self.guest_log[LOG_OFFSET + pfn] = 1
                    if self.round1 is not None:
                        self.marked_after_round1.add(pfn)
            return True
        if kind == "answer":
            _, code, times = step
            guest.read(1 << 30)
            for req, _payload, fds in list(guest.vmm_requests):
                if req == control.Req.SET_DIRTY_LOG and fds and self.guest_log is None and code == 0:
                    self._map_guest_log(fds[0])
                for _ in range(times):
                    guest.send(control.HEADER.pack(req, control.VERSION | control.FLAG_REPLY, 8) + struct.pack("<q", code), [], None)
                    wakeup("the guest's answer")
            guest.close_vmm_requests()
            return True
        if kind == "scribble":
            if self.guest_log is not None:
                _, pfn, value = step
                off = LOG_OFFSET + pfn if pfn < len(self.guest_log) - LOG_OFFSET else 0
                self.guest_log[off] = value
                self.scribbled = True
            return True
        if kind == "shrink-log":
            if self.guest_log_fd is not None:
                try:
                    os.ftruncate(self.guest_log_fd, 4096)
                    self.failure = ("crash", "the guest shrank the dirty log's memfd: its size is not sealed")
                except PermissionError:
                    pass
            return True
        return False                                   # a control-plane step: run_control serves it

    def _map_guest_log(self, fd: int) -> None:
        self.guest_log_fd = os.dup(fd)
        self.guest_log = mmap.mmap(self.guest_log_fd, os.fstat(self.guest_log_fd).st_size)

    def _vmm(self, kind: str, ctx: dict) -> None:
        dev, hints, chan = ctx["dev"], ctx["hints"], ctx["chan"]
        if kind == "attach":
            if self.log is None and not ctx["gone"]:
                self.log = DirtyLog(dev.layout.max_pfn)
                hints.mark_dirty = self.log.mark
                ctx["expect"].append(int(control.Req.SET_DIRTY_LOG))
                try:
                    chan.send(control.Req.SET_DIRTY_LOG, self.log.payload(), [self.log.fd])
                except control.ControlError:
                    pass
        elif kind == "detach":
            hints.mark_dirty = None
        elif kind == "hint-start":
            if ctx["case"]["hint"] == "upstream" and hints.upstream_ready:
                hints.reset()
                hints.start_upstream()
        elif kind == "hint-request":
            if ctx["case"]["hint"] == "bitmap" and hints.bitmap_ready:
                hints.reset()
                hints.request_bitmap()
        elif kind == "hint-stop":
            hints.stop_upstream()
        elif kind == "hint-done":
            hints.done_upstream()
        elif kind == "round1":
            self.round1 = hints.hinted.copy()
        elif kind == "harvest" and self.log is not None:
            self.harvested.update(self.log.harvest().tolist())

    # --- checks -----------------------------------------------------------------------------
    def check(self, ctx: dict) -> tuple[str | None, str]:
        if self.failure is not None:
            return self.failure
        hints, state = ctx["hints"], ctx["state"]
        marked = np.flatnonzero(hints.hinted)
        ram_mask = state.regions.ram_mask()
        ram = (marked < ram_mask.size) & ram_mask[np.minimum(marked, ram_mask.size - 1)] if marked.size else \
            marked.astype(bool)
        wrong = [int(p) for p, r in zip(marked.tolist(), ram.tolist()) if not r or p not in self.hint_bound]
        if wrong:
            return "crash", f"hint device marked pages {wrong[:8]} free that no hint named (or no RAM)"
        if self.log is not None and not self.scribbled:
            final = set(self.log.harvest().tolist()) | self.harvested
            missed = sorted(self.marked_after_round1 - final)
            if missed:
                return "crash", f"pages {missed[:8]} written and marked after round 1 are in no harvest"
        return None, ""

    def signature(self, ctx: dict) -> tuple:
        h = ctx["hints"]
        return ("migration", bool(h.hinted.any()), self.log is not None, self.guest_log is not None,
                self.stopped, bool(self.marked_after_round1), h.reporting, h.awaiting is not None)

    def close(self) -> None:
        if self.guest_log is not None:
            self.guest_log.close()
        if self.guest_log_fd is not None:
            os.close(self.guest_log_fd)
        if self.log is not None:
            self.log.close()
        self.guest_log = self.guest_log_fd = self.log = None


def run_migration(state: ControlWorkerState, case: dict, limit_s: float) -> tuple[str | None, str, tuple]:
    ms = MigrationSteps()
    try:
        return run_control(state, case, limit_s, extra=ms)
    finally:
        ms.close()
