"""The ring's floor (device/vmm/ring_floor.py) in real processes, and the lab's own cost
against it (lab/results/ring_cost.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lab.results.ring_cost import lab_cost, round_trip_floor

ROOT = Path(__file__).resolve().parents[1]


def test_floor_measures_hot_and_held_round_trips_in_two_processes():
    out = subprocess.run([sys.executable, "-m", "device.vmm.ring_floor", "--json", "--round-trips", "500",
                          "--held-round-trips", "20", "--guest-mib", "512"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    f = json.loads(out.stdout)
    assert f["round_trips"] == 500 and f["held_round_trips"] == 20 and f["translate_pfns"] == 256
    # the hold is 256 real single-page discards: at least a microsecond each on any machine
    assert f["hold_ns"] > 256_000
    # the held round trip is the guest's time less the hold the device spun: a wake-up is left
    assert 0 < f["held_round_trip_ns"] < f["hold_ns"]
    assert 0 < f["round_trip_ns"] and 0 < f["translate_ns"]


def test_floor_refuses_a_count_of_no_round_trips():
    out = subprocess.run([sys.executable, "-m", "device.vmm.ring_floor", "--held-round-trips", "0"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 2 and "at least 1" in out.stderr


def test_transmit_is_held_to_the_held_floor_and_older_trials_to_the_hot_one():
    stages = {"transmit": 100_000_000, "translate": 40_000_000, "total": 2_000_000_000}
    floors = {"round_trip_ns": 10_000.0, "held_round_trip_ns": 50_000.0, "translate_ns": 5_000.0}
    c = lab_cost(stages, 1000, floors)
    assert round_trip_floor(floors.get) == 50_000.0
    assert c["transmit_over_floor"] == pytest.approx(2.0) and c["transmit_over_hot_floor"] == pytest.approx(10.0)
    assert c["own_ns"] == pytest.approx((100e6 - 50e6) + (40e6 - 5e6))
    old = {k: v for k, v in floors.items() if k != "held_round_trip_ns"}
    assert lab_cost(stages, 1000, old)["transmit_over_floor"] == pytest.approx(10.0)


@pytest.mark.slow
def test_bench_pfn_madvise_states_the_ratio_a_device_at_the_floor_would_reach():
    """`bench pfn-madvise`, small and real: beside the inflate's ratio to the bare loop it
    states what a device at the ring's floor would reach in the same run (the discard stage
    and one held round trip per request, over the bare loop), from the figures it measured."""
    out = subprocess.run([str(ROOT / ".venv" / "bin" / "balloon-lab"), "bench", "pfn-madvise",
                          "--guest-mib", "256", "--inflate-mib", "32", "--no-real-stack", "--json"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    held = r["floors"]["held_round_trip_ns"]
    assert r["requests"] == 32 and held > 0 and r["bare_loop_pages"] == r["pages"] == 32 * 256
    assert r["at_floor_ns"] == pytest.approx(r["inflate_discard_ns"] + r["requests"] * held)
    assert r["ratio_at_floor"] == pytest.approx(r["at_floor_ns"] / r["bare_loop_ns"])
    # the inflate pays at least its discard stage
    assert r["inflate_total_ns"] > r["inflate_discard_ns"] > 0
