"""The targets: each one's generator, mutator and runner, and one worker's state for them.

`balloon-lab fuzz --target FAMILY` draws its cases from the targets of one family
(FAMILIES), with their weights:
  rings      device (fuzz/device_target.py), ring (the ring walker alone), pfn / bitmap /
             chunks (the decoders, fuzz/decoder_target.py), report (the free page
             reporting queue, fuzz/formats_target.py);
  control    message sequences on the control socket (fuzz/control_target.py);
  migration  a guest turning hostile during a live migration (fuzz/migration_target.py);
  all        every target above.
Every target runs its device work on the VMM's own event-loop code with the real
per-wake-up budget, and every wake-up is held to the 50 ms CPU bound (fuzz/wakeups.py).
"""
from __future__ import annotations

import random
from typing import Callable

from fuzz import control_cases, control_target, formats_target, migration_target
from fuzz.cases import Outcome
from device.virtio.protocols import WIRE_FORMAT_NAMES
from fuzz.decoder_target import run_decoder
from fuzz.device_target import DeviceTarget
from fuzz.generators import gen_bitmap, gen_chunks, gen_device, gen_pfn, gen_ring
from fuzz.mutators import mutate_decoder, mutate_device

# one decoder target per wire format of the protocols table (each with its own generator below)
TARGETS = ("device", "ring", *WIRE_FORMAT_NAMES, "report")
WEIGHTS = (0.40, 0.15, 0.10, 0.15, 0.12, 0.08)       # report: fuzz/formats_target.py
GENERATORS: dict[str, Callable[[random.Random], dict]] = {
    "device": gen_device, "ring": gen_ring, "pfn": gen_pfn, "bitmap": gen_bitmap, "chunks": gen_chunks,
    "report": formats_target.gen_report}
MUTATORS = {"device": mutate_device, "ring": mutate_device, "pfn": mutate_decoder, "bitmap": mutate_decoder,
            "chunks": mutate_decoder, "report": formats_target.mutate_report}
# The control plane and a hostile guest during migration (fuzz/control_target.py, fuzz/migration_target.py)
GENERATORS.update(control=control_cases.gen_control, migration=migration_target.gen_migration)
MUTATORS.update(control=control_cases.mutate_control, migration=migration_target.mutate_migration)
_UNSERVED = [t for t in TARGETS if t not in GENERATORS or t not in MUTATORS]
if _UNSERVED:   # a new wire format in device/virtio/protocols.py needs its own generator here
    raise ImportError(f"fuzz targets without a generator or a mutator: {', '.join(_UNSERVED)}")
# `balloon-lab fuzz --target`: which targets a run draws from, with their weights
FAMILIES = {"rings": (TARGETS, WEIGHTS), "control": (("control",), (1.0,)),
            "migration": (("migration",), (1.0,)), "control+migration": (("control", "migration"), (0.5, 0.5)),
            # every target: the rings family's mix for 70 % of the execs, control and migration 15 % each
            "all": (TARGETS + ("control", "migration"), tuple(0.7 * w for w in WEIGHTS) + (0.15, 0.15))}


class WorkerState:
    """One worker process's reusable pieces for every target (made when first needed),
    and its counts of volatile execs and timing retries."""

    def __init__(self) -> None:
        self.devices = DeviceTarget()
        self.control: control_target.ControlWorkerState | None = None
        self.report: formats_target.ReportTarget | None = None
        self._control_volatile = 0

    @property
    def volatile(self) -> int:
        """Execs whose oracle had to allow every page (device and control targets)."""
        control = self.control.volatile if self.control is not None else 0
        return self.devices.volatile + self._control_volatile + control

    def control_state(self) -> control_target.ControlWorkerState:
        """The small sealed guest RAM of the control-plane and migration targets."""
        if self.control is None:
            self.control = control_target.ControlWorkerState()
        return self.control

    def close(self) -> None:
        self.devices.close()
        if self.control is not None:
            self._control_volatile += self.control.volatile
            self.control.close()
            self.control = None
        if self.report is not None:
            self.report.close()
            self.report = None


def execute(state: WorkerState, case: dict, limit_s: float) -> Outcome:
    """Run one case on its target."""
    t = case["t"]
    if t not in ("control", "migration") and state.control is not None:
        state.control.fds = None        # other targets open fds of their own: a new baseline
    if t == "device":
        return state.devices.run_device(case, limit_s)
    if t == "ring":
        return state.devices.run_ring(case, limit_s)
    if t == "report":
        if state.report is None:
            state.report = formats_target.ReportTarget()
        return formats_target.run_report(state.report, case, limit_s)
    if t in ("control", "migration"):
        run = control_target.run_control if t == "control" else migration_target.run_migration
        failure, detail, sig = run(state.control_state(), case, limit_s)
        return Outcome(sig, failure, detail)
    return run_decoder(case, limit_s)
