"""One trial of an arm under an ExperimentSpec, on the arm's backend: lab.trials.experiment's
trial function. The one dispatch point arm -> backend (lab/trials/backends.py says
which): the lab's model (lab/trials/model/) or the real stack (lab/trials/qemu/).
"""
from __future__ import annotations

from lab.trials import twins
from lab.trials.backends import is_qemu_arm
from lab.trials.model.balloon_trial import BalloonTrial
from lab.trials.model.runner import run_balloon


def run_trial(spec, arm: str, probe_session=None, rnd: int = 0) -> dict:
    """lab.trials.experiment's trial function: one balloon trial of `arm` under an ExperimentSpec.

    Round `rnd` uses seed spec.seed + rnd (every arm of a round sees the same guest
    layout, rounds differ). With probes on and spec.twins, the trial is a twin pair
    (lab.trials.twins): timings from an unprobed twin, counts from the probed one. A trial
    of an arm scheduled without probes runs with every BPF program detached."""
    if spec.kind != "balloon":
        raise ValueError(f"run_trial runs balloon experiments, not {spec.kind!r}")
    if is_qemu_arm(arm):                  # the one dispatch point: arm -> backend
        from lab.trials.qemu.trial import run_qemu_trial

        def run_one(session):
            return run_qemu_trial(spec, arm, session)
    else:
        t = BalloonTrial.from_spec(spec, arm, rnd)

        def run_one(session):
            return run_balloon(t, session)
    active = probe_session is not None and getattr(probe_session, "active", False)
    if not spec.probes:
        with twins.probes_detached(probe_session):
            return run_one(None)
    if active and getattr(spec, "twins", False):
        return twins.run_twins(run_one, probe_session, rnd)
    return run_one(probe_session)

def trial_fn(probe_session=None):
    """run_experiment's trial function for balloon specs, with this probe session."""
    return lambda spec, arm, rnd: run_trial(spec, arm, probe_session, rnd)
