"""The guest's half of the ring's floor (device/vmm/ring_floor.py): a bare round trip.

    python -m device.guest.ring_peer --kick-fd K --call-fd C --round-trips N --warm-up W

Spawned by device/vmm/ring_floor.py as the VMM spawns the guest (same interpreter,
the two eventfds passed down). Each round trip is what one request of the balloon
driver needs at the very least, with nothing else: write the kick eventfd, sleep in
epoll until the call eventfd is readable, read it. The peer answers each kick with
epoll, a read and a write. The guest times the round trips, as it times a request's
transmit stage, and prints one JSON line: the mean and the median ns per round trip
after the warm-up.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import sys
import time


def ping(kick_fd: int, call_fd: int, round_trips: int, warm_up: int, less_ns: int = 0) -> dict:
    """Round trips from this side; returns their mean and median ns (after `warm_up`),
    each less `less_ns` (the time the other side holds a request, when it does)."""
    ep = select.epoll()
    ep.register(call_fd, select.EPOLLIN)
    write, read, poll, now = os.eventfd_write, os.eventfd_read, ep.poll, time.perf_counter_ns
    for _ in range(warm_up):
        write(kick_fd, 1)
        poll()
        read(call_fd)
    times = [0] * round_trips
    t_start = now()
    for k in range(round_trips):
        t0 = now()
        write(kick_fd, 1)
        poll()
        read(call_fd)
        times[k] = now() - t0
    total = now() - t_start
    times.sort()
    return {"round_trips": round_trips, "mean_ns": total / round_trips - less_ns,
            "median_ns": times[round_trips // 2] - less_ns}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="device.guest.ring_peer", description=__doc__.splitlines()[0])
    p.add_argument("--kick-fd", type=int, required=True)
    p.add_argument("--call-fd", type=int, required=True)
    p.add_argument("--round-trips", type=int, required=True)
    p.add_argument("--warm-up", type=int, default=200)
    p.add_argument("--less-ns", type=int, default=0, help="the other side's hold per request, taken off each")
    a = p.parse_args(argv)
    print(json.dumps(ping(a.kick_fd, a.call_fd, a.round_trips, a.warm_up, a.less_ns)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
