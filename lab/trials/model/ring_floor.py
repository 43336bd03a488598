"""The ring's floor, measured for a trial: `python -m device.vmm.ring_floor` in a process.

The lab starts the floor's processes as it starts the VMM (by module name, with this
interpreter), so it imports nothing of the device for it; the figures it returns are
stored with the trial (TrialResult.floors) and read by lab/results/ring_cost.py.
"""
from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

FLOOR_TIMEOUT_S = 120.0


class FloorFailed(RuntimeError):
    """The floor could not be measured (its processes failed)."""


def measure_floors(guest_mib: int) -> dict[str, Any]:
    """The ring's floor now, in processes of the lab's two kinds (device/vmm/ring_floor.py)."""
    cmd = [sys.executable, "-m", "device.vmm.ring_floor", "--json", "--guest-mib", str(guest_mib)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=FLOOR_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise FloorFailed(f"measuring the ring's floor took over {FLOOR_TIMEOUT_S:g} s") from e
    if p.returncode != 0:
        raise FloorFailed(f"measuring the ring's floor failed (status {p.returncode}): {p.stderr.strip()[-500:]}")
    return json.loads(p.stdout)
