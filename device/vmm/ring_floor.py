"""The ring's floor on this machine: what the lab's own machinery cannot go below.

    python -m device.vmm.ring_floor [--round-trips N] [--guest-mib M] [--json]

Figures measured now, in the processes the lab runs (this one is the VMM's kind, the
peer it spawns the guest's: `python -m device.guest.ring_peer`, same interpreter, the
eventfds passed down as the VMM passes the kick and call eventfds):

  round trip   an eventfd ping-pong between the two: the guest writes the kick eventfd
               and sleeps in epoll on the call eventfd; this side sleeps in epoll on
               the kick eventfd, reads it and writes the call eventfd. Nothing else:
               no ring, no request, no device work. Back to back, the two processes
               wake each other within microseconds, usually on one CPU that never
               goes idle: the *hot* floor.
  held round   the same ping-pong, but this side holds each request as long as a PFN
  trip         request's discards take (`hold`: 256 single-page madvise(MADV_REMOVE)
               of resident memfd pages, timed bare in this process first), busy, as
               the device is in madvise, before it writes the call; the held round
               trip is the guest's time less the hold. Meanwhile the guest sleeps and
               its CPU goes idle, as the driver's does during a real request, so each
               wake-up is that of an idle CPU (on this kind of VM, tens of us: the
               vCPU halts at once, `haltpoll.guest_halt_poll_ns=0`). One request of the
               PFN protocol needs one such round trip at least (the guest waits for
               each request, as Linux's tell_host does), so its transmit stage per
               request (the device's translate and discard excluded) is compared with
               this (`balloon-lab run`, `compare`, `show`, the report, `bench pfn-madvise`).
  translate    the least translation of one request's 256 PFNs, warm: the sort that
               finds its span and the span's translation (GuestLayout.translate_pfn_span,
               one RAM region holding the request), the least the device's translate
               stage does per PFN request in Python.

What a request costs above these is the lab's own work (Python around the ring, the
interrupt and the checks); a device in C would mostly not pay it. docs/BENCHMARKS.md
says where it goes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from device.virtio.discard import ResidentPages
from device.virtio.layout import GuestLayout

ROUND_TRIPS = 5000          # ~0.1 s here (the hot round trip is 8-20 us)
HELD_ROUND_TRIPS = 100      # ~0.1 s here (each holds one PFN request's discards, ~1 ms)
HOLD_REPEATS = 5
TRANSLATE_REPEATS = 2000
PFNS_PER_REQUEST = 256      # the PFN protocol's request (Linux's VIRTIO_BALLOON_ARRAY_PFNS_MAX)


class FloorError(RuntimeError):
    """The peer process failed: no floor was measured."""


def serve(kick_fd: int, call_fd: int, round_trips: int, hold_ns: int = 0) -> None:
    """The device's side of the ping-pong: each kick answered with a call, `hold_ns`
    after it was read (busy, as a device in madvise is)."""
    import select
    ep = select.epoll()
    ep.register(kick_fd, select.EPOLLIN)
    write, read, poll, now = os.eventfd_write, os.eventfd_read, ep.poll, time.perf_counter_ns
    for _ in range(round_trips):
        poll()
        read(kick_fd)
        if hold_ns:
            end = now() + hold_ns
            while now() < end:
                pass
        write(call_fd, 1)
    ep.close()


def discard_hold_ns(pages: int = PFNS_PER_REQUEST, repeats: int = HOLD_REPEATS) -> int:
    """A PFN request's discards, bare: `pages` single-page madvise(MADV_REMOVE) of
    resident pages of a memfd, timed in this process (median of `repeats`; the pages are
    made resident before each, outside the timing)."""
    times = []
    with ResidentPages(pages, "ring-floor-hold") as rp:
        for _ in range(repeats):
            rp.populate()
            t0 = time.perf_counter_ns()
            rp.discard_each()
            times.append(time.perf_counter_ns() - t0)
    return int(sorted(times)[len(times) // 2])


def round_trip_floor(round_trips: int = ROUND_TRIPS, warm_up: int = 200, timeout_s: float = 60.0,
                     hold_ns: int = 0) -> dict:
    """Ping-pong with a guest-kind peer process; its timing of the round trips, less the
    hold (when this side holds each request)."""
    kick, call = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)
    try:
        peer = subprocess.Popen([sys.executable, "-m", "device.guest.ring_peer", "--kick-fd", str(kick),
                                 "--call-fd", str(call), "--round-trips", str(round_trips),
                                 "--warm-up", str(warm_up), "--less-ns", str(hold_ns)],
                                pass_fds=(kick, call), stdout=subprocess.PIPE)
        try:
            serve(kick, call, warm_up + round_trips, hold_ns)
            out, _ = peer.communicate(timeout=timeout_s)
        finally:
            if peer.poll() is None:
                peer.kill()
                peer.wait()
    finally:
        os.close(kick)
        os.close(call)
    if peer.returncode != 0:
        raise FloorError(f"the ring-floor peer exited with status {peer.returncode}")
    return json.loads(out)


def translate_floor(guest_mib: int, repeats: int = TRANSLATE_REPEATS, seed: int = 0) -> dict:
    """Median ns of the least translation of a request's PFNs: the sort that finds its
    span, and the span's translation (GuestLayout.translate_pfn_span), for requests
    inside one RAM region, as the device translates them (warm, back to back)."""
    layout = GuestLayout.pc(guest_mib)
    rng = np.random.default_rng(seed)
    sizes = np.array([r.end_pfn - r.first_pfn for r in layout.regions], dtype=np.float64)
    regions = [layout.regions[i] for i in rng.choice(len(sizes), 64, p=sizes / sizes.sum())]
    requests = [rng.integers(r.first_pfn, r.end_pfn, PFNS_PER_REQUEST, dtype=np.int64) for r in regions]
    times = np.empty(repeats, dtype=np.int64)
    now, span = time.perf_counter_ns, layout.translate_pfn_span
    for k in range(repeats):
        pfns = requests[k % len(requests)]
        t0 = now()
        span(pfns)
        times[k] = now() - t0
    return {"pfns": PFNS_PER_REQUEST, "repeats": repeats, "median_ns": float(np.median(times))}


def measure(round_trips: int = ROUND_TRIPS, guest_mib: int = 2048, held_round_trips: int = HELD_ROUND_TRIPS) -> dict:
    """The floors, as `balloon-lab` stores them with a trial (TrialResult.floors)."""
    rt = round_trip_floor(round_trips)
    hold = discard_hold_ns()
    held = round_trip_floor(held_round_trips, warm_up=5, hold_ns=hold)
    tr = translate_floor(guest_mib)
    return {"round_trip_ns": rt["mean_ns"], "round_trip_median_ns": rt["median_ns"],
            "round_trips": rt["round_trips"], "held_round_trip_ns": held["mean_ns"],
            "held_round_trip_median_ns": held["median_ns"], "held_round_trips": held["round_trips"],
            "hold_ns": hold, "translate_ns": tr["median_ns"], "translate_pfns": tr["pfns"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="device.vmm.ring_floor", description=__doc__.splitlines()[0])
    p.add_argument("--round-trips", type=int, default=ROUND_TRIPS)
    p.add_argument("--held-round-trips", type=int, default=HELD_ROUND_TRIPS)
    p.add_argument("--guest-mib", type=int, default=2048, help="the guest whose region table translates")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    if a.round_trips < 1 or a.held_round_trips < 1:
        p.error("--round-trips and --held-round-trips must be at least 1")
    try:
        GuestLayout.pc(a.guest_mib)
    except ValueError as e:
        p.error(f"--guest-mib: {e}")
    try:
        r = measure(a.round_trips, a.guest_mib, a.held_round_trips)
    except FloorError as e:
        print(f"ring_floor: {e}", file=sys.stderr)
        return 1
    if a.json:
        print(json.dumps(r))
    else:
        print(f"ring round trip, hot (eventfd ping-pong, epoll, {r['round_trips']} round trips): "
              f"{r['round_trip_ns'] / 1e3:.1f} us mean, {r['round_trip_median_ns'] / 1e3:.1f} us median")
        print(f"ring round trip, held (the device holds each request {r['hold_ns'] / 1e3:.0f} us, as "
              f"{PFNS_PER_REQUEST} single-page discards take; {r['held_round_trips']} round trips, hold "
              f"excluded): {r['held_round_trip_ns'] / 1e3:.1f} us mean, {r['held_round_trip_median_ns'] / 1e3:.1f} us "
              f"median")
        print(f"translate of {r['translate_pfns']} PFNs (the sort that finds their span and its translation): "
              f"{r['translate_ns'] / 1e3:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
