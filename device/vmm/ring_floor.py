"""The ring's floor on this machine: what the lab's own machinery cannot go below.

    python -m device.vmm.ring_floor [--round-trips N] [--guest-mib M] [--json]

Two figures, measured now, in the processes the lab runs (this one is the VMM's kind,
the peer it spawns the guest's: `python -m device.guest.ring_peer`, same interpreter,
the eventfds passed down as the VMM passes the kick and call eventfds):

  round trip   an eventfd ping-pong between the two: the guest writes the kick eventfd
               and sleeps in epoll on the call eventfd; this side sleeps in epoll on
               the kick eventfd, reads it and writes the call eventfd. Nothing else:
               no ring, no request, no device work. One request of the PFN protocol
               needs one such round trip at least (the guest waits for each request,
               as Linux's tell_host does), so its transmit stage per request is
               compared with this (`balloon-lab run`, `compare`, `show`, the report,
               `bench pfn-madvise`).
  translate    one numpy pass of the region table over one request's 256 PFNs
               (GuestLayout.translate_pfns), the least the device's translate stage
               does per PFN request in Python.

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

from device.virtio.layout import GuestLayout

ROUND_TRIPS = 5000          # ~0.2 s here; the round trip is ~40 us on a quiet machine
TRANSLATE_REPEATS = 2000
PFNS_PER_REQUEST = 256      # the PFN protocol's request (Linux's VIRTIO_BALLOON_ARRAY_PFNS_MAX)


class FloorError(RuntimeError):
    """The peer process failed: no floor was measured."""


def serve(kick_fd: int, call_fd: int, round_trips: int) -> None:
    """The device's side of the ping-pong: each kick answered with a call."""
    import select
    ep = select.epoll()
    ep.register(kick_fd, select.EPOLLIN)
    write, read, poll = os.eventfd_write, os.eventfd_read, ep.poll
    for _ in range(round_trips):
        poll()
        read(kick_fd)
        write(call_fd, 1)
    ep.close()


def round_trip_floor(round_trips: int = ROUND_TRIPS, warm_up: int = 200, timeout_s: float = 60.0) -> dict:
    """Ping-pong with a guest-kind peer process; its timing of the round trips."""
    kick, call = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)
    try:
        peer = subprocess.Popen([sys.executable, "-m", "device.guest.ring_peer", "--kick-fd", str(kick),
                                 "--call-fd", str(call), "--round-trips", str(round_trips),
                                 "--warm-up", str(warm_up)], pass_fds=(kick, call), stdout=subprocess.PIPE)
        try:
            serve(kick, call, warm_up + round_trips)
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
    """Median ns of one numpy pass of the region table over a request's PFNs."""
    layout = GuestLayout.pc(guest_mib)
    ram_pfns = np.concatenate([np.arange(r.first_pfn, r.end_pfn, dtype=np.int64) for r in layout.regions])
    requests = np.random.default_rng(seed).choice(ram_pfns, (64, PFNS_PER_REQUEST))
    times = np.empty(repeats, dtype=np.int64)
    now, translate = time.perf_counter_ns, layout.translate_pfns
    for k in range(repeats):
        pfns = requests[k % len(requests)]
        t0 = now()
        translate(pfns)
        times[k] = now() - t0
    return {"pfns": PFNS_PER_REQUEST, "repeats": repeats, "median_ns": float(np.median(times))}


def measure(round_trips: int = ROUND_TRIPS, guest_mib: int = 2048) -> dict:
    """Both floors, as `balloon-lab` stores them with a trial (TrialResult.floors)."""
    rt = round_trip_floor(round_trips)
    tr = translate_floor(guest_mib)
    return {"round_trip_ns": rt["mean_ns"], "round_trip_median_ns": rt["median_ns"],
            "round_trips": rt["round_trips"], "translate_ns": tr["median_ns"], "translate_pfns": tr["pfns"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="device.vmm.ring_floor", description=__doc__.splitlines()[0])
    p.add_argument("--round-trips", type=int, default=ROUND_TRIPS)
    p.add_argument("--guest-mib", type=int, default=2048, help="the guest whose region table translates")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    if a.round_trips < 1:
        p.error("--round-trips must be at least 1")
    try:
        GuestLayout.pc(a.guest_mib)
    except ValueError as e:
        p.error(f"--guest-mib: {e}")
    try:
        r = measure(a.round_trips, a.guest_mib)
    except FloorError as e:
        print(f"ring_floor: {e}", file=sys.stderr)
        return 1
    if a.json:
        print(json.dumps(r))
    else:
        print(f"ring round trip (eventfd ping-pong, epoll, {r['round_trips']} round trips): "
              f"{r['round_trip_ns'] / 1e3:.1f} us mean, {r['round_trip_median_ns'] / 1e3:.1f} us median")
        print(f"translate of {r['translate_pfns']} PFNs (one numpy pass of the region table): "
              f"{r['translate_ns'] / 1e3:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
