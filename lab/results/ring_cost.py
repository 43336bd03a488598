"""The lab's own cost of each arm, against the ring's floor measured with the trial.

A Python device and driver pay for their own machinery on every request: the ring
work around the kick and the interrupt, the checks, the translation in Python. A
device written in C would mostly not pay it, so a ratio between arms that send very
different numbers of requests (pfn: 1792 for 1792 MiB, bitmap: 3) is flattered by it.
Each trial therefore measures the floor first (lab/trials/model/ring_floor.py runs
`python -m device.vmm.ring_floor`: an eventfd round trip between a VMM-kind and a
guest-kind process, hot (back to back) and held (the device side holding each request
as long as a PFN request's discards take, so the guest's CPU goes idle as it does in a
real request), and the least translation of a request's 256 PFNs: the sort that finds
their span and the span's translation) and
states, per operation:

  transmit_per_request_ns   the transmit stage over the requests sent
  transmit_over_floor       that, in held round-trip floors (in hot ones for trials
                            stored before the held floor was measured)
  transmit_over_hot_floor   that, in hot round-trip floors
  translate_per_request_ns  the translate stage over the requests
  translate_over_floor      that, in translate floors
  own_ns                    transmit and translate above requests x their floors:
                            what the lab itself spent
  own_share                 own_ns over the operation's total

`balloon-lab run`, `compare`, `show` and the report print these (docs/BENCHMARKS.md).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from device.api import COUNTER, GAUGE, TIMING, Metric

FLOOR_METRICS = [
    Metric("floors.round_trip_ns", TIMING, "ns", "the ring's floor before the trial: one eventfd round trip "
                                                 "between a VMM-kind and a guest-kind process, epoll both sides, mean"),
    Metric("floors.round_trip_median_ns", TIMING, "ns", "the same round trips' median"),
    Metric("floors.round_trips", COUNTER, "", "round trips the floor was measured over"),
    Metric("floors.held_round_trip_ns", TIMING, "ns", "the held floor: the same round trip with the device side "
                                                      "holding each request floors.hold_ns (busy), less the hold, "
                                                      "mean: what a request's round trip costs when the guest's CPU "
                                                      "idles meanwhile"),
    Metric("floors.held_round_trip_median_ns", TIMING, "ns", "the held round trips' median"),
    Metric("floors.held_round_trips", COUNTER, "", "held round trips the floor was measured over"),
    Metric("floors.hold_ns", TIMING, "ns", "the held floor's hold: 256 single-page madvise(MADV_REMOVE) of "
                                           "resident memfd pages, timed bare before (median of 5)"),
    Metric("floors.translate_ns", TIMING, "ns", "the translate floor: the least translation of a request's PFNs "
                                                "(the sort that finds their span, and the span's translation: "
                                                "device/vmm/ring_floor.py), median"),
    Metric("floors.translate_pfns", COUNTER, "", "PFNs in the translate floor's request"),
    Metric("lab_cost.*.transmit_per_request_ns", TIMING, "ns", "transmit stage per request sent"),
    Metric("lab_cost.*.transmit_over_floor", GAUGE, "", "transmit per request in held round-trip floors"),
    Metric("lab_cost.*.transmit_over_hot_floor", GAUGE, "", "transmit per request in hot round-trip floors"),
    Metric("lab_cost.*.translate_per_request_ns", TIMING, "ns", "translate stage per request"),
    Metric("lab_cost.*.translate_over_floor", GAUGE, "", "translate per request in translate floors"),
    Metric("lab_cost.*.own_ns", TIMING, "ns", "transmit and translate above requests x their floors: the "
                                              "lab's own cost"),
    Metric("lab_cost.*.own_share", GAUGE, "", "the lab's own cost over the operation's total"),
]


ROUND_TRIP_FLOORS = ("held_round_trip_ns", "round_trip_ns")


def round_trip_floor(get: Callable[[str], Any]) -> Any:
    """The round trip a request's transmit is held to, by `get(name)` of each floor's
    name under `floors.` (a trial's floors dict's .get, or a median over trials): the
    held floor, or for trials stored before it was measured, the hot one."""
    for name in ROUND_TRIP_FLOORS:
        v = get(name)
        if v:
            return v
    return None


def lab_cost(stages_ns: Mapping[str, int], requests: int, floors: Mapping[str, float]) -> dict[str, float]:
    """One operation's own cost against the floors (the module doc names each figure)."""
    if not requests or not floors:
        return {}
    rt, tr = round_trip_floor(floors.get), floors["translate_ns"]
    transmit, translate = stages_ns["transmit"], stages_ns["translate"]
    own = max(0.0, transmit - requests * rt) + max(0.0, translate - requests * tr)
    return {"transmit_per_request_ns": transmit / requests, "transmit_over_floor": transmit / requests / rt,
            "transmit_over_hot_floor": transmit / requests / floors["round_trip_ns"],
            "translate_per_request_ns": translate / requests, "translate_over_floor": translate / requests / tr,
            "own_ns": own, "own_share": own / stages_ns["total"] if stages_ns["total"] else 0.0}


def lab_cost_table(comp, op: str = "inflate") -> str:
    """Per arm (medians): transmit and translate per request against their floors, and
    the lab's own share of the operation. Empty when no trial measured a floor."""
    rows = []
    for arm in comp.arms:
        m = {k: comp.summary(arm, f"lab_cost.{op}.{k}") for k in ("transmit_per_request_ns", "transmit_over_floor",
                                                                   "translate_per_request_ns", "translate_over_floor",
                                                                   "own_ns", "own_share")}
        rt = round_trip_floor(lambda name: comp.summary(arm, f"floors.{name}"))
        tr, req = (comp.summary(arm, "floors.translate_ns"),
                   comp.summary(arm, "requests" if op == "inflate" else "deflate.requests"))
        if any(v is None for v in (*m.values(), rt, tr, req)):
            continue
        rows.append(f"{arm:<14}{req.median:9.0f}{m['transmit_per_request_ns'].median / 1e3:11.1f}"
                    f"{rt.median / 1e3:9.1f}{m['transmit_over_floor'].median:8.2f}x"
                    f"{m['translate_per_request_ns'].median / 1e3:11.1f}{tr.median / 1e3:9.1f}"
                    f"{m['translate_over_floor'].median:8.2f}x{m['own_ns'].median / 1e6:10.1f}"
                    f"{100 * m['own_share'].median:8.1f}%")
    if not rows:
        return ""
    head = (f"{'arm':<14}{'requests':>9}{'transmit':>11}{'floor':>9}{'':>9}{'translate':>11}{'floor':>9}{'':>9}"
            f"{'own ms':>10}{'share':>9}")
    return "\n".join([f"{op}: the lab's own cost against the ring's floor (medians; us per request; floors "
                      "measured with each trial;",
                      "    the round trip held: the device side holds each request as long as a PFN request's "
                      "discards take):", head, *rows])
